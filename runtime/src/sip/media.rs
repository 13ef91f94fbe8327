//! One call's media: an RTP socket, G.711 or Opus both ways, and the session between them.
//!
//! In: RTP -> jitter buffer (reorder, duplicates, late, loss -> G.711 silence or Opus
//! concealment) -> decode -> 16 kHz (G.711 is resampled from 8 kHz; Opus is decoded at 16 kHz)
//! -> the session. Out: the session's paced 20 ms frames at the codec's rate -> G.711 or Opus ->
//! RTP, to where the peer's RTP comes from once it has come (symmetric RTP), else to its SDP
//! address.
//! RFC 4733 telephone events become keys for the session's agent; no RTP for `media_timeout` ends
//! the call.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talkline_asr::audio::To16k;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::g711::Law;
use super::rtp::{self, DtmfDetector, RtpSender};
use super::sdp::{Codec, RemoteMedia};
use crate::jitter::{JitterBuffer, Playout};
use crate::session::{self, SessionOutput, Shared};

/// Telephone audio: G.711 at 8 kHz.
pub const RATE: u32 = 8_000;
/// 20 ms at 8 kHz: one G.711 RTP packet.
const FRAME_SAMPLES: usize = 160;
const FRAME: Duration = Duration::from_millis(20);
/// One Opus packet decodes to at most 120 ms; at 16 kHz, 1,920 samples.
const MAX_OPUS_FRAME: usize = 1_920;
/// 20 ms of Opus at 16 kHz ([`Codec::audio_rate`]): what one packet we send carries.
const OPUS_FRAME_SAMPLES: usize = 320;
/// How long a gap in the RTP sequence is waited for before it is concealed. Phones pace their
/// packets evenly; a packet more than three frames late is as good as lost for a conversation.
const JITTER_DELAY_S: f64 = 0.06;
/// Decoded audio waiting for the session, in 20 ms frames. Policy when full: drop the newest
/// frame and count it; the socket reader never blocks.
const INPUT_QUEUE: usize = 100;
/// Digits waiting for whoever consumes them. Policy when full: drop the digit and count it
/// (a caller does not type 32 digits ahead of the agent).
pub const DTMF_QUEUE: usize = 32;
/// Largest RTP datagram read; G.711 packets are 172 bytes.
const MAX_RTP: usize = 1_500;

/// Why a call's media ended on its own (the signalling then hangs up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEnd {
    /// The session finished (the agent's idle timeout, an error).
    SessionEnded,
    /// No RTP for the media timeout.
    Timeout,
    /// The call was hung up by signalling.
    Cancelled,
}

/// Asks the signalling to transfer the call to a human (the agent's reason); called from the
/// media task when the session reports its transfer, after the agent's last words played.
pub type TransferHook = Arc<dyn Fn(String) + Send + Sync>;

/// Where and how to send: the negotiated media, which re-INVITEs update.
pub type RemoteWatch = watch::Receiver<RemoteMedia>;

/// Runs the call until `cancel`, the session's end or the media timeout.
pub async fn run(
    socket: UdpSocket,
    remote: RemoteWatch,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    name: String,
    media_timeout: Duration,
    transfer: TransferHook,
) -> MediaEnd {
    let socket = Arc::new(socket);
    let latched: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let (input_tx, input_rx) = mpsc::channel::<Vec<f32>>(INPUT_QUEUE);
    let (output_tx, output_rx) = mpsc::channel::<SessionOutput>(session::OUTPUT_QUEUE);
    let tasks = TaskTracker::new();
    let session_cancel = cancel.child_token();
    // RFC 4733 keys go to the session's agent (a PIN, a menu choice); never to a log.
    let (dtmf, keys) = mpsc::channel::<char>(DTMF_QUEUE);
    // The call's audio rate is the first codec's; a re-INVITE keeps the codec family.
    let audio_rate = remote.borrow().codec.audio_rate();
    let session = tasks.spawn(session::run_with_keys(
        shared,
        audio_rate,
        input_rx,
        Some(keys),
        output_tx,
        session_cancel.clone(),
        name.clone(),
    ));
    let sender = tasks.spawn(send_agent_audio(
        socket.clone(),
        remote.clone(),
        latched.clone(),
        output_rx,
        transfer,
        session_cancel.clone(),
    ));
    let receiver = Receiver {
        socket,
        remote,
        latched,
        input: input_tx,
        dtmf,
        name: name.clone(),
    };
    let end = tokio::select! {
        _ = cancel.cancelled() => MediaEnd::Cancelled,
        timed_out = receiver.run(media_timeout, session_cancel.clone()) => {
            if timed_out { MediaEnd::Timeout } else { MediaEnd::Cancelled }
        }
        _ = session_cancel.cancelled() => MediaEnd::Cancelled,
        result = wait_session(session) => {
            if let Err(e) = result {
                tracing::info!(call = %name, "session ended: {e:#}");
            }
            MediaEnd::SessionEnded
        }
    };
    session_cancel.cancel();
    tasks.close();
    sender.abort();
    tasks.wait().await;
    end
}

