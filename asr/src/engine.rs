//! Live recognition: two threads per stream, a shared model, and a process-wide cap on concurrent
//! decodes so that Whisper never oversubscribes the cores the LLM and TTS need.
//!
//! A stream's *listener* thread runs the VAD and the recognizer's policy on every frame; its
//! *decoder* thread runs Whisper. They are split so that the VAD never waits for a decode: a
//! pause is seen when it happens, not up to a decode later, and the decode it calls for starts as
//! soon as the decoder is free (a decode of older audio still running is aborted; whisper.cpp
//! looks at the abort flag only after its encoder pass and between decoder steps, so that can
//! take the rest of an encoder pass: about 73 ms once, going by a debug run's timings). The
//! turn manager's speculation and the end of turn hang on that moment.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{AsrError, Result};
use crate::streaming::{AsrEvent, DecodeRequest, StreamingConfig, StreamingRecognizer};
use crate::vad::SpeechProbability;
use crate::whisper::{DecodeOptions, Hypothesis, WhisperModel, WhisperSession, SAMPLE_RATE};

/// Audio waiting for a stream's thread, in seconds. Policy when full: drop the oldest audio and
/// count it; the transport is never blocked. It only fills if decoding falls this far behind.
pub const INBOX_SECONDS: f64 = 10.0;

/// Shared by every stream of a process: the model and the decode slots.
#[derive(Clone)]
pub struct AsrEngine {
    model: WhisperModel,
    options: DecodeOptions,
    slots: Arc<DecodeSlots>,
    /// Streams open now: `final_threads` is only for a lone caller, whose LLM and TTS are idle
    /// while its final decode runs; with other callers their replies need those cores.
    open_streams: Arc<AtomicUsize>,
}

/// A counting semaphore: at most `max` decodes run at once, process-wide.
struct DecodeSlots {
    busy: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl DecodeSlots {
    fn acquire(&self) -> SlotGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy >= self.max {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy += 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a DecodeSlots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().unwrap_or_else(|p| p.into_inner());
        *busy -= 1;
        self.0.freed.notify_one();
    }
}

impl AsrEngine {
    /// `options.threads` is per decode; `max_concurrent_decodes` bounds decodes across streams.
    pub fn new(model: WhisperModel, options: DecodeOptions, max_concurrent_decodes: usize) -> Self {
        AsrEngine {
            model,
            options,
            slots: Arc::new(DecodeSlots {
                busy: Mutex::new(0),
                freed: Condvar::new(),
                max: max_concurrent_decodes.max(1),
            }),
            open_streams: Arc::default(),
        }
    }

    /// Starts a stream on its own thread; `on_event` is called from that thread for each event
    /// (it must not block: hand the event to a channel).
    pub fn open_stream(
        &self,
        name: &str,
        config: StreamingConfig,
        vad: Box<dyn SpeechProbability>,
        on_event: impl FnMut(AsrEvent) + Send + 'static,
    ) -> Result<AsrStream> {
        let session = self.model.session()?;
        let inbox = Arc::new(Inbox {
            state: Mutex::new(InboxState::default()),
            wake: Condvar::new(),
        });
        let decoder = Arc::new(DecoderQueue {
            state: Mutex::new(DecoderState::default()),
            wake: Condvar::new(),
        });
        let decoder_thread = {
            let decoder = Decoder {
                session,
                options: self.options.clone(),
                slots: self.slots.clone(),
                queue: decoder.clone(),
                inbox: inbox.clone(),
                open_streams: self.open_streams.clone(),
            };
            std::thread::Builder::new()
                .name(format!("asr-dec-{name}"))
                .spawn(move || decoder.run())
                .map_err(|e| AsrError::Inference(format!("cannot start the ASR thread: {e}")))?
        };
        let listener = Listener {
            recognizer: StreamingRecognizer::new(config, vad),
            inbox: inbox.clone(),
            decoder,
            decoder_thread: Some(decoder_thread),
            submitted: VecDeque::new(),
            on_event: Box::new(on_event),
        };
        let thread = std::thread::Builder::new()
            .name(format!("asr-{name}"))
            .spawn(move || listener.run())
            .map_err(|e| AsrError::Inference(format!("cannot start the ASR thread: {e}")))?;
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        Ok(AsrStream {
            inbox,
            thread: Some(thread),
            open_streams: self.open_streams.clone(),
        })
    }
}

#[derive(Default)]
struct InboxState {
    chunks: VecDeque<(f64, Vec<f32>)>,
    samples: usize,
    /// Media time reached without audio (transport silent), for the endpointer's timers.
    clock: Option<f64>,
    dropped_samples: u64,
    /// New VAD thresholds (threshold, release) to apply.
    thresholds: Option<(f32, f32)>,
    /// Finished decodes from the decoder thread.
    results: VecDeque<DecodeOutcome>,
    closed: bool,
    /// Media time up to which the listener has run the VAD and handed out every event.
    heard_until: f64,
}

struct DecodeOutcome {
    id: u64,
    result: Result<Hypothesis>,
    decode_ms: f64,
}

struct Inbox {
    state: Mutex<InboxState>,
    wake: Condvar,
}

/// The handle a session holds. Dropping it stops the thread.
pub struct AsrStream {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
    open_streams: Arc<AtomicUsize>,
}

impl AsrStream {
    /// Queues 16 kHz mono audio starting at media time `timestamp`. Never blocks for long: if the
    /// thread is [`INBOX_SECONDS`] behind, the oldest audio is dropped.
    pub fn push(&self, timestamp: f64, samples: &[f32]) {
        let capacity = (INBOX_SECONDS * SAMPLE_RATE as f64) as usize;
        let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
        state.chunks.push_back((timestamp, samples.to_vec()));
        state.samples += samples.len();
        while state.samples > capacity {
            let Some((_, old)) = state.chunks.pop_front() else {
                break;
            };
            state.samples -= old.len();
            state.dropped_samples += old.len() as u64;
        }
        drop(state);
        self.inbox.wake.notify_one();
    }

