//! Speech recognition for talkline.
//!
//! - [`convert`]: CTranslate2 Whisper checkpoints -> whisper.cpp ggml files (model provisioning).
//! - [`whisper`]: a Whisper model loaded once per process, with one decoding state per user.
//!
//! **Architecture invariant: this crate knows nothing about transports, sessions or the LLM.**

pub mod audio;
pub mod convert;
pub mod engine;
pub mod error;
pub mod offline;
pub mod streaming;
pub mod vad;
pub mod whisper;

pub use error::{AsrError, Result};
