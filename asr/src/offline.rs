//! Runs a [`StreamingRecognizer`] over recorded audio, decoding inline: `talkline transcribe`,
//! tests and benchmarks use it. Audio is fed in 20 ms chunks exactly as a live transport would.

use std::time::Instant;

use crate::error::Result;
use crate::streaming::{AsrEvent, StreamingRecognizer};
use crate::whisper::{DecodeOptions, WhisperSession, SAMPLE_RATE};

/// An event and the media time at which the recognizer produced it. Decodes run inline, so media
/// time stands still while one runs; `decode_ms` says how long the decode behind a `Partial` or
/// `Final` took, which a live stream would add to that media time.
#[derive(Debug, Clone)]
pub struct TimedEvent {
    pub media_time: f64,
    pub decode_ms: f64,
    pub event: AsrEvent,
}

/// 20 ms at 16 kHz: a transport frame.
const FRAME: usize = SAMPLE_RATE as usize / 50;

pub fn transcribe_stream(
    recognizer: &mut StreamingRecognizer,
    session: &mut WhisperSession,
    options: &DecodeOptions,
    audio: &[f32],
) -> Result<Vec<TimedEvent>> {
    let mut events = Vec::new();
    let mut now = 0.0;
    for chunk in audio.chunks(FRAME) {
        recognizer.push_audio(now, chunk)?;
        now += chunk.len() as f64 / SAMPLE_RATE as f64;
        pump(recognizer, session, options, now, &mut events)?;
    }
    // The stream ends: time passes without audio, so an utterance still open is endpointed.
    if let Some(deadline) = recognizer.poll_timeout() {
        recognizer.handle_timeout(deadline.max(now));
        pump(recognizer, session, options, deadline.max(now), &mut events)?;
    }
    Ok(events)
}

fn pump(
    recognizer: &mut StreamingRecognizer,
    session: &mut WhisperSession,
    options: &DecodeOptions,
    now: f64,
    events: &mut Vec<TimedEvent>,
) -> Result<()> {
    loop {
        let mut decode_ms = 0.0;
        if let Some(request) = recognizer.poll_decode() {
            let options = DecodeOptions {
                prompt: Some(request.prompt.clone()),
                ..options.clone()
            };
            let started = Instant::now();
            let result = session.decode(&request.audio, &options);
            decode_ms = started.elapsed().as_secs_f64() * 1000.0;
            recognizer.on_decode_result(request.id, result, decode_ms);
        }
        let mut any = false;
        while let Some(event) = recognizer.poll_event() {
            any = true;
            let decode_ms = match event {
                AsrEvent::Partial { .. } | AsrEvent::Final { .. } => decode_ms,
                _ => 0.0,
            };
            events.push(TimedEvent {
                media_time: now,
                decode_ms,
                event,
            });
        }
        if decode_ms == 0.0 && !any {
            return Ok(());
        }
    }
}
