//! CTranslate2 Whisper checkpoint -> whisper.cpp ggml model.
//!
//! faster-whisper's CTranslate2 format is what the registries ship; whisper.cpp (and so whisper-rs)
//! loads only its own ggml format. The name map and layout facts are in `shared/MODELS.md`.

pub mod ct2;
pub mod ggml;
pub mod mel;
pub mod vocab;

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{AsrError, Result};
use ct2::{Ct2Model, Ct2Variable};
pub use ggml::WeightType;
use ggml::{Tensor, TensorType, WhisperHparams};

const END_OF_TEXT: &str = "<|endoftext|>";

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub hparams: WhisperHparams,
    pub weight_type: WeightType,
    pub tensors: usize,
    pub vocabulary: usize,
    pub bytes: u64,
}

/// Converts the CTranslate2 Whisper model in `model_dir` (`model.bin` plus `vocabulary.txt` or
/// `vocabulary.json`) into a whisper.cpp ggml file at `out`.
///
/// The file is written beside `out` under a temporary name and renamed into place, so a reader
/// never sees a half-written model.
pub fn convert_ct2_whisper(
    model_dir: &Path,
    out: &Path,
    weight_type: WeightType,
) -> Result<ConvertReport> {
    let model = Ct2Model::read(&ct2::model_bin(model_dir))?;
    if model.spec_name != "WhisperSpec" {
        return unsupported(format!(
            "spec {:?} is not a Whisper model (expected WhisperSpec)",
            model.spec_name
        ));
    }
    let vocab_tokens = read_vocabulary(model_dir)?;
    let hparams = hparams_of(&model)?;
    let tensors = map_tensors(&model, &hparams, weight_type)?;

    let eot = vocab_tokens
        .iter()
        .position(|t| t == END_OF_TEXT)
        .ok_or_else(|| AsrError::UnsupportedModel {
            reason: format!("the vocabulary has no {END_OF_TEXT} token"),
        })?;
    // whisper.cpp adds the special tokens itself; it wants only the text tokens before EOT.
    let vocab = vocab::decode_byte_level_tokens(vocab_tokens[..eot].iter().map(String::as_str))
        .map_err(|reason| AsrError::UnsupportedModel { reason })?;
    let mel_filters = mel::slaney_mel_filters(hparams.n_mels);

    let partial = partial_path(out);
    let write = || -> std::io::Result<u64> {
        let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(&partial)?);
        ggml::write_header(&mut w, &hparams, weight_type, &mel_filters, &vocab)?;
        for t in &tensors {
            ggml::write_tensor(&mut w, t)?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    };
    let bytes = write().map_err(|e| {
        let _ = fs::remove_file(&partial);
        AsrError::io(&partial, e)
    })?;
    fs::rename(&partial, out).map_err(|e| AsrError::io(out, e))?;
    Ok(ConvertReport {
        hparams,
        weight_type,
        tensors: tensors.len(),
        vocabulary: vocab.len(),
        bytes,
    })
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

fn unsupported<T>(reason: String) -> Result<T> {
    Err(AsrError::UnsupportedModel { reason })
}

fn read_vocabulary(dir: &Path) -> Result<Vec<String>> {
    let txt = dir.join("vocabulary.txt");
    if txt.exists() {
        let text = fs::read_to_string(&txt).map_err(|e| AsrError::io(&txt, e))?;
        // Byte-level tokens never contain a raw newline ('\n' is spelled 'Ċ'), so lines are tokens.
        let mut tokens: Vec<String> = text.split('\n').map(str::to_owned).collect();
        if tokens.last().is_some_and(String::is_empty) {
            tokens.pop();
        }
        return Ok(tokens);
    }
    let json = dir.join("vocabulary.json");
    let text = fs::read_to_string(&json).map_err(|e| AsrError::io(&json, e))?;
    serde_json::from_str(&text).map_err(|e| AsrError::Ct2Format {
        path: json,
        reason: format!("vocabulary.json is not a list of strings: {e}"),
    })
}

fn var<'m>(model: &'m Ct2Model, name: &str) -> Result<&'m Ct2Variable> {
    model.get(name).ok_or_else(|| AsrError::UnsupportedModel {
        reason: format!("variable {name:?} is missing"),
    })
}

fn floats(model: &Ct2Model, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let v = var(model, name)?;
    let values = v.to_f32().ok_or_else(|| AsrError::UnsupportedModel {
        reason: format!(
            "variable {name:?} is {:?}; only float models convert (quantized CT2 models do not)",
            v.dtype
        ),
    })?;
    Ok((v.shape.clone(), values))
}

