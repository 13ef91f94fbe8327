//! A tiny Llama-3-shaped GGUF written in the test (random weights, byte-level vocabulary,
//! `llama-bpe` pre-tokenizer, grouped-query attention 4:1, an untied output matrix, RoPE
//! frequency factors, a Llama-3 header chat template, Q4_0/Q8_0/F32 tensors). No Llama-3 weights
//! are available here; this checks that everything other than SmolLM2's particular shape loads
//! and behaves: template, special tokens, KV reuse and speculative decoding.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use talkline_llm::{
    CancelToken, DraftSource, GenerateParams, LoadOptions, LocalConfig, LocalModel, Message,
    Sampling,
};

const DIM: usize = 64;
const LAYERS: usize = 2;
const FFN: usize = 128;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 1;
const SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];
const TEMPLATE: &str = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// GPT-2's byte-to-character map, as byte-level BPE vocabularies spell bytes.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("below 512 every code point is a char")
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

fn weight(rng: &mut Lcg, rows: usize, cols: usize, scale: f32, dtype: GgmlDType) -> QTensor {
    let data: Vec<f32> = (0..rows * cols).map(|_| rng.next() * scale).collect();
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, dtype).expect("quantizes")
}

fn vector(values: Vec<f32>) -> QTensor {
    let n = values.len();
    let t = Tensor::from_vec(values, n, &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, GgmlDType::F32).expect("f32 'quantizes'")
}

fn write_model(path: &Path) -> usize {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    tokens.push(format!("{}t", byte_char(b' ')));
    let first_special = tokens.len();
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let mut types = vec![Value::I32(1); first_special];
    types.extend(SPECIALS.iter().map(|_| Value::I32(3)));
    let s = |v: &str| Value::String(v.to_string());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.embedding_length", Value::U32(DIM as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(500_000.0)),
        ("llama.rope.dimension_count", Value::U32(DIM as u32 / HEADS)),
        ("llama.context_length", Value::U32(256)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("llama-bpe")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![s(&format!("{} t", byte_char(b' ')))]),
        ),
        (
            "tokenizer.ggml.bos_token_id",
            Value::U32(first_special as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(first_special as u32 + 4),
        ),
        ("tokenizer.chat_template", s(TEMPLATE)),
    ];
    let mut rng = Lcg(42);
    let kv = DIM / HEADS as usize * KV_HEADS as usize;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            weight(&mut rng, vocab, DIM, 2.0, GgmlDType::Q4_0),
        ),
        (
            "output.weight".into(),
            weight(&mut rng, vocab, DIM, 1.0, GgmlDType::Q8_0),
        ),
        ("output_norm.weight".into(), vector(vec![1.0; DIM])),
        (
            "rope_freqs.weight".into(),
            vector(
                (0..DIM / HEADS as usize / 2)
                    .map(|i| 1.0 + i as f32 / 4.0)
                    .collect(),
            ),
        ),
    ];
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let mut add = |name: &str, t: QTensor| tensors.push((format!("{p}.{name}"), t));
        add("attn_norm.weight", vector(vec![1.0; DIM]));
        add("ffn_norm.weight", vector(vec![1.0; DIM]));
        add(
            "attn_q.weight",
            weight(&mut rng, DIM, DIM, 0.5, GgmlDType::Q4_0),
        );
        add(
            "attn_k.weight",
            weight(&mut rng, kv, DIM, 0.5, GgmlDType::Q4_0),
        );
        add(
            "attn_v.weight",
            weight(&mut rng, kv, DIM, 0.5, GgmlDType::Q4_0),
        );
        add(
            "attn_output.weight",
            weight(&mut rng, DIM, DIM, 0.5, GgmlDType::Q8_0),
        );
        add(
            "ffn_gate.weight",
            weight(&mut rng, FFN, DIM, 0.5, GgmlDType::Q4_0),
        );
        add(
            "ffn_up.weight",
            weight(&mut rng, FFN, DIM, 0.5, GgmlDType::Q4_0),
        );
        add(
            "ffn_down.weight",
            weight(&mut rng, DIM, FFN, 0.5, GgmlDType::Q8_0),
        );
    }
    let file = File::create(path).expect("create the GGUF");
    let mut w = BufWriter::new(file);
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut w, &meta, &ts).expect("write the GGUF");
    vocab
}

#[test]
fn a_llama3_shaped_gguf_loads_templates_and_decodes_consistently() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tiny-llama3.gguf");
    let vocab = write_model(&path);
    let model = LocalModel::load(&LocalConfig {
        model: path,
        tokenizer: None,
        load: LoadOptions {
            threads: 2,
            max_context: 256,
            ..LoadOptions::default()
        },
    })
    .expect("the synthetic Llama-3 GGUF loads");
    let c = &model.llama.config;
    assert_eq!((c.n_heads, c.n_kv_heads, c.vocab), (4, 1, vocab));

    // Special tokens are recognised in text, the merge applies, bytes round-trip.
    let tok = &model.tokenizer;
    let bos = tok.bos.as_ref().expect("a BOS token").0;
    let ids = tok.encode("<|begin_of_text|>at tea").expect("encodes");
    let space_t = tok
        .token_to_id(&format!("{}t", byte_char(b' ')))
        .expect("merged token");
    assert_eq!(
        ids,
        vec![
            bos,
            b'a' as u32,
            b't' as u32,
            space_t,
            b'e' as u32,
            b'a' as u32
        ]
    );
    assert_eq!(tok.decode(&ids[1..]).expect("decodes"), "at tea");
    assert_eq!(
        tok.decode(&tok.encode("héllo wörld ✓").expect("encodes"))
            .expect("decodes"),
        "héllo wörld ✓"
    );
    assert!(tok.is_stop(tok.token_to_id("<|eot_id|>").expect("eot")));

    let messages = [Message::system("Be brief."), Message::user(" Hi ")];
    let text = model.template.render(&messages, true).expect("renders");
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let (open, end) = model.open_tokens(&messages).expect("renders open");
    assert_eq!(end, tok.token_to_id("<|eot_id|>").expect("eot"));
    assert_eq!(
        tok.decode(&open).expect("decodes").rsplit("\n\n").next(),
        Some("Hi")
    );

    // Greedy decoding with and without prompt lookup, and KV reuse vs a fresh prefill.
    let prompt = model.prompt_tokens(&messages).expect("renders");
    let params = GenerateParams {
        max_tokens: 12,
        sampling: Sampling::Greedy,
    };
    let cancel = CancelToken::new();
    let mut plain = model.session();
    let a = plain
        .generate(&prompt, &params, &cancel, &mut |_, _| {})
        .expect("generates");
    let mut spec = model.session();
    spec.set_draft(DraftSource::Lookup {
        ngram_min: 1,
        ngram_max: 3,
        draft_len: 4,
    })
    .expect("draft source");
    let b = spec
        .generate(&prompt, &params, &cancel, &mut |_, _| {})
        .expect("generates");
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());

    let mut longer = prompt.clone();
    longer.extend_from_slice(&a.tokens);
    longer.extend(tok.encode("<|eot_id|>more").expect("encodes"));
    plain
        .sync(&longer, &cancel)
        .expect("syncs")
        .expect("not cancelled");
    let mut fresh = model.session();
    fresh
        .sync(&longer, &cancel)
        .expect("syncs")
        .expect("not cancelled");
    let diff = plain
        .logits()
        .iter()
        .zip(fresh.logits())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-3, "max |logit difference| {diff}");
}
