//! The process-wide ONNX Runtime environment, shared by the VAD (asr) and Piper (tts).
//!
//! ort allows one environment per process; `talkline_tts::onnx` owns that singleton (the TTS
//! crate also runs alone), and the runtime hands the same environment to the VAD.

use std::path::Path;

use anyhow::Context;
use ort::environment::Environment;

/// The environment, created on first use from `library` (later calls reuse it).
pub fn environment(library: &Path) -> anyhow::Result<Environment> {
    talkline_tts::onnx::environment(library)
        .with_context(|| format!("loading ONNX Runtime from {}", library.display()))
}
