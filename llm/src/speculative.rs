//! Lossless speculative decoding: a cheap source proposes a few tokens, the model checks them all
//! in one batched forward pass, and the KV cache is rolled back past the first rejected one.
//!
//! Greedy decoding accepts a proposal only when it is the model's argmax, so the output is
//! exactly plain greedy decoding (the batched pass computes every row with the arithmetic of a
//! single-token pass). With sampling, proposals go through standard rejection sampling
//! (Leviathan et al. 2023, Chen et al. 2023): accept `d` with probability `min(1, p(d)/q(d))`,
//! otherwise draw from `max(p - q, 0)` renormalised, so each token is distributed exactly as `p`.

use std::sync::Arc;

use crate::chat::ReplyStats;
use crate::error::{LlmError, Result};
use crate::local::LocalModel;
use crate::model::{KvCache, Scratch};
use crate::sampling::{argmax, Sampler};

/// The most tokens one step may propose.
pub const MAX_DRAFT: usize = 8;

/// Where proposals come from.
#[derive(Debug, Clone, Default)]
pub enum DraftSource {
    /// No speculative decoding.
    #[default]
    None,
    /// Prompt lookup: find the latest earlier occurrence of the last `ngram_max..=ngram_min`
    /// tokens in the conversation and propose what followed it. Free, and good at answers that
    /// quote the question or the history.
    Lookup {
        ngram_min: usize,
        ngram_max: usize,
        draft_len: usize,
    },
    /// A smaller model with the same vocabulary.
    Model {
        model: Arc<LocalModel>,
        draft_len: usize,
    },
}

impl DraftSource {
    pub fn lookup() -> Self {
        DraftSource::Lookup {
            ngram_min: 2,
            ngram_max: 4,
            draft_len: 6,
        }
    }

    pub fn model(model: Arc<LocalModel>) -> Self {
        DraftSource::Model {
            model,
            draft_len: 4,
        }
    }
}

/// Tokens decided by one step, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Decided {
    buf: [u32; MAX_DRAFT + 1],
    len: usize,
}

impl Decided {
    pub fn one(id: u32) -> Self {
        let mut d = Decided {
            buf: [0; MAX_DRAFT + 1],
            len: 0,
        };
        d.push(id);
        d
    }
    fn empty() -> Self {
        Decided {
            buf: [0; MAX_DRAFT + 1],
            len: 0,
        }
    }
    fn push(&mut self, id: u32) {
        self.buf[self.len] = id;
        self.len += 1;
    }
    pub fn tokens(&self) -> &[u32] {
        &self.buf[..self.len]
    }
}

struct DraftModel {
    model: Arc<LocalModel>,
    cache: KvCache,
    scratch: Scratch,
    tokens: Vec<u32>,
}

/// Per-session speculative-decoding state and buffers.
pub(crate) struct Drafter {
    source: DraftSource,
    draft: Option<DraftModel>,
    drafts: Vec<u32>,
    batch: Vec<u32>,
    seq: Vec<u32>,
    /// Draft distributions, one row of `vocab` per proposal (sampling with a draft model only).
    q: Vec<f32>,
    p: Vec<f32>,
}

impl Drafter {
    pub(crate) fn new(source: DraftSource, target: &LocalModel) -> Result<Option<Self>> {
        let draft = match &source {
            DraftSource::None => return Ok(None),
            DraftSource::Lookup {
                ngram_min,
                ngram_max,
                draft_len,
            } => {
                check_len(*draft_len)?;
                if *ngram_min == 0 || ngram_min > ngram_max {
                    return Err(LlmError::InvalidArgument {
                        reason: format!("n-gram range {ngram_min}..={ngram_max}"),
                    });
                }
                None
            }
            DraftSource::Model { model, draft_len } => {
                check_len(*draft_len)?;
                if model.llama.config.vocab != target.llama.config.vocab
                    || model.tokenizer.eos != target.tokenizer.eos
                {
                    return Err(LlmError::InvalidArgument {
                        reason: format!(
                            "draft model {} has a different vocabulary from {}",
                            model.path.display(),
                            target.path.display()
                        ),
                    });
                }
                Some(DraftModel {
                    cache: model.llama.new_cache(),
                    scratch: Scratch::default(),
                    tokens: Vec::new(),
                    model: Arc::clone(model),
                })
            }
        };
        Ok(Some(Drafter {
            source,
            draft,
            drafts: Vec::with_capacity(MAX_DRAFT),
            batch: Vec::with_capacity(MAX_DRAFT + 1),
            seq: Vec::new(),
            q: Vec::new(),
            p: Vec::new(),
        }))
    }

