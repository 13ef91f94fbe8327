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
use std::time::{Duration, Instant};

use ort::session::RunOptions;

use crate::chunker::{ChunkerConfig, ClauseChunker, TextChunk};
use crate::error::{Result, TtsError};
use crate::normalize::{self, Skipped, WordMap};
use crate::resample::StreamResampler;
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

/// The first sentence of a stream's first chunks ([`WINDOWED_CHUNKS`]) is decoded in windows of
/// latent frames (one frame is
/// `hop_length` samples, 11.6 ms with the default voice): a short first window, so the voice is
/// heard after the encoder and about 0.3 s of decoding, then each window [`WINDOW_GROWTH`] times
/// the last. The decoder runs some 20 times faster than real time here, so every window is
/// ready long before the audio ahead of it has played. Later sentences are decoded whole: each window costs
/// [`crate::voice::DECODER_CONTEXT_FRAMES`] of extra decoding on each side.
pub const FIRST_WINDOW_FRAMES: usize = 24;

/// The last chunk (by index) whose first sentence is decoded in windows. The first chunk is cut
/// short for the first audio, so the second is wanted soon after the LLM has finished its
/// sentence; with it decoded whole, replies went silent for 220-1020 ms after the first chunk
/// (`talkline bench`, `starved_ms` in the turn events).
const WINDOWED_CHUNKS: usize = 1;

/// Each window of the first sentence is this many times the one before: few windows (each costs
/// context frames), yet each decoded in a fraction of the playing time of the one before.
const WINDOW_GROWTH: usize = 4;

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
    /// Decode the stream's first sentence in windows of this many latent frames, then growing
    /// ([`FIRST_WINDOW_FRAMES`]); `None` decodes every sentence whole (one piece per chunk).
    pub first_window_frames: Option<usize>,
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
            first_window_frames: Some(FIRST_WINDOW_FRAMES),
        }
    }
}

/// Synthesized audio of one text chunk, or of a piece of it: a stream's first chunk arrives in
/// several pieces, the first as soon as its first window is decoded ([`FIRST_WINDOW_FRAMES`]).
#[derive(Debug, Clone)]
pub struct AudioChunk {
    /// The text chunk's index; its pieces share it.
    pub index: usize,
    /// The words (as pushed, before normalisation) whose end is heard in this piece; all of the
    /// chunk's text when it comes whole. Empty for a piece within a word.
    pub text: String,
    /// This piece ends its text chunk.
    pub ends_chunk: bool,
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

