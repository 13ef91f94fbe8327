//! Streaming synthesis: text deltas in (from the LLM), audio chunks out, in order, each as soon
//! as it is synthesized; cancellation, and what the listener actually heard.
//!
//! ```text
//! TextInput::push ─ ClauseChunker ─▶ [TEXT_QUEUE_CAP] ─▶ worker thread ─▶ [AUDIO_QUEUE_CAP] ─▶ AudioOutput::recv
//!                                                       normalize · phonemize · Piper · resample
//! ```
//!
//! The model runs on a dedicated thread, never on the caller's (or an async runtime's) thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ort::session::RunOptions;

use crate::chunker::{ChunkerConfig, ClauseChunker, TextChunk};
use crate::error::{Result, TtsError};
use crate::normalize::{self, Skipped, WordMap};
use crate::resample::resample;
use crate::voice::{PiperVoice, SentenceAudio};

/// Text chunks waiting for the worker. Policy when full: **block** the producer. Chunks are a
/// sentence each, so a full queue means synthesis is far behind the LLM, and slowing the LLM
/// down is the right back-pressure; dropping text would skip words.
pub const TEXT_QUEUE_CAP: usize = 16;

/// Synthesized chunks waiting for the consumer. Policy when full: **block** the worker. These
/// are whole chunks ahead of real time (not live frames), so waiting costs no latency, while
/// dropping one would skip a sentence; live audio frames are dropped oldest-first downstream, in
/// the transport's ring buffer.
pub const AUDIO_QUEUE_CAP: usize = 4;

/// How long the idle worker waits for text before it looks at the cancel flag again.
const IDLE_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub chunker: ChunkerConfig,
    /// Resample every chunk to this rate; `None` keeps the voice's rate.
    pub output_rate: Option<u32>,
    /// English text normalisation ([`normalize`]); turn it off for voices in other languages.
    pub normalize: bool,
    /// Cut the silence Piper puts before the first chunk's first sound (30-40 ms with the
    /// default voice) down to [`LEAD_IN_KEEP_S`]: a reply waits for nothing. Later chunks keep
    /// theirs, which is the pause between sentences.
    pub trim_lead_in: bool,
}

/// Below this level a sample counts as silence for the lead-in: about -54 dBFS, under the
/// noise VITS leaves before speech begins.
pub const LEAD_IN_SILENCE: f32 = 0.002;
/// Kept before the first sound, so its onset is not clipped.
pub const LEAD_IN_KEEP_S: f64 = 0.005;

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            chunker: ChunkerConfig::default(),
            output_rate: None,
            normalize: true,
            trim_lead_in: true,
        }
    }
}

/// One synthesized chunk.
#[derive(Debug, Clone)]
pub struct AudioChunk {
    pub index: usize,
    /// The chunk's text as it was pushed (before normalisation).
    pub text: String,
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// What normalisation left out of this chunk (emoji, unknown scripts).
    pub skipped: Vec<Skipped>,
    /// For each word of `text`: its end (bytes into `text`) and when it has been spoken
    /// (samples into `samples`).
    pub word_ends: Vec<(usize, u64)>,
    /// `true` when the word times come from the model's duration output, `false` when they
    /// are estimated (see [`sentence_word_ends`]).
    pub timed_by_model: bool,
}

/// What the listener heard when playback stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// The words heard in full, as pushed (chunks joined by a space).
    pub text: String,
    /// Playback position, in samples at the stream's output rate.
    pub position: u64,
    /// Every chunk received so far was played to its end.
    pub all_received: bool,
}

