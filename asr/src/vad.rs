//! Voice activity detection: a speech probability per window (Silero VAD through ONNX Runtime, or
//! an energy fallback) and the [`Endpointer`], a sans-I/O state machine driven by media time.

use std::path::Path;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;

use crate::error::{AsrError, Result};
use crate::whisper::SAMPLE_RATE;

/// Scores fixed-size windows of 16 kHz audio.
pub trait SpeechProbability: Send {
    /// Samples per window.
    fn window_samples(&self) -> usize;
    /// Probability in [0, 1] that `window` (exactly `window_samples()` long) holds speech.
    fn probability(&mut self, window: &[f32]) -> Result<f32>;
    /// Forgets the stream (new utterance source).
    fn reset(&mut self);
    fn name(&self) -> &'static str;
}

/// Silero VAD v5/v6. It only accepts 512-sample windows at 16 kHz (32 ms), preceded by the last
/// 64 samples of the previous window, and carries a recurrent state between calls.
pub struct SileroVad {
    session: Session,
    state: Vec<f32>,
    input: Vec<f32>,
}

const SILERO_WINDOW: usize = 512;
const SILERO_CONTEXT: usize = 64;
const SILERO_STATE: usize = 2 * 128;

impl SileroVad {
    /// Loads the model into a session of the given (process-wide) ONNX Runtime environment.
    pub fn load(environment: &Environment, model: &Path) -> Result<Self> {
        let onnx = |e: ort::Error| AsrError::Onnx(format!("Silero VAD {}: {e}", model.display()));
        if !model.is_file() {
            return Err(AsrError::ModelLoad {
                path: model.to_path_buf(),
                reason: "no such file; run `talkline models fetch --only silero-vad`".into(),
            });
        }
        let session = Session::builder(environment)
            .map_err(onnx)?
            .with_intra_threads(1)
            .map_err(|e| onnx(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| onnx(e.into()))?
            .commit_from_file(model)
            .map_err(onnx)?;
        Ok(SileroVad {
            session,
            state: vec![0.0; SILERO_STATE],
            input: vec![0.0; SILERO_CONTEXT + SILERO_WINDOW],
        })
    }
}

impl SpeechProbability for SileroVad {
    fn window_samples(&self) -> usize {
        SILERO_WINDOW
    }

    fn probability(&mut self, window: &[f32]) -> Result<f32> {
        if window.len() != SILERO_WINDOW {
            return Err(AsrError::Onnx(format!(
                "Silero VAD needs {SILERO_WINDOW}-sample windows, got {}",
                window.len()
            )));
        }
        // input = last 64 samples of the previous window ++ this window.
        self.input.copy_within(SILERO_WINDOW.., 0);
        self.input[SILERO_CONTEXT..].copy_from_slice(window);
        let onnx = |e: ort::Error| AsrError::Onnx(format!("Silero VAD: {e}"));
        let sr = [SAMPLE_RATE as i64];
        let outputs = self
            .session
            .run(ort::inputs![
                "input" => TensorRef::from_array_view(([1usize, SILERO_CONTEXT + SILERO_WINDOW], &self.input[..])).map_err(onnx)?,
                "state" => TensorRef::from_array_view(([2usize, 1, 128], &self.state[..])).map_err(onnx)?,
                "sr" => TensorRef::from_array_view(([0usize; 0], &sr[..])).map_err(onnx)?,
            ])
            .map_err(onnx)?;
        let (_, probability) = outputs["output"]
            .try_extract_tensor::<f32>()
            .map_err(onnx)?;
        let probability = probability.first().copied().unwrap_or(0.0);
        let (_, state) = outputs["stateN"]
            .try_extract_tensor::<f32>()
            .map_err(onnx)?;
        if state.len() == SILERO_STATE {
            self.state.copy_from_slice(state);
        }
        Ok(if probability.is_finite() {
            probability
        } else {
            0.0
        })
    }

    fn reset(&mut self) {
        self.state.fill(0.0);
        self.input.fill(0.0);
    }

    fn name(&self) -> &'static str {
        "silero"
    }
}

/// The fallback when the Silero model is missing: loudness against an adaptive noise floor.
/// Much weaker than Silero on noise and music; it exists so that a missing model degrades
/// endpointing instead of disabling the agent.
pub struct EnergyVad {
    noise_floor_db: f32,
}

impl Default for EnergyVad {
    fn default() -> Self {
        EnergyVad {
            noise_floor_db: -60.0,
        }
    }
}

/// 30 ms at 16 kHz.
const ENERGY_WINDOW: usize = 480;

