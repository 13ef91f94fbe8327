//! A Whisper model loaded once per process and shared; each user gets a [`WhisperSession`].

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

use crate::error::{AsrError, Result};

/// Whisper's input rate.
pub const SAMPLE_RATE: u32 = 16_000;
/// The encoder sees at most 30 s; 1500 frames of 20 ms.
const MAX_AUDIO_CTX: usize = 1500;

static LOG_HOOKS: Once = Once::new();

/// The shared, read-only model. Cheap to clone.
#[derive(Clone)]
pub struct WhisperModel {
    context: Arc<WhisperContext>,
    path: PathBuf,
}

impl std::fmt::Debug for WhisperModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperModel")
            .field("path", &self.path)
            .finish()
    }
}

/// Options of one decode.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub threads: usize,
    /// Threads for a decode whose result may become an utterance's final transcript (see
    /// [`DecodeOptions::for_request`]). The reply waits on that decode while the LLM and TTS
    /// are mostly idle, so it can take more cores than the partial re-decodes during speech.
    pub final_threads: usize,
    pub language: String,
    /// Shrink the encoder window to the audio's real length instead of 30 s.
    pub fit_audio_ctx: bool,
    /// Text the decoder is conditioned on (e.g. the committed part of an utterance).
    pub prompt: Option<String>,
    /// Set by another thread to stop the decode early; it then fails with [`AsrError::Aborted`].
    pub abort: Option<Arc<AtomicBool>>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            threads: 1,
            final_threads: 1,
            language: "en".into(),
            fit_audio_ctx: true,
            prompt: None,
            abort: None,
        }
    }
}

impl DecodeOptions {
    /// The options for one decode the streaming recognizer asked for: its prompt, and its
    /// thread count by whether the turn will wait on its result.
    pub fn for_request(&self, request: &crate::streaming::DecodeRequest) -> DecodeOptions {
        DecodeOptions {
            threads: if request.may_be_final {
                self.final_threads.max(self.threads)
            } else {
                self.threads
            },
            prompt: Some(request.prompt.clone()),
            ..self.clone()
        }
    }
}