/// Starts a stream on `voice`. One voice serves one stream at a time: a second stream on the same
/// voice waits for the first one's model runs.
pub fn start(
    voice: Arc<Mutex<PiperVoice>>,
    config: StreamConfig,
) -> Result<(TextInput, AudioOutput)> {
    // Run options of this stream's own, so cancelling it can abort the model run in flight
    // without touching other streams (a terminated flag would also stick to the next run).
    let run_options = Arc::new(RunOptions::new().map_err(|e| TtsError::Inference(e.to_string()))?);
    let (text_tx, text_rx) = mpsc::sync_channel::<TextChunk>(TEXT_QUEUE_CAP);
    let (audio_tx, audio_rx) = mpsc::sync_channel::<Result<AudioChunk>>(AUDIO_QUEUE_CAP);
    let cancelled = Arc::new(AtomicBool::new(false));
    let worker = {
        let cancelled = Arc::clone(&cancelled);
        let run_options = Arc::clone(&run_options);
        let config = config.clone();
        std::thread::Builder::new()
            .name("tts-synth".into())
            .spawn(move || worker(voice, config, text_rx, audio_tx, cancelled, run_options))
            .map_err(|e| TtsError::WorkerGone(format!("cannot start the synthesis thread: {e}")))?
    };
    Ok((
        TextInput {
            chunker: ClauseChunker::new(config.chunker),
            tx: Some(text_tx),
            cancelled: Arc::clone(&cancelled),
        },
        AudioOutput {
            rx: Some(audio_rx),
            cancelled,
            run_options,
            worker: Some(worker),
            timeline: Timeline::default(),
        },
    ))
}

/// The text side: give it the LLM's deltas, then [`TextInput::finish`].
#[derive(Debug)]
pub struct TextInput {
    chunker: ClauseChunker,
    tx: Option<SyncSender<TextChunk>>,
    cancelled: Arc<AtomicBool>,
}

impl TextInput {
    /// Adds text; complete chunks go to the worker (blocking while [`TEXT_QUEUE_CAP`] chunks
    /// wait). Errors with [`TtsError::Cancelled`] once the stream was cancelled.
    pub fn push(&mut self, delta: &str) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(TtsError::Cancelled);
        }
        for chunk in self.chunker.push(delta) {
            self.send(chunk)?;
        }
        Ok(())
    }

    /// Sends the rest of the text; the audio side ends after the last chunk.
    pub fn finish(mut self) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(TtsError::Cancelled);
        }
        if let Some(chunk) = self.chunker.finish() {
            self.send(chunk)?;
        }
        self.tx = None;
        Ok(())
    }

    fn send(&mut self, chunk: TextChunk) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .expect("the sender lives until finish(), which consumes self");
        tx.send(chunk).map_err(|_| {
            if self.cancelled.load(Ordering::SeqCst) {
                TtsError::Cancelled
            } else {
                TtsError::WorkerGone("the synthesis thread has ended".into())
            }
        })
    }
}

/// The audio side: chunks in order, then the end; cancel at any time.
pub struct AudioOutput {
    rx: Option<Receiver<Result<AudioChunk>>>,
    cancelled: Arc<AtomicBool>,
    run_options: Arc<RunOptions>,
    worker: Option<JoinHandle<()>>,
    timeline: Timeline,
}

impl std::fmt::Debug for AudioOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioOutput")
            .field("chunks", &self.timeline.chunks.len())
            .field("cancelled", &self.cancelled.load(Ordering::SeqCst))
            .finish()
    }
}

impl AudioOutput {
    /// The next chunk, waiting for it; `None` at the end of the stream. A chunk that failed to
    /// synthesize is an `Err`; later chunks still follow.
    pub fn recv(&mut self) -> Option<Result<AudioChunk>> {
        let item = self.rx.as_ref()?.recv().ok()?;
        if let Ok(chunk) = &item {
            self.timeline.record(chunk);
        }
        Some(item)
    }

    /// What was heard at `played` samples (at the output rate) into the stream.
    pub fn heard(&self, played: u64) -> Heard {
        self.timeline.heard(played)
    }

    /// Stops now: aborts the model run in flight, drops queued text and audio, waits for the
    /// worker thread to end, and reports what was heard at `played`.
    pub fn cancel(mut self, played: u64) -> Heard {
        self.stop();
        self.timeline.heard(played)
    }

    fn stop(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Err(e) = self.run_options.terminate() {
            tracing::warn!(error = %e, "could not abort the running synthesis");
        }
        // Dropping the receiver wakes a worker blocked on a full audio queue.
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("the synthesis thread panicked");
            }
        }
    }
}