    /// Tells the stream that media time `now` has passed with no audio (timers fire on it).
    pub fn tick(&self, now: f64) {
        let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
        state.clock = Some(state.clock.map_or(now, |c| c.max(now)));
        drop(state);
        self.inbox.wake.notify_one();
    }

    /// Changes the VAD thresholds from the next frame on (the echo guard raises them while the
    /// agent speaks).
    pub fn set_vad_thresholds(&self, threshold: f32, release: f32) {
        let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
        state.thresholds = Some((threshold, release));
    }

    /// Media time up to which the VAD has run and every event it caused has been handed to
    /// `on_event` (the handoff happens before this moves). Behind the transport's clock when the
    /// thread is starved: silence that has arrived but not been heard is not yet silence.
    pub fn heard_until(&self) -> f64 {
        self.inbox
            .state
            .lock()
            .map(|s| s.heard_until)
            .unwrap_or_default()
    }

    /// Audio dropped because the thread fell behind.
    pub fn dropped_samples(&self) -> u64 {
        self.inbox
            .state
            .lock()
            .map(|s| s.dropped_samples)
            .unwrap_or_default()
    }

    /// Stops the thread after the decode in progress, and waits for it.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(mut state) = self.inbox.state.lock() {
            state.closed = true;
        }
        self.inbox.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            self.open_streams.fetch_sub(1, Ordering::Relaxed);
            if thread.join().is_err() {
                tracing::error!("the ASR thread panicked");
            }
        }
    }
}

