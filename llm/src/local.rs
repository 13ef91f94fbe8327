//! The local backend: a GGUF Llama with its tokenizer and chat template, and per-conversation
//! sessions that reuse, extend and roll back their KV cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chat::{
    CancelToken, ChatModel, ChatSession, GenerateParams, Reply, ReplyStats, StopReason,
};
use crate::error::{LlmError, Result};
use crate::model::{Gguf, KvCache, Llama, LoadOptions, Scratch};
use crate::sampling::{softmax_into, Sampler};
use crate::speculative::{DraftSource, Drafter};
use crate::template::{ChatTemplate, Message, CHATML};
use crate::tokenizer::{TextStream, Tokenizer};

/// Prompt tokens per forward pass during prefill. Bounds the scratch memory (which grows with
/// the batch) and the time between cancellation checks.
pub const PREFILL_CHUNK: usize = 32;

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LocalConfig {
    pub model: PathBuf,
    /// A tokenizer.json to use instead of the one built from the GGUF metadata.
    pub tokenizer: Option<PathBuf>,
    pub load: LoadOptions,
}

/// A loaded model with its tokenizer and chat template. Shared by every session.
#[derive(Debug)]
pub struct LocalModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub path: PathBuf,
}

impl LocalModel {
    pub fn load(config: &LocalConfig) -> Result<Arc<Self>> {
        let mut gguf = Gguf::open(&config.model)?;
        let tokenizer = match &config.tokenizer {
            Some(path) => Tokenizer::from_file(path, &gguf)?,
            None => Tokenizer::from_gguf(&gguf)?,
        };
        let template_src = gguf
            .meta_str("tokenizer.chat_template")
            .unwrap_or(CHATML)
            .to_string();
        let text =
            |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
        let template =
            ChatTemplate::new(&template_src, &text(&tokenizer.bos), &text(&tokenizer.eos))?;
        let llama = Llama::from_gguf(&mut gguf, &config.load)?;
        Ok(Arc::new(LocalModel {
            llama,
            tokenizer,
            template,
            path: config.model.clone(),
        }))
    }

    /// Token ids of the conversation, ready for the assistant to answer.
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(&self.template.render(messages, true)?)
    }

    /// Token ids of the conversation with its last message left open, and the id of the token
    /// the template writes right after that message (its end-of-turn marker).
    pub fn open_tokens(&self, messages: &[Message]) -> Result<(Vec<u32>, u32)> {
        let (open, rest) = self.template.render_open_last(messages)?;
        let ids = self.tokenizer.encode(&open)?;
        let end = self
            .tokenizer
            .encode(&rest)?
            .first()
            .copied()
            .ok_or_else(|| LlmError::Template {
                reason: "the template writes nothing after a message".into(),
            })?;
        Ok((ids, end))
    }

    pub fn session(self: &Arc<Self>) -> LocalSession {
        LocalSession::new(Arc::clone(self))
    }
}

/// A shareable handle implementing [`ChatModel`], with the speculative-decoding choice that
/// every session it creates uses.
#[derive(Debug, Clone)]
pub struct LocalChatModel {
    pub model: Arc<LocalModel>,
    pub draft: DraftSource,
}

impl ChatModel for LocalChatModel {
    fn describe(&self) -> String {
        let llama = &self.model.llama;
        let solo = if llama.solo_threads() > llama.threads() {
            format!(", {} while one conversation is open", llama.solo_threads())
        } else {
            String::new()
        };
        format!(
            "{} (local, {} weights run as Q8_0, {} thread(s){solo})",
            self.model.path.display(),
            llama.source_dtype(),
            llama.threads()
        )
    }

    fn new_session(&self) -> Result<Box<dyn ChatSession>> {
        let mut s = self.model.session();
        s.set_draft(self.draft.clone())?;
        Ok(Box::new(s))
    }
}

/// One conversation: the KV cache, the tokens it holds, and reusable buffers.
pub struct LocalSession {
    model: Arc<LocalModel>,
    cache: KvCache,
    scratch: Scratch,
    /// The tokens whose keys and values are in `cache`, in order.
    tokens: Vec<u32>,
    drafter: Option<Drafter>,
    probs: Vec<f32>,
    /// Set while `scratch.last()` holds the logits after all of `tokens`: a `sync` to exactly
    /// `tokens` (a reply whose prompt was prefilled to its last token) then runs nothing.
    logits_current: bool,
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        self.model.llama.session_closed();
    }
}

