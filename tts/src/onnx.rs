//! The ONNX Runtime environment, loaded at run time from a `libonnxruntime.so` given by path
//! (ort's `load-dynamic`; `talkline models fetch` provides the library).
//!
//! ort allows one environment per process. A program that already creates it elsewhere (the
//! talkline runtime does, for the VAD and Piper together) passes that one to
//! [`crate::PiperVoice::load`]; [`environment`] is for programs that use this crate alone.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use ort::environment::Environment;

use crate::error::{Result, TtsError};

/// ort allows one environment per process; keep it so every caller (and every test in one
/// binary) shares it, together with the library path it came from.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime from `library` (once per process) and returns the shared environment.
/// Never panics when the library is missing or unusable: that is an error naming the path.
pub fn environment(library: &Path) -> Result<Environment> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != library {
            tracing::warn!(
                requested = %library.display(),
                loaded = %loaded.display(),
                "ONNX Runtime is already loaded in this process; using the loaded library"
            );
        }
        return Ok(env.clone());
    }
    let load_err = |reason: String| TtsError::RuntimeLoad {
        path: library.to_path_buf(),
        reason,
    };
    if !library.is_file() {
        return Err(load_err(
            "no such file; run `talkline models fetch --only onnxruntime`".into(),
        ));
    }
    let env = ort::init_from(library)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("talkline")
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    *slot = Some((library.to_path_buf(), env.clone()));
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_an_error_not_a_panic() {
        let err = environment(Path::new("/nonexistent/libonnxruntime.so")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/libonnxruntime.so"),
            "{err}"
        );
    }
}
