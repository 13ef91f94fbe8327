//! The WebRTC transport: a browser (or any WebRTC peer) calls the agent.
//!
//! Signaling is WHIP-style HTTP: the peer POSTs its SDP offer to `/webrtc/offer` and gets the
//! answer back, with ICE candidates gathered in (no trickle), and a `Location` it can DELETE to
//! hang up. Media is Opus at 48 kHz both ways in 20 ms frames, over DTLS-SRTP. The offer must
//! carry a data channel; it carries the same JSON events as the WebSocket transport, and the peer
//! may send `{"type":"bye"}` on it.
//!
//! Each call owns its tasks (a [`TaskTracker`]) and a [`CancellationToken`]: hang-up, ICE
//! failure, a closed peer connection or the session ending on its own cancel the token, and the
//! peer connection is closed only after every task has finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use talkline_asr::audio::To16k;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{APIBuilder, API};
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::udp_network::{EphemeralUDP, UDPNetwork};
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp_transceiver::rtp_codec::{RTCRtpCodecCapability, RTPCodecType};
use webrtc::rtp_transceiver::rtp_sender::RTCRtpSender;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;
use webrtc::track::track_remote::TrackRemote;

use crate::config::WebRtcConfig;
use crate::jitter::{JitterBuffer, Playout};
use crate::session::{self, SessionOutput, Shared};

/// WebRTC audio: Opus at 48 kHz.
pub const RATE: u32 = 48_000;
const FRAME: Duration = Duration::from_millis(20);
const FRAME_SAMPLES: usize = 960;
/// The longest Opus frame, 120 ms at 48 kHz: the decode buffer's size.
const MAX_OPUS_FRAME: usize = 5_760;
/// How long a gap in the RTP sequence is waited for before it is concealed. Browsers pace
/// audio evenly, so reordering beyond a few packets means loss.
const JITTER_DELAY_S: f64 = 0.06;
/// Decoded audio waiting for the session, in 20 ms frames. Policy when full: drop the newest
/// frame and count it; the network reader never blocks.
const INPUT_QUEUE: usize = 100;
/// Agent audio waiting for the Opus encoder, in 20 ms frames. Policy when full: drop the frame
/// and count it (the session already paces output; a backlog means the peer is gone).
const AUDIO_OUT_QUEUE: usize = 50;
/// Events waiting for the data channel, also while it is opening. Policy when full: drop the
/// oldest event (a newer partial transcript supersedes it).
const EVENT_QUEUE: usize = 256;

/// Why an offer was not answered.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// The offer itself is wrong: the peer should fix it (HTTP 400).
    #[error("{0}")]
    BadOffer(String),
    /// Something failed on this side (HTTP 500).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Answers offers and keeps the calls in progress, so they can be hung up by id.
pub struct WebRtcHub {
    api: API,
    ice_servers: Vec<RTCIceServer>,
    calls: Mutex<HashMap<u64, CancellationToken>>,
}

