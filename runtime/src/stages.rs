//! Loading the stages from the configuration, once per process: the chat model and the voice.
//! Every command that needs them (`chat`, `say`, `converse`, `serve`) goes through here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use talkline_asr::vad::{EnergyVad, SileroVad, SpeechProbability};
use talkline_asr::whisper::WhisperModel;
use talkline_llm::fallback::FallbackChatModel;
use talkline_llm::remote::{OpenAiChatModel, OpenAiConfig};
use talkline_llm::{ChatModel, DraftSource, LoadOptions, LocalChatModel, LocalConfig, LocalModel};
use talkline_tts::{PiperVoice, VoiceOptions};

use crate::config::{
    default_llm_solo_threads, default_llm_threads, Config, LlmConfig, LlmFallback, Origin,
    RequiredModel,
};
use crate::models::ModelStore;

/// The model that holds the espeak-ng data Piper was trained with.
pub const ESPEAK_DATA_MODEL: &str = "piper-espeak-data";

/// How to fix a missing file, by where it was supposed to come from.
pub fn fix(origin: &Origin) -> String {
    match origin {
        Origin::Embedded { model } => format!("run `talkline models fetch --only {model}`"),
        Origin::Configured { key } => format!("point {key} at an existing file"),
    }
}

/// The configured file for `what` ("LLM model", "TTS voice", ...), which must exist.
pub fn required_file(
    config: &Config,
    store: &ModelStore,
    what: &str,
) -> anyhow::Result<RequiredModel> {
    let required = config
        .required_models(store)
        .into_iter()
        .find(|r| r.what == what)
        .with_context(|| format!("the configuration names no {what}"))?;
    anyhow::ensure!(
        required.path.is_file(),
        "{what} {} is missing: {}",
        required.path.display(),
        fix(&required.origin)
    );
    Ok(required)
}

/// The configured chat model; `threads` overrides `[llm] threads`, `draft` picks speculative
/// decoding for the local backend.
pub fn chat_model(
    config: &Config,
    store: &ModelStore,
    threads: Option<usize>,
    draft: DraftChoice,
) -> anyhow::Result<Box<dyn ChatModel>> {
    match &config.llm {
        LlmConfig::Local {
            tokenizer,
            threads: configured,
            solo_threads,
            ..
        } => {
            let path = required_file(config, store, "LLM model")?.path;
            let load = LoadOptions {
                threads: threads.unwrap_or(*configured),
                // An explicit thread count (`talkline chat --threads`) is the count, alone or not.
                solo_threads: threads.unwrap_or(*solo_threads),
                ..LoadOptions::default()
            };
            let model = LocalModel::load(&LocalConfig {
                model: path.clone(),
                tokenizer: tokenizer.clone(),
                load: load.clone(),
            })
            .with_context(|| format!("loading {}", path.display()))?;
            let draft = match draft {
                DraftChoice::None => DraftSource::None,
                DraftChoice::Lookup => DraftSource::lookup(),
                DraftChoice::Model(draft) => DraftSource::model(
                    LocalModel::load(&LocalConfig {
                        model: draft.clone(),
                        tokenizer: None,
                        load,
                    })
                    .with_context(|| format!("loading the draft {}", draft.display()))?,
                ),
            };
            Ok(Box::new(LocalChatModel { model, draft }))
        }
        LlmConfig::Openai {
            base_url,
            model,
            api_key_env,
            connect_timeout_s,
            first_token_timeout_s,
            between_tokens_timeout_s,
            retries,
            fallback,
        } => {
            anyhow::ensure!(
                matches!(draft, DraftChoice::None),
                "speculative decoding (--draft, --lookup) needs the local backend"
            );
            let seconds = |key: &str, s: f64| {
                anyhow::ensure!(
                    s.is_finite() && s > 0.0 && s <= 3600.0,
                    "[llm] {key} must be between 0 and 3600 seconds, not {s}"
                );
                Ok(Duration::from_secs_f64(s))
            };
            let mut c = OpenAiConfig::new(base_url.clone(), model.clone());
            c.connect_timeout = seconds("connect_timeout_s", *connect_timeout_s)?;
            c.first_token_timeout = seconds("first_token_timeout_s", *first_token_timeout_s)?;
            c.between_tokens_timeout =
                seconds("between_tokens_timeout_s", *between_tokens_timeout_s)?;
            c.retries = *retries;
            if let Some(var) = api_key_env {
                c.api_key =
                    Some(std::env::var(var).with_context(|| {
                        format!("[llm] api_key_env names {var}, which is unset")
                    })?);
            }
            let remote = Box::new(OpenAiChatModel::new(c));
            match fallback {
                None => Ok(remote),
                Some(LlmFallback::Local) => {
                    let local = LlmConfig::Local {
                        model: None,
                        tokenizer: None,
                        threads: threads.unwrap_or_else(default_llm_threads),
                        solo_threads: threads.unwrap_or_else(default_llm_solo_threads),
                        prompt_lookup: false,
                    };
                    let local = chat_model(
                        &Config {
                            llm: local,
                            ..config.clone()
                        },
                        store,
                        threads,
                        DraftChoice::None,
                    )
                    .context("loading the local fallback model ([llm] fallback = \"local\")")?;
                    Ok(Box::new(FallbackChatModel {
                        primary: remote,
                        fallback: local,
                    }))
                }
            }
        }
    }
}

