//! The scripted caller's connection to the server, over a real transport: WebSocket (PCM16
//! frames and JSON events), WebRTC (a webrtc-rs peer: Opus over DTLS-SRTP, events on the data
//! channel, WHIP-style signaling) or SIP (a phone call: G.711 RTP, no events; see
//! [`super::sip_link`]). The caller sees 16 kHz frames out and, coming back, whether each agent
//! frame was audible and every event the transport carries.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::APIBuilder;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;

use super::scenario::RATE;
use super::sip_link::SipLink;

/// An agent frame with any sample above 1% of full scale is audible (the Pipecat anchor's rule).
pub const AUDIBLE: f32 = 0.01;
/// What the WebRTC peer receives, waiting for the caller's loop. Policy when full: dropped and
/// counted as lost by the analysis (it sees a gap); the network side never blocks.
const INCOMING_QUEUE: usize = 1_000;
const OPUS_RATE: u32 = 48_000;
const OPUS_FRAME: usize = 960;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Websocket,
    Webrtc,
    /// A SIP call over UDP to the server's SIP listener, PCMU RTP at 8 kHz.
    Sip,
}

impl Transport {
    /// Whether the server's events (turn metrics, `clear`) reach the caller. SIP has no channel
    /// for them: the caller knows only the audio.
    pub fn has_events(self) -> bool {
        !matches!(self, Transport::Sip)
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::Websocket => "websocket",
            Transport::Webrtc => "webrtc",
            Transport::Sip => "sip",
        }
    }
}

pub enum Incoming {
    /// One agent frame arrived.
    Audio {
        audible: bool,
    },
    Event(serde_json::Value),
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub enum Link {
    WebSocket {
        tx: SplitSink<WsStream, Message>,
        rx: SplitStream<WsStream>,
    },
    WebRtc(Box<RtcLink>),
    Sip(Box<SipLink>),
}

pub struct RtcLink {
    peer: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticSample>,
    encoder: opus::Encoder,
    upsampler: Upsampler,
    incoming: mpsc::Receiver<Incoming>,
    packet: Vec<u8>,
}

impl Link {
    /// Connects and waits until audio can flow.
    pub async fn connect(transport: Transport, addr: &str) -> anyhow::Result<Link> {
        match transport {
            Transport::Websocket => connect_websocket(addr).await,
            Transport::Webrtc => Ok(Link::WebRtc(Box::new(connect_webrtc(addr).await?))),
            Transport::Sip => Ok(Link::Sip(Box::new(SipLink::connect(addr).await?))),
        }
    }

    /// One 20 ms frame of caller audio at [`RATE`].
    pub async fn send(&mut self, frame: &[i16]) -> anyhow::Result<()> {
        match self {
            Link::WebSocket { tx, .. } => {
                let bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
                tx.send(Message::Binary(bytes.into()))
                    .await
                    .context("sending audio")
            }
            Link::WebRtc(link) => link.send(frame).await,
            Link::Sip(link) => link.send(frame).await,
        }
    }

    /// The next frame or event from the server; `None` when the server has gone. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Incoming>> {
        match self {
            Link::WebSocket { rx, .. } => loop {
                let Some(msg) = rx.next().await else {
                    return Ok(None);
                };
                match msg.context("reading from the server")? {
                    Message::Binary(b) => {
                        let audible = b.chunks_exact(2).any(|s| {
                            (i16::from_le_bytes([s[0], s[1]]) as f32 / 32768.0).abs() > AUDIBLE
                        });
                        return Ok(Some(Incoming::Audio { audible }));
                    }
                    Message::Text(t) => {
                        let v = serde_json::from_str(&t).context("a non-JSON event")?;
                        return Ok(Some(Incoming::Event(v)));
                    }
                    Message::Close(_) => return Ok(None),
                    _ => {}
                }
            },
            Link::WebRtc(link) => Ok(link.incoming.recv().await),
            Link::Sip(link) => Ok(link.recv().await.map(|audible| Incoming::Audio { audible })),
        }
    }

    pub async fn hang_up(&mut self) {
        match self {
            Link::WebSocket { tx, .. } => {
                let _ = tx.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
            }
            Link::WebRtc(link) => {
                let _ = link.peer.close().await;
            }
            Link::Sip(link) => link.hang_up().await,
        }
    }
}

async fn connect_websocket(addr: &str) -> anyhow::Result<Link> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .with_context(|| format!("connecting to ws://{addr}/ws"))?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        format!(r#"{{"type":"hello","sample_rate":{RATE}}}"#).into(),
    ))
    .await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .context("no ready within 10 s")?
            .context("closed before ready")??;
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).context("a non-JSON event")?;
            match v["type"].as_str() {
                Some("ready") => return Ok(Link::WebSocket { tx, rx }),
                Some("error") => bail!("server error: {}", v["message"]),
                _ => {}
            }
        }
    }
}

