//! A Piper VITS voice: `.onnx` through ONNX Runtime plus its `.onnx.json`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::Tensor;

use crate::config::VoiceConfig;
use crate::error::{Result, TtsError};
use crate::onnx::Environment;
use crate::phonemize::{self, Clause, Phonemizer};

/// How a voice is loaded and run.
#[derive(Debug, Clone)]
pub struct VoiceOptions {
    /// ONNX Runtime intra-op threads.
    pub threads: usize,
    /// Speaker for multi-speaker voices (`sid` input); default: the voice's default speaker.
    pub speaker: Option<i64>,
    /// Overrides the voice's `length_scale` (< 1 speaks faster).
    pub length_scale: Option<f32>,
    /// Where the `espeak-ng-data` folder Piper ships lives (its parent folder); `None` uses the
    /// system's data, whose phonemes differ slightly from Piper's.
    pub espeak_data: Option<PathBuf>,
    /// Run the model once at load: ONNX Runtime's first run is about twice as slow.
    pub warm_up: bool,
}

impl Default for VoiceOptions {
    fn default() -> Self {
        VoiceOptions {
            threads: 1,
            speaker: None,
            length_scale: None,
            espeak_data: None,
            warm_up: true,
        }
    }
}

/// One sentence's worth of synthesized audio.
#[derive(Debug, Clone)]
pub struct SentenceAudio {
    /// Mono f32 samples in [-1, 1] at the voice's sample rate.
    pub samples: Vec<f32>,
    /// Piper's phonemes (NFD code points, punctuation and word spaces included).
    pub phonemes: Vec<String>,
    pub phoneme_ids: Vec<i64>,
    /// Samples per phoneme id, when the model was exported with a duration output
    /// (`piper.patch_voice_with_alignment`); `None` otherwise.
    pub id_samples: Option<Vec<u32>>,
    /// Bytes of the phonemized text this sentence covers.
    pub text: std::ops::Range<usize>,
}

/// A loaded voice. One inference at a time (`&mut self`); load one per synthesis thread.
pub struct PiperVoice {
    session: Session,
    config: VoiceConfig,
    phonemizer: Box<dyn Phonemizer>,
    path: PathBuf,
    speaker: Option<i64>,
    length_scale: f32,
    has_sid_input: bool,
    has_durations: bool,
    run_options: Arc<RunOptions>,
}

impl std::fmt::Debug for PiperVoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PiperVoice")
            .field("path", &self.path)
            .field("sample_rate", &self.config.audio.sample_rate)
            .field("speaker", &self.speaker)
            .finish()
    }
}

impl PiperVoice {
    /// Loads `model` (`.onnx`) and `<model>.json`, with the default phonemizer for its
    /// `phoneme_type` (espeak-ng, or code points for "text" voices).
    pub fn load(env: &Environment, model: &Path, options: &VoiceOptions) -> Result<Self> {
        if !model.is_file() {
            return Err(TtsError::VoiceLoad {
                path: model.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let config = VoiceConfig::load(&VoiceConfig::path_for(model))?;
        let phonemizer = default_phonemizer(&config, options)?;
        Self::load_with(env, model, config, phonemizer, options)
    }

    /// Loads `model` with a config and phonemizer of the caller's choice.
    pub fn load_with(
        env: &Environment,
        model: &Path,
        config: VoiceConfig,
        phonemizer: Box<dyn Phonemizer>,
        options: &VoiceOptions,
    ) -> Result<Self> {
        let load_err = |reason: String| TtsError::VoiceLoad {
            path: model.to_path_buf(),
            reason,
        };
        if !model.is_file() {
            return Err(load_err("no such file".into()));
        }
        let speaker = config.speaker_id(options.speaker)?;
        let session = Session::builder(env)
            .and_then(|b| {
                b.with_intra_threads(options.threads.max(1))
                    .map_err(|e| e.into())
            })
            .and_then(|b| b.with_inter_threads(1).map_err(|e| e.into()))
            // Every chunk has another length, so ONNX Runtime's memory pattern never applies,
            // and its CPU arena grows to the longest chunk seen (in power-of-two extensions, over
            // 500 MB with the default voice in a soak) and never gives memory back. Without
            // them each run's tensors are freed when it ends.
            .and_then(|b| b.with_memory_pattern(false).map_err(|e| e.into()))
            .and_then(|b| {
                b.with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()])
                    .map_err(|e| e.into())
            })
            .and_then(|mut b| b.commit_from_file(model))
            .map_err(|e| load_err(e.to_string()))?;
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input", "input_lengths", "scales"] {
            if !inputs.contains(&required) {
                return Err(load_err(format!(
                    "not a Piper voice: no input {required:?} (inputs: {inputs:?})"
                )));
            }
        }
        let has_sid_input = inputs.contains(&"sid");
        if speaker.is_some() && !has_sid_input {
            return Err(load_err(
                "the config declares several speakers but the model has no `sid` input".into(),
            ));
        }
        let has_durations = session.outputs().len() > 1;
        let run_options =
            Arc::new(RunOptions::new().map_err(|e| TtsError::Inference(e.to_string()))?);
        let mut voice = PiperVoice {
            session,
            length_scale: options
                .length_scale
                .unwrap_or(config.inference.length_scale),
            config,
            phonemizer,
            path: model.to_path_buf(),
            speaker,
            has_sid_input,
            has_durations,
            run_options,
        };
        if options.warm_up {
            voice.warm_up()?;
        }
        Ok(voice)
    }

