//! Runs a [`StreamingRecognizer`] over recorded audio as if it were live: `talkline transcribe`,
//! tests and benchmarks use it.
//!
//! Audio is fed in 20 ms frames on a virtual media clock. Each decode really runs (inline), and
//! its measured wall time is charged to the clock: the result is handed back only when media time
//! has advanced by that much, while later frames keep arriving meanwhile, exactly as with one
//! decode thread per stream. Event times are therefore what a live caller would have seen, on
//! this machine, at its current load.

use std::time::Instant;

use crate::error::Result;
use crate::streaming::{AsrEvent, StreamingRecognizer};
use crate::whisper::{DecodeOptions, Hypothesis, WhisperSession, SAMPLE_RATE};

/// An event and the media time at which a live caller would have received it.
#[derive(Debug, Clone)]
pub struct TimedEvent {
    pub media_time: f64,
    /// Wall time of the decode that produced this `Partial` or `Final` (0 for others).
    pub decode_ms: f64,
    pub event: AsrEvent,
}

/// 20 ms at 16 kHz: a transport frame.
const FRAME: usize = SAMPLE_RATE as usize / 50;

struct Pending {
    id: u64,
    result: Result<Hypothesis>,
    decode_ms: f64,
    ready_at: f64,
}

pub fn transcribe_stream(
    recognizer: &mut StreamingRecognizer,
    session: &mut WhisperSession,
    options: &DecodeOptions,
    audio: &[f32],
) -> Result<Vec<TimedEvent>> {
    let mut run = Run {
        recognizer,
        session,
        options,
        pending: None,
        events: Vec::new(),
        now: 0.0,
    };
    for chunk in audio.chunks(FRAME) {
        run.advance_to(run.now)?;
        run.recognizer.push_audio(run.now, chunk)?;
        run.now += chunk.len() as f64 / SAMPLE_RATE as f64;
        run.collect(0.0);
        run.start_decode();
    }
    // The stream ends; media time goes on without audio until nothing is left to happen.
    loop {
        let next = [
            run.pending.as_ref().map(|p| p.ready_at),
            run.recognizer.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
        if !next.is_finite() {
            break;
        }
        let now = next.max(run.now);
        run.advance_to(now)?;
        run.recognizer.handle_timeout(now);
        run.collect(0.0);
        run.start_decode();
    }
    Ok(run.events)
}

struct Run<'a> {
    recognizer: &'a mut StreamingRecognizer,
    session: &'a mut WhisperSession,
    options: &'a DecodeOptions,
    pending: Option<Pending>,
    events: Vec<TimedEvent>,
    now: f64,
}

impl Run<'_> {
    /// Delivers the running decode's result if it has finished by `now`.
    fn advance_to(&mut self, now: f64) -> Result<()> {
        self.now = self.now.max(now);
        if let Some(p) = self.pending.take_if(|p| p.ready_at <= self.now) {
            let at = self.now;
            self.recognizer
                .on_decode_result(p.id, p.result, p.decode_ms);
            let before = self.events.len();
            self.collect(p.decode_ms);
            for e in &mut self.events[before..] {
                e.media_time = at;
            }
            self.start_decode();
        }
        Ok(())
    }

    fn start_decode(&mut self) {
        // An abandoned decode stops at once, as the live engine aborts it.
        while let Some(id) = self.recognizer.poll_abandoned_decode() {
            self.pending.take_if(|p| p.id == id);
        }
        if self.pending.is_some() {
            return;
        }
        let Some(request) = self.recognizer.poll_decode() else {
            return;
        };
        let options = self.options.for_request(&request);
        let started = Instant::now();
        let result = self.session.decode(&request.audio, &options);
        let decode_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.pending = Some(Pending {
            id: request.id,
            result,
            decode_ms,
            ready_at: self.now + decode_ms / 1000.0,
        });
    }

    fn collect(&mut self, decode_ms: f64) {
        while let Some(event) = self.recognizer.poll_event() {
            let decode_ms = match event {
                AsrEvent::Partial { .. } | AsrEvent::Final { .. } => decode_ms,
                _ => 0.0,
            };
            self.events.push(TimedEvent {
                media_time: self.now,
                decode_ms,
                event,
            });
        }
    }
}