async fn wait_session(session: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    session
        .await
        .map_err(|e| anyhow::anyhow!("session task failed: {e}"))?
}

struct Receiver {
    socket: Arc<UdpSocket>,
    remote: RemoteWatch,
    latched: Arc<Mutex<Option<SocketAddr>>>,
    input: mpsc::Sender<Vec<f32>>,
    dtmf: mpsc::Sender<char>,
    name: String,
}

impl Receiver {
    /// Reads RTP until the media timeout (returns true) or `stop`.
    async fn run(self, media_timeout: Duration, stop: CancellationToken) -> bool {
        let start = Instant::now();
        let mut jitter = JitterBuffer::<Vec<u8>>::new(JITTER_DELAY_S);
        let codec = self.remote.borrow().codec;
        let mut decoder = match PayloadDecoder::new(codec) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(call = %self.name, "no {codec:?} decoder: {e}");
                return false;
            }
        };
        let mut resampler = match To16k::new(codec.audio_rate()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(call = %self.name, "no resampler: {e}");
                return false;
            }
        };
        let mut detector = DtmfDetector::default();
        let mut counts = Counts::default();
        let mut last_rtp = Instant::now();
        let mut buf = vec![0u8; MAX_RTP];
        let timed_out = loop {
            let wake = jitter
                .poll_timeout()
                .map(|t| start + Duration::from_secs_f64(t.max(0.0)))
                .unwrap_or_else(|| Instant::now() + FRAME)
                .min(last_rtp + media_timeout);
            tokio::select! {
                _ = stop.cancelled() => break false,
                received = self.socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    let now = start.elapsed().as_secs_f64();
                    if self.take_packet(now, from, &buf[..n], &mut jitter, &mut detector, &mut counts) {
                        last_rtp = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            if last_rtp.elapsed() >= media_timeout {
                break true;
            }
            decoder.follow(self.remote.borrow().codec);
            let now = start.elapsed().as_secs_f64();
            while let Some(playout) = jitter.pop(now) {
                let Some(samples) = decoder.decode(playout) else {
                    counts.undecodable += 1;
                    continue;
                };
                let audio = resampler.push(&samples);
                if !audio.is_empty() && self.input.try_send(audio).is_err() {
                    counts.input_dropped += 1;
                }
            }
        };
        counts.log(&self.name, jitter.stats());
        timed_out
    }

    /// Takes one datagram; true when it was RTP of this call.
    fn take_packet(
        &self,
        now: f64,
        from: SocketAddr,
        datagram: &[u8],
        jitter: &mut JitterBuffer<Vec<u8>>,
        detector: &mut DtmfDetector,
        counts: &mut Counts,
    ) -> bool {
        let Some(packet) = rtp::parse(datagram) else {
            counts.malformed += 1;
            return false;
        };
        let (codec, dtmf) = {
            let remote = self.remote.borrow();
            (remote.codec, remote.dtmf)
        };
        self.latch(from);
        if Some(packet.payload_type) == dtmf.map(|(pt, _)| pt) {
            if let Some(digit) = detector.push(packet.timestamp, packet.payload) {
                // The digit itself may be a patient's date of birth or PIN: never logged.
                tracing::info!(call = %self.name, "a DTMF digit arrived");
                if self.dtmf.try_send(digit.0).is_err() {
                    counts.dtmf_dropped += 1;
                }
            }
            return true;
        }
        if packet.payload_type != codec.payload_type() {
            counts.other_payload += 1;
            return true;
        }
        jitter.push(now, packet.sequence, packet.payload.to_vec());
        true
    }

    /// Symmetric RTP: answer to where the peer's packets come from (NAT, or an SDP address
    /// the peer cannot actually receive on).
    fn latch(&self, from: SocketAddr) {
        let mut latched = self.latched.lock().unwrap_or_else(|p| p.into_inner());
        if *latched != Some(from) {
            if latched.is_some() {
                tracing::info!(call = %self.name, "the peer's RTP moved; following it");
            }
            *latched = Some(from);
        }
    }
}