    /// One speculative step: `pending` is decided but not yet in `cache` (which holds `tokens`).
    /// Runs `pending` plus the proposals through the model, keeps what is accepted, and returns
    /// the newly decided tokens (accepted proposals, then one token from the model).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        target: &LocalModel,
        cache: &mut KvCache,
        scratch: &mut Scratch,
        tokens: &mut Vec<u32>,
        pending: u32,
        sampler: &mut Sampler,
        stats: &mut ReplyStats,
    ) -> Result<Decided> {
        let greedy = sampler.is_greedy();
        self.propose(tokens, pending, sampler)?;
        let room = target.llama.max_context.saturating_sub(cache.len() + 1);
        self.drafts.truncate(room);
        let n_draft = self.drafts.len();
        self.batch.clear();
        self.batch.push(pending);
        self.batch.extend_from_slice(&self.drafts);
        let base = cache.len();
        target.llama.forward(cache, scratch, &self.batch, true)?;
        tokens.extend_from_slice(&self.batch);
        stats.decode_steps += 1;
        stats.drafted_tokens += n_draft;

        let vocab = target.llama.config.vocab;
        let mut decided = Decided::empty();
        let mut rejected = false;
        for i in 0..n_draft {
            let d = self.drafts[i];
            let row = scratch.row(i);
            if greedy {
                let t = argmax(row);
                if t == d {
                    decided.push(d);
                    continue;
                }
                decided.push(t);
            } else {
                sampler.distribution(row, &mut self.p);
                let p_d = self.p[d as usize];
                let q_d = match self.draft {
                    Some(_) => self.q[i * vocab + d as usize],
                    None => 1.0,
                };
                if q_d > 0.0 && sampler.uniform() < (p_d / q_d).min(1.0) {
                    decided.push(d);
                    continue;
                }
                // Residual distribution max(p - q, 0).
                let mut sum = 0.0;
                match self.draft {
                    Some(_) => {
                        let q = &self.q[i * vocab..(i + 1) * vocab];
                        for (p, q) in self.p.iter_mut().zip(q) {
                            *p = (*p - q).max(0.0);
                            sum += *p;
                        }
                    }
                    None => {
                        self.p[d as usize] = 0.0;
                        sum = self.p.iter().sum();
                    }
                }
                if sum > 0.0 {
                    let inv = 1.0 / sum;
                    self.p.iter_mut().for_each(|p| *p *= inv);
                    let t = sampler.draw(&self.p);
                    decided.push(t);
                } else {
                    // p == q: the residual is empty and `p` itself is the right distribution.
                    sampler.distribution(row, &mut self.p);
                    let t = sampler.draw(&self.p);
                    decided.push(t);
                }
            }
            stats.accepted_tokens += i;
            // Keep `pending` and the accepted proposals; forget the rejected ones.
            cache.truncate(base + 1 + i);
            tokens.truncate(base + 1 + i);
            rejected = true;
            break;
        }
        if !rejected {
            stats.accepted_tokens += n_draft;
            let row = scratch.row(n_draft);
            let t = sampler.sample(row, &mut self.p);
            decided.push(t);
        }
        Ok(decided)
    }

    fn propose(&mut self, tokens: &[u32], pending: u32, sampler: &mut Sampler) -> Result<()> {
        self.drafts.clear();
        match &self.source {
            DraftSource::None => {}
            DraftSource::Lookup {
                ngram_min,
                ngram_max,
                draft_len,
            } => {
                self.seq.clear();
                self.seq.extend_from_slice(tokens);
                self.seq.push(pending);
                lookup(
                    &self.seq,
                    *ngram_min,
                    *ngram_max,
                    *draft_len,
                    &mut self.drafts,
                );
            }
            DraftSource::Model { draft_len, .. } => {
                let draft_len = *draft_len;
                let dm = self
                    .draft
                    .as_mut()
                    .expect("invariant: a Model source always has its draft state");
                // Bring the draft's cache to the target's tokens plus `pending`: reuse the common
                // prefix, roll back what the target rejected last step.
                self.seq.clear();
                self.seq.extend_from_slice(tokens);
                self.seq.push(pending);
                let common = dm
                    .tokens
                    .iter()
                    .zip(&self.seq)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(self.seq.len() - 1);
                dm.cache.truncate(common);
                dm.tokens.truncate(common);
                let room = dm
                    .model
                    .llama
                    .max_context
                    .saturating_sub(self.seq.len() + 1);
                let draft_len = draft_len.min(room);
                if draft_len == 0 {
                    return Ok(());
                }
                for chunk in self.seq[common..].chunks(crate::local::PREFILL_CHUNK) {
                    dm.model
                        .llama
                        .forward(&mut dm.cache, &mut dm.scratch, chunk, false)?;
                    dm.tokens.extend_from_slice(chunk);
                }
                let vocab = dm.model.llama.config.vocab;
                let greedy = sampler.is_greedy();
                if !greedy && self.q.len() != draft_len * vocab {
                    self.q.resize(draft_len * vocab, 0.0);
                }
                for i in 0..draft_len {
                    let logits = dm.scratch.last();
                    let d = if greedy {
                        argmax(logits)
                    } else {
                        sampler.distribution(logits, &mut self.p);
                        self.q[i * vocab..(i + 1) * vocab].copy_from_slice(&self.p);
                        sampler.draw(&self.p)
                    };
                    self.drafts.push(d);
                    if i + 1 == draft_len || dm.model.tokenizer.is_stop(d) {
                        break;
                    }
                    dm.model
                        .llama
                        .forward(&mut dm.cache, &mut dm.scratch, &[d], false)?;
                    dm.tokens.push(d);
                }
            }
        }
        Ok(())
    }
}