    pub fn config(&self) -> &VoiceConfig {
        &self.config
    }

    pub fn sample_rate(&self) -> u32 {
        self.config.audio.sample_rate
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the model reports phoneme durations (a second output); otherwise the stream
    /// estimates them.
    pub fn has_durations(&self) -> bool {
        self.has_durations
    }

    /// The phonemizer's clauses for `text`.
    pub fn clauses(&mut self, text: &str) -> Result<Vec<Clause>> {
        self.phonemizer.phonemize(text)
    }

    /// Phonemes per sentence, exactly as Piper groups them.
    pub fn phonemes(&mut self, text: &str) -> Result<Vec<Vec<String>>> {
        let clauses = self.clauses(text)?;
        Ok(self
            .sentence_phonemes(&clauses)
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }

    /// Phoneme ids per sentence, as Piper's `phonemes_to_ids` makes them.
    pub fn phoneme_ids(&mut self, text: &str) -> Result<Vec<Vec<i64>>> {
        Ok(self.phonemes(text)?.iter().map(|p| self.ids(p)).collect())
    }

    fn ids(&self, phonemes: &[String]) -> Vec<i64> {
        let (ids, missing) = self.config.phonemes_to_ids(phonemes);
        if !missing.is_empty() {
            tracing::warn!(
                ?missing,
                "phonemes missing from the voice's phoneme_id_map; skipped"
            );
        }
        ids
    }

    fn sentence_phonemes(&self, clauses: &[Clause]) -> Vec<(Vec<String>, std::ops::Range<usize>)> {
        // Keep each sentence's text span beside its phonemes, for the heard-text estimate.
        let mut out = Vec::new();
        let mut start = 0;
        while start < clauses.len() {
            let end = clauses[start..]
                .iter()
                .position(|c| c.end_of_sentence)
                .map_or(clauses.len(), |i| start + i + 1);
            let group = &clauses[start..end];
            let mut phones = phonemize::sentences(group).concat();
            if let Some(clusters) = &self.config.vowel_clusters {
                phones = phonemize::merge_vowel_clusters(phones, clusters);
            }
            if !phones.is_empty() {
                let span = group[0].text.start..group[group.len() - 1].text.end;
                out.push((phones, span));
            }
            start = end;
        }
        out
    }

    /// Synthesizes `text` sentence by sentence, as Piper does.
    pub fn synthesize(&mut self, text: &str) -> Result<Vec<SentenceAudio>> {
        let run_options = Arc::clone(&self.run_options);
        self.synthesize_with(text, &run_options)
    }

    /// [`Self::synthesize`], abortable from another thread through `run_options`
    /// ([`RunOptions::terminate`]); the streaming worker uses one per stream.
    pub(crate) fn synthesize_with(
        &mut self,
        text: &str,
        run_options: &RunOptions,
    ) -> Result<Vec<SentenceAudio>> {
        let clauses = self.clauses(text)?;
        let mut out = Vec::new();
        for (phones, span) in self.sentence_phonemes(&clauses) {
            let ids = self.ids(&phones);
            let (samples, id_samples) = self.infer_with(&ids, run_options)?;
            out.push(SentenceAudio {
                samples,
                phonemes: phones,
                phoneme_ids: ids,
                id_samples,
                text: span,
            });
        }
        Ok(out)
    }

    /// All of `text` as one buffer of samples at [`Self::sample_rate`].
    pub fn speak(&mut self, text: &str) -> Result<Vec<f32>> {
        Ok(self
            .synthesize(text)?
            .into_iter()
            .flat_map(|s| s.samples)
            .collect())
    }

    /// One sentence's ids to audio; also the samples per id when the model reports durations.
    pub fn infer(&mut self, ids: &[i64]) -> Result<(Vec<f32>, Option<Vec<u32>>)> {
        let run_options = Arc::clone(&self.run_options);
        self.infer_with(ids, &run_options)
    }

    fn infer_with(
        &mut self,
        ids: &[i64],
        run_options: &RunOptions,
    ) -> Result<(Vec<f32>, Option<Vec<u32>>)> {
        let infer_err = |e: ort::Error| TtsError::Inference(e.to_string());
        let n = ids.len();
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                "input".into(),
                Tensor::from_array(([1usize, n], ids.to_vec()))
                    .map_err(infer_err)?
                    .into(),
            ),
            (
                "input_lengths".into(),
                Tensor::from_array(([1usize], vec![n as i64]))
                    .map_err(infer_err)?
                    .into(),
            ),
            (
                "scales".into(),
                Tensor::from_array((
                    [3usize],
                    vec![
                        self.config.inference.noise_scale,
                        self.length_scale,
                        self.config.inference.noise_w,
                    ],
                ))
                .map_err(infer_err)?
                .into(),
            ),
        ];
        if let (Some(sid), true) = (self.speaker, self.has_sid_input) {
            inputs.push((
                "sid".into(),
                Tensor::from_array(([1usize], vec![sid]))
                    .map_err(infer_err)?
                    .into(),
            ));
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(infer_err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(infer_err)?;
        let samples = normalize_peak(audio);
        let id_samples = if self.has_durations {
            match outputs[1].try_extract_tensor::<f32>() {
                Ok((_, frames)) if frames.len() == n => Some(
                    frames
                        .iter()
                        .map(|f| (f.max(0.0) * self.config.hop_length as f32) as u32)
                        .collect(),
                ),
                _ => None,
            }
        } else {
            None
        };
        Ok((samples, id_samples))
    }

    /// Runs the model once on a short sentence: ONNX Runtime's first run is about twice as slow
    /// (allocations, kernel selection), and that must not land on the first caller's answer.
    pub fn warm_up(&mut self) -> Result<()> {
        let ids = self.phoneme_ids("Warming up.")?;
        for sentence in ids {
            self.infer(&sentence)?;
        }
        Ok(())
    }
}

/// Piper's default `normalize_audio`: scale each sentence so its peak is 1, then clip.
fn normalize_peak(audio: &[f32]) -> Vec<f32> {
    let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs()));
    if peak < 1e-8 || !peak.is_finite() {
        return vec![0.0; audio.len()];
    }
    audio.iter().map(|s| (s / peak).clamp(-1.0, 1.0)).collect()
}

