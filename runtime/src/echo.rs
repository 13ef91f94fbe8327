//! Acoustic echo cancellation of the caller's 16 kHz mono input against the agent's own audio.
//!
//! A transport can loop the agent's voice back into the caller's stream: a phone line with
//! sidetone or line echo, a speakerphone, a WebSocket client that plays and records at once. That
//! echo arrives 20-300 ms late, attenuated and coded (G.711, Opus); raising the VAD threshold
//! while the agent speaks (the turn manager's echo guard) lets loud echo through. This removes it
//! before the VAD and the ASR see the audio, with WebRTC's AEC3 (the `aec3` crate, a pure-Rust
//! port): a delay estimator finds where the agent's audio reappears, an adaptive frequency-domain
//! filter subtracts it, and a suppressor removes the residual while keeping the caller's speech
//! (double talk).
//!
//! Sans-I/O: no clocks, no threads. The session pushes what it hands to the transport
//! ([`EchoCanceller::push_render`]) and runs the caller's audio through
//! [`EchoCanceller::process_capture`].
//!
//! **Alignment.** Both streams are cut into 10 ms frames and each capture frame is processed
//! after exactly one render frame, taken from a render FIFO, so the far-end timeline advances
//! with the caller's audio whatever the session sends. AEC3 aligns the two by counting frames,
//! not by arrival time, and that count must not slip while it has an echo path: a 10 ms shift of
//! the agent's audio against the caller's throws its converged filter away (measured: echo
//! reduction fell from about 60 dB to under 10 dB for seconds). So the alignment is fixed when
//! agent audio first arrives after the FIFO ran dry (an *anchor*: queued behind
//! [`RENDER_HEADROOM`] of silence, for small bursts of caller audio), and kept afterwards: when a
//! burst of caller audio outruns the agent audio, silence stands in for the missing frames and
//! the same amount of agent audio is skipped when it arrives (a short echo leak, no slip). Only
//! a gap longer than [`MAX_RENDER_DEBT`] (the agent stopped, or the caller's clock drifted) lets
//! the next agent audio anchor anew. The headroom is taken off the echo delay AEC3 sees, which
//! must stay positive: echo paths shorter than about 15 ms are not cancelled (transports loop
//! back at 20-300 ms; AEC3 finds delays up to about 500 ms). When caller audio stalls instead,
//! at most [`MAX_RENDER_BACKLOG`] of agent audio waits, the oldest dropped first.
//!
//! The session should push every frame it sends, **and 20 ms of zeros on every tick where it
//! sends none**: the FIFO then never runs dry between replies, and the echo path found during
//! one reply is still aligned for the next. Pushing nothing while silent also works, at the cost
//! of realigning (AEC3 reconverging, echo leaking for a few hundred ms) at the start of each
//! reply.
//!
//! **Latency.** Output lags input by exactly [`LATENCY_SAMPLES`] (18 ms: 10 ms of framing here,
//! 8 ms inside AEC3): the first calls return that much silence first. A sample's media time in
//! the processed stream is its input media time plus 18 ms.

use std::collections::VecDeque;

use aec3::api::config::EchoCanceller3Config;
use aec3::api::control::EchoControl;
use aec3::audio_processing::aec3::echo_canceller3::EchoCanceller3;
use aec3::audio_processing::audio_buffer::AudioBuffer;
use aec3::audio_processing::stream_config::StreamConfig;