impl WhisperModel {
    /// Loads a whisper.cpp ggml model (e.g. one made by `talkline models fetch`).
    pub fn load(path: &Path) -> Result<Self> {
        // whisper.cpp prints to stderr by default; route it through `tracing` instead.
        LOG_HOOKS.call_once(|| {
            whisper_rs::install_logging_hooks();
            // SAFETY: replaces whisper.cpp's log callback with one that only reads its arguments.
            unsafe {
                whisper_rs::whisper_rs_sys::whisper_log_set(Some(whisper_log), std::ptr::null_mut())
            };
        });
        if !path.is_file() {
            return Err(AsrError::ModelLoad {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let context = WhisperContext::new_with_params(path, WhisperContextParameters::default())
            .map_err(|e| AsrError::ModelLoad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(WhisperModel {
            context: Arc::new(context),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A decoding state of its own (mel, KV caches), for one user.
    pub fn session(&self) -> Result<WhisperSession> {
        let state = self
            .context
            .create_state()
            .map_err(|e| AsrError::Inference(format!("cannot create a decoding state: {e}")))?;
        Ok(WhisperSession {
            model: self.clone(),
            state,
        })
    }
}

/// One user's decoding state over a shared [`WhisperModel`].
pub struct WhisperSession {
    model: WhisperModel,
    state: WhisperState,
}

/// A recognised word with its position in the decoded audio, in seconds from the audio's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// The word as Whisper wrote it, with attached punctuation, without the leading space.
    pub text: String,
    pub start: f64,
    pub end: f64,
}

/// One decode of an audio window.
#[derive(Debug, Clone, Default)]
pub struct Hypothesis {
    pub words: Vec<Word>,
    /// Whisper's probability that the window holds no speech.
    pub no_speech_probability: f32,
}

impl Hypothesis {
    pub fn text(&self) -> String {
        join_words(&self.words)
    }
}

pub fn join_words(words: &[Word]) -> String {
    let mut text = String::new();
    for w in words {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&w.text);
    }
    text
}

thread_local! {
    /// The abort flag of the decode running on this thread, so that the errors whisper.cpp logs
    /// when it is aborted ("failed to encode") are not reported as errors.
    static DECODE_ABORT: std::cell::RefCell<Option<Arc<AtomicBool>>> =
        const { std::cell::RefCell::new(None) };
}

/// whisper.cpp's log callback: its messages into `tracing`, as whisper-rs's hook does, except that
/// an aborted decode's complaints are expected and go to debug.
unsafe extern "C" fn whisper_log(
    level: whisper_rs::whisper_rs_sys::ggml_log_level,
    text: *const std::ffi::c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: whisper.cpp passes a NUL-terminated string valid for the call.
    let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim();
    let aborted = DECODE_ABORT.with(|a| {
        a.borrow()
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Relaxed))
    });
    match whisper_rs::GGMLLogLevel::from(level) {
        whisper_rs::GGMLLogLevel::Error if !aborted => {
            tracing::error!(target: "whisper_rs", "{text}")
        }
        whisper_rs::GGMLLogLevel::Warn if !aborted => {
            tracing::warn!(target: "whisper_rs", "{text}")
        }
        whisper_rs::GGMLLogLevel::Info => tracing::info!(target: "whisper_rs", "{text}"),
        // The decoder's per-token trace quotes every token it decodes: what the caller said,
        // which may be a patient's data. Logs never hold that, at any level.
        _ if text.starts_with("whisper_full_with_state") => {}
        _ if !text.is_empty() => tracing::debug!(target: "whisper_rs", "{text}"),
        _ => {}
    }
}

/// whisper.cpp's abort callback: `user_data` is the decode's `AtomicBool` abort flag.
unsafe extern "C" fn abort_requested(user_data: *mut c_void) -> bool {
    // SAFETY: set up in `WhisperSession::decode`, which keeps the flag alive while whisper.cpp
    // may call this.
    unsafe { (*(user_data as *const AtomicBool)).load(Ordering::Relaxed) }
}

impl WhisperSession {
    /// Transcribes 16 kHz mono audio in one go and returns the text, trimmed.
    pub fn transcribe(&mut self, pcm: &[f32], options: &DecodeOptions) -> Result<String> {
        Ok(self.decode(pcm, options)?.text())
    }

    /// Decodes 16 kHz mono audio into words with timestamps.
    pub fn decode(&mut self, pcm: &[f32], options: &DecodeOptions) -> Result<Hypothesis> {
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(options.threads.max(1) as i32);
        params.set_language(Some(&options.language));
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_special(false);
        params.set_print_timestamps(false);
        // Timestamp tokens anchor the token-level times that trimming and the seam rely on.
        params.set_no_timestamps(false);
        params.set_single_segment(true);
        params.set_token_timestamps(true);
        params.set_suppress_nst(true);
        params.set_suppress_blank(true);
        // A streaming window is short: no temperature fallback re-decodes, they cost latency.
        params.set_temperature_inc(0.0);
        if let Some(prompt) = options.prompt.as_deref().filter(|p| !p.is_empty()) {
            params.set_initial_prompt(prompt);
        }
        if options.fit_audio_ctx {
            params.set_audio_ctx(audio_ctx_for(pcm.len()) as i32);
        }
        // Short windows make Whisper loop ("My dog. My dog. ..."); nobody says more than about
        // 8 tokens a second.
        let seconds = pcm.len() as f64 / SAMPLE_RATE as f64;
        params.set_max_tokens((8.0 * seconds).ceil() as i32 + 4);
        // whisper.cpp refuses windows shorter than 100 ms; pad with silence.
        const MIN_SAMPLES: usize = SAMPLE_RATE as usize / 10 + 1;
        let padded;
        let pcm = if pcm.len() < MIN_SAMPLES {
            padded = [pcm, &vec![0.0; MIN_SAMPLES - pcm.len()]].concat();
            &padded[..]
        } else {
            pcm
        };
        let aborted = || {
            options
                .abort
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Relaxed))
        };
        if let Some(abort) = &options.abort {
            // Not whisper-rs's `set_abort_callback_safe`: in 0.16 its trampoline reads the boxed
            // closure as the wrong type, so decodes abort at random.
            // SAFETY: the callback only reads the flag, which `options` keeps alive until `full`
            // below has returned; whisper.cpp calls it on this decode's threads only.
            unsafe {
                params.set_abort_callback(Some(abort_requested));
                params.set_abort_callback_user_data(Arc::as_ptr(abort) as *mut c_void);
            }
        }
        if aborted() {
            return Err(AsrError::Aborted);
        }
        DECODE_ABORT.with(|a| a.replace(options.abort.clone()));
        let decoded = self.state.full(params, pcm);
        DECODE_ABORT.with(|a| a.replace(None));
        decoded.map_err(|e| {
            if aborted() {
                AsrError::Aborted
            } else {
                AsrError::Inference(e.to_string())
            }
        })?;
        if aborted() {
            return Err(AsrError::Aborted);
        }
        let eot = self.model.context.token_eot();
        let mut hypothesis = Hypothesis::default();
        for segment in self.state.as_iter() {
            hypothesis.no_speech_probability = segment.no_speech_probability();
            for i in 0..segment.n_tokens() {
                let Some(token) = segment.get_token(i) else {
                    continue;
                };
                if token.token_id() >= eot {
                    continue; // special and timestamp tokens
                }
                let data = token.token_data();
                let Ok(piece) = token.to_str_lossy() else {
                    continue;
                };
                // whisper.cpp token times are in 10 ms units.
                let (t0, t1) = (data.t0 as f64 / 100.0, data.t1 as f64 / 100.0);
                push_piece(&mut hypothesis.words, &piece, t0, t1);
            }
        }
        cut_repetition_loop(&mut hypothesis.words);
        Ok(hypothesis)
    }
}

/// Whisper on a short window can fall into a loop ("What? What? What?", "Is it normal? Is it
/// normal? Is it") and repeat itself until the token budget ends. People repeat themselves too,
/// but not a phrase of three words or more twice back to back, nor a word or two three times
/// running; from the first such repeat on, the words are cut.
fn cut_repetition_loop(words: &mut Vec<Word>) {
    let keys: Vec<String> = words
        .iter()
        .map(|w| {
            w.text
                .chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect()
        })
        .collect();
    let n = keys.len();
    for start in 0..n {
        for period in 1..=(n - start) / 2 {
            let copies_to_cut = if period >= 3 { 1 } else { 2 };
            let phrase = &keys[start..start + period];
            let copies = keys[start + period..]
                .chunks_exact(period)
                .take_while(|next| *next == phrase)
                .count();
            if copies >= copies_to_cut {
                words.truncate(start + period);
                return;
            }
        }
    }
}

/// Appends a token's text: a leading space starts a new word, anything else extends the last.
fn push_piece(words: &mut Vec<Word>, piece: &str, t0: f64, t1: f64) {
    let starts_word = piece.starts_with(' ') || words.is_empty();
    let trimmed = piece.trim();
    if trimmed.is_empty() {
        return;
    }
    match words.last_mut() {
        Some(last) if !starts_word => {
            last.text.push_str(trimmed);
            last.end = last.end.max(t1);
        }
        _ => words.push(Word {
            text: trimmed.to_string(),
            start: t0,
            end: t1.max(t0),
        }),
    }
}

/// Encoder frames for `samples` of audio: 50 per second, plus a little headroom because
/// whisper.cpp's quality drops sharply when the window is cut exactly at the last word.
pub fn audio_ctx_for(samples: usize) -> usize {
    const FRAMES_PER_SECOND: usize = 50;
    const HEADROOM_FRAMES: usize = 64;
    let frames = samples * FRAMES_PER_SECOND / SAMPLE_RATE as usize;
    (frames + HEADROOM_FRAMES).min(MAX_AUDIO_CTX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_ctx_tracks_length_and_caps_at_30_seconds() {
        assert_eq!(audio_ctx_for(16_000), 50 + 64);
        assert_eq!(audio_ctx_for(16_000 * 60), 1500);
    }

    #[test]
    fn tokens_join_into_words_with_times() {
        let mut words = Vec::new();
        for (piece, t0, t1) in [
            (" Hel", 0.0, 0.2),
            ("lo", 0.2, 0.3),
            (",", 0.3, 0.3),
            (" world", 0.4, 0.8),
        ] {
            push_piece(&mut words, piece, t0, t1);
        }
        assert_eq!(join_words(&words), "Hello, world");
        assert_eq!((words[0].start, words[0].end), (0.0, 0.3));
        assert_eq!(words[1].start, 0.4);
    }

    fn words_of(text: &str) -> Vec<Word> {
        text.split_whitespace()
            .map(|w| Word {
                text: w.to_string(),
                start: 0.0,
                end: 0.0,
            })
            .collect()
    }

    #[test]
    fn repetition_loops_are_cut_after_the_first_pass() {
        for (decoded, kept) in [
            (
                "What is a normal blood pressure? What is a normal blood pressure? What is a",
                "What is a normal blood pressure?",
            ),
            ("What? What? What?", "What?"),
            ("Is it, is it high", "Is it, is it high"),
            ("no no no no", "no"),
            ("I said no, no.", "I said no, no."),
            ("the test the test the test results", "the test"),
            ("", ""),
        ] {
            let mut words = words_of(decoded);
            cut_repetition_loop(&mut words);
            assert_eq!(join_words(&words), kept, "{decoded:?}");
        }
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let err = WhisperModel::load(Path::new("/nonexistent/ggml.bin")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ggml.bin"));
    }
}
