//! The caller's audio on its way to the ASR, through the echo canceller on a thread of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::FRAME_S;
use talkline_asr::audio::To16k;

/// Caller audio (16 kHz) from the echo thread to the control loop. Policy when full: the chunk
/// is dropped and counted; the echo thread never blocks.
pub(super) const CLEANED_QUEUE: usize = 100;
/// Audio waiting for the echo thread, both directions in one queue so that their order is kept.
/// Policy when full: the chunk is dropped and counted (the thread runs at about 3% of a core,
/// so a full queue means it died).
const ECHO_QUEUE: usize = 200;
/// AEC3's echo reduction (ERLE) from which its echo path counts as found: at a call's start it
/// stays near 0 dB until its filter has converged, and falls back there whenever the path moves
/// and the filter is reset. Measured in `tests/serve_echo.rs`: 5-9 dB some 3 s into the first
/// reply, 30-40 dB afterwards.
const ECHO_PATH_FOUND_ERLE_DB: f64 = 6.0;

enum EchoInput {
    /// 16 kHz agent audio as it was handed to the transport (zeros while silent).
    Played(Vec<f32>),
    /// 16 kHz caller audio.
    Heard(Vec<f32>),
    /// The caller's audio is back after a pause in the stream.
    Resumed,
}

/// The caller's audio on its way to the ASR, with the agent's own voice taken out (see
/// [`crate::echo`]): what was played is the canceller's reference, silence included, so that its
/// timeline never slips. AEC3's state is not `Send`, so it lives on a thread of its own, fed in
/// order from the control loop; cleaned audio comes back as `cleaned`.
pub(super) struct EchoPath {
    input: Option<std::sync::mpsc::SyncSender<EchoInput>>,
    thread: Option<std::thread::JoinHandle<()>>,
    to16k: Option<To16k>,
    dropped: u64,
    path_found: Arc<AtomicBool>,
}

impl EchoPath {
    /// No canceller when `enabled` is false: [`EchoPath::heard`] hands the audio straight back.
    pub(super) fn new(
        enabled: bool,
        out_rate: u32,
        cleaned: mpsc::Sender<Vec<f32>>,
    ) -> anyhow::Result<Self> {
        if !enabled {
            return Ok(Self {
                input: None,
                thread: None,
                to16k: None,
                dropped: 0,
                path_found: Arc::new(AtomicBool::new(true)),
            });
        }
        let (input, inbox) = std::sync::mpsc::sync_channel(ECHO_QUEUE);
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let path_found = Arc::new(AtomicBool::new(false));
        let found = Arc::clone(&path_found);
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || cancel_echo(inbox, cleaned, ready_tx, &found))?;
        ready
            .recv()
            .map_err(|_| anyhow::anyhow!("the echo thread ended before starting"))??;
        Ok(Self {
            input: Some(input),
            thread: Some(thread),
            to16k: Some(To16k::new(out_rate)?),
            dropped: 0,
            path_found,
        })
    }

    /// Whether the canceller has found the echo path (always, without a canceller): until then
    /// the agent's own voice may leak through it.
    pub(super) fn path_found(&self) -> bool {
        self.path_found.load(Ordering::Relaxed)
    }

    /// Whether a canceller runs: its reference is the output clock's frames, so that clock must
    /// keep its phase.
    pub(super) fn cancels(&self) -> bool {
        self.input.is_some()
    }

    /// Caller audio: returned at once when there is no canceller, else cleaned on the thread.
    /// `after_gap`: the stream had stopped for a while before this audio.
    pub(super) fn heard(&mut self, audio: Vec<f32>, after_gap: bool) -> Option<Vec<f32>> {
        match &self.input {
            None => Some(audio),
            Some(input) => {
                if after_gap {
                    self.dropped += u64::from(input.try_send(EchoInput::Resumed).is_err());
                }
                self.dropped += u64::from(input.try_send(EchoInput::Heard(audio)).is_err());
                None
            }
        }
    }

    pub(super) fn played(&mut self, frame: &[f32]) {
        if let (Some(input), Some(to16k)) = (&self.input, &mut self.to16k) {
            let played = to16k.push(frame);
            self.dropped += u64::from(input.try_send(EchoInput::Played(played)).is_err());
        }
    }

    pub(super) fn played_silence(&mut self) {
        if let Some(input) = &self.input {
            let silence = vec![0.0; (16_000.0 * FRAME_S) as usize];
            self.dropped += u64::from(input.try_send(EchoInput::Played(silence)).is_err());
        }
    }
}

impl Drop for EchoPath {
    fn drop(&mut self) {
        self.input.take(); // the thread ends when its inbox closes
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if self.dropped > 0 {
            tracing::warn!(dropped = self.dropped, "echo canceller input dropped");
        }
    }
}

fn cancel_echo(
    inbox: std::sync::mpsc::Receiver<EchoInput>,
    cleaned: mpsc::Sender<Vec<f32>>,
    ready: std::sync::mpsc::SyncSender<anyhow::Result<()>>,
    path_found: &AtomicBool,
) {
    let mut canceller = match crate::echo::EchoCanceller::new() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    // The canceller's fixed delay is dropped from the start of its output, so that every sample
    // keeps the media time it had at the transport.
    let mut to_skip = crate::echo::LATENCY_SAMPLES;
    let mut dropped = 0u64;
    // AEC3's estimates go to the debug log once a second of caller audio: a jump in its delay
    // is the alignment slipping.
    const METRICS_EVERY_SAMPLES: usize = 16_000;
    let mut heard_samples = 0usize;
    while let Ok(input) = inbox.recv() {
        match input {
            EchoInput::Played(samples) => canceller.push_render(&samples),
            EchoInput::Resumed => canceller.capture_resumed_after_gap(),
            EchoInput::Heard(samples) => {
                heard_samples += samples.len();
                if heard_samples >= METRICS_EVERY_SAMPLES {
                    heard_samples = 0;
                    let m = canceller.metrics();
                    tracing::debug!(erle_db = m.erle_db, delay_ms = m.delay_ms, "echo canceller");
                }
                let mut out = canceller.process_capture(&samples);
                let found = canceller.metrics().erle_db >= ECHO_PATH_FOUND_ERLE_DB;
                path_found.store(found, Ordering::Relaxed);
                let skip = to_skip.min(out.len());
                out.drain(..skip);
                to_skip -= skip;
                if !out.is_empty() && cleaned.try_send(out).is_err() {
                    dropped += 1;
                }
            }
        }
    }
    let metrics = canceller.metrics();
    tracing::debug!(
        erle_db = metrics.erle_db,
        delay_ms = metrics.delay_ms,
        dropped,
        "echo canceller finished"
    );
}
