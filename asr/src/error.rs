use std::path::PathBuf;

/// Everything that can go wrong in the ASR crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AsrError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid CTranslate2 model: {reason}")]
    Ct2Format { path: PathBuf, reason: String },
    #[error("the CTranslate2 model cannot be converted to ggml: {reason}")]
    UnsupportedModel { reason: String },
    #[error("Whisper model {path} could not be loaded: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    /// The driver aborted the decode (its result was no longer wanted).
    #[error("the decode was aborted")]
    Aborted,
    #[error("Whisper inference failed: {0}")]
    Inference(String),
    #[error("{path} is not usable audio: {reason} (expected a WAV file)")]
    BadAudioFile { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Onnx(String),
    #[error("audio must be 16 kHz mono; got {sample_rate} Hz with {channels} channel(s)")]
    AudioFormat { sample_rate: u32, channels: u16 },
}

pub type Result<T, E = AsrError> = std::result::Result<T, E>;

impl AsrError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AsrError::Io {
            path: path.into(),
            source,
        }
    }
}