/// The incoming payloads' decoder, for the codec the call settled on.
enum PayloadDecoder {
    G711(Law),
    Opus {
        decoder: opus::Decoder,
        pcm: Vec<f32>,
        /// The last packet's length: a lost packet is concealed with as much audio.
        last_frame: usize,
    },
}

impl PayloadDecoder {
    fn new(codec: Codec) -> Result<Self, opus::Error> {
        Ok(match codec {
            Codec::G711(law) => PayloadDecoder::G711(law),
            Codec::Opus { .. } => PayloadDecoder::Opus {
                decoder: opus::Decoder::new(codec.audio_rate(), opus::Channels::Mono)?,
                pcm: vec![0.0; MAX_OPUS_FRAME],
                last_frame: codec.audio_rate() as usize / 50,
            },
        })
    }

    /// A re-INVITE may switch between PCMU and PCMA; Opus stays Opus (the SDP layer refuses
    /// other switches, since the session's rate is the first codec's).
    fn follow(&mut self, codec: Codec) {
        if let (PayloadDecoder::G711(law), Codec::G711(now)) = (&mut *self, codec) {
            *law = now;
        }
    }

    /// One packet's audio (or its concealment); `None` when it does not decode.
    fn decode(&mut self, playout: Playout<Vec<u8>>) -> Option<Vec<f32>> {
        match (self, playout) {
            (PayloadDecoder::G711(law), Playout::Packet(payload)) => Some(decode(*law, &payload)),
            (PayloadDecoder::G711(_), Playout::Lost) => Some(vec![0.0; FRAME_SAMPLES]),
            (
                PayloadDecoder::Opus {
                    decoder,
                    pcm,
                    last_frame,
                },
                playout,
            ) => {
                let decoded = match playout {
                    Playout::Packet(payload) => decoder.decode_float(&payload, pcm, false),
                    // Opus packet loss concealment: an empty packet asks for one frame of it.
                    Playout::Lost => decoder.decode_float(&[], &mut pcm[..*last_frame], false),
                };
                let n = decoded.ok()?;
                *last_frame = n.clamp(1, MAX_OPUS_FRAME);
                Some(pcm[..n].to_vec())
            }
        }
    }
}

/// The agent's frames as payloads of the call's codec.
enum PayloadEncoder {
    G711(Law),
    Opus {
        encoder: Box<opus::Encoder>,
        packet: Vec<u8>,
    },
}

impl PayloadEncoder {
    fn new(codec: Codec) -> Result<Self, opus::Error> {
        Ok(match codec {
            Codec::G711(law) => PayloadEncoder::G711(law),
            Codec::Opus { .. } => {
                let mut encoder = opus::Encoder::new(
                    codec.audio_rate(),
                    opus::Channels::Mono,
                    opus::Application::Voip,
                )?;
                // The peer's decoder can conceal a lost frame from the next one's FEC.
                encoder.set_inband_fec(true)?;
                PayloadEncoder::Opus {
                    encoder: Box::new(encoder),
                    packet: vec![0; MAX_RTP],
                }
            }
        })
    }

