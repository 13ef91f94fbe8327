//! The LLM stage of talkline.
//!
//! - [`ChatModel`] / [`ChatSession`]: the interface the runtime uses, with a local backend
//!   ([`LocalChatModel`]: a GGUF Llama on our own forward pass over Q8_0 weights) and a remote one
//!   ([`remote::OpenAiChatModel`]: any OpenAI-compatible server), and a chain of the two
//!   ([`fallback::FallbackChatModel`]: the local model answers when the server fails).
//! - The local backend keeps a truncatable KV cache per session: a new turn only processes its
//!   new tokens, and a speculative prefill of a partial transcript is extended or rolled back
//!   when the transcript changes.
//! - Lossless speculative decoding from prompt lookup or a draft GGUF ([`DraftSource`]).
//! - [`convert::requantize_gguf_q8_0`] turns any Llama GGUF into Q8_0 (run at model fetch time).
//!
//! **This crate knows nothing about sessions, transports or the model cache.**

pub mod chat;
pub mod convert;
pub mod error;
pub mod fallback;
pub mod local;
pub mod model;
pub mod q8;
pub mod remote;
pub mod sampling;
pub mod speculative;
pub mod template;
pub mod tokenizer;

pub use chat::{
    CancelToken, ChatModel, ChatSession, GenerateParams, Reply, ReplyStats, Sampling, StopReason,
};
pub use error::{LlmError, Result};
pub use local::{LocalChatModel, LocalConfig, LocalModel, LocalSession};
pub use model::{KvCache, Llama, LlamaConfig, LoadOptions};
pub use speculative::DraftSource;
pub use template::{ChatTemplate, Message, Role};
pub use tokenizer::Tokenizer;
