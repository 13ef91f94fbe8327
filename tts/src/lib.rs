//! Text-to-speech for talkline: Piper VITS voices through ONNX Runtime.
//!
//! - [`onnx`]: the ONNX Runtime environment, loaded from a library file at run time.
//! - [`config`], [`voice`]: a Piper voice (`.onnx` + `.onnx.json`) and its inference.
//! - [`vits_split`]: a voice's graph cut into encoder and decoder, so a sentence's audio can be
//!   decoded window by window.
//! - [`phonemize`]: text to phonemes; espeak-ng by default (feature `espeak`, GPL-3.0).
//! - [`normalize`]: numbers, units, dates and abbreviations spelled out before phonemization.
//! - [`chunker`], [`stream`]: LLM tokens to speakable chunks, synthesized in order on a worker
//!   thread, with cancellation and a "what was heard" report.
//! - [`resample`]: the voice's rate to 48, 16 or 8 kHz.
//!
//! **Architecture invariant: this crate knows nothing about transports, sessions, the ASR or the
//! LLM; it takes text and gives audio.**

pub mod chunker;
pub mod config;
pub mod error;
pub mod normalize;
pub mod onnx;
pub mod phonemize;
pub mod resample;
pub mod stream;
pub mod vits_split;
pub mod voice;

pub use config::VoiceConfig;
pub use error::{Result, TtsError};
pub use voice::{PiperVoice, SentenceAudio, VoiceOptions};
