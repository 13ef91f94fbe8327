//! The tokenizer, built from GGUF metadata with the `tokenizers` crate (or read from a
//! tokenizer.json), plus incremental detokenization for streaming.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{LlmError, Result};
use crate::model::Gguf;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The Llama-3 pre-tokenizer split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text <-> token ids, with the special tokens the chat loop needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Token id -> text, for rendering the template's `bos_token`/`eos_token`.
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    /// Ids that end a reply: EOS, end-of-turn markers, EOT.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> LlmError {
    LlmError::Tokenizer {
        reason: e.to_string(),
    }
}

/// Names of tokens that end an assistant turn in the chat formats we know.
const END_OF_TURN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
];

impl Tokenizer {
    /// Builds the tokenizer the GGUF describes. Supports byte-level BPE (`tokenizer.ggml.model`
    /// = `gpt2`) with the `smollm`, `llama-bpe` and plain GPT-2 pre-tokenizers.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let model = gguf.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(LlmError::Unsupported {
                reason: format!(
                    "tokenizer model {model:?} in the GGUF; only byte-level BPE (\"gpt2\") can be \
                     built from metadata; give a tokenizer.json instead"
                ),
            });
        }
        let tokens: Vec<String> = meta_strings(gguf, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = meta_strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("merge {m:?} has no space")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match gguf
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            Some(v) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let llama3 = matches!(pre, "llama-bpe" | "llama3" | "smaug-bpe");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3's tokenizer.json sets ignore_merges: whole words in the vocabulary win.
            .ignore_merges(llama3)
            .build()
            .map_err(tok_err)?;
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            _ if llama3 => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err)?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(LlmError::Unsupported {
                    reason: format!(
                        "pre-tokenizer {other:?}; supported: smollm, llama-bpe, gpt2 (or give a \
                         tokenizer.json)"
                    ),
                })
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&special);
        let id_text = |key: &str| -> Option<(u32, String)> {
            let id = gguf.meta_u32(key).ok()?;
            Some((id, tokens.get(id as usize)?.clone()))
        };
        let bos = id_text("tokenizer.ggml.bos_token_id");
        let eos = id_text("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some((id, _)) = id_text("tokenizer.ggml.eot_token_id") {
            stop_ids.push(id);
        }
        for name in END_OF_TURN_NAMES {
            if let Some(&id) = tokens
                .iter()
                .position(|t| t == name)
                .map(|i| i as u32)
                .as_ref()
            {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            stop_ids,
        })
    }

    /// Reads a tokenizer.json; BOS/EOS still come from the GGUF's metadata.
    pub fn from_file(path: &Path, gguf: &Gguf) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| LlmError::Tokenizer {
            reason: format!("{}: {e}", path.display()),
        })?;
        let tokens: Vec<String> = meta_strings(gguf, "tokenizer.ggml.tokens").unwrap_or_default();
        let id_text = |key: &str| -> Option<(u32, String)> {
            let id = gguf.meta_u32(key).ok()?;
            Some((
                id,
                inner
                    .id_to_token(id)
                    .or_else(|| tokens.get(id as usize).cloned())?,
            ))
        };
        let bos = id_text("tokenizer.ggml.bos_token_id");
        let eos = id_text("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        for name in END_OF_TURN_NAMES {
            if let Some(id) = inner.token_to_id(name) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            stop_ids,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    /// No BOS is added: chat templates write it themselves.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }
}

fn meta_strings(gguf: &Gguf, key: &str) -> Result<Vec<String>> {
    let values = gguf
        .meta(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| LlmError::MissingMetadata { key: key.into() })?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| LlmError::MissingMetadata { key: key.into() })
        })
        .collect()
}

/// Turns a stream of token ids into text pieces, holding back bytes of an incomplete UTF-8
/// character (byte-level BPE splits multi-byte characters across tokens).
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    /// Adds `id`; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tok.decode(&self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            if let Some(delta) = text.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }
}
