//! Converts a tiny synthetic CTranslate2 Whisper model and reads the ggml file back.

use std::collections::BTreeMap;

use super::ct2::{write_ct2, Ct2Dtype};
use super::*;

const D: usize = 32;
const FFN: usize = 64;
const MELS: usize = 4;
const VOCAB: [&str; 6] = [
    "!",
    "Ġthe",
    "Ċ",
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
];

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect()
}

/// Deterministic, distinct values so that a misplaced slice is visible.
fn ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + (i % 97) as f32 / 128.0).collect()
}

struct Synthetic {
    vars: Vec<(String, Vec<usize>, Vec<f32>)>,
    scalars: Vec<(String, i16)>,
}

impl Synthetic {
    fn whisper() -> Self {
        let mut s = Synthetic {
            vars: Vec::new(),
            scalars: vec![
                ("encoder/num_heads".into(), 2),
                ("decoder/num_heads".into(), 2),
            ],
        };
        let mut seed = 0.0;
        let mut add = |s: &mut Synthetic, name: &str, shape: Vec<usize>| {
            seed += 0.25;
            let n = shape.iter().product();
            s.vars.push((name.to_string(), shape, ramp(n, seed)));
        };
        add(&mut s, "encoder/conv1/weight", vec![D, MELS, 3]);
        add(&mut s, "encoder/conv1/bias", vec![D]);
        add(&mut s, "encoder/conv2/weight", vec![D, D, 3]);
        add(&mut s, "encoder/conv2/bias", vec![D]);
        add(&mut s, "encoder/position_encodings/encodings", vec![10, D]);
        add(&mut s, "decoder/position_encodings/encodings", vec![8, D]);
        add(&mut s, "decoder/embeddings/weight", vec![VOCAB.len(), D]);
        for side in ["encoder", "decoder"] {
            let l = format!("{side}/layer_0");
            for ln in ["self_attention/layer_norm", "ffn/layer_norm"] {
                add(&mut s, &format!("{l}/{ln}/gamma"), vec![D]);
                add(&mut s, &format!("{l}/{ln}/beta"), vec![D]);
            }
            add(
                &mut s,
                &format!("{l}/self_attention/linear_0/weight"),
                vec![3 * D, D],
            );
            add(
                &mut s,
                &format!("{l}/self_attention/linear_0/bias"),
                vec![3 * D],
            );
            add(
                &mut s,
                &format!("{l}/self_attention/linear_1/weight"),
                vec![D, D],
            );
            add(
                &mut s,
                &format!("{l}/self_attention/linear_1/bias"),
                vec![D],
            );
            add(&mut s, &format!("{l}/ffn/linear_0/weight"), vec![FFN, D]);
            add(&mut s, &format!("{l}/ffn/linear_0/bias"), vec![FFN]);
            add(&mut s, &format!("{l}/ffn/linear_1/weight"), vec![D, FFN]);
            add(&mut s, &format!("{l}/ffn/linear_1/bias"), vec![D]);
            add(&mut s, &format!("{side}/layer_norm/gamma"), vec![D]);
            add(&mut s, &format!("{side}/layer_norm/beta"), vec![D]);
        }
        let l = "decoder/layer_0/attention";
        add(&mut s, &format!("{l}/layer_norm/gamma"), vec![D]);
        add(&mut s, &format!("{l}/layer_norm/beta"), vec![D]);
        add(&mut s, &format!("{l}/linear_0/weight"), vec![D, D]);
        add(&mut s, &format!("{l}/linear_0/bias"), vec![D]);
        add(&mut s, &format!("{l}/linear_1/weight"), vec![2 * D, D]);
        add(&mut s, &format!("{l}/linear_1/bias"), vec![2 * D]);
        add(&mut s, &format!("{l}/linear_2/weight"), vec![D, D]);
        add(&mut s, &format!("{l}/linear_2/bias"), vec![D]);
        // CTranslate2 stores the (absent) key bias as zeros.
        s.zero_range("encoder/layer_0/self_attention/linear_0/bias", D..2 * D);
        s.zero_range("decoder/layer_0/self_attention/linear_0/bias", D..2 * D);
        s.zero_range("decoder/layer_0/attention/linear_1/bias", 0..D);
        s
    }

    fn zero_range(&mut self, name: &str, range: std::ops::Range<usize>) {
        let v = self.vars.iter_mut().find(|v| v.0 == name).unwrap();
        v.2[range].iter_mut().for_each(|x| *x = 0.0);
    }

