//! A Llama forward pass over GGUF weights, with a KV cache the caller owns and can truncate.
//!
//! candle_transformers' `quantized_llama` keeps its KV cache private and can only grow it; the
//! turn manager needs to roll a speculative prefill back to any token. This module is our own
//! small implementation of the same architecture (facts from candle's and llama.cpp's code; RoPE
//! on adjacent pairs as llama.cpp's `LLAMA_ROPE_TYPE_NORM`, grouped-query attention, SwiGLU).
//!
//! Every row of a batch is computed with exactly the same arithmetic as a single row, so a prefix
//! computed in one batch, token by token, or reused from the cache gives bit-identical results.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;
use std::sync::atomic::Ordering;

use crate::chat::CancelToken;
use crate::error::{LlmError, Result};
use crate::q8::{self, Q8Act, Q8Matrix};

/// Hyperparameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// The context the model was trained for.
    pub train_ctx: usize,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for the matrix products and attention. 0 means all cores.
    pub threads: usize,
    /// Threads while at most one session is open, when more than `threads`: a lone
    /// conversation's reply has the cores to itself, while with several each keeps to
    /// `threads` so that the others' replies and audio are not starved. 0: `threads` always.
    pub solo_threads: usize,
    /// The longest conversation (prompt and reply, in tokens) a session can hold. The KV cache
    /// reserves address space for this many positions but only touches what is used. Capped by
    /// the model's training context.
    pub max_context: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 1,
            solo_threads: 0,
            max_context: 4096,
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Q8Matrix,
    wk: Q8Matrix,
    wv: Q8Matrix,
    wo: Q8Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Q8Matrix,
    w_up: Q8Matrix,
    w_down: Q8Matrix,
}

/// The weights of a Llama-family model, shared by every session (`Arc`).
pub struct Llama {
    pub config: LlamaConfig,
    /// Largest position + 1 a session may reach.
    pub max_context: usize,
    embed: Q8Matrix,
    /// `None` when the output projection is tied to the embeddings.
    output: Option<Q8Matrix>,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// cos and sin per position and pair: `max_context * head_dim / 2` each.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    pool: rayon::ThreadPool,
    /// `LoadOptions::solo_threads`, when more than `threads`.
    solo_pool: Option<rayon::ThreadPool>,
    /// Sessions open on this model (see `LoadOptions::solo_threads`).
    open_sessions: std::sync::atomic::AtomicUsize,
    threads: usize,
    solo_threads: usize,
    pub(crate) source_dtype: String,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("max_context", &self.max_context)
            .field("threads", &self.threads)
            .field("solo_threads", &self.solo_threads)
            .finish_non_exhaustive()
    }
}

/// An opened GGUF file: metadata plus a reader for its tensors.
pub struct Gguf {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: BufReader<File>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(LlmError::io(path))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| LlmError::BadGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_u32(&self, key: &str) -> Result<u32> {
        self.meta(key)
            .and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_u64().ok().map(|v| v as u32))
            })
            .ok_or_else(|| LlmError::MissingMetadata { key: key.into() })
    }

    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        self.meta(key)
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| LlmError::MissingMetadata { key: key.into() })
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| LlmError::MissingMetadata { key: key.into() })
    }

    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| LlmError::BadGguf {
                path: self.path.clone(),
                reason: format!("tensor {name}: {e}"),
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn bad(&self, reason: String) -> LlmError {
        LlmError::BadGguf {
            path: self.path.clone(),
            reason,
        }
    }

    /// A 2-D weight as Q8_0: Q8_0 tensors are copied as they are, any other type is dequantized
    /// and quantized again (one code path and one fast kernel for every file type).
    pub fn q8_matrix(&mut self, name: &str) -> Result<Q8Matrix> {
        let t = self.tensor(name)?;
        let dims = t.shape().dims().to_vec();
        let [rows, cols] = dims[..] else {
            return Err(self.bad(format!("{name} has shape {dims:?}, expected 2-D")));
        };
        if cols % q8::BLOCK != 0 {
            return Err(self.bad(format!("{name}: {cols} columns is not a multiple of 32")));
        }
        if t.dtype() == GgmlDType::Q8_0 {
            let data = t.data()?;
            return Q8Matrix::from_ggml_q8_0(rows, cols, &data)
                .ok_or_else(|| self.bad(format!("{name}: Q8_0 data has the wrong length")));
        }
        let values = t
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Q8Matrix::from_f32(rows, cols, &values))
    }

    pub fn f32_vec(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(LlmError::Unsupported {
                reason: format!(
                    "{}: architecture {arch:?}; only Llama-family GGUFs (\"llama\") are supported",
                    self.path.display()
                ),
            });
        }
        let dim = self.meta_u32("llama.embedding_length")? as usize;
        let n_heads = self.meta_u32("llama.attention.head_count")? as usize;
        let n_kv_heads = self
            .meta_u32("llama.attention.head_count_kv")
            .unwrap_or(n_heads as u32) as usize;
        let head_dim = self
            .meta_u32("llama.rope.dimension_count")
            .map(|v| v as usize)
            .unwrap_or(dim / n_heads.max(1));
        let vocab = match self
            .meta("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
        {
            Some(tokens) => tokens.len(),
            None => self.meta_u32("llama.vocab_size")? as usize,
        };
        let config = LlamaConfig {
            dim,
            n_layers: self.meta_u32("llama.block_count")? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: self.meta_u32("llama.feed_forward_length")? as usize,
            vocab,
            rms_eps: self.meta_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: self.meta_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            train_ctx: self.meta_u32("llama.context_length").unwrap_or(4096) as usize,
        };
        if n_heads == 0
            || n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
            || !head_dim.is_multiple_of(2)
            || n_heads * head_dim != dim
        {
            return Err(self.bad(format!("inconsistent attention shape: {config:?}")));
        }
        Ok(config)
    }
}

