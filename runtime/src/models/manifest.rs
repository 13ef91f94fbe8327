//! The embedded model manifest (`runtime/models.toml`).

use serde::Deserialize;

/// The manifest text, compiled into the binary so that `talkline` alone knows what to fetch.
pub const MANIFEST_TOML: &str = include_str!("../../models.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// One embedded default: a registry package and the files made from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub role: String,
    pub summary: String,
    pub license: String,
    pub package: String,
    pub version: String,
    /// The wheel's file name as the registry serves it.
    pub wheel: String,
    pub wheel_sha256: String,
    /// Extra `pip download` arguments (platform wheels).
    #[serde(default)]
    pub pip_args: Vec<String>,
    #[serde(rename = "file")]
    pub files: Vec<ModelFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Where the file lives under the model's cache folder.
    pub path: String,
    pub sha256: String,
    #[serde(flatten)]
    pub source: FileSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileSource {
    /// A member of the wheel (a zip archive).
    Member(String),
    /// Made by a conversion step from files listed earlier.
    Convert(Conversion),
    /// Every member of the wheel under this prefix (a folder, ending in `/`), extracted below
    /// `path`. Its `sha256` is the folder's [`tree digest`](super::tree_digest).
    Tree(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Conversion {
    #[serde(rename = "whisper-ggml-f16")]
    WhisperGgmlF16,
    #[serde(rename = "whisper-ggml-q8_0")]
    WhisperGgmlQ8_0,
    /// The model's first GGUF file, re-quantized to Q8_0 (talkline-llm has fast kernels for it).
    #[serde(rename = "gguf-q8_0")]
    GgufQ8_0,
}

impl Manifest {
    pub fn embedded() -> Self {
        toml::from_str(MANIFEST_TOML).expect("runtime/models.toml is valid: a unit test parses it")
    }

    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }
}

impl ModelEntry {
    pub fn file(&self, path: &str) -> Option<&ModelFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_is_complete_and_consistent() {
        let m = Manifest::embedded();
        for role in ["asr", "llm", "tts", "vad", "runtime"] {
            assert!(m.models.iter().any(|e| e.role == role), "no {role} model");
        }
        for entry in &m.models {
            assert!(entry.wheel.ends_with(".whl"));
            assert!(is_sha256(&entry.wheel_sha256), "{}", entry.name);
            assert!(!entry.files.is_empty());
            for f in &entry.files {
                assert!(
                    is_sha256(&f.sha256),
                    "{}/{}: {}",
                    entry.name,
                    f.path,
                    f.sha256
                );
                assert!(
                    !f.path.starts_with('/') && !f.path.contains(".."),
                    "{}",
                    f.path
                );
                if let FileSource::Tree(prefix) = &f.source {
                    assert!(prefix.ends_with('/'), "{}: {prefix}", f.path);
                }
            }
        }
    }

    fn is_sha256(s: &str) -> bool {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }
}