impl SpeechProbability for EnergyVad {
    fn window_samples(&self) -> usize {
        ENERGY_WINDOW
    }

    fn probability(&mut self, window: &[f32]) -> Result<f32> {
        let mean_square = window.iter().map(|s| s * s).sum::<f32>() / window.len().max(1) as f32;
        let db = 10.0 * (mean_square + 1e-12).log10();
        // The floor follows quiet windows quickly and loud ones slowly.
        let rate = if db < self.noise_floor_db { 0.3 } else { 0.002 };
        self.noise_floor_db += (db - self.noise_floor_db) * rate;
        // 0.5 at 15 dB above the floor, saturating at 25 dB.
        let above = db - self.noise_floor_db.max(-70.0);
        Ok(((above - 5.0) / 20.0).clamp(0.0, 1.0))
    }

    fn reset(&mut self) {
        *self = EnergyVad::default();
    }

    fn name(&self) -> &'static str {
        "energy"
    }
}

/// Endpointing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VadConfig {
    /// Probability at or above which a window is speech.
    pub threshold: f32,
    /// Below this (hysteresis), a window in speech counts as silence.
    pub release_threshold: f32,
    /// Speech must last this long before `SpeechStarted` (coughs and clicks are ignored).
    pub min_speech_s: f64,
    /// Silence must last this long before `SpeechEnded`.
    pub min_silence_s: f64,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            threshold: 0.5,
            release_threshold: 0.35,
            min_speech_s: 0.1,
            min_silence_s: 0.2,
        }
    }
}

/// What the endpointer decided. Times are media seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VadEvent {
    /// Speech began at `at` (confirmed `min_speech_s` later).
    SpeechStarted { at: f64 },
    /// Inside speech, a pause began at `at`; speech may resume.
    PauseStarted { at: f64 },
    /// The pause ended without becoming the end of speech.
    SpeechResumed { at: f64 },
    /// The pause that began at `pause_at` outlasted `min_silence_s`.
    SpeechEnded { pause_at: f64 },
}

/// The speech/silence state machine. It is told the media time and never reads a clock, so tests
/// drive it with a virtual clock and a transport that stops sending frames still ends the turn
/// through [`Endpointer::handle_timeout`].
#[derive(Debug, Clone)]
pub struct Endpointer {
    config: VadConfig,
    state: EndpointState,
    /// End of the last scored window.
    last_audio_end: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum EndpointState {
    Silence,
    MaybeSpeech { since: f64 },
    Speech { pause_since: Option<f64> },
}

impl Endpointer {
    pub fn new(config: VadConfig) -> Self {
        Endpointer {
            config,
            state: EndpointState::Silence,
            last_audio_end: 0.0,
        }
    }

    pub fn config(&self) -> &VadConfig {
        &self.config
    }

    /// Changes the thresholds live (the echo guard raises them while the agent speaks).
    pub fn set_thresholds(&mut self, threshold: f32, release_threshold: f32) {
        self.config.threshold = threshold;
        self.config.release_threshold = release_threshold.min(threshold);
    }

    pub fn in_speech(&self) -> bool {
        matches!(self.state, EndpointState::Speech { .. })
    }

    /// Feeds the probability of the window `[start, end)`; returns at most one event.
    pub fn on_window(&mut self, start: f64, end: f64, probability: f32) -> Option<VadEvent> {
        self.last_audio_end = end;
        let speech = probability >= self.config.threshold;
        let silence = probability < self.config.release_threshold;
        match self.state {
            EndpointState::Silence => {
                if speech {
                    self.state = EndpointState::MaybeSpeech { since: start };
                    return self.confirm_speech(end);
                }
                None
            }
            EndpointState::MaybeSpeech { .. } => {
                if silence {
                    self.state = EndpointState::Silence;
                    return None;
                }
                self.confirm_speech(end)
            }
            EndpointState::Speech { pause_since } => match (pause_since, speech, silence) {
                (None, _, true) => {
                    self.state = EndpointState::Speech {
                        pause_since: Some(start),
                    };
                    Some(VadEvent::PauseStarted { at: start })
                }
                (Some(_), true, _) => {
                    self.state = EndpointState::Speech { pause_since: None };
                    Some(VadEvent::SpeechResumed { at: start })
                }
                (Some(_), _, _) => self.handle_timeout(end),
                (None, _, false) => None,
            },
        }
    }

    fn confirm_speech(&mut self, now: f64) -> Option<VadEvent> {
        if let EndpointState::MaybeSpeech { since } = self.state {
            if now - since >= self.config.min_speech_s - 1e-9 {
                self.state = EndpointState::Speech { pause_since: None };
                return Some(VadEvent::SpeechStarted { at: since });
            }
        }
        None
    }