    fn encode(&mut self, samples: &[f32]) -> Option<Vec<u8>> {
        match self {
            PayloadEncoder::G711(law) => Some(encode(*law, samples)),
            PayloadEncoder::Opus { encoder, packet } => {
                // Opus codes whole 20 ms frames; the session's frames are 20 ms, and a short
                // last one is padded with silence.
                let mut frame = samples.to_vec();
                frame.resize(OPUS_FRAME_SAMPLES, 0.0);
                match encoder.encode_float(&frame, packet) {
                    Ok(n) => Some(packet[..n].to_vec()),
                    Err(e) => {
                        tracing::warn!("Opus encoding failed: {e}");
                        None
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    malformed: u64,
    undecodable: u64,
    other_payload: u64,
    input_dropped: u64,
    dtmf_dropped: u64,
}

impl Counts {
    fn log(&self, name: &str, jitter: crate::jitter::JitterStats) {
        tracing::info!(
            call = %name,
            received = jitter.received,
            lost = jitter.lost,
            late = jitter.late,
            duplicates = jitter.duplicates,
            malformed = self.malformed,
            undecodable = self.undecodable,
            other_payload = self.other_payload,
            input_dropped = self.input_dropped,
            dtmf_dropped = self.dtmf_dropped,
            "RTP receive summary"
        );
    }
}

pub fn decode(law: Law, payload: &[u8]) -> Vec<f32> {
    payload
        .iter()
        .map(|&b| law.decode(b) as f32 / 32_768.0)
        .collect()
}

pub fn encode(law: Law, samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .map(|s| law.encode((s.clamp(-1.0, 1.0) * 32_767.0) as i16))
        .collect()
}

/// The session's frames out as RTP. The session paces them at 20 ms; between replies it may
/// send nothing, so the RTP timestamp follows the wall clock across the gap.
async fn send_agent_audio(
    socket: Arc<UdpSocket>,
    remote: RemoteWatch,
    latched: Arc<Mutex<Option<SocketAddr>>>,
    mut output: mpsc::Receiver<SessionOutput>,
    transfer: TransferHook,
    stop: CancellationToken,
) {
    let seed = stream_seed(&socket);
    let mut codec = remote.borrow().codec;
    let mut encoder = match PayloadEncoder::new(codec) {
        Ok(e) => e,
        Err(e) => return tracing::warn!("no {codec:?} encoder: {e}"),
    };
    let audio_rate = codec.audio_rate();
    let mut sender = RtpSender::new(codec.payload_type(), seed);
    let mut last_sent: Option<Instant> = None;
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            out = output.recv() => out,
        };
        let Some(out) = out else { return };
        let samples = match out {
            SessionOutput::Audio(samples) => samples,
            // The session emits this once the agent's "I'll connect you" has played.
            SessionOutput::Event(event) if event["type"] == "transfer" => {
                let reason = event["reason"].as_str().unwrap_or("unspecified");
                transfer(reason.to_string());
                continue;
            }
            // Clear (barge-in) has nothing to recall on RTP: packets already sent are played.
            // Other events (turn metrics) are for clients that have a data channel.
            SessionOutput::Clear | SessionOutput::Event(_) => continue,
        };
        let (current, target, sending) = {
            let media = remote.borrow();
            let target = latched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(media.rtp);
            (media.codec, target, media.peer_receives())
        };
        if current != codec {
            if current.audio_rate() != audio_rate {
                // Not reachable through our SDP answers; a peer answering outside its offer is
                // not followed.
                tracing::warn!("the peer switched to {current:?} mid-call; keeping {codec:?}");
            } else if let Ok(new) = PayloadEncoder::new(current) {
                codec = current;
                encoder = new;
                sender = RtpSender::new(codec.payload_type(), seed);
            }
        }
        // RTP timestamps count the codec's clock: 8 kHz for G.711, 48 kHz for Opus.
        let ticks_per_sample = codec.clock_rate() / audio_rate;
        let frame_ticks = codec.clock_rate() / 50;
        if let Some(gap) = last_sent.map(|t| t.elapsed()) {
            if gap > FRAME * 2 {
                let skipped = (gap.as_secs_f64() / FRAME.as_secs_f64()) as u32;
                sender.skip(skipped.saturating_sub(1) * frame_ticks);
            }
        }
        last_sent = Some(Instant::now());
        if !sending {
            // On hold: time passes, nothing is sent.
            sender.skip(samples.len() as u32 * ticks_per_sample);
            continue;
        }
        let Some(payload) = encoder.encode(&samples) else {
            continue;
        };
        let ticks = match codec {
            // Padded to a whole frame when encoded.
            Codec::Opus { .. } => frame_ticks,
            Codec::G711(_) => samples.len() as u32,
        };
        let packet = sender.packet(&payload, ticks);
        if let Err(e) = socket.send_to(&packet, target).await {
            tracing::debug!("RTP send to {target} failed: {e}");
        }
    }
}

/// Per-stream randomness for the SSRC and initial sequence/timestamp, without a dependency: the
/// clock and the socket's port.
fn stream_seed(socket: &UdpSocket) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let port = socket.local_addr().map(|a| a.port() as u64).unwrap_or(0);
    nanos ^ (port << 48) ^ std::process::id() as u64
}