/// The phonemizer a voice's config asks for.
pub fn default_phonemizer(
    config: &VoiceConfig,
    options: &VoiceOptions,
) -> Result<Box<dyn Phonemizer>> {
    match config.phoneme_type.as_str() {
        "text" => Ok(Box::new(phonemize::TextPhonemizer)),
        "espeak" => espeak_phonemizer(config, options),
        other => Err(TtsError::UnsupportedPhonemeType {
            phoneme_type: other.to_string(),
        }),
    }
}

#[cfg(feature = "espeak")]
fn espeak_phonemizer(config: &VoiceConfig, options: &VoiceOptions) -> Result<Box<dyn Phonemizer>> {
    Ok(Box::new(phonemize::espeak::EspeakPhonemizer::new(
        options.espeak_data.as_deref(),
        &config.espeak.voice,
    )?))
}

#[cfg(not(feature = "espeak"))]
fn espeak_phonemizer(config: &VoiceConfig, _options: &VoiceOptions) -> Result<Box<dyn Phonemizer>> {
    Err(TtsError::NoPhonemizer {
        what: format!("espeak voice {:?}", config.espeak.voice),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_normalisation_matches_piper() {
        assert_eq!(normalize_peak(&[0.25, -0.5]), vec![0.5, -1.0]);
        assert_eq!(normalize_peak(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