    /// When [`Endpointer::handle_timeout`] must next be called if no audio arrives: missing audio
    /// counts as silence from the end of the last window.
    pub fn poll_timeout(&self) -> Option<f64> {
        match self.state {
            EndpointState::Speech { pause_since } => {
                Some(pause_since.unwrap_or(self.last_audio_end) + self.config.min_silence_s)
            }
            _ => None,
        }
    }

    /// Fires `SpeechEnded` once the pause (or the gap in audio) has lasted `min_silence_s`.
    pub fn handle_timeout(&mut self, now: f64) -> Option<VadEvent> {
        let EndpointState::Speech { pause_since } = self.state else {
            return None;
        };
        let pause_at = pause_since.unwrap_or(self.last_audio_end);
        if now - pause_at >= self.config.min_silence_s - 1e-9 {
            self.state = EndpointState::Silence;
            return Some(VadEvent::SpeechEnded { pause_at });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the endpointer with 32 ms windows of the given probabilities.
    fn drive(e: &mut Endpointer, probs: &[f32], t0: f64) -> Vec<(f64, VadEvent)> {
        let w = 0.032;
        probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| {
                let start = t0 + i as f64 * w;
                e.on_window(start, start + w, p).map(|ev| (start + w, ev))
            })
            .collect()
    }

    #[test]
    fn a_click_shorter_than_min_speech_is_ignored() {
        let mut e = Endpointer::new(VadConfig::default());
        let events = drive(&mut e, &[0.0, 0.9, 0.1, 0.0, 0.0], 0.0);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn speech_then_silence_gives_start_pause_end_in_media_time() {
        let mut e = Endpointer::new(VadConfig::default());
        let mut probs = vec![0.0; 3];
        probs.extend([0.9; 20]);
        probs.extend([0.0; 12]);
        let events = drive(&mut e, &probs, 0.0);
        let kinds: Vec<_> = events.iter().map(|(_, ev)| *ev).collect();
        assert_eq!(kinds.len(), 3, "{events:?}");
        assert!(matches!(kinds[0], VadEvent::SpeechStarted { at } if (at - 0.096).abs() < 1e-9));
        assert!(matches!(kinds[1], VadEvent::PauseStarted { at } if (at - 0.736).abs() < 1e-9));
        // Fires at the first window end at least 200 ms after the pause began.
        let (fired_at, ended) = events[2];
        assert!(
            matches!(ended, VadEvent::SpeechEnded { pause_at } if (pause_at - 0.736).abs() < 1e-9)
        );
        assert!(fired_at - 0.736 >= 0.2 && fired_at - 0.736 < 0.2 + 0.032);
    }

    #[test]
    fn a_short_pause_does_not_end_speech() {
        let mut e = Endpointer::new(VadConfig::default());
        let mut probs = vec![0.9; 10];
        probs.extend([0.0; 4]); // 128 ms
        probs.extend([0.9; 10]);
        let events = drive(&mut e, &probs, 0.0);
        assert!(!events
            .iter()
            .any(|(_, ev)| matches!(ev, VadEvent::SpeechEnded { .. })));
        assert!(
            matches!(events.last(), Some((_, VadEvent::SpeechResumed { at })) if (at - 0.448).abs() < 1e-9)
        );
        assert!(e.in_speech());
    }

    #[test]
    fn timers_fire_when_frames_stop_arriving() {
        let mut e = Endpointer::new(VadConfig::default());
        drive(&mut e, &[0.9; 10], 0.0); // speech until 0.32 s, then the transport goes quiet
        let deadline = e.poll_timeout().expect("a timer while in speech");
        assert!((deadline - (0.32 + 0.2)).abs() < 1e-9);
        assert_eq!(e.handle_timeout(deadline - 0.01), None);
        assert!(matches!(
            e.handle_timeout(deadline),
            Some(VadEvent::SpeechEnded { pause_at }) if (pause_at - 0.32).abs() < 1e-9
        ));
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn energy_vad_separates_a_tone_from_silence() {
        let mut vad = EnergyVad::default();
        let quiet = vec![0.0005f32; ENERGY_WINDOW];
        for _ in 0..20 {
            assert!(vad.probability(&quiet).unwrap() < 0.2);
        }
        let loud: Vec<f32> = (0..ENERGY_WINDOW)
            .map(|i| (i as f32 * 0.1).sin() * 0.3)
            .collect();
        assert!(vad.probability(&loud).unwrap() > 0.9);
    }
}
