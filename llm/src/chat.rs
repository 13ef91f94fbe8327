//! The `ChatModel` trait every backend implements, and the types around it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::template::Message;

/// A cancellation flag shared between whoever runs a generation and whoever may stop it
/// (barge-in). Generation checks it before every token, so it stops within one token.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    /// Cancelling the token this one was made from cancels this one too.
    parent: Option<Arc<AtomicBool>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    /// A token cancelled by its own [`cancel`](Self::cancel) or by this one's: a part of the
    /// work (the LLM of a reply) can be stopped alone, and stops with the whole.
    pub fn child(&self) -> Self {
        CancelToken {
            flag: Arc::default(),
            parent: Some(self.flag.clone()),
        }
    }
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Acquire))
    }
    /// Clears the flag so the token can be used for the next turn.
    pub fn reset(&self) {
        self.flag.store(false, Ordering::Release);
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token: deterministic.
    Greedy,
    /// Temperature, then top-k, then top-p (nucleus).
    Sample {
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
    },
}

/// Parameters of one reply.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: Sampling,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: Sampling::Sample {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.95,
                seed: 0,
            },
        }
    }
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model wrote an end-of-sequence or end-of-turn token.
    EndOfTurn,
    /// `max_tokens` reached.
    MaxTokens,
    /// The cancel token fired.
    Cancelled,
}

/// Measurements of one reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyStats {
    /// Tokens of the rendered conversation.
    pub prompt_tokens: usize,
    /// Of those, tokens whose keys and values were already in the cache.
    pub reused_tokens: usize,
    /// Time to process the new prompt tokens.
    pub prefill_time: Duration,
    /// From the call to the first token of the reply.
    pub time_to_first_token: Duration,
    /// Tokens generated (the stop token excluded).
    pub generated_tokens: usize,
    /// From the first token to the end.
    pub decode_time: Duration,
    /// Speculative decoding: tokens proposed by the draft source and tokens accepted.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    /// Target forward passes during decoding.
    pub decode_steps: usize,
}

impl ReplyStats {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        let new = self.prompt_tokens - self.reused_tokens;
        new as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Tokens after the first, per second of decoding.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted_tokens > 0).then(|| self.accepted_tokens as f64 / self.drafted_tokens as f64)
    }
}

/// A finished reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    /// The reply's token ids (empty for remote backends, which stream text).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub stats: ReplyStats,
}

/// A language model that answers conversations. Loaded once per process and shared; each
/// conversation gets its own [`ChatSession`].
pub trait ChatModel: Send + Sync {
    /// A human-readable description (model file or endpoint).
    fn describe(&self) -> String;
    /// Fresh per-conversation state.
    fn new_session(&self) -> Result<Box<dyn ChatSession>>;
}

/// One conversation's decoding state. Synchronous by design: a session runs on a dedicated
/// inference thread (or `spawn_blocking`), never on the async runtime.
pub trait ChatSession: Send {
    /// Generates the assistant's next message after `messages`, calling `on_text` with each
    /// piece of text as it is decided. Stops at an end-of-turn token, at `max_tokens`, or within
    /// one token of `cancel` firing.
    fn reply(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply>;

    /// Processes `messages` ahead of time, the last one left open (no end-of-turn marker), so a
    /// later `reply` only has to process what changed. The turn manager calls this with the
    /// partial transcript; when the transcript changes, the next call or `reply` rolls the state
    /// back to the common prefix. Backends without local state do nothing.
    fn prefill(&mut self, messages: &[Message]) -> Result<()>;

    /// Probability that the end-of-turn marker comes right after the last (user) message, i.e.
    /// that the speaker has finished. `None` when the backend cannot tell (remote servers).
    fn end_of_turn_probability(&mut self, messages: &[Message]) -> Result<Option<f32>>;

    /// Forgets the conversation.
    fn reset(&mut self);
}
