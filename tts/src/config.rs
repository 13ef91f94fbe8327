//! A Piper voice's `.onnx.json`: sample rate, phonemizer settings, `phoneme_id_map`, speakers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, TtsError};

/// Piper's special symbols (piper/const.py).
pub const PAD: &str = "_";
pub const BOS: &str = "^";
pub const EOS: &str = "$";

/// The parts of `<voice>.onnx.json` that inference needs. Unknown keys are ignored: Piper's
/// training writes many more (dataset, language, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct VoiceConfig {
    pub audio: AudioConfig,
    #[serde(default)]
    pub espeak: EspeakConfig,
    #[serde(default)]
    pub inference: InferenceConfig,
    /// "espeak" (IPA from espeak-ng) or "text" (code points). Other types (pinyin, ...) need
    /// phonemizers this crate does not have.
    #[serde(default = "default_phoneme_type")]
    pub phoneme_type: String,
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default = "one")]
    pub num_speakers: u32,
    #[serde(default)]
    pub speaker_id_map: HashMap<String, i64>,
    #[serde(default)]
    pub default_speaker_id: i64,
    /// Samples per frame of the decoder; converts model durations (frames) to samples.
    #[serde(default = "default_hop_length")]
    pub hop_length: u32,
    /// Vowel sequences some voices treat as one phoneme (e.g. `["a", "ɪ"]`).
    #[serde(default)]
    pub vowel_clusters: Option<Vec<Vec<String>>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AudioConfig {
    pub sample_rate: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EspeakConfig {
    pub voice: String,
}

impl Default for EspeakConfig {
    fn default() -> Self {
        EspeakConfig {
            voice: "en-us".into(),
        }
    }
}

/// Piper's defaults (piper/config.py) when the file leaves them out.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct InferenceConfig {
    pub noise_scale: f32,
    pub length_scale: f32,
    pub noise_w: f32,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            noise_scale: 0.667,
            length_scale: 1.0,
            noise_w: 0.8,
        }
    }
}

fn default_phoneme_type() -> String {
    "espeak".into()
}

fn one() -> u32 {
    1
}

fn default_hop_length() -> u32 {
    256
}

impl VoiceConfig {
    /// `<model>.onnx.json`, Piper's convention.
    pub fn path_for(model: &Path) -> PathBuf {
        let mut name = model.as_os_str().to_os_string();
        name.push(".json");
        PathBuf::from(name)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TtsError::io(path, e))?;
        Self::parse(&text).map_err(|reason| TtsError::VoiceConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let config: VoiceConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for symbol in [PAD, BOS, EOS] {
            match config.phoneme_id_map.get(symbol) {
                Some(ids) if !ids.is_empty() => {}
                _ => return Err(format!("phoneme_id_map has no id for {symbol:?}")),
            }
        }
        if config.audio.sample_rate == 0 {
            return Err("audio.sample_rate is 0".into());
        }
        Ok(config)
    }

    /// The speaker id to feed the model: `None` for single-speaker voices.
    pub fn speaker_id(&self, requested: Option<i64>) -> Result<Option<i64>> {
        if self.num_speakers <= 1 {
            return Ok(None);
        }
        let sid = requested.unwrap_or(self.default_speaker_id);
        if sid < 0 || sid >= i64::from(self.num_speakers) {
            return Err(TtsError::BadSpeaker {
                speaker: sid,
                num_speakers: self.num_speakers,
            });
        }
        Ok(Some(sid))
    }

    /// Piper's `phonemes_to_ids`: BOS, PAD, then each phoneme followed by PAD, then EOS.
    /// Phonemes missing from the map are skipped (Piper logs and skips them too); they are
    /// returned so the caller can report them.
    pub fn phonemes_to_ids(&self, phonemes: &[String]) -> (Vec<i64>, Vec<String>) {
        let map = &self.phoneme_id_map;
        let special = |s: &str| -> &[i64] { map.get(s).map(Vec::as_slice).unwrap_or_default() };
        let (bos, pad, eos) = (special(BOS), special(PAD), special(EOS));
        let mut ids = Vec::with_capacity(phonemes.len() * 2 + 3);
        let mut missing = Vec::new();
        ids.extend_from_slice(bos);
        ids.extend_from_slice(pad);
        for phoneme in phonemes {
            match map.get(phoneme) {
                Some(p) => {
                    ids.extend_from_slice(p);
                    ids.extend_from_slice(pad);
                }
                None => missing.push(phoneme.clone()),
            }
        }
        ids.extend_from_slice(eos);
        (ids, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
        "audio": {"sample_rate": 16000},
        "num_speakers": 3,
        "phoneme_id_map": {"_": [0], "^": [1], "$": [2], "a": [14], "b": [15]}
    }"#;

    #[test]
    fn ids_follow_piper_layout_and_report_unknown_phonemes() {
        let config = VoiceConfig::parse(MINIMAL).unwrap();
        let (ids, missing) =
            config.phonemes_to_ids(&["a".to_string(), "ʒ".to_string(), "b".to_string()]);
        assert_eq!(ids, vec![1, 0, 14, 0, 15, 0, 2]);
        assert_eq!(missing, vec!["ʒ".to_string()]);
        assert_eq!(config.inference.noise_w, 0.8);
    }

    #[test]
    fn multi_speaker_ids_are_checked() {
        let config = VoiceConfig::parse(MINIMAL).unwrap();
        assert_eq!(config.speaker_id(None).unwrap(), Some(0));
        assert_eq!(config.speaker_id(Some(2)).unwrap(), Some(2));
        assert!(matches!(
            config.speaker_id(Some(3)),
            Err(TtsError::BadSpeaker { speaker: 3, .. })
        ));
    }

    #[test]
    fn missing_special_symbol_is_rejected() {
        let err = VoiceConfig::parse(
            r#"{"audio": {"sample_rate": 22050}, "phoneme_id_map": {"_": [0], "^": [1]}}"#,
        )
        .unwrap_err();
        assert!(err.contains("\"$\""), "{err}");
    }
}