fn check_len(draft_len: usize) -> Result<()> {
    if draft_len == 0 || draft_len > MAX_DRAFT {
        return Err(LlmError::InvalidArgument {
            reason: format!("draft length {draft_len} is outside 1..={MAX_DRAFT}"),
        });
    }
    Ok(())
}

/// Prompt lookup: the continuation of the latest earlier occurrence of the sequence's last
/// n-gram, longest n first.
pub fn lookup(seq: &[u32], ngram_min: usize, ngram_max: usize, k: usize, out: &mut Vec<u32>) {
    let len = seq.len();
    for n in (ngram_min..=ngram_max).rev() {
        if n >= len {
            continue;
        }
        let pattern = &seq[len - n..];
        for start in (0..len - n).rev() {
            if &seq[start..start + n] == pattern {
                let from = start + n;
                let to = (from + k).min(len);
                if from < to {
                    out.extend_from_slice(&seq[from..to]);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_proposes_what_followed_the_latest_match() {
        let seq = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3];
        let mut out = Vec::new();
        lookup(&seq, 1, 3, 3, &mut out);
        // "2 3" last occurred at 6..8, followed by 7 8 2.
        assert_eq!(out, vec![7, 8, 2]);
        out.clear();
        lookup(&[5, 6, 7], 2, 3, 3, &mut out);
        assert!(out.is_empty());
    }
}
