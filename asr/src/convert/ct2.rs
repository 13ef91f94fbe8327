//! Reader for CTranslate2's `model.bin` (binary format version 6).
//!
//! Written by hand because no Rust crate reads CTranslate2 checkpoints; the format is small:
//! a header, a list of named variables (rank, dims, dtype id, byte count, raw little-endian data)
//! and a table of aliases. See `ctranslate2/specs/model_spec.py::_serialize`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{AsrError, Result};

/// The binary versions whose layout this reader knows.
const SUPPORTED_VERSIONS: std::ops::RangeInclusive<u32> = 5..=6;

/// Element type of a stored variable, by CTranslate2's dtype id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Dtype {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Dtype {
    fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::Bf16,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One named variable of a CTranslate2 model.
#[derive(Debug, Clone)]
pub struct Ct2Variable {
    pub shape: Vec<usize>,
    pub dtype: Ct2Dtype,
    pub data: Vec<u8>,
}

impl Ct2Variable {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32, for floating-point variables.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let values = match self.dtype {
            Ct2Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Ct2Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Ct2Dtype::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Ct2Dtype::I8 | Ct2Dtype::I16 | Ct2Dtype::I32 => return None,
        };
        Some(values)
    }

    /// The value of an integer scalar (CTranslate2 stores hyperparameters this way).
    pub fn scalar_i64(&self) -> Option<i64> {
        if self.num_elements() != 1 {
            return None;
        }
        let d = &self.data;
        Some(match self.dtype {
            Ct2Dtype::I8 => i8::from_le_bytes([*d.first()?]) as i64,
            Ct2Dtype::I16 => i16::from_le_bytes([*d.first()?, *d.get(1)?]) as i64,
            Ct2Dtype::I32 => i32::from_le_bytes(d.get(..4)?.try_into().ok()?) as i64,
            _ => return None,
        })
    }
}

/// A parsed `model.bin`.
#[derive(Debug, Clone)]
pub struct Ct2Model {
    pub spec_name: String,
    pub spec_revision: u32,
    pub variables: BTreeMap<String, Ct2Variable>,
    /// alias -> target variable name
    pub aliases: BTreeMap<String, String>,
}

impl Ct2Model {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| AsrError::io(path, e))?;
        Self::parse(&bytes).map_err(|reason| AsrError::Ct2Format {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = ByteReader { bytes, pos: 0 };
        let version = r.u32()?;
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(format!(
                "binary version {version} is not supported (expected {SUPPORTED_VERSIONS:?})"
            ));
        }
        let spec_name = r.string()?;
        let spec_revision = r.u32()?;
        let count = r.u32()? as usize;
        let mut variables = BTreeMap::new();
        for _ in 0..count {
            let name = r.string()?;
            let rank = r.u8()? as usize;
            let shape = (0..rank)
                .map(|_| r.u32().map(|d| d as usize))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let dtype_id = r.u8()?;
            let dtype = Ct2Dtype::from_id(dtype_id)
                .ok_or_else(|| format!("variable {name:?} has unknown dtype id {dtype_id}"))?;
            let num_bytes = r.u32()? as usize;
            let elements = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("variable {name:?} has an overflowing shape {shape:?}"))?;
            if elements.checked_mul(dtype.size()) != Some(num_bytes) {
                return Err(format!(
                    "variable {name:?} declares {num_bytes} bytes but shape {shape:?} of {dtype:?} needs {}",
                    elements.saturating_mul(dtype.size())
                ));
            }
            let data = r.take(num_bytes)?.to_vec();
            variables.insert(name, Ct2Variable { shape, dtype, data });
        }
        let mut aliases = BTreeMap::new();
        // Version 5 files may end right after the variables.
        if r.remaining() > 0 {
            let alias_count = r.u32()? as usize;
            for _ in 0..alias_count {
                let alias = r.string()?;
                let target = r.string()?;
                aliases.insert(alias, target);
            }
        }
        Ok(Ct2Model {
            spec_name,
            spec_revision,
            variables,
            aliases,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Ct2Variable> {
        self.variables
            .get(name)
            .or_else(|| self.variables.get(self.aliases.get(name)?))
    }
}

struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: wanted {n} bytes at offset {} of {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> std::result::Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u16 length (counting the trailing NUL), then the UTF-8 bytes and a NUL.
    fn string(&mut self) -> std::result::Result<String, String> {
        let len = self.u16()? as usize;
        let raw = self.take(len)?;
        let text = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(text.to_vec()).map_err(|_| "a name is not valid UTF-8".to_string())
    }
}

/// Serialises variables in the CTranslate2 layout. Used by tests to build tiny synthetic models.
pub fn write_ct2(
    spec_name: &str,
    variables: &[(&str, Vec<usize>, Ct2Dtype, Vec<u8>)],
    aliases: &[(&str, &str)],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&6u32.to_le_bytes());
    string(&mut out, spec_name);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(variables.len() as u32).to_le_bytes());
    for (name, shape, dtype, data) in variables {
        string(&mut out, name);
        out.push(shape.len() as u8);
        for d in shape {
            out.extend_from_slice(&(*d as u32).to_le_bytes());
        }
        out.push(match dtype {
            Ct2Dtype::F32 => 0,
            Ct2Dtype::I8 => 1,
            Ct2Dtype::I16 => 2,
            Ct2Dtype::I32 => 3,
            Ct2Dtype::F16 => 4,
            Ct2Dtype::Bf16 => 5,
        });
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
    for (alias, target) in aliases {
        string(&mut out, alias);
        string(&mut out, target);
    }
    out
}

/// Where a model directory keeps its weights.
pub fn model_bin(dir: &Path) -> PathBuf {
    dir.join("model.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_variables_scalars_and_aliases() {
        let weights: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bytes = write_ct2(
            "WhisperSpec",
            &[
                ("a/weight", vec![2, 2], Ct2Dtype::F16, weights),
                (
                    "a/num_heads",
                    vec![],
                    Ct2Dtype::I16,
                    6i16.to_le_bytes().to_vec(),
                ),
            ],
            &[("b/weight", "a/weight")],
        );
        let model = Ct2Model::parse(&bytes).unwrap();
        assert_eq!(model.spec_name, "WhisperSpec");
        let w = model.get("b/weight").unwrap();
        assert_eq!(w.shape, vec![2, 2]);
        assert_eq!(w.to_f32().unwrap(), vec![1.0, -2.0, 0.5, 4.0]);
        assert_eq!(model.get("a/num_heads").unwrap().scalar_i64(), Some(6));
    }

    #[test]
    fn truncated_and_inconsistent_files_are_errors_not_panics() {
        let bytes = write_ct2(
            "WhisperSpec",
            &[("w", vec![4], Ct2Dtype::F32, vec![0; 16])],
            &[],
        );
        for cut in 0..bytes.len() - 4 {
            assert!(Ct2Model::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let lying = write_ct2("S", &[("w", vec![4], Ct2Dtype::F32, vec![0; 15])], &[]);
        let err = Ct2Model::parse(&lying).unwrap_err();
        assert!(err.contains("declares 15 bytes"), "{err}");
        let mut future = bytes.clone();
        future[0] = 99;
        assert!(Ct2Model::parse(&future).unwrap_err().contains("version 99"));
    }
}