fn count_layers(model: &Ct2Model, side: &str) -> usize {
    (0..)
        .take_while(|i| {
            let prefix = format!("{side}/layer_{i}/");
            model.variables.keys().any(|k| k.starts_with(&prefix))
        })
        .count()
}

fn hparams_of(model: &Ct2Model) -> Result<WhisperHparams> {
    let dims2 = |name: &str| -> Result<(usize, usize)> {
        match var(model, name)?.shape[..] {
            [a, b] => Ok((a, b)),
            ref other => unsupported(format!("{name:?} has shape {other:?}, expected 2-D")),
        }
    };
    let heads = |name: &str| -> Result<usize> {
        var(model, name)?
            .scalar_i64()
            .and_then(|h| usize::try_from(h).ok())
            .filter(|&h| h > 0)
            .ok_or_else(|| AsrError::UnsupportedModel {
                reason: format!("{name:?} is not a positive integer"),
            })
    };
    let (n_vocab, n_text_state) = dims2("decoder/embeddings/weight")?;
    let (n_text_ctx, _) = dims2("decoder/position_encodings/encodings")?;
    let (n_audio_ctx, n_audio_state) = dims2("encoder/position_encodings/encodings")?;
    let n_mels = match var(model, "encoder/conv1/weight")?.shape[..] {
        [_, mels, _] => mels,
        ref other => return unsupported(format!("conv1 has shape {other:?}, expected 3-D")),
    };
    let hp = WhisperHparams {
        n_vocab,
        n_audio_ctx,
        n_audio_state,
        n_audio_head: heads("encoder/num_heads")?,
        n_audio_layer: count_layers(model, "encoder"),
        n_text_ctx,
        n_text_state,
        n_text_head: heads("decoder/num_heads")?,
        n_text_layer: count_layers(model, "decoder"),
        n_mels,
    };
    if hp.n_audio_layer == 0 || hp.n_text_layer == 0 {
        return unsupported("the model has no encoder or decoder layers".into());
    }
    Ok(hp)
}

/// How one CTranslate2 module becomes whisper.cpp tensors.
#[derive(Clone, Copy)]
enum Map {
    /// Layer norm: `gamma`/`beta` -> `weight`/`bias`.
    Norm,
    /// `weight` and `bias` copied.
    Linear,
    /// A fused projection split into these parts.
    Fused(&'static [&'static str]),
}

/// (map, CTranslate2 name under the layer, whisper.cpp name under the block)
type Layout = &'static [(Map, &'static str, &'static str)];

const SELF_ATTENTION: Layout = &[
    (Map::Norm, "self_attention/layer_norm", "attn_ln"),
    (
        Map::Fused(&["query", "key", "value"]),
        "self_attention/linear_0",
        "attn",
    ),
    (Map::Linear, "self_attention/linear_1", "attn.out"),
];
const CROSS_ATTENTION: Layout = &[
    (Map::Norm, "attention/layer_norm", "cross_attn_ln"),
    (Map::Linear, "attention/linear_0", "cross_attn.query"),
    (
        Map::Fused(&["key", "value"]),
        "attention/linear_1",
        "cross_attn",
    ),
    (Map::Linear, "attention/linear_2", "cross_attn.out"),
];
const FEED_FORWARD: Layout = &[
    (Map::Norm, "ffn/layer_norm", "mlp_ln"),
    (Map::Linear, "ffn/linear_0", "mlp.0"),
    (Map::Linear, "ffn/linear_1", "mlp.2"),
];

type Push<'a> = dyn FnMut(String, Vec<usize>, Vec<f32>) + 'a;

fn copy(model: &Ct2Model, push: &mut Push<'_>, src: &str, dst: &str) -> Result<()> {
    let (shape, values) = floats(model, src)?;
    push(dst.to_string(), shape, values);
    Ok(())
}

fn apply(
    model: &Ct2Model,
    push: &mut Push<'_>,
    src: &str,
    dst: &str,
    layout: Layout,
    d: usize,
) -> Result<()> {
    for &(map, from, to) in layout {
        let (from, to) = (format!("{src}/{from}"), format!("{dst}.{to}"));
        match map {
            Map::Norm => {
                copy(
                    model,
                    push,
                    &format!("{from}/gamma"),
                    &format!("{to}.weight"),
                )?;
                copy(model, push, &format!("{from}/beta"), &format!("{to}.bias"))?;
            }
            Map::Linear => {
                copy(
                    model,
                    push,
                    &format!("{from}/weight"),
                    &format!("{to}.weight"),
                )?;
                copy(model, push, &format!("{from}/bias"), &format!("{to}.bias"))?;
            }
            Map::Fused(parts) => split_fused(model, push, &from, &to, parts, d)?,
        }
    }
    Ok(())
}