async fn connect_webrtc(addr: &str) -> anyhow::Result<RtcLink> {
    let mut media = MediaEngine::default();
    media.register_default_codecs()?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    let api = APIBuilder::new()
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .build();
    let peer = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);
    let track = Arc::new(TrackLocalStaticSample::new(
        RTCRtpCodecCapability {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            ..Default::default()
        },
        "caller".to_owned(),
        "talkline-bench".to_owned(),
    ));
    peer.add_track(track.clone()).await?;
    let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
    let (open_tx, mut open) = mpsc::channel::<()>(1);
    let events = peer.create_data_channel("events", None).await?;
    let tx = incoming_tx.clone();
    events.on_message(Box::new(move |msg| {
        if let Ok(v) = serde_json::from_slice(&msg.data) {
            let _ = tx.try_send(Incoming::Event(v));
        }
        Box::pin(async {})
    }));
    events.on_open(Box::new(move || {
        let _ = open_tx.try_send(());
        Box::pin(async {})
    }));
    peer.on_track(Box::new(move |remote, _, _| {
        let tx = incoming_tx.clone();
        tokio::spawn(async move {
            let Ok(mut decoder) = opus::Decoder::new(OPUS_RATE, opus::Channels::Mono) else {
                return;
            };
            let mut pcm = vec![0f32; 5_760];
            while let Ok((packet, _)) = remote.read_rtp().await {
                let Ok(n) = decoder.decode_float(&packet.payload, &mut pcm, false) else {
                    continue;
                };
                let audible = pcm[..n].iter().any(|s| s.abs() > AUDIBLE);
                let _ = tx.try_send(Incoming::Audio { audible });
            }
        });
        Box::pin(async {})
    }));
    let (failed_tx, mut failed) = mpsc::channel::<()>(1);
    peer.on_peer_connection_state_change(Box::new(move |state| {
        if state == RTCPeerConnectionState::Failed {
            let _ = failed_tx.try_send(());
        }
        Box::pin(async {})
    }));

    let offer = peer.create_offer(None).await?;
    let mut gathered = peer.gathering_complete_promise().await;
    peer.set_local_description(offer).await?;
    let _ = gathered.recv().await;
    let sdp = peer
        .local_description()
        .await
        .context("no local description")?
        .sdp;
    let answer = post_offer(addr, &sdp).await?;
    peer.set_remote_description(RTCSessionDescription::answer(answer)?)
        .await?;
    tokio::select! {
        _ = open.recv() => {}
        _ = failed.recv() => bail!("the WebRTC connection failed"),
        _ = tokio::time::sleep(Duration::from_secs(10)) => bail!("no data channel within 10 s"),
    }
    Ok(RtcLink {
        peer,
        track,
        encoder: opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip)?,
        upsampler: Upsampler::default(),
        incoming,
        packet: vec![0u8; 1_500],
    })
}

impl RtcLink {
    async fn send(&mut self, frame: &[i16]) -> anyhow::Result<()> {
        let mut pcm = self.upsampler.push(frame);
        pcm.resize(OPUS_FRAME, 0.0);
        let n = self.encoder.encode_float(&pcm, &mut self.packet)?;
        let sample = Sample {
            data: self.packet[..n].to_vec().into(),
            duration: Duration::from_millis(20),
            ..Default::default()
        };
        self.track
            .write_sample(&sample)
            .await
            .context("sending audio")
    }
}

/// 16 kHz to 48 kHz by linear interpolation, continuous across frames. Enough for a benchmark
/// caller: the server's resampler filters the images away before the ASR sees them.
#[derive(Default)]
struct Upsampler {
    last: f32,
}

impl Upsampler {
    fn push(&mut self, frame: &[i16]) -> Vec<f32> {
        let mut out = Vec::with_capacity(frame.len() * 3);
        for &s in frame {
            let s = s as f32 / 32768.0;
            for k in 1..=3 {
                out.push(self.last + (s - self.last) * k as f32 / 3.0);
            }
            self.last = s;
        }
        out
    }
}

/// The WHIP-style offer: the SDP answer, or why the server refused.
async fn post_offer(addr: &str, sdp: &str) -> anyhow::Result<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/webrtc/offer"))
        .header("Content-Type", "application/sdp")
        .body(sdp.to_owned())
        .send()
        .await
        .with_context(|| format!("posting the offer to {addr}"))?;
    let status = response.status();
    let body = response.text().await?;
    if status.as_u16() != 201 {
        bail!("the offer was refused ({status}): {}", body.trim());
    }
    Ok(body)
}