impl Drop for AudioOutput {
    fn drop(&mut self) {
        // Nothing outlives the stream: the worker is stopped and joined.
        if self.worker.is_some() {
            self.stop();
        }
    }
}

fn worker(
    voice: Arc<Mutex<PiperVoice>>,
    config: StreamConfig,
    text_rx: Receiver<TextChunk>,
    audio_tx: SyncSender<Result<AudioChunk>>,
    cancelled: Arc<AtomicBool>,
    run_options: Arc<RunOptions>,
) {
    loop {
        if cancelled.load(Ordering::SeqCst) {
            return;
        }
        let chunk = match text_rx.recv_timeout(IDLE_POLL) {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let result = synthesize_chunk(&voice, &config, chunk, &run_options);
        if cancelled.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = &result {
            tracing::warn!(error = %e, "a chunk could not be synthesized");
        }
        if audio_tx.send(result).is_err() {
            return;
        }
    }
}

fn synthesize_chunk(
    voice: &Mutex<PiperVoice>,
    config: &StreamConfig,
    chunk: TextChunk,
    run_options: &RunOptions,
) -> Result<AudioChunk> {
    let normalized = if config.normalize {
        normalize::normalize(&chunk.text)
    } else {
        normalize::passthrough(&chunk.text)
    };
    if !normalized.skipped.is_empty() {
        let list: Vec<String> = normalized.skipped.iter().map(ToString::to_string).collect();
        // The chunk carries the list for the caller to report; this is for the logs.
        tracing::debug!(chunk = chunk.index, skipped = %list.join(", "), "left out of the speech");
    }
    let (sentences, voice_rate, timed_by_model) = {
        let mut v = voice.lock().unwrap_or_else(|p| p.into_inner());
        let sentences = if normalized.spoken.is_empty() {
            Vec::new()
        } else {
            v.synthesize_with(&normalized.spoken, run_options)?
        };
        (sentences, v.sample_rate(), v.has_durations())
    };
    let mut samples = Vec::new();
    let mut spoken_ends = Vec::new();
    for s in &sentences {
        let base = samples.len() as u64;
        spoken_ends.extend(
            sentence_word_ends(s, &normalized.spoken)
                .into_iter()
                .map(|(end, t)| (end, base + t)),
        );
        samples.extend_from_slice(&s.samples);
    }
    let mut word_ends = source_word_ends(&normalized.words, &spoken_ends, samples.len() as u64);
    let sample_rate = config.output_rate.unwrap_or(voice_rate);
    if sample_rate != voice_rate {
        samples = resample(&samples, voice_rate, sample_rate)?;
        for (_, t) in &mut word_ends {
            *t = *t * u64::from(sample_rate) / u64::from(voice_rate);
        }
    }
    if config.trim_lead_in && chunk.index == 0 {
        trim_lead_in(&mut samples, &mut word_ends, sample_rate);
    }
    Ok(AudioChunk {
        index: chunk.index,
        text: chunk.text,
        samples,
        sample_rate,
        skipped: normalized.skipped,
        word_ends,
        timed_by_model,
    })
}

/// Drops the silence before the first sound but [`LEAD_IN_KEEP_S`] of it, moving the word times
/// with the audio; returns the samples dropped.
fn trim_lead_in(samples: &mut Vec<f32>, word_ends: &mut [(usize, u64)], rate: u32) -> usize {
    let Some(onset) = samples.iter().position(|s| s.abs() > LEAD_IN_SILENCE) else {
        return 0;
    };
    let cut = onset.saturating_sub((LEAD_IN_KEEP_S * f64::from(rate)) as usize);
    samples.drain(..cut);
    for (_, t) in word_ends {
        *t = t.saturating_sub(cut as u64);
    }
    cut
}

/// When each whitespace-separated word of a sentence's spoken text ends, in samples into the
/// sentence: `(byte end in spoken text, sample)`.
///
/// With a model that outputs durations (exported with `piper.patch_voice_with_alignment`) the
/// samples per phoneme id are the model's. The default voice (joe-medium) has no such output, so
/// its durations are **estimated**: the sentence's samples are shared equally among its phoneme
/// ids, so each word lasts in proportion to its phoneme count. Words are matched to phoneme
/// groups (phonemes between spaces); when espeak-ng joined or split words and the counts differ,
/// each word gets a share proportional to its letters instead.
pub fn sentence_word_ends(s: &SentenceAudio, spoken: &str) -> Vec<(usize, u64)> {
    let span = &spoken[s.text.clone()];
    let words: Vec<usize> = word_end_offsets(span)
        .into_iter()
        .map(|e| s.text.start + e)
        .collect();
    if words.is_empty() {
        return Vec::new();
    }
    let total = s.samples.len() as f64;
    let n_ids = s.phoneme_ids.len();
    let per_id: Vec<f64> = match &s.id_samples {
        Some(d) if d.len() == n_ids => {
            // Scale so the durations add up to the audio actually produced.
            let sum: f64 = d.iter().map(|&x| f64::from(x)).sum::<f64>().max(1.0);
            d.iter().map(|&x| f64::from(x) * total / sum).collect()
        }
        _ => vec![total / n_ids.max(1) as f64; n_ids],
    };
    // Piper's layout: BOS PAD (phoneme PAD)* EOS, one id per phoneme for espeak voices.
    let one_id_each = n_ids == 2 * s.phonemes.len() + 3;
    let mut group_ends = Vec::new();
    if one_id_each {
        let mut t = per_id[0] + per_id[1];
        let mut in_word = false;
        for (k, p) in s.phonemes.iter().enumerate() {
            let dur = per_id[2 + 2 * k] + per_id[3 + 2 * k];
            if p == " " {
                if in_word {
                    group_ends.push(t);
                }
                in_word = false;
            } else {
                in_word = true;
            }
            t += dur;
        }
        if in_word {
            group_ends.push(t);
        }
    }
    let ends: Vec<f64> = if group_ends.len() == words.len() {
        group_ends
    } else {
        let letters: Vec<usize> = span
            .split_whitespace()
            .map(|w| w.chars().filter(|c| c.is_alphanumeric()).count().max(1))
            .collect();
        let sum: usize = letters.iter().sum();
        let mut acc = 0;
        letters
            .iter()
            .map(|l| {
                acc += l;
                total * acc as f64 / sum as f64
            })
            .collect()
    };
    words
        .into_iter()
        .zip(ends)
        .map(|(w, t)| (w, t.round().min(total) as u64))
        .collect()
}

fn word_end_offsets(s: &str) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut in_word = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            if in_word {
                ends.push(i);
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    if in_word {
        ends.push(s.len());
    }
    ends
}

/// Each source word is spoken when the last of its spoken words is.
fn source_word_ends(
    words: &[WordMap],
    spoken_ends: &[(usize, u64)],
    total: u64,
) -> Vec<(usize, u64)> {
    words
        .iter()
        .map(|w| {
            let t = spoken_ends
                .iter()
                .find(|(end, _)| *end >= w.spoken.end)
                .map_or(total, |&(_, t)| t);
            (w.source.end, t)
        })
        .collect()
}

/// Where each received chunk sits in the output, for "what was heard".
#[derive(Debug, Default)]
struct Timeline {
    chunks: Vec<ChunkSpan>,
    total: u64,
}

#[derive(Debug)]
struct ChunkSpan {
    text: String,
    start: u64,
    len: u64,
    word_ends: Vec<(usize, u64)>,
}

impl Timeline {
    fn record(&mut self, chunk: &AudioChunk) {
        let len = chunk.samples.len() as u64;
        self.chunks.push(ChunkSpan {
            text: chunk.text.clone(),
            start: self.total,
            len,
            word_ends: chunk.word_ends.clone(),
        });
        self.total += len;
    }

    fn heard(&self, played: u64) -> Heard {
        let mut parts: Vec<&str> = Vec::new();
        for c in &self.chunks {
            if played >= c.start + c.len {
                parts.push(&c.text);
                continue;
            }
            let into = played.saturating_sub(c.start);
            let end = c
                .word_ends
                .iter()
                .filter(|(_, t)| *t <= into)
                .map(|&(e, _)| e)
                .max();
            if let Some(end) = end {
                parts.push(&c.text[..end]);
            }
            break;
        }
        Heard {
            text: parts.join(" ").trim().to_string(),
            position: played,
            all_received: played >= self.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentence(samples: usize, phonemes: &str, text: std::ops::Range<usize>) -> SentenceAudio {
        let phonemes: Vec<String> = phonemes.chars().map(String::from).collect();
        let n = 2 * phonemes.len() + 3;
        SentenceAudio {
            samples: vec![0.0; samples],
            phoneme_ids: vec![0; n],
            phonemes,
            id_samples: None,
            text,
        }
    }

    #[test]
    fn words_last_in_proportion_to_their_phonemes() {
        // "ab cdef": 7 phonemes (space included) -> 17 ids of 10 samples each.
        let spoken = "ab cdef";
        let s = sentence(170, "ab cdef", 0..7);
        let ends = sentence_word_ends(&s, spoken);
        // BOS+PAD (20) + a,b (40) = 60; then space (20) + c,d,e,f (80) = 160.
        assert_eq!(ends, vec![(2, 60), (7, 160)]);
    }

    #[test]
    fn model_durations_are_used_when_present() {
        let spoken = "ab cd";
        let mut s = sentence(100, "ab cd", 0..5);
        // 13 ids: a long first word.
        s.id_samples = Some(vec![0, 0, 30, 0, 30, 0, 5, 0, 5, 0, 5, 0, 25]);
        assert_eq!(sentence_word_ends(&s, spoken), vec![(2, 60), (5, 75)]);
    }

    #[test]
    fn word_count_mismatch_falls_back_to_letters() {
        // espeak-ng joined "of the" into one phoneme group.
        let spoken = "of the day";
        let s = sentence(90, "ʌvðə dˈeɪ", 0..10);
        let ends = sentence_word_ends(&s, spoken);
        // Letters 2, 3, 3 of 8.
        assert_eq!(ends, vec![(2, 23), (6, 56), (10, 90)]);
    }

    #[test]
    fn the_lead_in_is_cut_to_a_few_milliseconds_and_word_times_follow() {
        let rate = 16_000;
        let mut samples = vec![0.0005f32; 640];
        samples.extend([0.3, -0.2, 0.1]);
        let mut word_ends = vec![(5, 700), (9, 30)];
        let cut = trim_lead_in(&mut samples, &mut word_ends, rate);
        assert_eq!(cut, 640 - 80);
        assert_eq!(samples.len(), 83);
        assert_eq!(samples[80], 0.3);
        assert_eq!(word_ends, vec![(5, 140), (9, 0)]);
        let mut silent = vec![0.0f32; 100];
        assert_eq!(trim_lead_in(&mut silent, &mut [], rate), 0);
        assert_eq!(silent.len(), 100);
    }

    #[test]
    fn heard_text_stops_at_the_last_word_fully_played() {
        let mut t = Timeline::default();
        for (i, (text, len, ends)) in [
            ("Hello there,", 100u64, vec![(5, 40), (12, 90)]),
            ("how are you?", 100, vec![(3, 30), (7, 60), (12, 95)]),
        ]
        .into_iter()
        .enumerate()
        {
            t.record(&AudioChunk {
                index: i,
                text: text.into(),
                samples: vec![0.0; len as usize],
                sample_rate: 16_000,
                skipped: Vec::new(),
                word_ends: ends,
                timed_by_model: false,
            });
        }
        assert_eq!(t.heard(0).text, "");
        assert_eq!(t.heard(45).text, "Hello");
        assert_eq!(t.heard(100).text, "Hello there,");
        assert_eq!(t.heard(165).text, "Hello there, how are");
        let end = t.heard(200);
        assert_eq!(end.text, "Hello there, how are you?");
        assert!(end.all_received);
    }
}
