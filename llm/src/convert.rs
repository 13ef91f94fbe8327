//! GGUF re-quantization: any Llama GGUF to Q8_0, so loading needs no conversion and the file
//! holds exactly the weights the fast kernel runs.
//!
//! A pure function of files, deterministic (tensors in their original order, metadata sorted by
//! key), so its output can be pinned by sha256 in the model manifest.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{LlmError, Result};
use crate::model::Gguf;

/// llama.cpp's `LLAMA_FTYPE_MOSTLY_Q8_0`.
const FTYPE_MOSTLY_Q8_0: u32 = 7;

/// Writes `dst`, a copy of the GGUF at `src` whose 2-D quantized weights are re-quantized to
/// Q8_0 (dequantized to f32 first). f32/f16 tensors and Q8_0 tensors are copied unchanged.
/// Writes `dst` atomically: a `.partial` file renamed into place.
pub fn requantize_gguf_q8_0(src: &Path, dst: &Path) -> Result<()> {
    let mut gguf = Gguf::open(src)?;
    let mut names: Vec<(u64, String)> = gguf
        .content
        .tensor_infos
        .iter()
        .map(|(name, info)| (info.offset, name.clone()))
        .collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (_, name) in names {
        let t = gguf.tensor(&name)?;
        let keep = matches!(
            t.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0
        ) || t.shape().dims().len() != 2
            || t.shape().dims()[1] % 32 != 0;
        let t = if keep {
            t
        } else {
            let f = t.dequantize(&Device::Cpu)?;
            QTensor::quantize(&f, GgmlDType::Q8_0)?
        };
        tensors.push((name, t));
    }
    let mut metadata: Vec<(String, Value)> = gguf
        .content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in &mut metadata {
        if k == "general.file_type" {
            *v = Value::U32(FTYPE_MOSTLY_Q8_0);
        }
    }
    let partial = dst.with_extension("gguf.partial");
    let result = (|| -> Result<()> {
        let file = File::create(&partial).map_err(LlmError::io(&partial))?;
        let mut w = BufWriter::new(file);
        let meta_refs: Vec<(&str, &Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        let file = w.into_inner().map_err(|e| LlmError::Io {
            path: partial.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(LlmError::io(&partial))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, dst).map_err(LlmError::io(dst))
}