impl std::fmt::Debug for LocalSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSession")
            .field("cached_tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl LocalSession {
    pub fn new(model: Arc<LocalModel>) -> Self {
        model.llama.session_opened();
        LocalSession {
            cache: model.llama.new_cache(),
            scratch: Scratch::default(),
            tokens: Vec::new(),
            drafter: None,
            probs: Vec::new(),
            logits_current: false,
            model,
        }
    }

    pub fn model(&self) -> &Arc<LocalModel> {
        &self.model
    }

    /// Chooses the speculative-decoding draft source for later replies.
    pub fn set_draft(&mut self, draft: DraftSource) -> Result<()> {
        self.drafter = Drafter::new(draft, &self.model)?;
        Ok(())
    }

    /// Tokens currently held in the KV cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Rolls the cache back to its first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        if len < self.tokens.len() {
            self.logits_current = false;
        }
        self.cache.truncate(len);
        self.tokens.truncate(len);
    }

    /// Appends `tokens` to the cache; returns the logits after the last one.
    pub fn extend(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.extend_cancellable(tokens, &CancelToken::new())?;
        Ok(self.scratch.last())
    }

    fn extend_cancellable(&mut self, tokens: &[u32], cancel: &CancelToken) -> Result<bool> {
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            if cancel.is_cancelled() {
                return Ok(false);
            }
            let len = self.cache.len();
            self.logits_current = false;
            match self.model.llama.forward_cancellable(
                &mut self.cache,
                &mut self.scratch,
                chunk,
                false,
                cancel,
            ) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) => {
                    self.truncate(len);
                    return Err(e);
                }
            }
            self.tokens.extend_from_slice(chunk);
            self.logits_current = true;
        }
        Ok(true)
    }

    /// Makes the cache hold exactly `target` and leaves the logits after its last token in the
    /// scratch. Keeps the longest common prefix with what is cached (KV reuse), rolls back the
    /// rest, and processes only the new tokens. Returns how many tokens were reused, or `None`
    /// when cancelled.
    pub fn sync(&mut self, target: &[u32], cancel: &CancelToken) -> Result<Option<usize>> {
        if target.is_empty() {
            return Err(LlmError::InvalidArgument {
                reason: "empty prompt".into(),
            });
        }
        let common = self
            .tokens
            .iter()
            .zip(target)
            .take_while(|(a, b)| a == b)
            .count();
        if common == target.len() && common == self.tokens.len() && self.logits_current {
            return Ok(Some(common));
        }
        if cancel.is_cancelled() {
            return Ok(None); // before rolling back: a cancelled call loses nothing
        }
        // At least one token must run to produce logits.
        let keep = common.min(target.len() - 1);
        self.truncate(keep);
        if !self.extend_cancellable(&target[keep..], cancel)? {
            return Ok(None);
        }
        Ok(Some(keep))
    }

    /// Logits after the cached tokens (valid after `sync`/`extend`).
    pub fn logits(&self) -> &[f32] {
        self.scratch.last()
    }

    /// Generates from `prompt` (token ids), streaming (token id, text) pairs to `on_token`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(u32, &str),
    ) -> Result<Reply> {
        let start = Instant::now();
        let mut stats = ReplyStats {
            prompt_tokens: prompt.len(),
            ..ReplyStats::default()
        };
        let stop_reply = |stop, stats| Reply {
            text: String::new(),
            tokens: Vec::new(),
            stop,
            stats,
        };
        let Some(reused) = self.sync(prompt, cancel)? else {
            return Ok(stop_reply(StopReason::Cancelled, stats));
        };
        stats.reused_tokens = reused;
        stats.prefill_time = start.elapsed();

        let model = Arc::clone(&self.model);
        let tok = &model.tokenizer;
        let mut sampler = Sampler::new(params.sampling);
        let mut stream = TextStream::default();
        let mut text = String::new();
        let mut out_tokens = Vec::new();
        let mut first_at: Option<Instant> = None;
        let mut emit = |id: u32,
                        out_tokens: &mut Vec<u32>,
                        text: &mut String,
                        first_at: &mut Option<Instant>|
         -> Result<bool> {
            if first_at.is_none() {
                *first_at = Some(Instant::now());
            }
            if tok.is_stop(id) {
                return Ok(false);
            }
            out_tokens.push(id);
            let piece = stream.push(tok, id)?;
            let piece = piece.as_deref().unwrap_or("");
            text.push_str(piece);
            on_token(id, piece);
            Ok(true)
        };

        // `pending` is decided but not yet run through the model; the cache holds everything
        // before it.
        let mut pending = sampler.sample(self.scratch.last(), &mut self.probs);
        let mut stop = StopReason::MaxTokens;
        if params.max_tokens == 0 {
            return Ok(stop_reply(StopReason::MaxTokens, stats));
        }
        if !emit(pending, &mut out_tokens, &mut text, &mut first_at)? {
            stop = StopReason::EndOfTurn;
        } else {
            loop {
                if out_tokens.len() >= params.max_tokens {
                    break;
                }
                if cancel.is_cancelled() {
                    stop = StopReason::Cancelled;
                    break;
                }
                // The steps below overwrite the scratch with logits after tokens not yet cached.
                self.logits_current = false;
                let decided = match self.drafter.as_mut() {
                    Some(drafter) => drafter.step(
                        &self.model,
                        &mut self.cache,
                        &mut self.scratch,
                        &mut self.tokens,
                        pending,
                        &mut sampler,
                        &mut stats,
                    )?,
                    None => {
                        self.model.llama.forward(
                            &mut self.cache,
                            &mut self.scratch,
                            &[pending],
                            false,
                        )?;
                        self.tokens.push(pending);
                        stats.decode_steps += 1;
                        let next = sampler.sample(self.scratch.last(), &mut self.probs);
                        crate::speculative::Decided::one(next)
                    }
                };
                let mut ended = false;
                for &id in decided.tokens() {
                    if out_tokens.len() >= params.max_tokens {
                        ended = true;
                        break;
                    }
                    // One speculative step can decide several tokens: still stop within one.
                    if cancel.is_cancelled() {
                        stop = StopReason::Cancelled;
                        ended = true;
                        break;
                    }
                    if !emit(id, &mut out_tokens, &mut text, &mut first_at)? {
                        stop = StopReason::EndOfTurn;
                        ended = true;
                        break;
                    }
                    pending = id;
                }
                if ended {
                    break;
                }
            }
        }
        let first = first_at.unwrap_or_else(Instant::now);
        stats.time_to_first_token = first.duration_since(start);
        stats.decode_time = first.elapsed();
        stats.generated_tokens = out_tokens.len();
        // Tokens accepted past the reply's end are in the cache but not in the reply: drop them
        // so the next turn's prompt matches the cache exactly.
        let consistent = self.tokens.len().min(prompt.len() + out_tokens.len());
        self.truncate(consistent);
        Ok(Reply {
            text,
            tokens: out_tokens,
            stop,
            stats,
        })
    }

    /// Probability of `end_id` right after `tokens` (synced into the cache).
    pub fn next_token_probability(&mut self, tokens: &[u32], end_id: u32) -> Result<f32> {
        self.sync(tokens, &CancelToken::new())?;
        softmax_into(self.scratch.last(), 1.0, &mut self.probs);
        Ok(self.probs.get(end_id as usize).copied().unwrap_or(0.0))
    }
}

impl ChatSession for LocalSession {
    fn reply(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let prompt = self.model.prompt_tokens(messages)?;
        self.generate(&prompt, params, cancel, &mut |_, piece| {
            if !piece.is_empty() {
                on_text(piece)
            }
        })
    }

    fn prefill(&mut self, messages: &[Message]) -> Result<()> {
        let (ids, _) = self.model.open_tokens(messages)?;
        self.sync(&ids, &CancelToken::new())?;
        Ok(())
    }

    fn end_of_turn_probability(&mut self, messages: &[Message]) -> Result<Option<f32>> {
        let (ids, end) = self.model.open_tokens(messages)?;
        Ok(Some(self.next_token_probability(&ids, end)?))
    }

    fn reset(&mut self) {
        self.truncate(0);
    }
}

/// Loads `path` with default options: a convenience for tools and tests.
pub fn load(path: &Path, threads: usize) -> Result<Arc<LocalModel>> {
    LocalModel::load(&LocalConfig {
        model: path.to_path_buf(),
        tokenizer: None,
        load: LoadOptions {
            threads,
            ..LoadOptions::default()
        },
    })
}

/// Wall time helper for stats printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
