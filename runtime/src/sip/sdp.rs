//! SDP offer/answer for telephone audio (RFC 3264): Opus (RFC 7587) when offered, else G.711
//! (PCMU or PCMA, in the offerer's order of preference), and RFC 4733 telephone-event. Offers are
//! parsed with webrtc-rs's `sdp` crate; ours are a handful of fixed lines, written out.
//!
//! Opus is chosen over G.711 whatever the offerer's order: wideband speech is what the
//! recognizer was trained on, and narrowband G.711 costs it words (tiny.en hears "Is my
//! hemoglobin normal?" at 8 kHz as "It's my ego in normal").

use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};

use webrtc::sdp::description::media::MediaDescription;
use webrtc::sdp::SessionDescription;

use super::g711::Law;

/// The RTP clock of G.711.
pub const CLOCK_RATE: u32 = 8_000;
/// The RTP clock of Opus, whatever rate it is coded at (RFC 7587 section 4.1).
pub const OPUS_CLOCK_RATE: u32 = 48_000;

/// The call's audio codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    G711(Law),
    /// Opus with the peer's payload type, coded here at 16 kHz mono.
    Opus {
        payload_type: u8,
    },
}

impl Codec {
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::G711(law) => law.payload_type(),
            Codec::Opus { payload_type } => payload_type,
        }
    }

    /// The RTP timestamp clock.
    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::G711(_) => CLOCK_RATE,
            Codec::Opus { .. } => OPUS_CLOCK_RATE,
        }
    }

    /// The rate of the audio the codec carries here: 8 kHz G.711, wideband (16 kHz) Opus, the
    /// rate the recognizer works at, so nothing is resampled on the way in.
    pub fn audio_rate(self) -> u32 {
        match self {
            Codec::G711(_) => CLOCK_RATE,
            Codec::Opus { .. } => 16_000,
        }
    }

    fn is_opus(self) -> bool {
        matches!(self, Codec::Opus { .. })
    }
}
/// The payload type we offer for telephone-event (the conventional one).
pub const OFFERED_DTMF_PT: u8 = 101;

/// Which way media flows, from the point of view of the side that wrote the description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    /// The direction an answer takes to an offer in this direction.
    pub fn answer(self) -> Direction {
        match self {
            Direction::SendRecv => Direction::SendRecv,
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            Direction::Inactive => Direction::Inactive,
        }
    }

    fn attribute(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }
}

/// What the other side's description settles for this call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMedia {
    /// Where the peer says it receives RTP (symmetric RTP may correct it).
    pub rtp: SocketAddr,
    pub codec: Codec,
    /// The telephone-event payload type and its clock, when the peer supports it.
    pub dtmf: Option<(u8, u32)>,
    /// The peer's direction.
    pub direction: Direction,
}