    /// Chunks handed to the voice so far.
    pub fn chunks_sent(&self) -> usize {
        self.chunker.chunks_emitted()
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
        if chunk.index == 0 {
            // A count only: never the words.
            tracing::debug!(
                words = chunk.text.split_whitespace().count(),
                "the first chunk goes to the voice"
            );
        }
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
        let mut send = |piece: AudioChunk| {
            !cancelled.load(Ordering::SeqCst) && audio_tx.send(Ok(piece)).is_ok()
        };
        match synthesize_chunk(&voice, &config, chunk, &run_options, &mut send) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                if cancelled.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(error = %e, "a chunk could not be synthesized");
                if audio_tx.send(Err(e)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Synthesizes one text chunk, handing each piece of audio to `emit` as soon as it exists;
/// `Ok(false)` when `emit` refused one (the stream was cancelled or its reader is gone).
fn synthesize_chunk(
    voice: &Mutex<PiperVoice>,
    config: &StreamConfig,
    chunk: TextChunk,
    run_options: &RunOptions,
    emit: &mut dyn FnMut(AudioChunk) -> bool,
) -> Result<bool> {
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
    // The lock is taken for each model run, not for the chunk: another stream on the same voice
    // may run between two windows, and no lock is held while a piece waits in the audio queue.
    let lock = || voice.lock().unwrap_or_else(|p| p.into_inner());
    let (voice_rate, timed_by_model, streams) = {
        let v = lock();
        (v.sample_rate(), v.has_durations(), v.can_stream())
    };
    let out_rate = config.output_rate.unwrap_or(voice_rate);
    let mut resampler = StreamResampler::new(voice_rate, out_rate)?;
    let spoken = normalized.spoken.as_str();
    let mut pieces = Pieces {
        index: chunk.index,
        text: &chunk.text,
        words: &normalized.words,
        skipped: normalized.skipped.clone(),
        timed_by_model,
        voice_rate,
        out_rate,
        trim_lead_in: config.trim_lead_in && chunk.index == 0,
        ..Pieces::default()
    };
    // (byte end in `spoken`, sample at the voice's rate into the chunk) of every spoken word.
    let mut spoken_ends: Vec<(usize, u64)> = Vec::new();

    if !streams || spoken.is_empty() {
        let sentences = match spoken.is_empty() {
            true => Vec::new(),
            false => lock().synthesize_with(spoken, run_options)?,
        };
        let mut samples = Vec::new();
        for s in &sentences {
            let base = samples.len() as u64;
            spoken_ends.extend(
                sentence_word_ends(s, spoken)
                    .into_iter()
                    .map(|(end, t)| (end, base + t)),
            );
            samples.extend_from_slice(&s.samples);
        }
        let mut out = resampler.push(&samples)?;
        out.extend(resampler.finish()?);
        return Ok(pieces.next(out, &spoken_ends, true).is_none_or(&mut *emit));
    }

    let sentences = {
        let mut v = lock();
        let clauses = v.clauses(spoken)?;
        v.sentence_ids(&clauses)
    };
    let mut base = 0u64;
    let count = sentences.len();
    if count == 0 {
        return Ok(pieces
            .next(Vec::new(), &spoken_ends, true)
            .is_none_or(&mut *emit));
    }
    for (k, (phonemes, ids, span)) in sentences.into_iter().enumerate() {
        let encoding = Instant::now();
        let encoded = lock().encode(&ids, run_options)?;
        let encode_ms = encoding.elapsed().as_secs_f64() * 1000.0;
        let total = encoded.samples();
        spoken_ends.extend(
            word_ends_in(
                total,
                &phonemes,
                ids.len(),
                encoded.id_samples.as_deref(),
                span,
                spoken,
            )
            .into_iter()
            .map(|(end, t)| (end, base + t)),
        );
        let frames = encoded.frames();
        // The first sentence of a reply is decoded in windows of `first` frames, then each
        // [`WINDOW_GROWTH`] times the last; a window that was all lead-in silence (and sent
        // nothing) does not count, so the first sound still comes in a short window.
        let mut window = match config.first_window_frames {
            Some(first) if chunk.index <= WINDOWED_CHUNKS && k == 0 => first.max(1),
            _ => frames,
        };
        let mut start = 0;
        loop {
            let end = (start + window).min(frames);
            let decoding = Instant::now();
            let samples = lock().decode(&encoded, start..end, run_options)?;
            if chunk.index == 0 && k == 0 && start == 0 {
                tracing::debug!(
                    encode_ms,
                    decode_ms = decoding.elapsed().as_secs_f64() * 1000.0,
                    ids = ids.len(),
                    frames = end,
                    "the first window is voiced"
                );
            }
            let last = k + 1 == count && end == frames;
            let mut out = resampler.push(&samples)?;
            if last {
                out.extend(resampler.finish()?);
            }
            if let Some(piece) = pieces.next(out, &spoken_ends, last) {
                if !emit(piece) {
                    return Ok(false);
                }
                window *= WINDOW_GROWTH;
            }
            if end == frames {
                break;
            }
            start = end;
        }
        base += total as u64;
    }
    Ok(true)
}

/// Cuts one text chunk's audio into pieces, giving each piece the words whose end it holds.
#[derive(Default)]
struct Pieces<'a> {
    index: usize,
    text: &'a str,
    words: &'a [WordMap],
    /// Reported with the first piece.
    skipped: Vec<Skipped>,
    timed_by_model: bool,
    voice_rate: u32,
    out_rate: u32,
    trim_lead_in: bool,
    /// The first word not yet given to a piece.
    next_word: usize,
    /// Bytes of `text` given to pieces so far.
    text_done: usize,
    /// Output samples emitted so far (after the lead-in trim).
    emitted: u64,
    /// Output samples cut from the lead-in (those held in `lead_in` included).
    trimmed: u64,
    /// The end of a silent first piece, kept in case the sound's onset follows in the next.
    lead_in: Vec<f32>,
    started: bool,
}

impl Pieces<'_> {
    /// The next piece: `samples` at the output rate, `spoken_ends` as far as known (voice rate,
    /// into the chunk), `last` for the chunk's final piece.
    /// `None` while everything so far is the first chunk's silent lead-in, which is dropped.
    fn next(
        &mut self,
        mut samples: Vec<f32>,
        spoken_ends: &[(usize, u64)],
        last: bool,
    ) -> Option<AudioChunk> {
        if !self.started && !samples.is_empty() {
            if self.trim_lead_in {
                let mut held = std::mem::take(&mut self.lead_in);
                self.trimmed -= held.len() as u64;
                held.append(&mut samples);
                samples = held;
                let cut = trim_lead_in(&mut samples, &mut [], self.out_rate);
                self.trimmed += cut as u64;
                let silent = samples.iter().all(|s| s.abs() <= LEAD_IN_SILENCE);
                if silent && !last {
                    // A long pause before the first word (Piper's durations are random) can fill
                    // the whole first window: nothing of it is sent, but the end of it may be
                    // the sound's lead-in, so that much waits for the next piece.
                    let keep = (LEAD_IN_KEEP_S * f64::from(self.out_rate)) as usize;
                    self.lead_in = samples.split_off(samples.len().saturating_sub(keep));
                    self.trimmed += samples.len() as u64 + self.lead_in.len() as u64;
                    return None;
                }
            }
            self.started = true;
        }
        let start = self.emitted;
        let end = start + samples.len() as u64;
        let mut word_ends = Vec::new();
        let mut text_end = self.text_done;
        while let Some(word) = self.words.get(self.next_word) {
            let at = spoken_ends
                .iter()
                .find(|(spoken_end, _)| *spoken_end >= word.spoken.end)
                .map(|&(_, t)| {
                    (t * u64::from(self.out_rate) / u64::from(self.voice_rate))
                        .saturating_sub(self.trimmed)
                });
            let at = match at {
                Some(t) if t <= end => t,
                _ if last => end,
                _ => break,
            };
            word_ends.push((word.source.end, at.max(start) - start));
            text_end = text_end.max(word.source.end);
            self.next_word += 1;
        }
        if last {
            text_end = self.text.len();
        }
        let raw = self.text.get(self.text_done..text_end).unwrap_or("");
        let piece_start = self.text_done + (raw.len() - raw.trim_start().len());
        let text = self
            .text
            .get(piece_start..text_end)
            .unwrap_or("")
            .to_string();
        let word_ends = word_ends
            .into_iter()
            .map(|(e, t): (usize, u64)| (e.saturating_sub(piece_start).min(text.len()), t))
            .collect();
        self.text_done = text_end.max(self.text_done);
        self.emitted = end;
        Some(AudioChunk {
            index: self.index,
            text,
            ends_chunk: last,
            samples,
            sample_rate: self.out_rate,
            skipped: std::mem::take(&mut self.skipped),
            word_ends,
            timed_by_model: self.timed_by_model,
        })
    }
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
    word_ends_in(
        s.samples.len(),
        &s.phonemes,
        s.phoneme_ids.len(),
        s.id_samples.as_deref(),
        s.text.clone(),
        spoken,
    )
}

/// [`sentence_word_ends`] from what the encoder already knows: the sentence's length in
/// samples, its phonemes and their ids, and the model's durations if it reports them.
fn word_ends_in(
    total: usize,
    phonemes: &[String],
    n_ids: usize,
    id_samples: Option<&[u32]>,
    text: std::ops::Range<usize>,
    spoken: &str,
) -> Vec<(usize, u64)> {
    let span = spoken.get(text.clone()).unwrap_or("");
    let words: Vec<usize> = word_end_offsets(span)
        .into_iter()
        .map(|e| text.start + e)
        .collect();
    if words.is_empty() {
        return Vec::new();
    }
    let total = total as f64;
    let per_id: Vec<f64> = match id_samples {
        Some(d) if d.len() == n_ids => {
            // Scale so the durations add up to the audio actually produced.
            let sum: f64 = d.iter().map(|&x| f64::from(x)).sum::<f64>().max(1.0);
            d.iter().map(|&x| f64::from(x) * total / sum).collect()
        }
        _ => vec![total / n_ids.max(1) as f64; n_ids],
    };
    // Piper's layout: BOS PAD (phoneme PAD)* EOS, one id per phoneme for espeak voices.
    let one_id_each = n_ids == 2 * phonemes.len() + 3;
    let mut group_ends = Vec::new();
    if one_id_each {
        let mut t = per_id[0] + per_id[1];
        let mut in_word = false;
        for (k, p) in phonemes.iter().enumerate() {
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
                if !c.text.is_empty() {
                    parts.push(&c.text);
                }
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
    fn a_first_window_of_pure_lead_in_is_not_sent() {
        let rate = 16_000;
        let mut pieces = Pieces {
            index: 0,
            text: "The American Heart Association",
            voice_rate: rate,
            out_rate: rate,
            trim_lead_in: true,
            ..Pieces::default()
        };
        // Piper sometimes opens a sentence with a third of a second of near-silence.
        let silence = vec![0.001f32; 4_480];
        assert!(pieces.next(silence, &[], false).is_none());
        let mut sound = vec![0.001f32; 1_600];
        sound.extend([0.3, -0.2]);
        let piece = pieces.next(sound, &[], false).expect("the sound is sent");
        let keep = (LEAD_IN_KEEP_S * f64::from(rate)) as usize;
        assert_eq!(piece.samples.len(), keep + 2);
        assert_eq!(piece.samples[keep], 0.3);
        assert_eq!(pieces.trimmed, (4_480 + 1_600 - keep) as u64);
        let rest = pieces
            .next(vec![0.0; 10], &[], true)
            .expect("the last piece");
        assert_eq!(
            rest.samples.len(),
            10,
            "only the first sound's lead-in is cut"
        );
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
                ends_chunk: true,
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
