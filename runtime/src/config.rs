//! `talkline.toml`: the user's configuration, and `talkline config check`.
//!
//! Every model has an embedded default in the model cache and can be replaced by a file of the
//! user's own, by path.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::models::ModelStore;

/// Looked for in the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "talkline.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub asr: AsrConfig,
    pub vad: VadConfig,
    pub llm: LlmConfig,
    pub tts: TtsConfig,
    pub onnxruntime: OnnxRuntimeConfig,
    pub agent: AgentConfig,
    pub webrtc: WebRtcConfig,
    pub audio: AudioConfig,
    pub turn: crate::turn::TurnConfig,
    pub openai: OpenAiEndpointConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
}

/// `[tls]`: serve HTTPS and WSS on `talkline serve --listen` instead of plain HTTP and WS.
/// Both files or neither; `--tls-cert`/`--tls-key` override them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first (a `fullchain.pem`).
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key: Option<PathBuf>,
}

/// `[limits]`: per-client-IP admission limits of `talkline serve` (see [`crate::limits`]).
/// The address is the TCP peer's: `X-Forwarded-For` is never trusted, so behind a reverse
/// proxy every caller shares the proxy's budget (raise these, or limit at the proxy).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// New `/ws` and `/twilio` connections one address may open per minute, in a burst of up to
    /// this many; more get 429 with `Retry-After` before the upgrade. 0: no limit.
    pub connections_per_minute_per_ip: u32,
    /// `POST /webrtc/offer` per address per minute, likewise; more get 429 with `Retry-After`
    /// before the offer is read. 0: no limit.
    pub offers_per_minute_per_ip: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_minute_per_ip: crate::limits::DEFAULT_CONNECTIONS_PER_MINUTE_PER_IP,
            offers_per_minute_per_ip: crate::limits::DEFAULT_OFFERS_PER_MINUTE_PER_IP,
        }
    }
}

/// `[openai]`: `talkline serve`'s OpenAI-compatible endpoint over the local model
/// (`/v1/chat/completions`, `/v1/models`; see [`crate::openai`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiEndpointConfig {
    /// Serve the endpoint (only with `[llm] backend = "local"`).
    pub enabled: bool,
    /// Completions generated at once; more are refused with 503 and `Retry-After` rather than
    /// queued, since each one holds inference threads for its whole reply.
    pub max_concurrent: usize,
    /// Cap on a request's `max_tokens`, and the value used when a request gives none.
    pub max_tokens: usize,
}

impl Default for OpenAiEndpointConfig {
    fn default() -> Self {
        OpenAiEndpointConfig {
            enabled: true,
            max_concurrent: 2,
            max_tokens: 512,
        }
    }
}

/// Processing of the caller's audio before the VAD and the ASR.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Cancel the agent's own voice when a transport loops it back (line echo, a speakerphone,
    /// a client that records what it plays). About 3% of a core per call. Off by default:
    /// browsers cancel echo themselves, and AEC3 has been seen to soften the first words a
    /// caller says right after the agent stops, which tiny.en then mishears.
    pub echo_cancellation: bool,
}

/// WebRTC transport: how peers reach this server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtcConfig {
    /// STUN/TURN servers offered to ICE (none: host candidates only, enough on a LAN).
    pub ice_servers: Vec<IceServer>,
    /// Public addresses to announce in place of the host's own (a server behind 1:1 NAT).
    pub public_ips: Vec<String>,
    /// UDP ports for media, `[min, max]` (none: any free port), so a firewall can open a range.
    pub udp_port_range: Option<[u16; 2]>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    /// `stun:host:port` or `turn:host:port?transport=udp`.
    pub urls: Vec<String>,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub credential: String,
}

/// The agent a caller talks to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Which agent answers: `"assistant"` (a free conversation) or `"lab-results"`.
    pub kind: AgentKind,
    /// The assistant's system prompt.
    pub system_prompt: String,
    /// Spoken first when a call connects (none: the agent waits for the caller).
    pub greeting: Option<String>,
    /// Most tokens in one reply.
    pub max_reply_tokens: usize,
    /// A call with no audio from the caller for this long is ended.
    pub idle_timeout_s: f64,
    /// Said when a reply cannot be given: the LLM fails or stalls, or the voice yields no audio.
    /// Synthesized once at start-up, so it plays even when the voice itself is failing.
    /// Empty: the reply ends in silence.
    pub fallback_line: String,
    /// `[agent.lab_results]`: used when `kind = "lab-results"`.
    pub lab_results: LabResultsConfig,
}

