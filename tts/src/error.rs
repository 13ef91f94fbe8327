use std::path::PathBuf;

/// Everything that can go wrong in the TTS crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TtsError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ONNX Runtime library {path} could not be loaded: {reason}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error("voice config {path} is invalid: {reason}")]
    VoiceConfig { path: PathBuf, reason: String },
    #[error("Piper voice {path} could not be loaded: {reason}")]
    VoiceLoad { path: PathBuf, reason: String },
    #[error(
        "voice uses phoneme type {phoneme_type:?}; only \"espeak\" and \"text\" are supported"
    )]
    UnsupportedPhonemeType { phoneme_type: String },
    #[error("speaker {speaker} is out of range: the voice has {num_speakers} speaker(s)")]
    BadSpeaker { speaker: i64, num_speakers: u32 },
    #[error("espeak-ng failed: {0}")]
    Espeak(String),
    #[error(
        "this build has no phonemizer for {what}; enable the `espeak` feature or pass your own"
    )]
    NoPhonemizer { what: String },
    #[error("ONNX Runtime inference failed: {0}")]
    Inference(String),
    #[error("cannot resample from {from} Hz to {to} Hz: {reason}")]
    Resample { from: u32, to: u32, reason: String },
    #[error("the synthesis worker stopped: {0}")]
    WorkerGone(String),
    #[error("the stream was cancelled")]
    Cancelled,
}

pub type Result<T, E = TtsError> = std::result::Result<T, E>;

impl TtsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TtsError::Io {
            path: path.into(),
            source,
        }
    }
}