impl RemoteMedia {
    /// Whether we may send audio: the peer receives, and has not put the call on hold with the
    /// old-style 0.0.0.0 address (RFC 2543).
    pub fn peer_receives(&self) -> bool {
        matches!(self.direction, Direction::SendRecv | Direction::RecvOnly)
            && !self.rtp.ip().is_unspecified()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    #[error("the SDP does not parse: {0}")]
    Unparseable(String),
    #[error("no audio stream with a port and an address")]
    NoAudio,
    #[error("no common codec (Opus, or PCMU or PCMA at 8000 Hz)")]
    NoCommonCodec,
}

/// Reads the peer's offer (or answer) and picks the codec: Opus when offered, else the first
/// G.711 law.
pub fn negotiate(sdp: &[u8]) -> Result<RemoteMedia, SdpError> {
    negotiate_keeping(sdp, None)
}

/// As [`negotiate`], but keeps Opus or G.711 as `current` is (a re-INVITE mid-call: the
/// session's audio rate was set by the first codec); an offer without it is refused.
pub fn negotiate_keeping(sdp: &[u8], current: Option<Codec>) -> Result<RemoteMedia, SdpError> {
    let description = SessionDescription::unmarshal(&mut Cursor::new(sdp))
        .map_err(|e| SdpError::Unparseable(e.to_string()))?;
    let audio = description
        .media_descriptions
        .iter()
        .find(|m| m.media_name.media == "audio" && m.media_name.port.value > 0)
        .ok_or(SdpError::NoAudio)?;
    let address = audio
        .connection_information
        .as_ref()
        .or(description.connection_information.as_ref())
        .and_then(|c| c.address.as_ref())
        .and_then(|a| a.address.parse::<IpAddr>().ok())
        .ok_or(SdpError::NoAudio)?;
    let port = u16::try_from(audio.media_name.port.value).map_err(|_| SdpError::NoAudio)?;
    let formats: Vec<u8> = audio
        .media_name
        .formats
        .iter()
        .filter_map(|f| f.parse::<u8>().ok())
        .collect();
    let opus = formats
        .iter()
        .find(|&&pt| is_opus(audio, pt))
        .map(|&payload_type| Codec::Opus { payload_type });
    let g711 = formats
        .iter()
        .find_map(|&pt| law_of(audio, pt))
        .map(Codec::G711);
    let codec = match current {
        None => opus.or(g711),
        Some(current) if current.is_opus() => opus,
        Some(_) => g711,
    }
    .ok_or(SdpError::NoCommonCodec)?;
    // Telephone events on the codec's own clock if offered (RFC 4733 section 2.1), else any.
    let events: Vec<(u8, u32)> = formats
        .iter()
        .filter_map(|&pt| {
            let encoding = encoding_of(audio, pt)?;
            let clock = encoding.strip_prefix("telephone-event/")?.parse().ok()?;
            Some((pt, clock))
        })
        .collect();
    let dtmf = events
        .iter()
        .find(|(_, clock)| *clock == codec.clock_rate())
        .or(events.first())
        .copied();
    let direction = direction_of(audio).or_else(|| session_direction(&description));
    Ok(RemoteMedia {
        rtp: SocketAddr::new(address, port),
        codec,
        dtmf,
        direction: direction.unwrap_or(Direction::SendRecv),
    })
}

/// The lower-cased `encoding/clock` an `a=rtpmap` gives this payload type.
fn encoding_of(media: &MediaDescription, pt: u8) -> Option<String> {
    media
        .attributes
        .iter()
        .filter(|a| a.key == "rtpmap")
        .filter_map(|a| a.value.as_deref())
        .find_map(|v| {
            let (number, encoding) = v.split_once(' ')?;
            (number.trim().parse::<u8>().ok()? == pt).then(|| encoding.trim().to_ascii_lowercase())
        })
}

fn is_opus(media: &MediaDescription, pt: u8) -> bool {
    // Opus is always `opus/48000/2` in SDP, whatever is sent (RFC 7587 section 7).
    encoding_of(media, pt).is_some_and(|e| e == "opus/48000/2" || e == "opus/48000")
}

fn law_of(media: &MediaDescription, pt: u8) -> Option<Law> {
    match encoding_of(media, pt).as_deref() {
        Some("pcmu/8000") | Some("pcmu/8000/1") => Some(Law::Mu),
        Some("pcma/8000") | Some("pcma/8000/1") => Some(Law::A),
        Some(_) => None,
        // Static payload types need no rtpmap (RFC 3551).
        None => match pt {
            0 => Some(Law::Mu),
            8 => Some(Law::A),
            _ => None,
        },
    }
}

fn direction_from(attributes: &[webrtc::sdp::description::common::Attribute]) -> Option<Direction> {
    attributes.iter().find_map(|a| match a.key.as_str() {
        "sendrecv" => Some(Direction::SendRecv),
        "sendonly" => Some(Direction::SendOnly),
        "recvonly" => Some(Direction::RecvOnly),
        "inactive" => Some(Direction::Inactive),
        _ => None,
    })
}

fn direction_of(media: &MediaDescription) -> Option<Direction> {
    direction_from(&media.attributes)
}

fn session_direction(description: &SessionDescription) -> Option<Direction> {
    direction_from(&description.attributes)
}

/// Our side of the call's media, as written into a description.
pub struct LocalMedia {
    pub ip: IpAddr,
    pub port: u16,
    /// Increases with every description of the same session (RFC 3264 section 8).
    pub version: u64,
    pub session_id: u64,
}

fn header(local: &LocalMedia) -> String {
    let family = if local.ip.is_ipv4() { "IP4" } else { "IP6" };
    format!(
        "v=0\r\no=talkline {id} {version} IN {family} {ip}\r\ns=talkline\r\nc=IN {family} {ip}\r\nt=0 0\r\n",
        id = local.session_id,
        version = local.version,
        ip = local.ip,
    )
}

/// The answer to `remote`'s offer: its codec, telephone-event if offered, the answering
/// direction.
pub fn answer(local: &LocalMedia, remote: &RemoteMedia) -> String {
    let codec = remote.codec;
    let pt = codec.payload_type();
    let mut sdp = header(local);
    let formats = match remote.dtmf {
        Some((dtmf, _)) => format!("{pt} {dtmf}"),
        None => pt.to_string(),
    };
    sdp += &format!("m=audio {} RTP/AVP {formats}\r\n", local.port);
    match codec {
        Codec::G711(law) => {
            sdp += &format!("a=rtpmap:{pt} {}/{CLOCK_RATE}\r\n", law.encoding_name());
        }
        Codec::Opus { .. } => sdp += &opus_lines(pt),
    }
    if let Some((dtmf, clock)) = remote.dtmf {
        sdp += &format!("a=rtpmap:{dtmf} telephone-event/{clock}\r\na=fmtp:{dtmf} 0-16\r\n");
    }
    sdp += "a=ptime:20\r\n";
    sdp += &format!("a={}\r\n", remote.direction.answer().attribute());
    sdp
}

/// `rtpmap` and `fmtp` of our Opus: mono wideband is all we send and all we want to receive
/// (the recognizer works at 16 kHz), with in-band FEC against loss.
fn opus_lines(pt: u8) -> String {
    format!(
        "a=rtpmap:{pt} opus/{OPUS_CLOCK_RATE}/2\r\n\
         a=fmtp:{pt} useinbandfec=1;stereo=0;sprop-stereo=0;maxplaybackrate=16000;sprop-maxcapturerate=16000\r\n"
    )
}

/// Our offer for an outbound call: PCMU, then PCMA, and telephone-event. Outbound calls go to
/// phones through the telephone network, whose codec is G.711; the call's audio rate is fixed
/// before the answer comes (media starts with the offer), so Opus is not offered.
pub fn offer(local: &LocalMedia) -> String {
    let mut sdp = header(local);
    sdp += &format!("m=audio {} RTP/AVP 0 8 {OFFERED_DTMF_PT}\r\n", local.port);
    sdp += "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n";
    sdp += &format!(
        "a=rtpmap:{OFFERED_DTMF_PT} telephone-event/8000\r\na=fmtp:{OFFERED_DTMF_PT} 0-16\r\n"
    );
    sdp += "a=ptime:20\r\na=sendrecv\r\n";
    sdp
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str =
        "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n\
        m=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n\
        a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n";

    fn local() -> LocalMedia {
        LocalMedia {
            ip: "127.0.0.1".parse().expect("literal address"),
            port: 30_000,
            version: 1,
            session_id: 7,
        }
    }

    #[test]
    fn the_offerers_first_g711_law_and_telephone_event_are_chosen() {
        let remote = negotiate(OFFER.as_bytes()).expect("a valid offer");
        assert_eq!(remote.codec, Codec::G711(Law::A));
        assert_eq!(remote.dtmf, Some((101, 8_000)));
        assert_eq!(remote.rtp, "192.0.2.10:40000".parse().expect("literal"));
        assert_eq!(remote.direction, Direction::SendRecv);
        let answer = answer(&local(), &remote);
        assert!(
            answer.contains("m=audio 30000 RTP/AVP 8 101\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:101 telephone-event/8000"));
        assert!(answer.contains("a=sendrecv"));
        // Our own answer parses back to the same choice.
        let back = negotiate(answer.as_bytes()).expect("our answer parses");
        assert_eq!(
            (back.codec, back.dtmf),
            (Codec::G711(Law::A), Some((101, 8_000)))
        );
    }

    #[test]
    fn static_pcmu_without_rtpmap_and_without_dtmf_is_accepted() {
        let offer = OFFER
            .replace("RTP/AVP 8 0 101", "RTP/AVP 0")
            .replace("a=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n", "");
        let remote = negotiate(offer.as_bytes()).expect("a valid offer");
        assert_eq!((remote.codec, remote.dtmf), (Codec::G711(Law::Mu), None));
        assert!(answer(&local(), &remote).contains("RTP/AVP 0\r\n"));
    }

    #[test]
    fn hold_offers_get_the_matching_answer_and_stop_our_audio() {
        let sendonly = format!("{OFFER}a=sendonly\r\n");
        let remote = negotiate(sendonly.as_bytes()).expect("a valid offer");
        assert_eq!(remote.direction, Direction::SendOnly);
        assert!(!remote.peer_receives());
        assert!(answer(&local(), &remote).contains("a=recvonly"));
        let inactive = format!("{OFFER}a=inactive\r\n");
        let remote = negotiate(inactive.as_bytes()).expect("a valid offer");
        assert!(answer(&local(), &remote).contains("a=inactive"));
        let old_style = OFFER.replace("c=IN IP4 192.0.2.10", "c=IN IP4 0.0.0.0");
        assert!(!negotiate(old_style.as_bytes())
            .expect("valid")
            .peer_receives());
    }

    #[test]
    fn opus_is_chosen_when_offered_with_events_on_its_clock() {
        let offer = OFFER
            .replace("RTP/AVP 8 0 101", "RTP/AVP 8 0 101 96 102")
            .replace(
            "a=fmtp:101 0-15\r\n",
            "a=fmtp:101 0-15\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:102 telephone-event/48000\r\n",
        );
        let remote = negotiate(offer.as_bytes()).expect("a valid offer");
        assert_eq!(remote.codec, Codec::Opus { payload_type: 96 });
        assert_eq!(remote.dtmf, Some((102, 48_000)));
        let answer = answer(&local(), &remote);
        assert!(
            answer.contains("m=audio 30000 RTP/AVP 96 102\r\n"),
            "{answer}"
        );
        assert!(answer.contains("a=rtpmap:96 opus/48000/2\r\n"), "{answer}");
        assert!(answer.contains("maxplaybackrate=16000"), "{answer}");
        assert!(
            answer.contains("a=rtpmap:102 telephone-event/48000\r\n"),
            "{answer}"
        );
        let back = negotiate(answer.as_bytes()).expect("our answer parses");
        assert_eq!(back.codec, Codec::Opus { payload_type: 96 });
        // A re-INVITE keeps the family the call started with.
        let kept = negotiate_keeping(offer.as_bytes(), Some(Codec::G711(Law::Mu)))
            .expect("G.711 is offered too");
        assert_eq!(kept.codec, Codec::G711(Law::A));
        assert_eq!(
            negotiate_keeping(OFFER.as_bytes(), Some(Codec::Opus { payload_type: 96 })),
            Err(SdpError::NoCommonCodec)
        );
    }

    #[test]
    fn offers_without_a_known_codec_or_audio_or_grammar_are_refused() {
        let speex_only = OFFER
            .replace("RTP/AVP 8 0 101", "RTP/AVP 97")
            .replace("a=rtpmap:8 PCMA/8000", "a=rtpmap:97 speex/16000");
        assert_eq!(
            negotiate(speex_only.as_bytes()),
            Err(SdpError::NoCommonCodec)
        );
        let video = OFFER.replace("m=audio", "m=video");
        assert_eq!(negotiate(video.as_bytes()), Err(SdpError::NoAudio));
        assert!(matches!(
            negotiate(b"this is not sdp"),
            Err(SdpError::Unparseable(_))
        ));
        assert!(negotiate(b"").is_err());
    }

    #[test]
    fn our_offer_lists_both_laws_and_dtmf() {
        let offer = offer(&local());
        let parsed = negotiate(offer.as_bytes()).expect("our offer parses");
        assert_eq!(parsed.codec, Codec::G711(Law::Mu));
        assert_eq!(parsed.dtmf, Some((101, 8_000)));
    }
}