impl WebRtcHub {
    pub fn new(config: &WebRtcConfig) -> anyhow::Result<Self> {
        let mut media = MediaEngine::default();
        media.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media)?;
        let mut settings = SettingEngine::default();
        // A closed browser tab sends nothing more: give up on it in seconds, not half a minute.
        settings.set_ice_timeouts(
            Some(Duration::from_secs(4)),
            Some(Duration::from_secs(8)),
            Some(Duration::from_secs(1)),
        );
        if !config.public_ips.is_empty() {
            settings.set_nat_1to1_ips(config.public_ips.clone(), RTCIceCandidateType::Host);
        }
        if let Some([min, max]) = config.udp_port_range {
            let ports = EphemeralUDP::new(min, max)
                .map_err(|e| anyhow::anyhow!("[webrtc] udp_port_range {min}-{max}: {e}"))?;
            settings.set_udp_network(UDPNetwork::Ephemeral(ports));
        }
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .build();
        let ice_servers = config
            .ice_servers
            .iter()
            .map(|s| RTCIceServer {
                urls: s.urls.clone(),
                username: s.username.clone(),
                credential: s.credential.clone(),
            })
            .collect();
        Ok(Self {
            api,
            ice_servers,
            calls: Mutex::new(HashMap::new()),
        })
    }

    /// Answers `offer` and starts its session. `on_end` runs once the call is over and every
    /// task of it has finished. Returns the SDP answer.
    pub async fn answer(
        self: &Arc<Self>,
        offer: String,
        shared: Arc<Shared>,
        id: u64,
        on_end: impl FnOnce() + Send + 'static,
    ) -> Result<String, OfferError> {
        check_offer(&offer)?;
        let description =
            RTCSessionDescription::offer(offer).map_err(|e| OfferError::BadOffer(e.to_string()))?;
        let peer = Arc::new(
            self.api
                .new_peer_connection(RTCConfiguration {
                    ice_servers: self.ice_servers.clone(),
                    ..Default::default()
                })
                .await
                .map_err(anyhow::Error::from)?,
        );
        match self.start_call(&peer, description, shared, id).await {
            Ok((answer, call)) => {
                self.supervise(peer, call, id, on_end);
                Ok(answer)
            }
            Err(e) => {
                let _ = peer.close().await;
                Err(e)
            }
        }
    }

    /// Hangs up call `id`; false if there is no such call.
    pub fn hang_up(&self, id: u64) -> bool {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.get(&id).map(|c| c.cancel()).is_some()
    }

    async fn start_call(
        &self,
        peer: &Arc<RTCPeerConnection>,
        offer: RTCSessionDescription,
        shared: Arc<Shared>,
        id: u64,
    ) -> Result<(String, Call), OfferError> {
        let call = Call {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let track = Arc::new(TrackLocalStaticSample::new(
            RTCRtpCodecCapability {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                ..Default::default()
            },
            "agent".to_owned(),
            "talkline".to_owned(),
        ));
        let sender = peer
            .add_track(track.clone())
            .await
            .map_err(anyhow::Error::from)?;
        peer.set_remote_description(offer)
            .await
            .map_err(|e| OfferError::BadOffer(format!("the offer was refused: {e}")))?;

        let (input_tx, input_rx) = mpsc::channel::<Vec<f32>>(INPUT_QUEUE);
        let (keys_tx, keys_rx) = mpsc::channel::<char>(crate::serve::KEY_QUEUE);
        let (events_tx, events_rx) = mpsc::channel::<serde_json::Value>(EVENT_QUEUE);
        let (channel_tx, channel_rx) = oneshot::channel();
        self.wire_peer(peer, &call, input_tx, keys_tx, channel_tx, id);

        let (output_tx, output_rx) = mpsc::channel::<SessionOutput>(session::OUTPUT_QUEUE);
        let (audio_tx, audio_rx) = mpsc::channel::<Vec<f32>>(AUDIO_OUT_QUEUE);
        let cancel = call.cancel.clone();
        call.tasks.spawn(async move {
            let result = session::run_with_keys(
                shared,
                RATE,
                input_rx,
                Some(keys_rx),
                output_tx,
                cancel.clone(),
                format!("webrtc-{id}"),
            )
            .await;
            if let Err(e) = result {
                tracing::warn!(call = id, "session failed: {e:#}");
            }
            cancel.cancel();
        });
        call.tasks
            .spawn(route_output(output_rx, audio_tx, events_tx.clone()));
        call.tasks
            .spawn(send_audio(track, audio_rx, call.cancel.clone(), id));
        call.tasks
            .spawn(send_events(channel_rx, events_rx, call.cancel.clone()));
        call.tasks.spawn(drain_rtcp(sender, call.cancel.clone()));

        let answer = peer
            .create_answer(None)
            .await
            .map_err(|e| OfferError::BadOffer(format!("no answer fits the offer: {e}")))?;
        let mut gathered = peer.gathering_complete_promise().await;
        peer.set_local_description(answer)
            .await
            .map_err(anyhow::Error::from)?;
        // Non-trickle ICE, as WHIP: the answer carries every host candidate.
        let _ = gathered.recv().await;
        let local = peer
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description after gathering"))?;
        Ok((local.sdp, call))
    }

    /// Incoming audio, the data channel, and the connection state, each tied to the call.
    fn wire_peer(
        &self,
        peer: &Arc<RTCPeerConnection>,
        call: &Call,
        input: mpsc::Sender<Vec<f32>>,
        keys: mpsc::Sender<char>,
        channel: oneshot::Sender<Arc<RTCDataChannel>>,
        id: u64,
    ) {
        let (cancel, tasks) = (call.cancel.clone(), call.tasks.clone());
        peer.on_track(Box::new(move |track, _, _| {
            if track.kind() == RTPCodecType::Audio {
                tasks.spawn(receive_audio(track, input.clone(), cancel.clone(), id));
            }
            Box::pin(async {})
        }));
        let cancel = call.cancel.clone();
        let channel = Mutex::new(Some(channel));
        peer.on_data_channel(Box::new(move |data_channel: Arc<RTCDataChannel>| {
            let (cancel, keys) = (cancel.clone(), keys.clone());
            let opened = channel.lock().unwrap_or_else(|p| p.into_inner()).take();
            Box::pin(async move {
                let Some(opened) = opened else {
                    tracing::info!(call = id, "ignored a second data channel");
                    return;
                };
                let cancel_on_bye = cancel.clone();
                data_channel.on_message(Box::new(move |msg: DataChannelMessage| {
                    match peer_message(&msg) {
                        Some(PeerMessage::Bye) => cancel_on_bye.cancel(),
                        Some(PeerMessage::Dtmf { digit }) => {
                            match crate::serve::parse_key(&digit) {
                                Some(key) => {
                                    let _ = keys.try_send(key);
                                }
                                None => tracing::info!(call = id, "ignored a bad dtmf digit"),
                            }
                        }
                        None => {
                            tracing::info!(call = id, "ignored an unknown data channel message")
                        }
                    }
                    Box::pin(async {})
                }));
                let ready = data_channel.clone();
                let opened = Mutex::new(Some(opened));
                data_channel.on_open(Box::new(move || {
                    if let Some(tx) = opened.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        let _ = tx.send(ready);
                    }
                    Box::pin(async {})
                }));
            })
        }));
        let cancel = call.cancel.clone();
        peer.on_peer_connection_state_change(Box::new(move |state| {
            tracing::debug!(call = id, ?state, "peer connection");
            if matches!(
                state,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            ) {
                cancel.cancel();
            }
            Box::pin(async {})
        }));
    }

    /// Waits for the call to end and every task of it to finish, then closes the connection.
    fn supervise(
        self: &Arc<Self>,
        peer: Arc<RTCPeerConnection>,
        call: Call,
        id: u64,
        on_end: impl FnOnce() + Send + 'static,
    ) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, call.cancel.clone());
        let hub = self.clone();
        tokio::spawn(async move {
            call.cancel.cancelled().await;
            call.tasks.close();
            call.tasks.wait().await;
            if let Err(e) = peer.close().await {
                tracing::debug!(call = id, "closing the peer connection: {e}");
            }
            hub.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tracing::info!(call = id, "WebRTC call ended");
            on_end();
        });
    }
}

