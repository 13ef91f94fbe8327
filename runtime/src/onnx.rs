//! The process-wide ONNX Runtime environment, shared by the VAD (asr) and Piper (tts).
//!
//! ort allows one environment per process, so the runtime creates it once, from the library that
//! `talkline models fetch` provides, and hands it to the stages.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use ort::environment::Environment;

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// The environment, created on first use from `library` (later calls ignore the path).
pub fn environment(library: &Path) -> anyhow::Result<Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    if !library.is_file() {
        anyhow::bail!(
            "ONNX Runtime library {} is missing: run `talkline models fetch --only onnxruntime`",
            library.display()
        );
    }
    let env = ort::init_from(library)
        .with_context(|| format!("loading ONNX Runtime from {}", library.display()))?
        .with_name("talkline")
        .build()
        .context("creating the ONNX Runtime environment")?;
    Ok(ENVIRONMENT.get_or_init(|| env).clone())
}
