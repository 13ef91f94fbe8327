//! Live recognition: one dedicated thread per stream, a shared model, and a process-wide cap on
//! concurrent decodes so that Whisper never oversubscribes the cores the LLM and TTS need.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{AsrError, Result};
use crate::streaming::{AsrEvent, StreamingConfig, StreamingRecognizer};
use crate::vad::SpeechProbability;
use crate::whisper::{DecodeOptions, WhisperModel, SAMPLE_RATE};

/// Audio waiting for a stream's thread, in seconds. Policy when full: drop the oldest audio and
/// count it; the transport is never blocked. It only fills if decoding falls this far behind.
pub const INBOX_SECONDS: f64 = 10.0;

/// Shared by every stream of a process: the model and the decode slots.
#[derive(Clone)]
pub struct AsrEngine {
    model: WhisperModel,
    options: DecodeOptions,
    slots: Arc<DecodeSlots>,
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
        let worker = Worker {
            recognizer: StreamingRecognizer::new(config, vad),
            session,
            options: self.options.clone(),
            slots: self.slots.clone(),
            inbox: inbox.clone(),
            on_event: Box::new(on_event),
        };
        let thread = std::thread::Builder::new()
            .name(format!("asr-{name}"))
            .spawn(move || worker.run())
            .map_err(|e| AsrError::Inference(format!("cannot start the ASR thread: {e}")))?;
        Ok(AsrStream {
            inbox,
            thread: Some(thread),
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
    closed: bool,
}

struct Inbox {
    state: Mutex<InboxState>,
    wake: Condvar,
}

/// The handle a session holds. Dropping it stops the thread.
pub struct AsrStream {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
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

struct Worker {
    recognizer: StreamingRecognizer,
    session: crate::whisper::WhisperSession,
    options: DecodeOptions,
    slots: Arc<DecodeSlots>,
    inbox: Arc<Inbox>,
    on_event: Box<dyn FnMut(AsrEvent) + Send>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let (chunks, clock, closed, thresholds) = {
                let mut state = self.inbox.state.lock().unwrap_or_else(|p| p.into_inner());
                while state.chunks.is_empty() && state.clock.is_none() && !state.closed {
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
                )
            };
            if closed {
                return;
            }
            if let Some((threshold, release)) = thresholds {
                self.recognizer
                    .endpointer_mut()
                    .set_thresholds(threshold, release);
            }
            for (timestamp, mut samples) in chunks {
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
            self.decode_due();
            while let Some(event) = self.recognizer.poll_event() {
                (self.on_event)(event);
            }
        }
    }

    fn decode_due(&mut self) {
        while let Some(request) = self.recognizer.poll_decode() {
            let options = DecodeOptions {
                prompt: Some(request.prompt.clone()),
                ..self.options.clone()
            };
            let _slot = self.slots.acquire();
            let started = Instant::now();
            let result = self.session.decode(&request.audio, &options);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            self.recognizer.on_decode_result(request.id, result, ms);
        }
    }
}