impl Llama {
    /// Loads a Llama-family GGUF (any ggml weight type candle can dequantize).
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self> {
        let mut gguf = Gguf::open(path)?;
        Self::from_gguf(&mut gguf, options)
    }

    pub fn from_gguf(gguf: &mut Gguf, options: &LoadOptions) -> Result<Self> {
        let config = gguf.llama_config()?;
        let source_dtype = gguf
            .content
            .tensor_infos
            .get("blk.0.attn_q.weight")
            .map(|t| format!("{:?}", t.ggml_dtype))
            .unwrap_or_else(|| "unknown".into());
        let embed = gguf.q8_matrix("token_embd.weight")?;
        let output = if gguf.has_tensor("output.weight") {
            Some(gguf.q8_matrix("output.weight")?)
        } else {
            None
        };
        let output_norm = gguf.f32_vec("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: gguf.f32_vec(&format!("{p}.attn_norm.weight"))?,
                wq: gguf.q8_matrix(&format!("{p}.attn_q.weight"))?,
                wk: gguf.q8_matrix(&format!("{p}.attn_k.weight"))?,
                wv: gguf.q8_matrix(&format!("{p}.attn_v.weight"))?,
                wo: gguf.q8_matrix(&format!("{p}.attn_output.weight"))?,
                ffn_norm: gguf.f32_vec(&format!("{p}.ffn_norm.weight"))?,
                w_gate: gguf.q8_matrix(&format!("{p}.ffn_gate.weight"))?,
                w_up: gguf.q8_matrix(&format!("{p}.ffn_up.weight"))?,
                w_down: gguf.q8_matrix(&format!("{p}.ffn_down.weight"))?,
            });
        }
        let kv_dim = config.n_kv_heads * config.head_dim;
        for (i, l) in layers.iter().enumerate() {
            let ok = l.wq.rows == config.dim
                && l.wq.cols == config.dim
                && l.wk.rows == kv_dim
                && l.wv.rows == kv_dim
                && l.wo.rows == config.dim
                && l.w_gate.rows == config.ffn_dim
                && l.w_up.rows == config.ffn_dim
                && l.w_down.rows == config.dim
                && l.w_down.cols == config.ffn_dim
                && l.attn_norm.len() == config.dim
                && l.ffn_norm.len() == config.dim;
            if !ok {
                return Err(gguf.bad(format!("layer {i} has unexpected weight shapes")));
            }
        }
        let out_rows = output.as_ref().unwrap_or(&embed).rows;
        if embed.cols != config.dim || out_rows < config.vocab {
            return Err(gguf.bad(format!(
                "embedding is {}x{}, expected {}x{}",
                embed.rows, embed.cols, config.vocab, config.dim
            )));
        }
        // Llama 3.1+ GGUFs carry their long-context RoPE scaling as per-frequency divisors.
        let freq_factors = if gguf.has_tensor("rope_freqs.weight") {
            Some(gguf.f32_vec("rope_freqs.weight")?)
        } else {
            None
        };
        let max_context = options.max_context.clamp(1, config.train_ctx.max(1));
        let half = config.head_dim / 2;
        let mut rope_cos = Vec::with_capacity(max_context * half);
        let mut rope_sin = Vec::with_capacity(max_context * half);
        for pos in 0..max_context {
            for i in 0..half {
                let mut freq = 1.0
                    / config
                        .rope_base
                        .powf(2.0 * i as f32 / config.head_dim as f32);
                if let Some(f) = freq_factors.as_ref().and_then(|f| f.get(i)) {
                    freq /= f;
                }
                let angle = pos as f32 * freq;
                rope_cos.push(angle.cos());
                rope_sin.push(angle.sin());
            }
        }
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let pool = |threads: usize, name: &'static str| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .map_err(|e| LlmError::InvalidArgument {
                    reason: format!("cannot start {threads} inference threads: {e}"),
                })
        };
        let solo_threads = options.solo_threads.max(threads);
        let solo_pool = if solo_threads > threads {
            Some(pool(solo_threads, "talkline-llm-solo")?)
        } else {
            None
        };
        let pool = pool(threads, "talkline-llm")?;
        Ok(Llama {
            config,
            max_context,
            embed,
            output,
            output_norm,
            layers,
            rope_cos,
            rope_sin,
            pool,
            solo_pool,
            open_sessions: Default::default(),
            threads,
            solo_threads,
            source_dtype,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Threads while at most one session is open (at least [`Llama::threads`]).
    pub fn solo_threads(&self) -> usize {
        self.solo_threads
    }

    /// A session opened on this model (see `LoadOptions::solo_threads`); pair with
    /// [`Llama::session_closed`].
    pub(crate) fn session_opened(&self) {
        self.open_sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session_closed(&self) {
        self.open_sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Threads the next forward pass runs on.
    pub fn current_threads(&self) -> usize {
        self.current_pool().current_num_threads()
    }

    /// The pool a forward pass runs on now. Every pool gives the same bits: a row's dot product
    /// never depends on how the rows are split over threads.
    fn current_pool(&self) -> &rayon::ThreadPool {
        match &self.solo_pool {
            Some(solo) if self.open_sessions.load(Ordering::Relaxed) <= 1 => solo,
            _ => &self.pool,
        }
    }

    /// The ggml type of the file's attention weights (before conversion to Q8_0).
    pub fn source_dtype(&self) -> &str {
        &self.source_dtype
    }

    /// A KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        let kv_dim = self.config.n_kv_heads * self.config.head_dim;
        KvCache {
            k: (0..self.config.n_layers)
                .map(|_| Vec::with_capacity(self.max_context * kv_dim))
                .collect(),
            v: (0..self.config.n_layers)
                .map(|_| Vec::with_capacity(self.max_context * kv_dim))
                .collect(),
            kv_dim,
            len: 0,
        }
    }

    /// Runs `tokens` at positions `cache.len()..` and appends their keys and values to the cache.
    /// Writes logits into `s.logits`: for every token when `all_logits`, else for the last one.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        s: &mut Scratch,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<()> {
        self.forward_cancellable(cache, s, tokens, all_logits, &CancelToken::new())
            .map(|_| ())
    }

    /// [`Self::forward`] that checks `cancel` before each layer: `Ok(false)` when cancelled,
    /// with the cache as it was before the call. A cancelled reply's prompt gives the cores back
    /// within a layer (about 2 ms), not at the end of a pass of tens of milliseconds.
    pub fn forward_cancellable(
        &self,
        cache: &mut KvCache,
        s: &mut Scratch,
        tokens: &[u32],
        all_logits: bool,
        cancel: &CancelToken,
    ) -> Result<bool> {
        // One hop onto the pool per forward pass: the parallel loops inside then run on the
        // pool's own threads instead of waking them from outside for each of the ~250 matrix
        // products (measured: that cost a fifth of the decode time).
        let pool = self.current_pool();
        pool.install(|| self.forward_on_pool(pool, cache, s, tokens, all_logits, cancel))
    }

    fn forward_on_pool(
        &self,
        pool: &rayon::ThreadPool,
        cache: &mut KvCache,
        s: &mut Scratch,
        tokens: &[u32],
        all_logits: bool,
        cancel: &CancelToken,
    ) -> Result<bool> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(LlmError::InvalidArgument {
                reason: "forward needs at least one token".into(),
            });
        }
        let pos0 = cache.len;
        if pos0 + n > self.max_context {
            return Err(LlmError::ContextFull {
                needed: pos0 + n,
                max: self.max_context,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(LlmError::InvalidArgument {
                reason: format!("token id {bad} is outside the vocabulary ({})", c.vocab),
            });
        }
        let dim = c.dim;
        let kv_dim = c.n_kv_heads * c.head_dim;
        s.prepare(c, n, self.max_context);
        for (t, &tok) in tokens.iter().enumerate() {
            self.embed
                .dequantize_row(tok as usize, &mut s.x[t * dim..(t + 1) * dim]);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            if cancel.is_cancelled() {
                // The layers before this one hold keys and values of the abandoned tokens.
                for kv in cache.k.iter_mut().chain(cache.v.iter_mut()) {
                    kv.truncate(pos0 * kv_dim);
                }
                return Ok(false);
            }
            rms_norm(&s.x, &layer.attn_norm, c.rms_eps, &mut s.xn, dim);
            s.act.set(&s.xn, n, dim);
            q8::matmul(pool, &layer.wq, &s.act, &mut s.q, &mut s.tmp);
            q8::matmul(pool, &layer.wk, &s.act, &mut s.k, &mut s.tmp);
            q8::matmul(pool, &layer.wv, &s.act, &mut s.v, &mut s.tmp);
            self.rope(&mut s.q, n, pos0, c.n_heads);
            self.rope(&mut s.k, n, pos0, c.n_kv_heads);
            cache.k[li].extend_from_slice(&s.k);
            cache.v[li].extend_from_slice(&s.v);
            self.attention(
                pool,
                &cache.k[li],
                &cache.v[li],
                &s.q,
                &mut s.heads,
                &mut s.scores,
                n,
                pos0,
            );
            // Heads come back as [head][row][head_dim]; the output projection wants rows.
            let hd = c.head_dim;
            for h in 0..c.n_heads {
                for t in 0..n {
                    let src = &s.heads[(h * n + t) * hd..(h * n + t + 1) * hd];
                    s.xn[t * dim + h * hd..t * dim + (h + 1) * hd].copy_from_slice(src);
                }
            }
            s.act.set(&s.xn, n, dim);
            q8::matmul(pool, &layer.wo, &s.act, &mut s.q, &mut s.tmp);
            for (x, a) in s.x.iter_mut().zip(&s.q) {
                *x += a;
            }
            rms_norm(&s.x, &layer.ffn_norm, c.rms_eps, &mut s.xn, dim);
            s.act.set(&s.xn, n, dim);
            q8::matmul(pool, &layer.w_gate, &s.act, &mut s.gate, &mut s.tmp);
            q8::matmul(pool, &layer.w_up, &s.act, &mut s.up, &mut s.tmp);
            for (g, u) in s.gate.iter_mut().zip(&s.up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            s.act_ffn.set(&s.gate, n, c.ffn_dim);
            q8::matmul(pool, &layer.w_down, &s.act_ffn, &mut s.q, &mut s.tmp);
            for (x, a) in s.x.iter_mut().zip(&s.q) {
                *x += a;
            }
        }
        cache.len += n;
        debug_assert!(cache.k.iter().all(|k| k.len() == cache.len * kv_dim));
        let first = if all_logits { 0 } else { n - 1 };
        let rows = n - first;
        rms_norm(
            &s.x[first * dim..],
            &self.output_norm,
            c.rms_eps,
            &mut s.xn[..rows * dim],
            dim,
        );
        s.act.set(&s.xn[..rows * dim], rows, dim);
        let out = self.output.as_ref().unwrap_or(&self.embed);
        let full = out.rows;
        if s.logits_full.len() != rows * full {
            s.logits_full.resize(rows * full, 0.0);
        }
        q8::matmul(pool, out, &s.act, &mut s.logits_full, &mut s.tmp);
        // Some GGUFs pad the output matrix past the tokenizer's vocabulary.
        s.logits.clear();
        for r in 0..rows {
            s.logits
                .extend_from_slice(&s.logits_full[r * full..r * full + c.vocab]);
        }
        s.logits_rows = rows;
        Ok(true)
    }

    fn rope(&self, x: &mut [f32], n: usize, pos0: usize, heads: usize) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for t in 0..n {
            let p = pos0 + t;
            let cos = &self.rope_cos[p * half..(p + 1) * half];
            let sin = &self.rope_sin[p * half..(p + 1) * half];
            let row = &mut x[t * heads * hd..(t + 1) * heads * hd];
            for head in row.chunks_exact_mut(hd) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[i] - b * sin[i];
                    pair[1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &rayon::ThreadPool,
        k_cache: &[f32],
        v_cache: &[f32],
        q: &[f32],
        heads_out: &mut [f32],
        scores: &mut [f32],
        n: usize,
        pos0: usize,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let dim = c.dim;
        let kv_dim = c.n_kv_heads * hd;
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let ctx = self.max_context;
        pool.install(|| {
            heads_out
                .par_chunks_mut(n * hd)
                .zip(scores.par_chunks_mut(ctx))
                .enumerate()
                .for_each(|(h, (out, scores))| {
                    let g = h / group;
                    for t in 0..n {
                        let len = pos0 + t + 1;
                        let qv = &q[t * dim + h * hd..t * dim + (h + 1) * hd];
                        let sc = &mut scores[..len];
                        let mut max = f32::NEG_INFINITY;
                        for (j, s) in sc.iter_mut().enumerate() {
                            let kv = &k_cache[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                            *s = dot(qv, kv) * scale;
                            max = max.max(*s);
                        }
                        let mut sum = 0.0;
                        for s in sc.iter_mut() {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        let inv = 1.0 / sum;
                        let o = &mut out[t * hd..(t + 1) * hd];
                        o.fill(0.0);
                        for (j, s) in sc.iter().enumerate() {
                            let w = s * inv;
                            let vv = &v_cache[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                            for (o, v) in o.iter_mut().zip(vv) {
                                *o += w * v;
                            }
                        }
                    }
                })
        });
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler can vectorise without reassociating a single chain.
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], dim: usize) {
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * w;
        }
    }
}

/// Keys and values of every position so far, per layer. Truncating it rolls the model back.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on. Keeps the memory, so extending again is free.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for k in &mut self.k {
            k.truncate(len * self.kv_dim);
        }
        for v in &mut self.v {
            v.truncate(len * self.kv_dim);
        }
        self.len = len;
    }
}

/// Per-session work buffers. They grow to the largest batch seen and are then reused, so a
/// decode step allocates nothing.
#[derive(Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    heads: Vec<f32>,
    scores: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    tmp: Vec<f32>,
    act: Q8Act,
    act_ffn: Q8Act,
    logits_full: Vec<f32>,
    /// Logits of the last forward: `logits_rows` rows of `vocab` values.
    pub logits: Vec<f32>,
    pub logits_rows: usize,
}

impl Scratch {
    fn prepare(&mut self, c: &LlamaConfig, n: usize, ctx: usize) {
        let kv_dim = c.n_kv_heads * c.head_dim;
        set_len(&mut self.x, n * c.dim);
        set_len(&mut self.xn, n * c.dim);
        set_len(&mut self.q, n * c.dim);
        set_len(&mut self.k, n * kv_dim);
        set_len(&mut self.v, n * kv_dim);
        set_len(&mut self.heads, n * c.dim);
        set_len(&mut self.scores, c.n_heads * ctx);
        set_len(&mut self.gate, n * c.ffn_dim);
        set_len(&mut self.up, n * c.ffn_dim);
    }

    /// Logits of row `r` of the last forward.
    pub fn row(&self, r: usize) -> &[f32] {
        let vocab = self.logits.len() / self.logits_rows.max(1);
        &self.logits[r * vocab..(r + 1) * vocab]
    }

    /// Logits of the last row of the last forward.
    pub fn last(&self) -> &[f32] {
        self.row(self.logits_rows.saturating_sub(1))
    }
}

/// Sets the length without reallocating once capacity is there (`resize` only grows).
fn set_len(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}
