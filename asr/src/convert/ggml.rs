//! Writer for whisper.cpp's legacy ggml model file (what `whisper_init_from_file` loads).
//!
//! Layout (from whisper.cpp's `models/convert-pt-to-ggml.py` and `whisper_model_load`): magic,
//! eleven i32 hyperparameters, the mel filterbank, the vocabulary, then each tensor as
//! `n_dims, name_len, type, dims (innermost first), name, data`.

use std::io::{self, Write};

pub const GGML_MAGIC: u32 = 0x6767_6d6c;
/// ggml's quantization format version; whisper.cpp stores `ftype + QNT_VERSION * 1000`.
const GGML_QNT_VERSION: i32 = 2;
const GGML_QNT_VERSION_FACTOR: i32 = 1000;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// How the large (2-D) weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F16,
    Q8_0,
}

impl WeightType {
    /// `hparams.ftype` as whisper.cpp reads it.
    pub fn file_ftype(self) -> i32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7 + GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            WeightType::F16 => "f16",
            WeightType::Q8_0 => "q8_0",
        }
    }
}

/// The element type of one stored tensor (ggml's `ggml_type` ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
}

/// Whisper's hyperparameters in the order of the ggml header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhisperHparams {
    pub n_vocab: usize,
    pub n_audio_ctx: usize,
    pub n_audio_state: usize,
    pub n_audio_head: usize,
    pub n_audio_layer: usize,
    pub n_text_ctx: usize,
    pub n_text_state: usize,
    pub n_text_head: usize,
    pub n_text_layer: usize,
    pub n_mels: usize,
}

/// One tensor to write: `shape` is row-major (outermost dimension first), as in PyTorch.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub store_as: TensorType,
    pub values: Vec<f32>,
}

fn i32_of(v: usize, what: &str) -> io::Result<[u8; 4]> {
    i32::try_from(v).map(i32::to_le_bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {v} exceeds i32"),
        )
    })
}

pub fn write_header(
    out: &mut impl Write,
    hp: &WhisperHparams,
    weight_type: WeightType,
    mel_filters: &[f32],
    vocab: &[Vec<u8>],
) -> io::Result<()> {
    out.write_all(&GGML_MAGIC.to_le_bytes())?;
    for (v, what) in [
        (hp.n_vocab, "n_vocab"),
        (hp.n_audio_ctx, "n_audio_ctx"),
        (hp.n_audio_state, "n_audio_state"),
        (hp.n_audio_head, "n_audio_head"),
        (hp.n_audio_layer, "n_audio_layer"),
        (hp.n_text_ctx, "n_text_ctx"),
        (hp.n_text_state, "n_text_state"),
        (hp.n_text_head, "n_text_head"),
        (hp.n_text_layer, "n_text_layer"),
        (hp.n_mels, "n_mels"),
    ] {
        out.write_all(&i32_of(v, what)?)?;
    }
    out.write_all(&weight_type.file_ftype().to_le_bytes())?;
    let n_bins = mel_filters.len() / hp.n_mels.max(1);
    out.write_all(&i32_of(hp.n_mels, "n_mels")?)?;
    out.write_all(&i32_of(n_bins, "mel bins")?)?;
    for v in mel_filters {
        out.write_all(&v.to_le_bytes())?;
    }
    out.write_all(&i32_of(vocab.len(), "vocabulary size")?)?;
    for token in vocab {
        out.write_all(&i32_of(token.len(), "token length")?)?;
        out.write_all(token)?;
    }
    Ok(())
}

pub fn write_tensor(out: &mut impl Write, t: &Tensor) -> io::Result<()> {
    let name = t.name.as_bytes();
    out.write_all(&i32_of(t.shape.len(), "rank")?)?;
    out.write_all(&i32_of(name.len(), "name length")?)?;
    out.write_all(&(t.store_as as i32).to_le_bytes())?;
    for &d in t.shape.iter().rev() {
        out.write_all(&i32_of(d, "dimension")?)?;
    }
    out.write_all(name)?;
    match t.store_as {
        TensorType::F32 => {
            for v in &t.values {
                out.write_all(&v.to_le_bytes())?;
            }
        }
        TensorType::F16 => {
            for v in &t.values {
                out.write_all(&half::f16::from_f32(*v).to_le_bytes())?;
            }
        }
        TensorType::Q8_0 => out.write_all(&quantize_q8_0(&t.values))?,
    }
    Ok(())
}

/// ggml's reference Q8_0: per block of 32, an f16 scale `amax / 127` and 32 rounded i8.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * (2 + Q8_0_BLOCK));
    for block in values.chunks(Q8_0_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(scale).to_le_bytes());
        for i in 0..Q8_0_BLOCK {
            let v = block.get(i).copied().unwrap_or(0.0);
            out.push((v * inverse).round() as i8 as u8);
        }
    }
    out
}

/// Inverse of [`quantize_q8_0`], for tests and checks.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2 + Q8_0_BLOCK)
        .flat_map(|block| {
            let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            block[2..].iter().map(move |&q| q as i8 as f32 * scale)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let bytes = quantize_q8_0(&values);
        assert_eq!(bytes.len(), 2 * 34);
        let back = dequantize_q8_0(&bytes);
        for block in 0..2 {
            let amax = values[block * 32..(block + 1) * 32]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            for i in block * 32..(block + 1) * 32 {
                assert!((back[i] - values[i]).abs() <= step * 0.5 + 1e-3 * amax);
            }
        }
        assert!(dequantize_q8_0(&quantize_q8_0(&[0.0; 32]))
            .iter()
            .all(|&v| v == 0.0));
    }
}