    fn values(&self, name: &str) -> &[f32] {
        &self.vars.iter().find(|v| v.0 == name).unwrap().2
    }

    fn write(&self, dir: &Path) {
        let mut vars: Vec<(&str, Vec<usize>, Ct2Dtype, Vec<u8>)> = self
            .vars
            .iter()
            .map(|(n, shape, v)| (n.as_str(), shape.clone(), Ct2Dtype::F16, f16_bytes(v)))
            .collect();
        for (n, v) in &self.scalars {
            vars.push((n.as_str(), vec![], Ct2Dtype::I16, v.to_le_bytes().to_vec()));
        }
        let bytes = write_ct2(
            "WhisperSpec",
            &vars,
            &[("decoder/projection/weight", "decoder/embeddings/weight")],
        );
        fs::write(dir.join("model.bin"), bytes).unwrap();
        fs::write(dir.join("vocabulary.txt"), VOCAB.join("\n") + "\n").unwrap();
    }
}

/// A minimal reader of the ggml file, independent of the writer.
struct GgmlFile {
    hparams: Vec<i32>,
    mel: Vec<f32>,
    vocab: Vec<Vec<u8>>,
    tensors: BTreeMap<String, (i32, Vec<usize>, Vec<u8>)>,
}

fn read_ggml(bytes: &[u8]) -> GgmlFile {
    let mut pos = 0;
    let i32_at = |pos: &mut usize| {
        let v = i32::from_le_bytes(bytes[*pos..*pos + 4].try_into().unwrap());
        *pos += 4;
        v
    };
    assert_eq!(i32_at(&mut pos) as u32, ggml::GGML_MAGIC);
    let hparams: Vec<i32> = (0..11).map(|_| i32_at(&mut pos)).collect();
    let (n_mel, n_fft) = (i32_at(&mut pos) as usize, i32_at(&mut pos) as usize);
    let mel = bytes[pos..pos + 4 * n_mel * n_fft]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    pos += 4 * n_mel * n_fft;
    let n_vocab = i32_at(&mut pos) as usize;
    let mut vocab = Vec::new();
    for _ in 0..n_vocab {
        let len = i32_at(&mut pos) as usize;
        vocab.push(bytes[pos..pos + len].to_vec());
        pos += len;
    }
    let mut tensors = BTreeMap::new();
    while pos < bytes.len() {
        let (rank, name_len, ty) = (i32_at(&mut pos), i32_at(&mut pos), i32_at(&mut pos));
        let mut dims: Vec<usize> = (0..rank).map(|_| i32_at(&mut pos) as usize).collect();
        dims.reverse();
        let name = String::from_utf8(bytes[pos..pos + name_len as usize].to_vec()).unwrap();
        pos += name_len as usize;
        let n: usize = dims.iter().product();
        let size = match ty {
            0 => 4 * n,
            1 => 2 * n,
            8 => n / 32 * 34,
            other => panic!("unexpected type {other}"),
        };
        tensors.insert(name, (ty, dims, bytes[pos..pos + size].to_vec()));
        pos += size;
    }
    GgmlFile {
        hparams,
        mel,
        vocab,
        tensors,
    }
}

fn as_f32(ty: i32, data: &[u8]) -> Vec<f32> {
    match ty {
        0 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        1 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        8 => ggml::dequantize_q8_0(data),
        other => panic!("type {other}"),
    }
}

fn f16_round(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32())
        .collect()
}

