//! Finds the real models in talkline's cache, the way `talkline models dir` does, and fails with
//! the fetch command when one is missing (tests never skip).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use talkline_tts::onnx::{self, Environment};
use talkline_tts::{PiperVoice, VoiceOptions};

/// `$TALKLINE_MODELS`, else `$XDG_CACHE_HOME/talkline`, else `~/.cache/talkline`.
pub fn models_dir() -> PathBuf {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("TALKLINE_MODELS") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("talkline");
    }
    PathBuf::from(non_empty("HOME").expect("HOME is set"))
        .join(".cache")
        .join("talkline")
}

pub fn real_model(model: &str, file: &str) -> PathBuf {
    let path = models_dir().join(model).join(file);
    assert!(
        path.exists(),
        "{} is missing: run `talkline models fetch --only {model}`",
        path.display()
    );
    path
}

pub fn environment() -> Environment {
    onnx::environment(&real_model("onnxruntime", "libonnxruntime.so.1.32.0"))
        .expect("ONNX Runtime loads")
}

pub fn voice_path() -> PathBuf {
    real_model("piper-joe", "en_US-joe-medium.onnx")
}

/// The folder holding Piper's `espeak-ng-data`.
pub fn piper_espeak_data() -> PathBuf {
    real_model("piper-espeak-data", "espeak-ng-data");
    models_dir().join("piper-espeak-data")
}

pub fn options() -> VoiceOptions {
    VoiceOptions {
        threads: 1,
        espeak_data: Some(piper_espeak_data()),
        ..VoiceOptions::default()
    }
}

pub fn joe() -> PiperVoice {
    PiperVoice::load(&environment(), &voice_path(), &options()).expect("the Piper voice loads")
}

/// Lower-case words without punctuation.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Word error rate: word-level edit distance over the reference length.
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let r = words(reference);
    let h = words(hypothesis);
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(rw != hw))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len().max(1) as f64
}