/// The only rate the canceller runs at (the session's internal rate).
pub const SAMPLE_RATE: usize = 16_000;
/// AEC3's frame: 10 ms.
pub const FRAME_SAMPLES: usize = SAMPLE_RATE / 100;
/// AEC3's own delay: it works on 64-sample blocks, and cutting 10 ms frames into blocks and back
/// holds two of them.
const AEC3_DELAY_SAMPLES: usize = 128;
/// Fixed delay of [`EchoCanceller::process_capture`]'s output behind its input: 18 ms, our 10 ms
/// framing (any chunk length in, as many samples out) plus AEC3's 8 ms.
pub const LATENCY_SAMPLES: usize = FRAME_SAMPLES + AEC3_DELAY_SAMPLES;
/// Agent audio waiting for the caller's audio to catch up: 250 ms. Policy when full: drop the
/// oldest. AEC3's delay estimator spans about 500 ms; render queued longer than this plus the
/// transport's round trip could not be matched to its echo anyway.
pub const MAX_RENDER_BACKLOG: usize = SAMPLE_RATE / 4;
/// Silence queued ahead of agent audio that starts a new alignment: 10 ms. More would absorb
/// bigger bursts of caller audio, but it comes off the echo delay AEC3 sees, which must stay
/// above zero for the shortest loopback (20 ms).
pub const RENDER_HEADROOM: usize = SAMPLE_RATE * 10 / 1000;
/// Agent audio the caller's audio may run ahead of, kept aligned by skipping it when it comes:
/// 60 ms. Past that the agent is taken to have stopped, and its next audio anchors anew.
pub const MAX_RENDER_DEBT: usize = SAMPLE_RATE * 60 / 1000;

/// A later echo, by up to this many 4 ms blocks (24 ms), keeps AEC3's alignment; its filter
/// (52 ms) still spans the echo and adapts to it. By default AEC3 realigns on a one-block change
/// and throws its filter away. A client that plays the agent's audio as it arrives falls a frame
/// behind whenever a frame comes late, and catches up only when the reply ends: measured in
/// `tests/serve_echo.rs`, the delay moved 48 -> 68 ms within a reply, and the reset filter had not
/// reconverged when the next reply began, which leaked back as the caller. AEC3 takes a shorter
/// delay at once, whatever this is.
const HYSTERESIS_BLOCKS: usize = 6;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    #[error("AEC3 rejected its configuration ({field})")]
    InvalidConfig { field: &'static str },
}

/// AEC3's own estimates, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EchoMetrics {
    /// Echo return loss enhancement: how much the canceller takes off the echo, in dB (smoothed
    /// estimate from AEC3's linear filter; 0 before any echo is found).
    pub erle_db: f64,
    /// Echo return loss: how much weaker the echo is than the agent's audio, in dB.
    pub erl_db: f64,
    /// The echo delay AEC3 currently aligns to, in ms: the transport's loopback delay, less
    /// [`RENDER_HEADROOM`] and however far the caller's audio lagged when the alignment was set.
    pub delay_ms: i32,
}

/// One caller's echo canceller, 16 kHz mono. Not shared: one per session.
pub struct EchoCanceller {
    aec: EchoCanceller3,
    stream: StreamConfig,
    render_frame: AudioBuffer,
    capture_frame: AudioBuffer,
    /// Agent audio not yet paired with a capture frame.
    render: VecDeque<f32>,
    /// Caller audio short of a whole frame.
    capture: Vec<f32>,
    /// Processed audio not yet returned; starts with [`FRAME_SAMPLES`] of silence so that every
    /// call can return as many samples as it was given.
    output: VecDeque<f32>,
    /// The FIFO ran dry since agent audio last arrived: the next agent audio starts a new
    /// alignment.
    starved: bool,
    /// Render samples replaced by silence because they had not arrived in time; skipped when
    /// they do, so the alignment holds.
    debt: usize,
    render_dropped: u64,
    render_underruns: u64,
}

impl EchoCanceller {
    pub fn new() -> Result<Self, EchoError> {
        let mut config = EchoCanceller3Config::default();
        config.delay.hysteresis_limit_blocks = HYSTERESIS_BLOCKS;
        if !config.validate() {
            return Err(EchoError::InvalidConfig {
                field: "EchoCanceller3Config::default",
            });
        }
        let buffer = || AudioBuffer::from_sample_rates(SAMPLE_RATE, 1, SAMPLE_RATE, 1, SAMPLE_RATE);
        Ok(EchoCanceller {
            aec: EchoCanceller3::new(config, SAMPLE_RATE as i32, 1, 1),
            stream: StreamConfig::new(SAMPLE_RATE, 1, false),
            render_frame: buffer(),
            capture_frame: buffer(),
            render: VecDeque::with_capacity(MAX_RENDER_BACKLOG + 2 * FRAME_SAMPLES),
            capture: Vec::with_capacity(FRAME_SAMPLES),
            output: std::iter::repeat_n(0.0, FRAME_SAMPLES).collect(),
            starved: true,
            debt: 0,
            render_dropped: 0,
            render_underruns: 0,
        })
    }