/// Builds the output tensors with whisper.cpp's (OpenAI's) names and storage types.
fn map_tensors(
    model: &Ct2Model,
    hp: &WhisperHparams,
    weight_type: WeightType,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        let store_as = storage_type(&name, &shape, weight_type);
        out.push(Tensor {
            name,
            shape,
            store_as,
            values,
        });
    };
    let p = &mut push;
    copy(
        model,
        p,
        "encoder/position_encodings/encodings",
        "encoder.positional_embedding",
    )?;
    for conv in ["conv1", "conv2"] {
        copy(
            model,
            p,
            &format!("encoder/{conv}/weight"),
            &format!("encoder.{conv}.weight"),
        )?;
        let (shape, bias) = floats(model, &format!("encoder/{conv}/bias"))?;
        // whisper.cpp adds the conv bias as a [n, 1] tensor.
        p(format!("encoder.{conv}.bias"), vec![shape[0], 1], bias);
    }
    for i in 0..hp.n_audio_layer {
        let (src, dst) = (format!("encoder/layer_{i}"), format!("encoder.blocks.{i}"));
        for layout in [SELF_ATTENTION, FEED_FORWARD] {
            apply(model, p, &src, &dst, layout, hp.n_audio_state)?;
        }
    }
    apply(
        model,
        p,
        "encoder",
        "encoder",
        &[(Map::Norm, "layer_norm", "ln_post")],
        0,
    )?;

    copy(
        model,
        p,
        "decoder/position_encodings/encodings",
        "decoder.positional_embedding",
    )?;
    copy(
        model,
        p,
        "decoder/embeddings/weight",
        "decoder.token_embedding.weight",
    )?;
    for i in 0..hp.n_text_layer {
        let (src, dst) = (format!("decoder/layer_{i}"), format!("decoder.blocks.{i}"));
        for layout in [SELF_ATTENTION, CROSS_ATTENTION, FEED_FORWARD] {
            apply(model, p, &src, &dst, layout, hp.n_text_state)?;
        }
    }
    apply(
        model,
        p,
        "decoder",
        "decoder",
        &[(Map::Norm, "layer_norm", "ln")],
        0,
    )?;
    // `decoder/projection/weight` is an alias of the embeddings (tied output): nothing to write.
    if let Some(t) = out
        .iter()
        .find(|t| t.store_as == TensorType::Q8_0 && t.shape[1] % ggml::Q8_0_BLOCK != 0)
    {
        return unsupported(format!(
            "{} has rows of {} values, which Q8_0 blocks of {} cannot hold; convert to f16",
            t.name,
            t.shape[1],
            ggml::Q8_0_BLOCK
        ));
    }
    Ok(out)
}

/// Splits a fused projection (`[parts * d, d]` weight, `[parts * d]` bias) into its parts.
/// Whisper's key projections have no bias; CTranslate2 stores zeros there, which we check.
fn split_fused(
    model: &Ct2Model,
    push: &mut Push<'_>,
    src: &str,
    dst: &str,
    parts: &[&str],
    d: usize,
) -> Result<()> {
    let (w_shape, weight) = floats(model, &format!("{src}/weight"))?;
    let (_, bias) = floats(model, &format!("{src}/bias"))?;
    if w_shape != [parts.len() * d, d] || bias.len() != parts.len() * d {
        return unsupported(format!(
            "{src} has shape {w_shape:?} and bias {}, expected [{}, {d}]",
            bias.len(),
            parts.len() * d
        ));
    }
    for (p, part) in parts.iter().enumerate() {
        let rows = p * d..(p + 1) * d;
        push(
            format!("{dst}.{part}.weight"),
            vec![d, d],
            weight[rows.start * d..rows.end * d].to_vec(),
        );
        let part_bias = &bias[rows];
        if *part == "key" {
            if part_bias.iter().any(|&b| b != 0.0) {
                return unsupported(format!(
                    "{src} has a non-zero key bias, which whisper.cpp cannot represent"
                ));
            }
        } else {
            push(format!("{dst}.{part}.bias"), vec![d], part_bias.to_vec());
        }
    }
    Ok(())
}

/// whisper.cpp's storage rules: 1-D tensors, conv biases and positional embeddings are f32; conv
/// kernels stay f16 (ggml's im2col wants them so); other matrices follow `weight_type`.
fn storage_type(name: &str, shape: &[usize], weight_type: WeightType) -> TensorType {
    let always_f32 = shape.len() < 2
        || name.ends_with("positional_embedding")
        || name == "encoder.conv1.bias"
        || name == "encoder.conv2.bias";
    if always_f32 {
        TensorType::F32
    } else if shape.len() == 2 && weight_type == WeightType::Q8_0 {
        TensorType::Q8_0
    } else {
        TensorType::F16
    }
}

#[cfg(test)]
mod tests;