/// Speculative decoding's draft source.
#[derive(Debug, Clone, Default)]
pub enum DraftChoice {
    #[default]
    None,
    Lookup,
    Model(std::path::PathBuf),
}

/// The chat model for conversations, as configured (`[llm] prompt_lookup` picks the drafting).
pub fn load_chat_model(config: &Config, store: &ModelStore) -> anyhow::Result<Arc<dyn ChatModel>> {
    let draft = match config.llm {
        LlmConfig::Local {
            prompt_lookup: true,
            ..
        } => DraftChoice::Lookup,
        _ => DraftChoice::None,
    };
    Ok(Arc::from(chat_model(config, store, None, draft)?))
}

/// The configured voice (or `voice` by path), warmed up, on the shared ONNX Runtime.
pub fn voice(
    config: &Config,
    store: &ModelStore,
    voice: Option<&std::path::Path>,
    threads: usize,
    speaker: Option<u32>,
) -> anyhow::Result<PiperVoice> {
    let voice_path = match voice {
        Some(p) => p.to_path_buf(),
        None => required_file(config, store, "TTS voice")?.path,
    };
    let ort = required_file(config, store, "ONNX Runtime")?;
    let env = crate::onnx::environment(&ort.path)?;
    let espeak_parent = store.model_dir(ESPEAK_DATA_MODEL);
    let espeak_data = if espeak_parent
        .join("espeak-ng-data")
        .join("phontab")
        .is_file()
    {
        Some(espeak_parent)
    } else {
        eprintln!(
            "warning: Piper's espeak-ng data is missing, so the system's is used and a few words \
             may sound different; fix: talkline models fetch --only {ESPEAK_DATA_MODEL}"
        );
        None
    };
    let options = VoiceOptions {
        threads: threads.max(1),
        speaker: speaker.or(config.tts.speaker).map(i64::from),
        espeak_data,
        warm_up: true,
        ..VoiceOptions::default()
    };
    PiperVoice::load(&env, &voice_path, &options)
        .with_context(|| format!("loading the voice {}", voice_path.display()))
}

/// The configured voice for conversations.
pub fn load_voice(config: &Config, store: &ModelStore) -> anyhow::Result<PiperVoice> {
    voice(config, store, None, 1, None)
}

/// The Silero VAD when its model and ONNX Runtime are present, else the energy VAD with a warning.
pub fn load_vad(config: &Config, store: &ModelStore) -> Box<dyn SpeechProbability> {
    let silero = (|| -> anyhow::Result<SileroVad> {
        let vad = required_file(config, store, "VAD model")?;
        let ort = required_file(config, store, "ONNX Runtime")?;
        let env = crate::onnx::environment(&ort.path)?;
        Ok(SileroVad::load(&env, &vad.path)?)
    })();
    match silero {
        Ok(vad) => Box::new(vad),
        Err(e) => {
            tracing::warn!("Silero VAD unavailable ({e:#}); falling back to the energy VAD");
            eprintln!("warning: Silero VAD unavailable ({e:#}); using the energy VAD");
            Box::new(EnergyVad::default())
        }
    }
}

/// The configured Whisper model, loaded once and shared by every session.
pub fn load_whisper(config: &Config, store: &ModelStore) -> anyhow::Result<WhisperModel> {
    let asr = required_file(config, store, "ASR model")?;
    Ok(WhisperModel::load(&asr.path)?)
}
