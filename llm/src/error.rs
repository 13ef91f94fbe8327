//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the LLM stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable GGUF model: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("GGUF metadata key {key:?} is missing or has the wrong type")]
    MissingMetadata { key: String },
    #[error("unsupported model: {reason}")]
    Unsupported { reason: String },
    #[error("tokenizer: {reason}")]
    Tokenizer { reason: String },
    #[error("chat template: {reason}")]
    Template { reason: String },
    #[error("the conversation needs {needed} tokens but the context holds {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {body}")]
    HttpStatus {
        url: String,
        status: u16,
        body: String,
    },
    #[error("no token from {url} within {timeout_ms} ms ({phase})")]
    Timeout {
        url: String,
        phase: &'static str,
        timeout_ms: u64,
    },
    #[error("the stream from {url} broke: {reason}")]
    Stream { url: String, reason: String },
    #[error("the server sent something unexpected: {reason}")]
    Protocol { reason: String },
}

pub type Result<T, E = LlmError> = std::result::Result<T, E>;

impl LlmError {
    /// A short, stable name for the failure, for logs, events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::Connect { .. } => "connect",
            LlmError::HttpStatus { .. } => "http_status",
            LlmError::Timeout { .. } => "timeout",
            LlmError::Stream { .. } => "stream",
            LlmError::Protocol { .. } => "protocol",
            LlmError::ContextFull { .. } => "context_full",
            _ => "model",
        }
    }

    /// The error without what a server or model sent back: an error body or a stream line can
    /// echo the conversation, which must never reach a log.
    pub fn redacted(&self) -> String {
        match self {
            LlmError::HttpStatus { url, status, .. } => format!("{url} answered HTTP {status}"),
            LlmError::Protocol { .. } => "the server sent something unexpected".into(),
            other => other.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LlmError {
        let path = path.into();
        move |source| LlmError::Io { path, source }
    }
}