impl Drop for AsrStream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the listener handed the decoder. The recognizer keeps one decode in flight, but an
/// abandoned one may still be finishing when its replacement arrives, so a few can be queued; every
/// queued job but the newest is abandoned, and abandoned jobs are dropped unrun.
#[derive(Default)]
struct DecoderState {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Job {
    request: DecodeRequest,
    abort: Arc<AtomicBool>,
}

struct DecoderQueue {
    state: Mutex<DecoderState>,
    wake: Condvar,
}

/// Runs the VAD and the recognizer: never blocks on Whisper.
struct Listener {
    recognizer: StreamingRecognizer,
    inbox: Arc<Inbox>,
    decoder: Arc<DecoderQueue>,
    decoder_thread: Option<JoinHandle<()>>,
    /// Decodes handed to the decoder and not yet answered, with their abort flags.
    submitted: VecDeque<(u64, Arc<AtomicBool>)>,
    on_event: Box<dyn FnMut(AsrEvent) + Send>,
}

impl Listener {
    fn run(mut self) {
        loop {
            let (chunks, clock, closed, thresholds, results) = {
                let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
                while state.chunks.is_empty()
                    && state.clock.is_none()
                    && state.results.is_empty()
                    && !state.closed
                {
                    state = self
                        .inbox
                        .wake
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                state.samples = 0;
                (
                    std::mem::take(&mut state.chunks),
                    state.clock.take(),
                    state.closed,
                    state.thresholds.take(),
                    std::mem::take(&mut state.results),
                )
            };
            if closed {
                break;
            }
            if let Some((threshold, release)) = thresholds {
                self.recognizer
                    .endpointer_mut()
                    .set_thresholds(threshold, release);
            }
            for outcome in results {
                self.submitted.retain(|(id, _)| *id != outcome.id);
                if matches!(outcome.result, Err(AsrError::Aborted)) {
                    continue; // abandoned: the recognizer has already moved on
                }
                self.recognizer
                    .on_decode_result(outcome.id, outcome.result, outcome.decode_ms);
            }
            let mut heard = clock.unwrap_or(f64::NEG_INFINITY);
            for (timestamp, mut samples) in chunks {
                heard = heard.max(timestamp + samples.len() as f64 / SAMPLE_RATE as f64);
                crate::audio::sanitize(&mut samples);
                if let Err(e) = self.recognizer.push_audio(timestamp, &samples) {
                    tracing::warn!("VAD failed on a frame: {e}");
                }
            }
            if let Some(now) = clock {
                if self.recognizer.poll_timeout().is_some_and(|t| t <= now) {
                    self.recognizer.handle_timeout(now);
                }
            }
            self.abort_abandoned();
            self.submit_due();
            while let Some(event) = self.recognizer.poll_event() {
                (self.on_event)(event);
            }
            if heard.is_finite() {
                let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
                state.heard_until = state.heard_until.max(heard);
            }
        }
        self.stop_decoder();
    }

    fn abort_abandoned(&mut self) {
        while let Some(id) = self.recognizer.poll_abandoned_decode() {
            if let Some((_, abort)) = self.submitted.iter().find(|(s, _)| *s == id) {
                abort.store(true, Ordering::Relaxed);
            }
        }
    }

    fn submit_due(&mut self) {
        while let Some(request) = self.recognizer.poll_decode() {
            let abort = Arc::new(AtomicBool::new(false));
            self.submitted.push_back((request.id, abort.clone()));
            let mut state = self.decoder.state.lock().unwrap_or_else(|p| p.into_inner());
            let submitted = &mut self.submitted;
            state.jobs.retain(|j| {
                let unwanted = j.abort.load(Ordering::Relaxed);
                if unwanted {
                    submitted.retain(|(id, _)| *id != j.request.id);
                }
                !unwanted
            });
            state.jobs.push_back(Job { request, abort });
            drop(state);
            self.decoder.wake.notify_one();
        }
    }

    fn stop_decoder(&mut self) {
        if let Ok(mut state) = self.decoder.state.lock() {
            state.closed = true;
            for job in &state.jobs {
                job.abort.store(true, Ordering::Relaxed);
            }
        }
        for (_, abort) in &self.submitted {
            abort.store(true, Ordering::Relaxed);
        }
        self.decoder.wake.notify_one();
        if let Some(thread) = self.decoder_thread.take() {
            if thread.join().is_err() {
                tracing::error!("the ASR decoder thread panicked");
            }
        }
    }
}

/// Runs Whisper for one stream, one decode at a time, within the process-wide decode slots.
struct Decoder {
    session: WhisperSession,
    options: DecodeOptions,
    slots: Arc<DecodeSlots>,
    queue: Arc<DecoderQueue>,
    inbox: Arc<Inbox>,
    open_streams: Arc<AtomicUsize>,
}

impl Decoder {
    fn run(mut self) {
        loop {
            let job = {
                let mut state = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if state.closed {
                        return;
                    }
                    if let Some(job) = state.jobs.pop_front() {
                        break job;
                    }
                    state = self
                        .queue
                        .wake
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
            };
            let mut options = self.options.clone();
            if self.open_streams.load(Ordering::Relaxed) > 1 {
                options.final_threads = options.threads;
            }
            let options = DecodeOptions {
                abort: Some(job.abort.clone()),
                ..options.for_request(&job.request)
            };
            let (result, decode_ms) = {
                let _slot = self.slots.acquire();
                let started = Instant::now();
                let result = self.session.decode(&job.request.audio, &options);
                (result, started.elapsed().as_secs_f64() * 1000.0)
            };
            let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
            state.results.push_back(DecodeOutcome {
                id: job.request.id,
                result,
                decode_ms,
            });
            drop(state);
            self.inbox.wake.notify_one();
        }
    }
}