    /// The agent audio exactly as it was handed to the transport, at 16 kHz, in order, any chunk
    /// length. Push 20 ms of zeros for ticks that send nothing (see the module notes).
    pub fn push_render(&mut self, samples: &[f32]) {
        if samples.is_empty() {
            return;
        }
        if self.starved {
            self.render
                .extend(std::iter::repeat_n(0.0, RENDER_HEADROOM));
            self.starved = false;
        }
        let owed = self.debt.min(samples.len());
        self.debt -= owed;
        self.render
            .extend(samples[owed..].iter().map(|&s| sanitize(s)));
        let excess = self.render.len().saturating_sub(MAX_RENDER_BACKLOG);
        if excess > 0 {
            self.render.drain(..excess);
            self.render_dropped += excess as u64;
        }
    }

    /// Caller audio at 16 kHz, any chunk length. Returns as many samples, with the echo removed,
    /// [`LATENCY_SAMPLES`] behind the input.
    pub fn process_capture(&mut self, samples: &[f32]) -> Vec<f32> {
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (FRAME_SAMPLES - self.capture.len()).min(rest.len());
            self.capture
                .extend(rest[..take].iter().map(|&s| sanitize(s)));
            rest = &rest[take..];
            if self.capture.len() == FRAME_SAMPLES {
                self.process_frame();
            }
        }
        // Holds: output.len() == FRAME_SAMPLES + processed - returned, and the unprocessed
        // remainder (self.capture) is shorter than FRAME_SAMPLES, so it covers samples.len().
        debug_assert!(self.output.len() >= samples.len());
        let n = samples.len().min(self.output.len());
        let mut out: Vec<f32> = self.output.drain(..n).collect();
        out.resize(samples.len(), 0.0);
        out
    }

    /// The caller's audio stopped for a while (a half-duplex client, a network stall): the agent
    /// audio queued meanwhile met no microphone, so it can echo into nothing that follows.
    /// Without this, the last 250 ms of it would be paired with the caller's next words, and
    /// AEC3 would suppress their onset as if it were echo.
    pub fn capture_resumed_after_gap(&mut self) {
        self.render.clear();
        self.starved = true;
        self.debt = 0;
    }

    /// AEC3's current estimates.
    pub fn metrics(&self) -> EchoMetrics {
        let m = self.aec.metrics();
        EchoMetrics {
            erle_db: m.echo_return_loss_enhancement,
            erl_db: m.echo_return_loss,
            delay_ms: m.delay_ms,
        }
    }

    /// Agent samples dropped because the caller's audio fell more than [`MAX_RENDER_BACKLOG`]
    /// behind.
    pub fn render_dropped(&self) -> u64 {
        self.render_dropped
    }

    /// Times the alignment was given up (the render FIFO stayed dry past [`MAX_RENDER_DEBT`]):
    /// the session stopped pushing, or caller audio came in a burst longer than that. The next
    /// agent audio anchors anew, and AEC3 may need a few hundred ms to find the echo again.
    pub fn render_underruns(&self) -> u64 {
        self.render_underruns
    }

    fn process_frame(&mut self) {
        let mut frame = [0.0f32; FRAME_SAMPLES];
        let available = self.render.len().min(FRAME_SAMPLES);
        for (dst, src) in frame.iter_mut().zip(self.render.drain(..available)) {
            *dst = src;
        }
        if available < FRAME_SAMPLES && !self.starved {
            self.debt += FRAME_SAMPLES - available;
            if self.debt > MAX_RENDER_DEBT {
                self.starved = true;
                self.debt = 0;
                self.render_underruns += 1;
            }
        }
        self.render_frame.copy_from(&[&frame[..]], &self.stream);
        self.render_frame.split_into_frequency_bands();
        self.aec.analyze_render(&mut self.render_frame);

        self.capture_frame
            .copy_from(&[&self.capture[..]], &self.stream);
        self.capture.clear();
        self.aec.analyze_capture(&mut self.capture_frame);
        self.capture_frame.split_into_frequency_bands();
        self.aec.process_capture(&mut self.capture_frame, false);
        self.capture_frame.merge_frequency_bands();
        let mut processed = [0.0f32; FRAME_SAMPLES];
        self.capture_frame
            .copy_to_stream(&self.stream, &mut [&mut processed[..]]);
        self.output.extend(processed);
    }
}