struct Call {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Rejects what webrtc-rs would accept but no call can use, with a message a developer can act on.
fn check_offer(offer: &str) -> Result<(), OfferError> {
    let mut reader = std::io::Cursor::new(offer.as_bytes());
    let parsed = webrtc::sdp::SessionDescription::unmarshal(&mut reader)
        .map_err(|e| OfferError::BadOffer(format!("the offer is not valid SDP: {e}")))?;
    let has = |kind: &str| {
        parsed
            .media_descriptions
            .iter()
            .any(|m| m.media_name.media == kind)
    };
    if !has("audio") {
        return Err(OfferError::BadOffer(
            "the offer has no audio section (m=audio)".into(),
        ));
    }
    if !has("application") {
        return Err(OfferError::BadOffer(
            "the offer has no data channel (m=application): create one before the offer".into(),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PeerMessage {
    Bye,
    /// A keypad key (`0`-`9`, `*`, `#`), as on `/ws`.
    Dtmf {
        digit: String,
    },
}

fn peer_message(msg: &DataChannelMessage) -> Option<PeerMessage> {
    if !msg.is_string {
        return None;
    }
    serde_json::from_slice(&msg.data).ok()
}

/// RTP from the peer -> jitter buffer -> Opus decoder (concealing losses) -> 16 kHz -> session.
async fn receive_audio(
    track: Arc<TrackRemote>,
    input: mpsc::Sender<Vec<f32>>,
    cancel: CancellationToken,
    id: u64,
) {
    let (mut decoder, mut resampler) = match (
        opus::Decoder::new(RATE, opus::Channels::Mono),
        To16k::new(RATE),
    ) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) => return tracing::error!(call = id, "Opus decoder: {e}"),
        (_, Err(e)) => return tracing::error!(call = id, "resampler: {e}"),
    };
    let mut jitter = JitterBuffer::new(JITTER_DELAY_S);
    let started = Instant::now();
    let mut pcm = vec![0f32; MAX_OPUS_FRAME];
    let mut last_frame = FRAME_SAMPLES;
    let (mut dropped, mut undecodable) = (0u64, 0u64);
    loop {
        let deadline = jitter
            .poll_timeout()
            .map(|t| tokio::time::Instant::from_std(started + Duration::from_secs_f64(t)));
        tokio::select! {
            _ = cancel.cancelled() => break,
            packet = track.read_rtp() => {
                let Ok((packet, _)) = packet else { break };
                if !packet.payload.is_empty() {
                    let now = started.elapsed().as_secs_f64();
                    jitter.push(now, packet.header.sequence_number, packet.payload);
                }
            }
            _ = sleep_until(deadline) => {}
        }
        let now = started.elapsed().as_secs_f64();
        while let Some(playout) = jitter.pop(now) {
            let decoded = match playout {
                Playout::Packet(payload) => decoder.decode_float(&payload, &mut pcm, false),
                // Opus packet loss concealment: an empty packet asks for one frame of it.
                Playout::Lost => decoder.decode_float(&[], &mut pcm[..last_frame], false),
            };
            let Ok(n) = decoded else {
                undecodable += 1;
                continue;
            };
            last_frame = n.clamp(1, MAX_OPUS_FRAME);
            let audio = resampler.push(&pcm[..n]);
            if !audio.is_empty() && input.try_send(audio).is_err() {
                dropped += 1;
            }
        }
    }
    let stats = jitter.stats();
    tracing::info!(
        call = id,
        received = stats.received,
        lost = stats.lost,
        late = stats.late,
        duplicates = stats.duplicates,
        undecodable,
        dropped,
        "incoming audio ended"
    );
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Splits the session's output: audio to the encoder, events (and `clear`) to the data channel.
async fn route_output(
    mut output: mpsc::Receiver<SessionOutput>,
    audio: mpsc::Sender<Vec<f32>>,
    events: mpsc::Sender<serde_json::Value>,
) {
    let mut dropped = 0u64;
    while let Some(out) = output.recv().await {
        let full = match out {
            SessionOutput::Audio(samples) => audio.try_send(samples).is_err(),
            SessionOutput::Clear => events.try_send(json!({"type": "clear"})).is_err(),
            SessionOutput::Event(event) => events.try_send(event).is_err(),
        };
        dropped += u64::from(full);
    }
    if dropped > 0 {
        tracing::warn!(dropped, "WebRTC output dropped: the peer fell behind");
    }
}

/// Encodes agent audio to Opus on a steady 20 ms clock, silence between replies, so the peer's
/// jitter buffer sees one continuous stream and never has to stretch a gap.
async fn send_audio(
    track: Arc<TrackLocalStaticSample>,
    mut audio: mpsc::Receiver<Vec<f32>>,
    cancel: CancellationToken,
    id: u64,
) {
    let mut encoder = match opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)
    {
        Ok(e) => e,
        Err(e) => return tracing::error!(call = id, "Opus encoder: {e}"),
    };
    let silence = vec![0f32; FRAME_SAMPLES];
    let mut packet = vec![0u8; 1_500];
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let frame = match audio.try_recv() {
            Ok(frame) => frame,
            Err(mpsc::error::TryRecvError::Empty) => silence.clone(),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let mut frame = frame;
        frame.resize(FRAME_SAMPLES, 0.0);
        let n = match encoder.encode_float(&frame, &mut packet) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(call = id, "Opus encoding failed: {e}");
                continue;
            }
        };
        let sample = Sample {
            data: packet[..n].to_vec().into(),
            duration: FRAME,
            ..Default::default()
        };
        if let Err(e) = track.write_sample(&sample).await {
            tracing::debug!(call = id, "writing audio: {e}");
        }
    }
}

/// Sends events on the data channel once it is open; until then they wait (bounded).
async fn send_events(
    channel: oneshot::Receiver<Arc<RTCDataChannel>>,
    mut events: mpsc::Receiver<serde_json::Value>,
    cancel: CancellationToken,
) {
    let mut pending = std::collections::VecDeque::new();
    let mut channel = std::pin::pin!(channel);
    let data_channel = loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            opened = &mut channel => match opened {
                Ok(dc) => break dc,
                Err(_) => return,
            },
            event = events.recv() => match event {
                Some(e) => {
                    if pending.len() == EVENT_QUEUE {
                        pending.pop_front();
                    }
                    pending.push_back(e);
                }
                None => return,
            },
        }
    };
    for event in pending.drain(..) {
        if data_channel.send_text(event.to_string()).await.is_err() {
            return;
        }
    }
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            event = events.recv() => match event { Some(e) => e, None => break },
        };
        if data_channel.send_text(event.to_string()).await.is_err() {
            break;
        }
    }
    let _ = data_channel.close().await;
}

