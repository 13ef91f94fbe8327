//! The Twilio Media Streams-compatible WebSocket transport (`/twilio`), so telephony providers
//! that speak it can bring phone calls: JSON `connected`/`start`/`media`/`mark`/`stop` events with
//! base64 μ-law at 8 kHz in, `media`, `mark` and `clear` (on barge-in) out.

use std::sync::Arc;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use talkline_asr::audio::To16k;

use crate::serve::SocketSession;
use crate::session::{SessionOutput, Shared};

/// Telephony audio: G.711 μ-law, 8 kHz mono.
pub const RATE: u32 = 8_000;
/// Audio waiting for the session, in messages. Policy when full: drop the newest and count it.
const INPUT_QUEUE: usize = 100;

/// A message from the provider. Public (hidden) only for the fuzz target `twilio`, which checks
/// that what parses serializes back to the same message.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Inbound {
    Connected,
    Start { start: StartInfo },
    Media { media: Media },
    Mark,
    Dtmf { dtmf: KeyPress },
    Stop,
}

#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct KeyPress {
    pub digit: String,
}

#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartInfo {
    pub stream_sid: String,
    #[serde(default)]
    pub media_format: Option<MediaFormat>,
}

#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    pub encoding: String,
    pub sample_rate: u32,
}

#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Media {
    pub payload: String,
}

// G.711 μ-law by hand: 20 lines of a fixed standard (ITU-T G.711) are simpler than a dependency.
const MULAW_BIAS: i32 = 0x84;
const MULAW_CLIP: i32 = 32_635;

pub fn mulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + MULAW_BIAS) << exponent) - MULAW_BIAS;
    (if u & 0x80 != 0 { -magnitude } else { magnitude }) as i16
}

pub fn mulaw_encode(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(MULAW_CLIP) + MULAW_BIAS;
    let exponent = (7 - ((s as u32).leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

/// The one parser of provider text messages.
#[doc(hidden)]
pub fn parse_inbound(text: &str) -> Result<Inbound, serde_json::Error> {
    serde_json::from_str(text)
}

/// A `media` payload (base64 μ-law) as samples at [`RATE`].
#[doc(hidden)]
pub fn decode_media_payload(payload: &str) -> Result<Vec<f32>, base64::DecodeError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload.as_bytes())?;
    Ok(bytes
        .iter()
        .map(|&b| mulaw_decode(b) as f32 / 32768.0)
        .collect())
}

fn text(value: serde_json::Value) -> WsMessage {
    WsMessage::Text(value.to_string().into())
}

pub async fn handle_socket(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    id: u64,
) -> anyhow::Result<()> {
    // Wait for `start`: it names the stream that every outbound message must carry.
    let stream_sid = loop {
        let Some(msg) = socket.recv().await else {
            return Ok(());
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => return Err(crate::serve::end_after_read_error(&mut socket, e).await),
        };
        match msg {
            WsMessage::Text(t) => match parse_inbound(&t) {
                Ok(Inbound::Start { start }) => {
                    if let Some(f) = &start.media_format {
                        anyhow::ensure!(
                            f.encoding == "audio/x-mulaw" && f.sample_rate == RATE,
                            "unsupported media format {} at {} Hz (expected audio/x-mulaw at 8000)",
                            f.encoding,
                            f.sample_rate
                        );
                    }
                    break start.stream_sid;
                }
                Ok(Inbound::Stop) => return Ok(()),
                Ok(_) => {}
                Err(e) => tracing::info!(session = id, "ignored a malformed message: {e}"),
            },
            WsMessage::Close(_) => return Ok(()),
            _ => {}
        }
    };
    let (sink, mut stream) = socket.split();
    let sid = stream_sid.clone();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut turn = 0u64;
    let encode = move |out| {
        let msg = match out {
            SessionOutput::Audio(samples) => {
                let bytes: Vec<u8> = samples
                    .iter()
                    .map(|s| mulaw_encode((s.clamp(-1.0, 1.0) * 32767.0) as i16))
                    .collect();
                json!({"event": "media", "streamSid": sid, "media": {"payload": b64.encode(bytes)}})
            }
            SessionOutput::Clear => json!({"event": "clear", "streamSid": sid}),
            SessionOutput::Event(e) if e["type"] == "turn" => {
                // A mark after each reply: the provider echoes it once the audio has played.
                turn += 1;
                json!({"event": "mark", "streamSid": sid, "mark": {"name": format!("turn-{turn}")}})
            }
            SessionOutput::Event(_) => return None,
        };
        Some(text(msg))
    };
    let name = format!("twilio-{id}");
    let session = SocketSession::start(shared, RATE, INPUT_QUEUE, name, sink, encode);

    let mut resampler = To16k::new(RATE)?;
    let mut dropped = 0u64;
    let mut close = None;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                close = crate::serve::oversize_close(&e);
                break;
            }
        };
        let t = match msg {
            WsMessage::Text(t) => t,
            WsMessage::Close(_) => break,
            _ => continue,
        };
        match parse_inbound(&t) {
            Ok(Inbound::Media { media }) => match decode_media_payload(&media.payload) {
                Ok(samples) => {
                    let audio = resampler.push(&samples);
                    if !audio.is_empty() && session.input_tx.try_send(audio).is_err() {
                        dropped += 1;
                    }
                }
                Err(e) => tracing::info!(session = id, "ignored media with bad base64: {e}"),
            },
            Ok(Inbound::Dtmf { dtmf }) => match crate::serve::parse_key(&dtmf.digit) {
                Some(key) => {
                    let _ = session.keys_tx.try_send(key);
                }
                None => tracing::info!(session = id, "ignored a dtmf event with a bad digit"),
            },
            Ok(Inbound::Stop) => break,
            Ok(_) => {}
            Err(e) => tracing::info!(session = id, "ignored a malformed message: {e}"),
        }
    }
    if dropped > 0 {
        tracing::warn!(
            session = id,
            dropped,
            "input dropped: the session fell behind"
        );
    }
    if close.is_some() {
        tracing::info!(session = id, "an oversize message; closing with 1009");
    }
    session.finish(close).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_round_trips_within_its_step_and_matches_g711_points() {
        // Reference points of G.711 μ-law: silence, full scale, and sign.
        assert_eq!(mulaw_encode(0), 0xFF);
        assert_eq!(mulaw_decode(0xFF), 0);
        assert_eq!(mulaw_encode(32_767), 0x80);
        assert_eq!(mulaw_encode(-32_768), 0x00);
        assert_eq!(mulaw_decode(0x80), 32_124);
        assert_eq!(mulaw_decode(0x00), -32_124);
        for s in (-32_768i32..=32_767).step_by(97) {
            let back = mulaw_decode(mulaw_encode(s as i16)) as i32;
            // The step grows with magnitude: about 1/16 of it, at least 8.
            let tolerance = (s.abs() / 16).max(8) + 4;
            assert!((back - s).abs() <= tolerance, "{s} -> {back}");
        }
    }
}