/// NaN or infinity from a transport would poison AEC3's filter state for the whole call.
fn sanitize(sample: f32) -> f32 {
    if sample.is_finite() {
        sample.clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::time::Instant;

    use talkline_asr::vad::{SileroVad, SpeechProbability};

    use super::*;
    use crate::models::ModelStore;
    use crate::twilio::{mulaw_decode, mulaw_encode};

    const TICK: usize = 320;
    /// Caller audio arrives in chunks of uneven length, as transports deliver it.
    const CHUNKS: [usize; 7] = [137, 320, 41, 480, 302, 160, 999];

    fn energy(x: &[f32]) -> f64 {
        x.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>()
    }

    fn db(ratio: f64) -> f64 {
        10.0 * ratio.max(1e-20).log10()
    }

    /// A transport's loopback: `delay_ms` late, `gain_db` quieter, optionally through G.711.
    fn loopback(agent: &[f32], len: usize, delay_ms: usize, gain_db: f32, mulaw: bool) -> Vec<f32> {
        let delay = delay_ms * SAMPLE_RATE / 1000;
        let gain = 10f32.powf(gain_db / 20.0);
        (0..len)
            .map(|i| {
                let s = i
                    .checked_sub(delay)
                    .and_then(|j| agent.get(j))
                    .map_or(0.0, |&s| s * gain);
                if mulaw {
                    let pcm = (s * 32767.0).round().clamp(-32768.0, 32767.0) as i16;
                    f32::from(mulaw_decode(mulaw_encode(pcm))) / 32768.0
                } else {
                    s
                }
            })
            .collect()
    }

    /// How the test session behaves.
    #[derive(Clone, Copy)]
    struct Driver {
        /// How far the caller's audio may run ahead of the agent's, in samples. Physically it
        /// lags (it holds the past); a lead models a reply that started while a burst of caller
        /// audio was still in flight.
        lead: usize,
        /// Push all-zero ticks (the contract) rather than skipping them.
        push_silence: bool,
    }

    const SESSION: Driver = Driver {
        lead: 0,
        push_silence: true,
    };

    /// Drives the canceller as the session does: every 20 ms tick one agent frame goes out (none
    /// once the agent is done), and the caller's audio up to that tick comes in, in uneven
    /// chunks, so capture runs up to one chunk behind render. Returns the output aligned with
    /// `capture` (the fixed latency taken off) and the seconds spent in `process_capture`.
    fn run_session(
        aec: &mut EchoCanceller,
        agent: &[f32],
        capture: &[f32],
        driver: Driver,
    ) -> (Vec<f32>, f64) {
        let mut out = Vec::with_capacity(capture.len() + LATENCY_SAMPLES);
        let mut fed = 0;
        let mut chunk = CHUNKS.iter().cycle();
        let mut spent = 0.0;
        let mut tick = 0;
        while fed < capture.len() {
            if let Some(frame) = agent.get(tick * TICK..((tick + 1) * TICK).min(agent.len())) {
                if driver.push_silence || frame.iter().any(|&s| s != 0.0) {
                    aec.push_render(frame);
                }
            }
            tick += 1;
            loop {
                let n = (*chunk.next().expect("cycle")).min(capture.len() - fed);
                if n == 0 || fed + n > tick * TICK + driver.lead {
                    break;
                }
                let start = Instant::now();
                let processed = aec.process_capture(&capture[fed..fed + n]);
                spent += start.elapsed().as_secs_f64();
                assert_eq!(processed.len(), n);
                out.extend(processed);
                fed += n;
            }
        }
        out.extend(aec.process_capture(&[0.0; LATENCY_SAMPLES]));
        (out.split_off(LATENCY_SAMPLES), spent)
    }

    /// Speech-like noise: white noise through a resonance, gated by a 4 Hz syllable envelope.
    fn babble(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        let (mut y1, mut y2) = (0.0f32, 0.0f32);
        (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                let y = noise + 1.6 * y1 - 0.8 * y2;
                (y2, y1) = (y1, y);
                let t = i as f32 / SAMPLE_RATE as f32;
                let envelope = (std::f32::consts::TAU * 4.0 * t).sin().max(0.0);
                0.05 * y * envelope
            })
            .collect()
    }

    #[test]
    fn output_keeps_length_and_a_fixed_10_ms_latency() {
        let mut aec = EchoCanceller::new().expect("default config");
        let input = babble(SAMPLE_RATE * 2, 7);
        let (out, _) = run_session(&mut aec, &[], &input, SESSION);
        assert_eq!(out.len(), input.len());
        // No agent audio: the caller passes through, same timing, same level.
        let skip = SAMPLE_RATE / 2;
        let change = db(energy(&out[skip..]) / energy(&input[skip..]));
        let error = db(energy(
            &out[skip..]
                .iter()
                .zip(&input[skip..])
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
        ) / energy(&input[skip..]));
        eprintln!("pass-through: level {change:+.2} dB, difference {error:.1} dB");

        assert!(change.abs() < 0.5, "level changed by {change:.2} dB");
        assert!(error < -20.0, "output differs from input by {error:.1} dB");
    }

    #[test]
    fn non_finite_input_does_not_poison_the_filter() {
        let mut aec = EchoCanceller::new().expect("default config");
        aec.push_render(&[f32::NAN; 480]);
        let out = aec.process_capture(&[f32::INFINITY; 480]);
        assert!(out.iter().all(|s| s.is_finite()));
        let out = aec.process_capture(&babble(1600, 3));
        assert!(out.iter().all(|s| s.is_finite()));
    }

    #[test]
    fn render_backlog_is_bounded() {
        let mut aec = EchoCanceller::new().expect("default config");
        aec.push_render(&vec![0.1; MAX_RENDER_BACKLOG + 1000]);
        assert_eq!(aec.render_dropped(), (RENDER_HEADROOM + 1000) as u64);
    }

    #[test]
    fn cancels_a_delayed_attenuated_loopback_of_babble_from_20_to_300_ms() {
        let agent = babble(SAMPLE_RATE * 6, 1);
        for delay_ms in [20, 120, 300] {
            let mut aec = EchoCanceller::new().expect("default config");
            let echo = loopback(&agent, agent.len(), delay_ms, -6.0, false);
            let (out, _) = run_session(&mut aec, &agent, &echo, SESSION);
            let settled = SAMPLE_RATE;
            let reduction = db(energy(&echo[settled..]) / energy(&out[settled..]));
            eprintln!(
                "babble, {delay_ms} ms: echo reduced by {reduction:.1} dB, {:?}",
                aec.metrics()
            );
            assert!(
                reduction >= 20.0,
                "{delay_ms} ms: reduced by only {reduction:.1} dB"
            );
        }
    }

    /// `text` spoken by espeak-ng with `voice`, 16 kHz mono.
    fn espeak_16k(text: &str, voice: &str) -> Vec<f32> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (raw, wav) = (dir.path().join("raw.wav"), dir.path().join("16k.wav"));
        let status = Command::new("espeak-ng")
            .args(["-v", voice, "-w"])
            .arg(&raw)
            .arg(text)
            .status()
            .expect("espeak-ng is installed (apt-get install espeak-ng; scripts/test does)");
        assert!(status.success());
        let status = Command::new("sox")
            .arg(&raw)
            .args(["-r", "16000", "-c", "1", "-b", "16"])
            .arg(&wav)
            .status()
            .expect("sox is installed (apt-get install sox; scripts/test does)");
        assert!(status.success());
        hound::WavReader::open(&wav)
            .expect("sox wrote a WAV")
            .samples::<i16>()
            .map(|s| f32::from(s.expect("16-bit samples")) / 32768.0)
            .collect()
    }

    fn silero() -> SileroVad {
        let store = ModelStore::open_default().expect("model cache");
        let require = |model: &str, file: &str| {
            let path = store.file_path(model, file);
            assert!(
                path.is_file(),
                "{} is missing: run `talkline models fetch --only {model}`",
                path.display()
            );
            path
        };
        let vad = require("silero-vad", "silero_vad.onnx");
        let lib = require("onnxruntime", "libonnxruntime.so.1.32.0");
        let env = crate::onnx::environment(&lib).expect("ONNX Runtime loads");
        SileroVad::load(&env, Path::new(&vad)).expect("Silero VAD loads")
    }

    /// Silero's speech probability for each 32 ms window of `x`, from a fresh state.
    fn vad_probabilities(vad: &mut SileroVad, x: &[f32]) -> Vec<f32> {
        vad.reset();
        x.chunks_exact(vad.window_samples())
            .map(|w| vad.probability(w).expect("Silero runs"))
            .collect()
    }

    /// Issue 6: the agent's own voice looped back by the transport must not become a user turn.
    /// Real speech, 120 ms late, 6 dB down, through G.711 μ-law, with the caller talking over it.
    #[test]
    fn issue_6_loopback_of_agent_speech_is_removed_and_the_caller_survives() {
        let agent = espeak_16k(
            "Thank you for calling the clinic. Your lab results from last Tuesday are ready. \
             Your cholesterol is within the normal range, and your blood sugar looks good. \
             Is there anything else I can help you with today?",
            "en-us",
        );
        let user = espeak_16k("Wait, could you repeat the part about my sugar?", "en-gb");
        let len = agent.len() + SAMPLE_RATE / 2;
        let user_at = 5 * SAMPLE_RATE;
        assert!(
            user_at + user.len() < agent.len(),
            "the caller talks over the agent"
        );
        let user_track: Vec<f32> = (0..len)
            .map(|i| {
                i.checked_sub(user_at)
                    .and_then(|j| user.get(j))
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect();
        let settled = SAMPLE_RATE;

        // (a) Echo only, plain PCM and μ-law.
        let mut reductions = Vec::new();
        let mut echo_only = Vec::new();
        for mulaw in [false, true] {
            let echo = loopback(&agent, len, 120, -6.0, mulaw);
            let mut aec = EchoCanceller::new().expect("default config");
            let (out, spent) = run_session(&mut aec, &agent, &echo, SESSION);
            let reduction = db(energy(&echo[settled..]) / energy(&out[settled..]));
            let rtf = spent / (len as f64 / SAMPLE_RATE as f64);
            eprintln!(
                "speech, mulaw={mulaw}: echo reduced by {reduction:.1} dB after 1 s; \
                 real-time factor {rtf:.4}; {:?}; {} render underruns",
                aec.metrics(),
                aec.render_underruns()
            );
            reductions.push(reduction);
            echo_only = vec![echo, out];
        }
        for reduction in &reductions {
            assert!(*reduction >= 20.0, "echo reduced by only {reduction:.1} dB");
        }

        // The echo alone would pass for a caller; after cancellation it does not.
        let mut vad = silero();
        let first = settled / vad.window_samples();
        let raw = vad_probabilities(&mut vad, &echo_only[0]);
        let cleaned = vad_probabilities(&mut vad, &echo_only[1]);
        let loud = raw[first..].iter().filter(|&&p| p >= 0.5).count();
        let worst = cleaned[first..].iter().copied().fold(0.0f32, f32::max);
        eprintln!(
            "echo only: {loud}/{} windows >= 0.5 before cancellation, max {worst:.3} after",
            raw.len() - first
        );
        assert!(
            loud > 10,
            "the echo should be speech to Silero ({loud} windows)"
        );
        assert!(
            worst < 0.5,
            "residual echo reaches VAD probability {worst:.3}"
        );

        // (b) Double talk: the caller speaks over the agent's echo.
        let echo = loopback(&agent, len, 120, -6.0, true);
        let capture: Vec<f32> = echo.iter().zip(&user_track).map(|(e, u)| e + u).collect();
        let mut aec = EchoCanceller::new().expect("default config");
        let (out, _) = run_session(&mut aec, &agent, &capture, SESSION);
        let span = user_at..user_at + user.len();
        let kept = db(energy(&out[span.clone()]) / energy(&user_track[span.clone()]));
        let echo_to_user = db(energy(&echo[span.clone()]) / energy(&user_track[span.clone()]));
        let clean = vad_probabilities(&mut vad, &user_track);
        let heard = vad_probabilities(&mut vad, &out);
        let speech: Vec<usize> = (0..clean.len()).filter(|&w| clean[w] >= 0.5).collect();
        let detected = speech.iter().filter(|&&w| heard[w] >= 0.5).count();
        let outside = (first..heard.len())
            .filter(|w| !span.contains(&(w * vad.window_samples())))
            .filter(|w| !span.contains(&((w + 1) * vad.window_samples() - 1)))
            .map(|w| heard[w])
            .fold(0.0f32, f32::max);
        eprintln!(
            "double talk (echo {echo_to_user:+.1} dB against the caller): caller's energy \
             {kept:+.1} dB, Silero speech in {detected}/{} of its windows, max {outside:.3} \
             outside it",
            speech.len()
        );
        assert!(
            kept.abs() <= 4.0,
            "caller's energy changed by {kept:+.1} dB"
        );
        assert!(
            detected * 10 >= speech.len() * 8,
            "Silero finds the caller in only {detected}/{} windows",
            speech.len()
        );
        assert!(
            outside < 0.5,
            "residual echo reaches VAD probability {outside:.3}"
        );
    }

    /// Two replies with a pause between them: the echo path found in the first still holds at
    /// the start of the second, as long as the session keeps pushing its silent ticks.
    #[test]
    fn second_reply_is_cancelled_from_its_first_second() {
        let reply = espeak_16k(
            "Your appointment is on Monday at nine in the morning.",
            "en-us",
        );
        let pause = 2 * SAMPLE_RATE;
        let mut agent = reply.clone();
        agent.resize(reply.len() + pause, 0.0);
        let second = agent.len();
        agent.extend(&reply);
        let len = agent.len() + SAMPLE_RATE / 2;
        let echo = loopback(&agent, len, 120, -6.0, true);
        let head = second..second + SAMPLE_RATE;
        for (name, driver) in [
            ("pushing silent ticks", SESSION),
            (
                "skipping silent ticks",
                Driver {
                    push_silence: false,
                    ..SESSION
                },
            ),
            (
                "caller audio 30 ms ahead",
                Driver {
                    lead: 480,
                    ..SESSION
                },
            ),
        ] {
            let mut aec = EchoCanceller::new().expect("default config");
            let (out, _) = run_session(&mut aec, &agent, &echo, driver);
            let reduction = db(energy(&echo[head.clone()]) / energy(&out[head.clone()]));
            eprintln!(
                "{name}: second reply's first second reduced by {reduction:.1} dB, {} realignments",
                aec.render_underruns()
            );
            if driver.push_silence && driver.lead == 0 {
                assert!(reduction >= 20.0, "{name}: only {reduction:.1} dB");
            }
        }
    }
}