/// `[agent] fallback_line` unless configured.
pub const DEFAULT_FALLBACK_LINE: &str =
    "Sorry, I'm having trouble right now. Could you say that again?";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentKind {
    #[default]
    Assistant,
    LabResults,
}

/// The lab-results line (`runtime/src/agent/lab_results/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabResultsConfig {
    /// A FHIR R4 JSON Bundle, or a folder of them: every patient the line can verify.
    pub patients: PathBuf,
    /// The audit log (JSON lines, appended): disclosures, lockouts, transfers, guard events.
    pub audit_log: PathBuf,
    /// A keyed PIN is submitted after this many digits (or at `#`). A spoken PIN of fewer digits
    /// is taken as its start: the caller is asked to go on, and a turn without digits ends it.
    pub pin_digits: usize,
    /// Failed identity checks before the call is locked out.
    pub max_failures: u32,
}

impl Default for LabResultsConfig {
    fn default() -> Self {
        LabResultsConfig {
            patients: PathBuf::from("examples/patients"),
            audit_log: PathBuf::from("talkline-audit.jsonl"),
            pin_digits: 4,
            max_failures: 3,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kind: AgentKind::Assistant,
            lab_results: LabResultsConfig::default(),
            system_prompt: crate::converse::DEFAULT_SYSTEM_PROMPT.to_string(),
            greeting: None,
            max_reply_tokens: 60,
            idle_timeout_s: 60.0,
            fallback_line: DEFAULT_FALLBACK_LINE.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    /// A whisper.cpp ggml model of your own; default: the converted tiny.en.
    pub model: Option<PathBuf>,
    /// Which conversion of the embedded model to use.
    pub weights: WhisperWeights,
    /// Whisper threads per partial re-decode while the user speaks.
    pub threads: usize,
    /// Whisper threads for the decode at a pause, whose result usually becomes the final
    /// transcript: the reply waits on it, and the LLM and TTS are idle then. Used only while one
    /// caller is connected; with more, their replies need the cores and `threads` applies.
    /// Default: 2, or 1 on a one-core machine.
    pub final_threads: usize,
    /// Decodes that may run at once across all sessions; with `threads` this caps the cores
    /// Whisper takes from the LLM and TTS.
    pub max_concurrent_decodes: usize,
    pub language: String,
    /// Media time between partial re-decodes while the user speaks.
    pub hop_s: f64,
}

impl Default for AsrConfig {
    fn default() -> Self {
        AsrConfig {
            model: None,
            weights: WhisperWeights::Q8_0,
            threads: 1,
            final_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
            max_concurrent_decodes: 1,
            language: "en".into(),
            hop_s: 0.3,
        }
    }
}

impl AsrConfig {
    pub fn decode_options(&self) -> talkline_asr::whisper::DecodeOptions {
        talkline_asr::whisper::DecodeOptions {
            threads: self.threads,
            final_threads: self.final_threads,
            language: self.language.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum WhisperWeights {
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "f16")]
    F16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// A Silero VAD ONNX model of your own.
    pub model: Option<PathBuf>,
    /// Speech probability at or above which a window is speech.
    pub threshold: f32,
    /// Speech shorter than this is ignored (clicks, coughs).
    pub min_speech_s: f64,
    /// Silence that ends an utterance.
    pub min_silence_s: f64,
    /// In speech, a window counts as silence below `threshold - hysteresis`. A narrower gap
    /// reports a pause sooner (Silero's probability falls over a few 32 ms windows after the
    /// last word), and the pause is where the speculative reply starts; a wider one keeps a
    /// wavering voice from flapping between speech and pause.
    pub hysteresis: f32,
}

impl Default for VadConfig {
    fn default() -> Self {
        let d = talkline_asr::vad::VadConfig::default();
        VadConfig {
            model: None,
            threshold: d.threshold,
            min_speech_s: d.min_speech_s,
            min_silence_s: d.min_silence_s,
            hysteresis: d.threshold - d.release_threshold,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum LlmConfig {
    /// In-process candle inference on a Llama-family GGUF.
    Local {
        #[serde(default)]
        model: Option<PathBuf>,
        /// A tokenizer.json; by default the tokenizer is built from the GGUF metadata.
        #[serde(default)]
        tokenizer: Option<PathBuf>,
        #[serde(default = "default_llm_threads")]
        threads: usize,
        /// Threads while only one conversation is open (more than `threads` helps only then:
        /// with several callers, each reply keeps to `threads` and leaves the cores to the
        /// others). Default: 2, or 1 on a one-core machine.
        #[serde(default = "default_llm_solo_threads")]
        solo_threads: usize,
        /// Speculative decoding in conversations, drafted from the conversation itself (prompt
        /// lookup); the output is the same token for token. Off by default: with SmolLM2-135M
        /// on 2 cores it did not bring the first audio sooner (`talkline bench --reps 2`,
        /// clinic scenario: voice-to-voice p50 571-588 ms with it, 540-547 ms without).
        #[serde(default)]
        prompt_lookup: bool,
    },
    /// Any OpenAI-compatible server (vLLM, llama.cpp server, ...).
    Openai {
        base_url: String,
        model: String,
        /// Name of the environment variable that holds the API key, if the server needs one.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Longest wait for the TCP connection.
        #[serde(default = "default_connect_timeout_s")]
        connect_timeout_s: f64,
        /// Longest wait from sending the request to the first word of the reply.
        #[serde(default = "default_first_token_timeout_s")]
        first_token_timeout_s: f64,
        /// Longest silence of the stream once the reply has started; then the reply is given
        /// up and the fallback line follows what was said.
        #[serde(default = "default_between_tokens_timeout_s")]
        between_tokens_timeout_s: f64,
        /// Extra attempts when a request fails before its first word.
        #[serde(default = "default_retries")]
        retries: u32,
        /// A model that answers when the server fails before the first word: `"local"`, the
        /// local model (`[llm]` local defaults). Unset: the fallback line is said instead.
        #[serde(default)]
        fallback: Option<LlmFallback>,
    },
}

/// `[llm] fallback`: what answers when the remote server cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmFallback {
    Local,
}

fn default_connect_timeout_s() -> f64 {
    3.0
}

fn default_first_token_timeout_s() -> f64 {
    10.0
}

fn default_between_tokens_timeout_s() -> f64 {
    5.0
}

fn default_retries() -> u32 {
    2
}

pub(crate) fn default_llm_threads() -> usize {
    1
}

pub(crate) fn default_llm_solo_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig::Local {
            model: None,
            tokenizer: None,
            threads: default_llm_threads(),
            solo_threads: default_llm_solo_threads(),
            prompt_lookup: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// A Piper voice `.onnx` of your own (its `.onnx.json` must sit beside it).
    pub voice: Option<PathBuf>,
    /// Speaker id for multi-speaker voices.
    pub speaker: Option<u32>,
    /// The first chunk of a reply goes to the voice after this many words (default 3), even
    /// mid-clause, or up to two words later while the cut would end on a function word ("the",
    /// "are"): fewer words start the voice sooner (each word is a few LLM tokens and a slice of
    /// the voice's run), at some cost in the prosody of that first cut. 0 waits for the clause.
    pub first_chunk_max_words: Option<usize>,
    /// The second chunk goes to the voice at its first clause end or after this many words
    /// (default 6, with the same function-word rule), so that it is voiced before the first has
    /// played. 0: the rest of the first sentence.
    pub second_chunk_max_words: Option<usize>,
}

impl TtsConfig {
    /// The clause chunker's settings.
    pub fn chunker(&self) -> talkline_tts::chunker::ChunkerConfig {
        let default = talkline_tts::chunker::ChunkerConfig::default();
        let first_max_words = self
            .first_chunk_max_words
            .unwrap_or(default.first_max_words);
        talkline_tts::chunker::ChunkerConfig {
            first_max_words,
            second_max_words: self
                .second_chunk_max_words
                .unwrap_or(default.second_max_words),
            // A cut below the minimum would never be taken.
            first_min_words: match first_max_words {
                0 => default.first_min_words,
                max => default.first_min_words.min(max),
            },
            ..default
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxRuntimeConfig {
    /// `libonnxruntime.so` of your own.
    pub library: Option<PathBuf>,
}

impl Config {
    /// The streaming recognizer's settings from `[asr]` and `[vad]`.
    pub fn streaming(&self) -> talkline_asr::streaming::StreamingConfig {
        talkline_asr::streaming::StreamingConfig {
            hop_s: self.asr.hop_s.clamp(0.05, 5.0),
            vad: talkline_asr::vad::VadConfig {
                threshold: self.vad.threshold.clamp(0.01, 0.99),
                release_threshold: (self.vad.threshold - self.vad.hysteresis.max(0.0)).max(0.01),
                min_speech_s: self.vad.min_speech_s.max(0.0),
                min_silence_s: self.vad.min_silence_s.max(0.03),
            },
            ..Default::default()
        }
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads `path`, or `./talkline.toml` if it exists, or returns the defaults.
    /// The second value says where the config came from.
    pub fn load(path: Option<&Path>) -> anyhow::Result<(Self, String)> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok((Config::default(), "built-in defaults".into())),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let config = Self::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("config {} is invalid: {e}", path.display()))?;
        Ok((config, path.display().to_string()))
    }

    /// Every model file this configuration needs.
    pub fn required_models(&self, store: &ModelStore) -> Vec<RequiredModel> {
        let embedded = |what, model: &str, file: &str, kind| RequiredModel {
            what,
            path: store.file_path(model, file),
            origin: Origin::Embedded {
                model: model.to_string(),
            },
            kind,
        };
        let own = |what, path: &PathBuf, key: &'static str, kind| RequiredModel {
            what,
            path: path.clone(),
            origin: Origin::Configured { key },
            kind,
        };
        let mut out = Vec::new();
        out.push(match &self.asr.model {
            Some(p) => own("ASR model", p, "[asr] model", FileKind::WhisperGgml),
            None => {
                let file = match self.asr.weights {
                    WhisperWeights::Q8_0 => "ggml-tiny.en-q8_0.bin",
                    WhisperWeights::F16 => "ggml-tiny.en-f16.bin",
                };
                embedded("ASR model", "whisper-tiny.en", file, FileKind::WhisperGgml)
            }
        });
        out.push(match &self.vad.model {
            Some(p) => own("VAD model", p, "[vad] model", FileKind::Onnx),
            None => embedded("VAD model", "silero-vad", "silero_vad.onnx", FileKind::Onnx),
        });
        let local = match &self.llm {
            LlmConfig::Local {
                model, tokenizer, ..
            } => Some((model.as_ref(), tokenizer.as_ref())),
            LlmConfig::Openai {
                fallback: Some(LlmFallback::Local),
                ..
            } => Some((None, None)),
            LlmConfig::Openai { .. } => None,
        };
        if let Some((model, tokenizer)) = local {
            out.push(match model {
                Some(p) => own("LLM model", p, "[llm] model", FileKind::Gguf),
                // The fetch-time Q8_0 re-quantization: the weights talkline-llm runs, so loading
                // converts nothing. The original Q4_1 file stays beside it.
                None => embedded(
                    "LLM model",
                    "smollm2-135m",
                    "SmolLM2-135M-Instruct.Q8_0.gguf",
                    FileKind::Gguf,
                ),
            });
            if let Some(p) = tokenizer {
                out.push(own("LLM tokenizer", p, "[llm] tokenizer", FileKind::Json));
            }
        }
        match &self.tts.voice {
            Some(p) => {
                out.push(own("TTS voice", p, "[tts] voice", FileKind::Onnx));
                let mut config = p.clone().into_os_string();
                config.push(".json");
                out.push(own(
                    "TTS voice config",
                    &config.into(),
                    "[tts] voice",
                    FileKind::Json,
                ));
            }
            None => {
                let model = "piper-joe";
                out.push(embedded(
                    "TTS voice",
                    model,
                    "en_US-joe-medium.onnx",
                    FileKind::Onnx,
                ));
                out.push(embedded(
                    "TTS voice config",
                    model,
                    "en_US-joe-medium.onnx.json",
                    FileKind::Json,
                ));
            }
        }
        out.push(match &self.onnxruntime.library {
            Some(p) => own(
                "ONNX Runtime",
                p,
                "[onnxruntime] library",
                FileKind::SharedLibrary,
            ),
            None => embedded(
                "ONNX Runtime",
                "onnxruntime",
                "libonnxruntime.so.1.32.0",
                FileKind::SharedLibrary,
            ),
        });
        out
    }
}

/// Where a required file comes from, which decides how to fix it when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Embedded { model: String },
    Configured { key: &'static str },
}

/// What a file must look like; checked from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    WhisperGgml,
    Gguf,
    Onnx,
    Json,
    SharedLibrary,
}

#[derive(Debug, Clone)]
pub struct RequiredModel {
    pub what: &'static str,
    pub path: PathBuf,
    pub origin: Origin,
    pub kind: FileKind,
}

/// The verdict on one required file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Problem { reason: String, fix: String },
}

impl RequiredModel {
    pub fn check(&self) -> Readiness {
        let fix = match &self.origin {
            Origin::Embedded { model } => format!("run `talkline models fetch --only {model}`"),
            Origin::Configured { key } => format!("point {key} at an existing file"),
        };
        if !self.path.is_file() {
            return Readiness::Problem {
                reason: "missing".into(),
                fix,
            };
        }
        match sniff(&self.path, self.kind) {
            Ok(()) => Readiness::Ready,
            Err(reason) => Readiness::Problem {
                reason,
                fix: match &self.origin {
                    Origin::Embedded { model } => {
                        format!("run `talkline models fetch --only {model}` to repair it")
                    }
                    Origin::Configured { key } => format!("point {key} at a valid file"),
                },
            },
        }
    }
}

/// Checks the magic bytes of a file, so a wrong file is reported before a loader fails on it.
fn sniff(path: &Path, kind: FileKind) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| format!("unreadable: {e}"))?;
    let head = &head[..read];
    let ok = match kind {
        FileKind::WhisperGgml => head == 0x6767_6d6cu32.to_le_bytes(),
        FileKind::Gguf => head == b"GGUF",
        FileKind::SharedLibrary => head == b"\x7fELF",
        // ONNX is a protobuf without a magic number; JSON must at least open an object.
        FileKind::Onnx => read > 0,
        FileKind::Json => head.first().is_some_and(|b| *b == b'{'),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("not a {kind:?} file"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_taking_is_tunable_and_unset_fields_keep_their_defaults() {
        let config: Config =
            toml::from_str("[turn]\nunsure_end_delay_s = 0.3\nbarge_in_min_speech_s = 0.5\n")
                .expect("valid [turn]");
        let defaults = crate::turn::TurnConfig::default();
        assert_eq!(config.turn.unsure_end_delay_s, 0.3);
        assert_eq!(config.turn.barge_in_min_speech_s, 0.5);
        assert_eq!(config.turn.max_end_delay_s, defaults.max_end_delay_s);
        assert!(toml::from_str::<Config>("[turn]\nvad_threshold = 0.2\n").is_err());
    }

    #[test]
    fn defaults_need_every_embedded_model() {
        let store = ModelStore::at("/cache");
        let required = Config::default().required_models(&store);
        let models: Vec<_> = required
            .iter()
            .filter_map(|r| match &r.origin {
                Origin::Embedded { model } => Some(model.as_str()),
                Origin::Configured { .. } => None,
            })
            .collect();
        for m in [
            "whisper-tiny.en",
            "silero-vad",
            "smollm2-135m",
            "piper-joe",
            "onnxruntime",
        ] {
            assert!(models.contains(&m), "{m} not required");
        }
        // Every embedded path names a file the manifest really provides.
        for r in &required {
            if let Origin::Embedded { model } = &r.origin {
                let entry = store.entry(model).unwrap();
                let rel = r.path.strip_prefix(store.model_dir(model)).unwrap();
                assert!(entry.file(rel.to_str().unwrap()).is_some(), "{rel:?}");
            }
        }
    }

    #[test]
    fn own_models_by_path_and_openai_backend() {
        let config = Config::from_toml(
            r#"
            [asr]
            model = "/m/ggml-base.en.bin"
            [llm]
            backend = "openai"
            base_url = "http://127.0.0.1:8080/v1"
            model = "llama-3.2-1b"
            [tts]
            voice = "/v/en_GB-alan-low.onnx"
            "#,
        )
        .unwrap();
        let required = config.required_models(&ModelStore::at("/cache"));
        let paths: Vec<_> = required.iter().map(|r| r.path.to_str().unwrap()).collect();
        assert!(paths.contains(&"/m/ggml-base.en.bin"));
        assert!(paths.contains(&"/v/en_GB-alan-low.onnx.json"));
        assert!(
            !required.iter().any(|r| r.what == "LLM model"),
            "remote LLM needs no file"
        );
    }

    #[test]
    fn remote_timeouts_fallback_model_and_fallback_line_are_configurable() {
        let config = Config::from_toml(
            "[agent]\nfallback_line = \"One moment, please.\"\n\
             [llm]\nbackend = \"openai\"\nbase_url = \"http://x/v1\"\nmodel = \"m\"\n\
             between_tokens_timeout_s = 1.5\nretries = 0\nfallback = \"local\"\n",
        )
        .expect("valid config");
        assert_eq!(config.agent.fallback_line, "One moment, please.");
        let LlmConfig::Openai {
            connect_timeout_s,
            between_tokens_timeout_s,
            retries,
            fallback,
            ..
        } = &config.llm
        else {
            panic!("the openai backend: {:?}", config.llm);
        };
        assert_eq!(*between_tokens_timeout_s, 1.5);
        assert_eq!(*connect_timeout_s, 3.0, "unset keys keep their defaults");
        assert_eq!(*retries, 0);
        assert_eq!(*fallback, Some(LlmFallback::Local));
        // The local fallback needs the local model on disk.
        let required = config.required_models(&ModelStore::at("/cache"));
        assert!(required.iter().any(|r| r.what == "LLM model"));
        assert_eq!(Config::default().agent.fallback_line, DEFAULT_FALLBACK_LINE);
        assert!(Config::from_toml(
            "[llm]\nbackend = \"openai\"\nbase_url = \"u\"\nmodel = \"m\"\nfallback = \"cloud\"\n"
        )
        .is_err());
    }

    #[test]
    fn lab_results_agent_is_selected_in_agent() {
        let config = Config::from_toml(
            "[agent]\nkind = \"lab-results\"\n[agent.lab_results]\npatients = \"/p\"\naudit_log = \"/a.jsonl\"\n",
        )
        .unwrap();
        assert_eq!(config.agent.kind, AgentKind::LabResults);
        assert_eq!(config.agent.lab_results.patients, PathBuf::from("/p"));
        assert_eq!(config.agent.lab_results.max_failures, 3);
        assert_eq!(Config::default().agent.kind, AgentKind::Assistant);
    }

    #[test]
    fn unknown_keys_and_backends_are_rejected_with_their_name() {
        let err = Config::from_toml("[asr]\nmodle = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("modle"), "{err}");
        let err = Config::from_toml("[llm]\nbackend = \"gpt\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt"), "{err}");
    }

    #[test]
    fn missing_and_wrong_files_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::at(dir.path());
        let fake = dir.path().join("fake.gguf");
        std::fs::write(&fake, b"not a gguf").unwrap();
        let config = Config {
            llm: LlmConfig::Local {
                model: Some(fake),
                tokenizer: None,
                threads: 1,
                solo_threads: 1,
                prompt_lookup: false,
            },
            ..Config::default()
        };
        for r in config.required_models(&store) {
            match (r.what, r.check()) {
                ("LLM model", Readiness::Problem { reason, fix }) => {
                    assert!(reason.contains("Gguf"), "{reason}");
                    assert!(fix.contains("[llm] model"), "{fix}");
                }
                ("ASR model", Readiness::Problem { fix, .. }) => {
                    assert_eq!(fix, "run `talkline models fetch --only whisper-tiny.en`");
                }
                (what, verdict) => assert!(matches!(verdict, Readiness::Problem { .. }), "{what}"),
            }
        }
    }
}
