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
use crate::vits_split;

/// Latent frames decoded on each side of a window beyond the window itself, so its edges sound
/// as in a whole-sentence decode: HiFi-GAN's receptive field. Measured on en_US-joe-medium
/// against a whole decode: 8 frames leave errors of 7e-4 (68 dB SNR), 12 frames 1e-6 (126 dB),
/// i.e. float rounding.
pub const DECODER_CONTEXT_FRAMES: usize = 12;

/// Raw peak times this gain is the level of streamed sentences; see
/// [`PiperVoice::stream_gain`]. Below 1 to leave room for sentences louder than the warm-up's.
const STREAM_HEADROOM: f32 = 0.9;

/// Sentences whose loudest raw peak sets the streamed level: different sounds, so the gain
/// comes from more than one vowel.
const WARM_UP_TEXT: &str = "Warming up. Your results are back, and they look good! Okay?";

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

/// The voice's graph: whole, or cut at the decoder ([`vits_split`]) so a sentence can be decoded
/// window by window.
enum Graphs {
    Whole(Session),
    Split {
        encoder: Session,
        decoder: Session,
        latent: String,
    },
}

/// A sentence through the encoder: its latent frames, ready to be decoded in windows.
#[derive(Debug)]
pub struct EncodedSentence {
    /// `[channels, frames]`, row-major.
    latent: Vec<f32>,
    channels: usize,
    frames: usize,
    hop: usize,
    /// Samples per phoneme id, when the model reports durations.
    pub id_samples: Option<Vec<u32>>,
}

impl EncodedSentence {
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The sentence's length in samples at the voice's rate, known before any is decoded.
    pub fn samples(&self) -> usize {
        self.frames * self.hop
    }
}