/// Reads RTCP from the peer: the interceptors (NACK, reports) act on it only when it is read.
async fn drain_rtcp(sender: Arc<RTCRtpSender>, cancel: CancellationToken) {
    let mut buffer = vec![0u8; 1_500];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            read = sender.read(&mut buffer) => if read.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_channel_messages_are_bye_or_dtmf_and_anything_else_is_ignored() {
        let text = |s: &str| DataChannelMessage {
            is_string: true,
            data: s.as_bytes().to_vec().into(),
        };
        assert!(matches!(
            peer_message(&text(r#"{"type":"bye"}"#)),
            Some(PeerMessage::Bye)
        ));
        assert!(matches!(
            peer_message(&text(r#"{"type":"dtmf","digit":"7"}"#)),
            Some(PeerMessage::Dtmf { digit }) if digit == "7"
        ));
        assert!(peer_message(&text("not json")).is_none());
        assert!(peer_message(&text(r#"{"type":"shout"}"#)).is_none());
        let binary = DataChannelMessage {
            is_string: false,
            data: br#"{"type":"bye"}"#.to_vec().into(),
        };
        assert!(peer_message(&binary).is_none());
    }

    #[test]
    fn offers_without_audio_or_a_data_channel_or_that_are_not_sdp_are_bad() {
        for (offer, expected) in [
            ("hello", "not valid SDP"),
            (
                "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
                "no audio",
            ),
            (
                "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
                "no data channel",
            ),
        ] {
            match check_offer(offer) {
                Err(OfferError::BadOffer(message)) => {
                    assert!(message.contains(expected), "{offer:?}: {message}")
                }
                other => panic!("{offer:?} gave {other:?}"),
            }
        }
    }
}