#[test]
fn synthetic_ct2_converts_to_f16_ggml_with_whisper_cpp_names_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = Synthetic::whisper();
    model.write(dir.path());
    let out = dir.path().join("ggml.bin");
    let report = convert_ct2_whisper(dir.path(), &out, WeightType::F16).unwrap();
    assert!(!partial_path(&out).exists());
    let file = read_ggml(&fs::read(&out).unwrap());

    // n_vocab, audio ctx/state/head/layer, text ctx/state/head/layer, n_mels, ftype
    assert_eq!(file.hparams, vec![6, 10, 32, 2, 1, 8, 32, 2, 1, 4, 1]);
    assert_eq!(report.tensors, file.tensors.len());
    assert_eq!(file.mel.len(), MELS * 201);
    // Only the tokens before <|endoftext|>, as raw bytes.
    assert_eq!(
        file.vocab,
        vec![b"!".to_vec(), b" the".to_vec(), b"\n".to_vec()]
    );

    let t = |name: &str| {
        file.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    // Encoder: 5 stem + 15 per layer + 2 ln_post; decoder: 2 stem + 24 per layer + 2 ln.
    assert_eq!(file.tensors.len(), 50);
    assert!(!file.tensors.keys().any(|k| k.contains("key.bias")));
    assert!(!file.tensors.keys().any(|k| k.contains("projection")));

    let (ty, dims, _) = t("encoder.conv1.bias");
    assert_eq!((*ty, dims.clone()), (0, vec![D, 1]));
    let (ty, dims, _) = t("encoder.conv1.weight");
    assert_eq!((*ty, dims.clone()), (1, vec![D, MELS, 3]));
    let (ty, _, _) = t("encoder.positional_embedding");
    assert_eq!(*ty, 0);
    let (ty, _, _) = t("decoder.blocks.0.mlp_ln.weight");
    assert_eq!(*ty, 0);

    // Fused QKV split by rows, in Q, K, V order.
    let fused = model.values("encoder/layer_0/self_attention/linear_0/weight");
    for (p, part) in ["query", "key", "value"].iter().enumerate() {
        let (ty, dims, data) = t(&format!("encoder.blocks.0.attn.{part}.weight"));
        assert_eq!((*ty, dims.clone()), (1, vec![D, D]));
        assert_eq!(
            as_f32(*ty, data),
            f16_round(&fused[p * D * D..(p + 1) * D * D])
        );
    }
    let fused_bias = model.values("encoder/layer_0/self_attention/linear_0/bias");
    let (ty, _, data) = t("encoder.blocks.0.attn.value.bias");
    assert_eq!(as_f32(*ty, data), f16_round(&fused_bias[2 * D..]));

    // Cross-attention K then V.
    let kv = model.values("decoder/layer_0/attention/linear_1/weight");
    let (ty, _, data) = t("decoder.blocks.0.cross_attn.value.weight");
    assert_eq!(as_f32(*ty, data), f16_round(&kv[D * D..]));
    let (ty, _, data) = t("decoder.blocks.0.cross_attn.out.bias");
    assert_eq!(
        as_f32(*ty, data),
        f16_round(model.values("decoder/layer_0/attention/linear_2/bias"))
    );
    let (ty, _, data) = t("decoder.ln.bias");
    assert_eq!(
        as_f32(*ty, data),
        f16_round(model.values("decoder/layer_norm/beta"))
    );
}

#[test]
fn q8_0_quantizes_matrices_but_not_convs_norms_or_positions() {
    let dir = tempfile::tempdir().unwrap();
    let model = Synthetic::whisper();
    model.write(dir.path());
    let out = dir.path().join("q8.bin");
    convert_ct2_whisper(dir.path(), &out, WeightType::Q8_0).unwrap();
    let file = read_ggml(&fs::read(&out).unwrap());
    assert_eq!(file.hparams[10], 2007, "ftype 7 (Q8_0) + version 2 * 1000");
    let ty = |name: &str| file.tensors[name].0;
    assert_eq!(ty("decoder.token_embedding.weight"), 8);
    assert_eq!(ty("encoder.blocks.0.mlp.0.weight"), 8);
    assert_eq!(ty("encoder.conv2.weight"), 1);
    assert_eq!(ty("encoder.conv2.bias"), 0);
    assert_eq!(ty("decoder.positional_embedding"), 0);
    let (_, _, data) = &file.tensors["encoder.blocks.0.mlp.2.weight"];
    let expected = model.values("encoder/layer_0/ffn/linear_1/weight");
    let got = ggml::dequantize_q8_0(data);
    let max_err = got
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    // Half a quantization step of the largest block, plus the f16 rounding of the scale.
    let amax = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_err <= amax / 254.0 + amax * 1e-3,
        "{max_err} vs amax {amax}"
    );
}

#[test]
fn nonzero_key_bias_and_missing_variables_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Synthetic::whisper();
    model
        .vars
        .iter_mut()
        .find(|v| v.0 == "decoder/layer_0/attention/linear_1/bias")
        .unwrap()
        .2[3] = 0.5;
    model.write(dir.path());
    let err = convert_ct2_whisper(dir.path(), &dir.path().join("o"), WeightType::F16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-zero key bias"), "{err}");

    let mut model = Synthetic::whisper();
    model
        .vars
        .retain(|v| v.0 != "encoder/layer_0/ffn/linear_1/bias");
    model.write(dir.path());
    let err = convert_ct2_whisper(dir.path(), &dir.path().join("o"), WeightType::F16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder/layer_0/ffn/linear_1/bias"), "{err}");
    assert!(!dir.path().join("o").exists());
}