/// A loaded voice. One inference at a time (`&mut self`); load one per synthesis thread.
pub struct PiperVoice {
    graphs: Graphs,
    /// Level of decoded windows, from the warm-up; `None` until then (streaming needs it).
    stream_gain: Option<f32>,
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
        let bytes = std::fs::read(model).map_err(|e| load_err(e.to_string()))?;
        let graphs = match vits_split::split(&bytes) {
            Ok(Some(split)) => {
                let encoder = session(env, options, &split.encoder);
                let decoder = session(env, options, &split.decoder);
                Graphs::Split {
                    encoder: encoder.map_err(|e| load_err(format!("its encoder: {e}")))?,
                    decoder: decoder.map_err(|e| load_err(format!("its decoder: {e}")))?,
                    latent: split.latent,
                }
            }
            Ok(None) => {
                tracing::info!(
                    voice = %model.display(),
                    "no VITS decoder found in the graph: each sentence is synthesized whole"
                );
                Graphs::Whole(session(env, options, &bytes).map_err(|e| load_err(e.to_string()))?)
            }
            Err(e) => return Err(load_err(format!("not an ONNX model: {e}"))),
        };
        drop(bytes);
        let front = match &graphs {
            Graphs::Whole(s) => s,
            Graphs::Split { encoder, .. } => encoder,
        };
        let inputs: Vec<&str> = front.inputs().iter().map(|i| i.name()).collect();
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
        // The split encoder's first output is the latent; a duration output comes after it.
        let has_durations = front.outputs().len() > 1;
        let run_options =
            Arc::new(RunOptions::new().map_err(|e| TtsError::Inference(e.to_string()))?);
        let mut voice = PiperVoice {
            graphs,
            stream_gain: None,
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

    /// Phonemes, phoneme ids and text span of each sentence of `clauses`.
    pub(crate) fn sentence_ids(
        &self,
        clauses: &[Clause],
    ) -> Vec<(Vec<String>, Vec<i64>, std::ops::Range<usize>)> {
        self.sentence_phonemes(clauses)
            .into_iter()
            .map(|(phonemes, span)| {
                let ids = self.ids(&phonemes);
                (phonemes, ids, span)
            })
            .collect()
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
        let (raw, id_samples) = self.infer_raw(ids, run_options)?;
        Ok((normalize_peak(&raw), id_samples))
    }

    /// The model's samples before Piper's peak normalisation.
    fn infer_raw(
        &mut self,
        ids: &[i64],
        run_options: &RunOptions,
    ) -> Result<(Vec<f32>, Option<Vec<u32>>)> {
        if matches!(self.graphs, Graphs::Split { .. }) {
            let sentence = self.encode(ids, run_options)?;
            let raw = self.decode_raw(&sentence, 0..sentence.frames, run_options)?;
            return Ok((raw, sentence.id_samples));
        }
        let infer_err = |e: ort::Error| TtsError::Inference(e.to_string());
        let inputs = self.front_inputs(ids)?;
        let hop_length = self.config.hop_length;
        let Graphs::Whole(session) = &mut self.graphs else {
            unreachable!("checked above");
        };
        let outputs = session
            .run_with_options(inputs, run_options)
            .map_err(infer_err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(infer_err)?;
        let id_samples = id_samples(&outputs, ids.len(), hop_length);
        Ok((audio.to_vec(), id_samples))
    }

    /// Whether [`Self::encode`] and [`Self::decode`] can stream a sentence window by window: the
    /// graph was split, and the warm-up has set the streamed level.
    pub fn can_stream(&self) -> bool {
        matches!(self.graphs, Graphs::Split { .. }) && self.stream_gain.is_some()
    }

    /// Runs the encoder half of a split voice: the sentence's latent frames, to decode in
    /// windows with [`Self::decode`].
    pub fn encode(&mut self, ids: &[i64], run_options: &RunOptions) -> Result<EncodedSentence> {
        let infer_err = |e: ort::Error| TtsError::Inference(e.to_string());
        let inputs = self.front_inputs(ids)?;
        let hop_length = self.config.hop_length;
        let Graphs::Split { encoder, .. } = &mut self.graphs else {
            return Err(TtsError::Inference(
                "this voice's graph was not split; synthesize whole sentences".into(),
            ));
        };
        let outputs = encoder
            .run_with_options(inputs, run_options)
            .map_err(infer_err)?;
        let (shape, latent) = outputs[0].try_extract_tensor::<f32>().map_err(infer_err)?;
        let (channels, frames) = match shape.iter().map(|&d| d as usize).collect::<Vec<_>>()[..] {
            [1, channels, frames] if channels * frames == latent.len() => (channels, frames),
            _ => {
                return Err(TtsError::Inference(format!(
                    "the encoder's latent has shape {shape:?}, not [1, channels, frames]"
                )))
            }
        };
        let latent = latent.to_vec();
        let id_samples = id_samples(&outputs, ids.len(), hop_length);
        Ok(EncodedSentence {
            latent,
            channels,
            frames,
            hop: hop_length as usize,
            id_samples,
        })
    }

    /// Decodes `window` (latent frames) of an encoded sentence: `window.len()` ×
    /// `hop_length` samples, the same as that span of a whole-sentence decode, at the streamed
    /// level (one gain per voice, as Piper's per-sentence peak is unknown until the sentence's
    /// last window).
    pub fn decode(
        &mut self,
        sentence: &EncodedSentence,
        window: std::ops::Range<usize>,
        run_options: &RunOptions,
    ) -> Result<Vec<f32>> {
        let gain = self.stream_gain.ok_or_else(|| {
            TtsError::Inference("the voice must be warmed up before it streams".into())
        })?;
        let mut samples = self.decode_raw(sentence, window, run_options)?;
        for s in &mut samples {
            *s = (*s * gain).clamp(-1.0, 1.0);
        }
        Ok(samples)
    }

    fn decode_raw(
        &mut self,
        sentence: &EncodedSentence,
        window: std::ops::Range<usize>,
        run_options: &RunOptions,
    ) -> Result<Vec<f32>> {
        let infer_err = |e: ort::Error| TtsError::Inference(e.to_string());
        let end = window.end.min(sentence.frames);
        let start = window.start.min(end);
        if start == end {
            return Ok(Vec::new());
        }
        let from = start.saturating_sub(DECODER_CONTEXT_FRAMES);
        let to = (end + DECODER_CONTEXT_FRAMES).min(sentence.frames);
        let width = to - from;
        let mut latent = Vec::with_capacity(sentence.channels * width);
        for row in sentence.latent.chunks_exact(sentence.frames) {
            latent.extend_from_slice(&row[from..to]);
        }
        let sid = self.sid_input(true)?;
        let Graphs::Split {
            decoder,
            latent: latent_name,
            ..
        } = &mut self.graphs
        else {
            return Err(TtsError::Inference(
                "this voice's graph was not split; synthesize whole sentences".into(),
            ));
        };
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![(
            Cow::Owned(latent_name.clone()),
            Tensor::from_array(([1usize, sentence.channels, width], latent))
                .map_err(infer_err)?
                .into(),
        )];
        inputs.extend(sid);
        let outputs = decoder
            .run_with_options(inputs, run_options)
            .map_err(infer_err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(infer_err)?;
        let hop = sentence.hop;
        if audio.len() != width * hop {
            return Err(TtsError::Inference(format!(
                "the decoder gave {} samples for {width} frames; the voice's hop_length is {hop}",
                audio.len()
            )));
        }
        let skip = (start - from) * hop;
        Ok(audio[skip..skip + (end - start) * hop].to_vec())
    }

    /// The inputs of the voice's first (or only) graph for one sentence.
    fn front_inputs(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'static>)>> {
        let infer_err = |e: ort::Error| TtsError::Inference(e.to_string());
        let n = ids.len();
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'static>)> = vec![
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
        inputs.extend(self.sid_input(false)?);
        Ok(inputs)
    }

    /// The speaker id input, when the (front or decoder) graph takes one.
    fn sid_input(
        &self,
        decoder: bool,
    ) -> Result<Option<(Cow<'static, str>, SessionInputValue<'static>)>> {
        let takes_sid = match (&self.graphs, decoder) {
            (Graphs::Split { decoder, .. }, true) => {
                decoder.inputs().iter().any(|i| i.name() == "sid")
            }
            (_, false) => self.has_sid_input,
            (Graphs::Whole(_), true) => false,
        };
        let (Some(sid), true) = (self.speaker, takes_sid) else {
            return Ok(None);
        };
        let tensor = Tensor::from_array(([1usize], vec![sid]))
            .map_err(|e| TtsError::Inference(e.to_string()))?;
        Ok(Some(("sid".into(), tensor.into())))
    }

    /// Runs the model on a few short sentences: ONNX Runtime's first run is about twice as slow
    /// (allocations, kernel selection), and that must not land on the first caller's answer.
    /// A split voice also takes its streamed level from their loudest raw peak.
    pub fn warm_up(&mut self) -> Result<()> {
        let run_options = Arc::clone(&self.run_options);
        let mut peak = 0f32;
        for sentence in self.phoneme_ids(WARM_UP_TEXT)? {
            let (raw, _) = self.infer_raw(&sentence, &run_options)?;
            peak = raw.iter().fold(peak, |m, s| m.max(s.abs()));
        }
        if matches!(self.graphs, Graphs::Split { .. }) && peak.is_finite() && peak > 1e-3 {
            self.stream_gain = Some(STREAM_HEADROOM / peak);
        }
        Ok(())
    }
}

/// Samples per phoneme id from a duration output (the second, in frames), if there is one.
fn id_samples(
    outputs: &ort::session::SessionOutputs<'_>,
    n_ids: usize,
    hop_length: u32,
) -> Option<Vec<u32>> {
    match outputs.len() > 1 {
        true => match outputs[1].try_extract_tensor::<f32>() {
            Ok((_, frames)) if frames.len() == n_ids => Some(
                frames
                    .iter()
                    .map(|f| (f.max(0.0) * hop_length as f32) as u32)
                    .collect(),
            ),
            _ => None,
        },
        false => None,
    }
}

/// An ONNX Runtime session on a serialized model, with the voice's options.
fn session(env: &Environment, options: &VoiceOptions, model: &[u8]) -> ort::Result<Session> {
    Session::builder(env)?
        .with_intra_threads(options.threads.max(1))?
        .with_inter_threads(1)?
        // Every chunk has another length, so ONNX Runtime's memory pattern never applies, and
        // its CPU arena grows to the longest chunk seen (in power-of-two extensions, over 500 MB
        // with the default voice in a soak) and never gives memory back. Without them each
        // run's tensors are freed when it ends.
        .with_memory_pattern(false)?
        .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])?
        .commit_from_memory(model)
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
