//! Finding the real SmolLM2 GGUF for the tests, and loading it once per test binary.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use talkline_llm::{LoadOptions, LocalConfig, LocalModel};

/// The model cache, resolved like `talkline models dir`: `$TALKLINE_MODELS`, else
/// `$XDG_CACHE_HOME/talkline`, else `~/.cache/talkline`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TALKLINE_MODELS") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("talkline");
    }
    let home = std::env::var_os("HOME").expect("HOME is set when no cache variable is");
    PathBuf::from(home).join(".cache").join("talkline")
}

/// A file of the embedded SmolLM2 model; fails with the fetch command when it is missing.
pub fn smollm2_file(file: &str) -> PathBuf {
    let path = models_dir().join("smollm2-135m").join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `talkline models fetch --only smollm2-135m`",
        path.display()
    );
    path
}

pub const Q4_1: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Made by `talkline models fetch` (re-quantized from the Q4_1 file).
pub const Q8_0: &str = "SmolLM2-135M-Instruct.Q8_0.gguf";

/// The SmolLM2 Q4_1 GGUF, loaded once per test binary (2 threads, a 1024-token context).
pub fn smollm2() -> Arc<LocalModel> {
    static MODEL: OnceLock<Arc<LocalModel>> = OnceLock::new();
    Arc::clone(MODEL.get_or_init(|| {
        LocalModel::load(&LocalConfig {
            model: smollm2_file(Q4_1),
            tokenizer: None,
            load: LoadOptions {
                threads: 2,
                max_context: 1024,
                ..LoadOptions::default()
            },
        })
        .expect("the SmolLM2 GGUF loads")
    }))
}
