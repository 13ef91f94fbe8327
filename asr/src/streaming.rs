//! [`StreamingRecognizer`]: live 16 kHz audio in, transcript events out.
//!
//! Sans-I/O: the recognizer is told the media time with every push, never reads a clock and never
//! runs Whisper itself. It asks for decodes ([`StreamingRecognizer::poll_decode`]); whoever drives
//! it runs them (inline in [`crate::offline`], on inference threads in the runtime) and hands the
//! results back. That keeps the policy (when to decode, what to commit) testable and the heavy
//! work off the caller's thread.
//!
//! Policy:
//! - The VAD gates everything: no speech, no decode.
//! - While the user speaks, the utterance is re-decoded every `hop_s` of media time, prompted with
//!   the text already trimmed from the window. Words are committed once two consecutive
//!   hypotheses agree on them (LocalAgreement-2); a committed word never changes.
//! - When a pause begins, a decode is requested at once; if the pause becomes the end of speech,
//!   that decode is the final one, so the `Final` costs no extra decode after the endpoint. A
//!   partial already running on audio that reaches the pause is that decode; one on older audio
//!   is abandoned.
//! - The window is cut at committed sentence ends once it is long, and never exceeds
//!   `max_window_s`.

use std::collections::VecDeque;

use crate::error::Result;
use crate::vad::{Endpointer, SpeechProbability, VadConfig, VadEvent};
use crate::whisper::{join_words, Hypothesis, Word, SAMPLE_RATE};

/// Events waiting for the caller. Policy when full: drop the oldest `Partial` (a newer one
/// supersedes it); other events are never dropped, and the queue can only hold a bounded number of
/// them per utterance, so the bound holds if the caller polls at least once per utterance.
pub const EVENT_QUEUE_CAPACITY: usize = 64;

/// Recognizer settings.
#[derive(Debug, Clone)]
pub struct StreamingConfig {
    /// Media time between partial re-decodes while the user speaks.
    pub hop_s: f64,
    /// Audio kept from before the VAD's speech start (onsets are often scored late).
    pub pre_roll_s: f64,
    /// Window length past which it is cut at the last committed sentence end.
    pub trim_after_s: f64,
    /// Hard bound of the decoded window.
    pub max_window_s: f64,
    pub vad: VadConfig,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            hop_s: 0.3,
            pre_roll_s: 0.25,
            trim_after_s: 8.0,
            max_window_s: 15.0,
            vad: VadConfig::default(),
        }
    }
}

/// Transcript events. Times are media seconds.
#[derive(Debug, Clone, PartialEq)]
pub enum AsrEvent {
    SpeechStarted {
        at: f64,
    },
    /// `committed` only ever grows within an utterance; `tentative` may change.
    Partial {
        committed: String,
        tentative: String,
        /// Media time of the newest audio in the decode.
        audio_end: f64,
    },
    /// A pause inside speech began at `at` (the turn manager may speculate from here).
    Paused {
        at: f64,
    },
    /// The user went on after a pause.
    Resumed {
        at: f64,
    },
    /// The endpoint: speech stopped at `at` (detected `min_silence_s` later).
    SpeechEnded {
        at: f64,
    },
    Final {
        text: String,
        start: f64,
        end: f64,
        words: Vec<Word>,
        /// Wall time of the decode this Final came from.
        decode_ms: f64,
        /// True when that decode was the one started at the pause (no decode after the endpoint).
        from_pause_decode: bool,
    },
}

/// A decode the driver must run: `audio` is 16 kHz mono, `prompt` conditions the decoder.
#[derive(Debug, Clone)]
pub struct DecodeRequest {
    pub id: u64,
    pub audio: Vec<f32>,
    pub prompt: String,
    /// The window may become the utterance's `Final`: it was asked for at a pause or at the end
    /// of speech. The reply waits on such a decode, so it may be given more threads.
    pub may_be_final: bool,
}

/// Known Whisper hallucinations on non-speech, dropped when Whisper itself doubts there was speech.
const HALLUCINATIONS: &[&str] = &[
    "thank you",
    "thanks for watching",
    "thank you for watching",
    "you",
    "bye",
    "so",
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Purpose {
    Partial,
    /// Requested at the endpoint: its result becomes the `Final`.
    Final,
}

/// Media times are sums of sample counts over the rate; equal instants may differ by rounding.
const HALF_SAMPLE_S: f64 = 0.5 / SAMPLE_RATE as f64;

/// Windows shorter than this produce partials but commit nothing.
const MIN_COMMIT_WINDOW_S: f64 = 1.0;

#[derive(Debug)]
struct InFlight {
    id: u64,
    utterance: u64,
    purpose: Purpose,
    /// Requested when a pause began: the window ends in silence, so its last word is whole.
    at_pause: bool,
    /// Media times the decoded audio spans.
    audio_start: f64,
    audio_end: f64,
}

#[derive(Debug)]
struct Utterance {
    id: u64,
    start: f64,
    /// Audio from `buffer_start` on.
    buffer: Vec<f32>,
    buffer_start: f64,
    /// Committed words already cut from the window (the decoder's prompt).
    context: Vec<Word>,
    /// Committed words inside the window.
    committed: Vec<Word>,
    /// The uncommitted rest of the previous hypothesis, for LocalAgreement-2.
    previous: Vec<Word>,
    last_decode_requested: f64,
    /// The due decode was requested by a pause.
    due_at_pause: bool,
    /// The newest finished decode: (audio end, words).
    latest: Option<(f64, Vec<Word>)>,
    /// Set at the endpoint: where speech stopped.
    ended_at: Option<f64>,
    /// Wall time of the newest finished decode, and whether it started at a pause.
    latest_decode_ms: f64,
    latest_at_pause: bool,
    /// Ended, and `latest` covers the audio up to the end: the Final can go out.
    final_ready: bool,
}

impl Utterance {
    fn buffer_end(&self) -> f64 {
        self.buffer_start + self.buffer.len() as f64 / SAMPLE_RATE as f64
    }

    fn committed_text(&self) -> String {
        let all: Vec<Word> = self
            .context
            .iter()
            .chain(&self.committed)
            .cloned()
            .collect();
        join_words(&all)
    }

    fn prompt(&self) -> String {
        // Whisper's prompt is capped at half its 448-token context; the recent text matters most.
        const PROMPT_CHARS: usize = 200;
        let text = join_words(&self.context);
        let cut = text.len().saturating_sub(PROMPT_CHARS);
        let cut = (cut..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[cut..].trim_start().to_string()
    }
}

pub struct StreamingRecognizer {
    config: StreamingConfig,
    vad: Box<dyn SpeechProbability>,
    endpointer: Endpointer,
    /// Audio not yet scored by the VAD.
    vad_pending: Vec<f32>,
    /// Media time of `vad_pending[0]`.
    vad_pending_start: f64,
    /// The last `pre_roll_s` of audio while nobody speaks.
    pre_roll: VecDeque<f32>,
    utterance: Option<Utterance>,
    next_utterance: u64,
    next_decode: u64,
    in_flight: Option<InFlight>,
    /// Decodes given up on while they ran (their result would come too late to matter): the
    /// driver should abort them so the decode that replaced them starts at once.
    abandoned: VecDeque<u64>,
    /// Ended utterances, oldest first, whose Finals are not out yet: a Final waits for its decode,
    /// and Finals leave in utterance order.
    finishing: VecDeque<Utterance>,
    events: VecDeque<AsrEvent>,
    dropped_partials: u64,
    now: f64,
}

impl StreamingRecognizer {
    pub fn new(config: StreamingConfig, vad: Box<dyn SpeechProbability>) -> Self {
        StreamingRecognizer {
            endpointer: Endpointer::new(config.vad.clone()),
            config,
            vad,
            vad_pending: Vec::new(),
            vad_pending_start: 0.0,
            pre_roll: VecDeque::new(),
            utterance: None,
            next_utterance: 0,
            next_decode: 0,
            in_flight: None,
            abandoned: VecDeque::new(),
            finishing: VecDeque::new(),
            events: VecDeque::new(),
            dropped_partials: 0,
            now: 0.0,
        }
    }

    pub fn vad_name(&self) -> &'static str {
        self.vad.name()
    }

    pub fn endpointer_mut(&mut self) -> &mut Endpointer {
        &mut self.endpointer
    }

    /// Samples held for the current utterance (bounded by `max_window_s`).
    pub fn buffered_samples(&self) -> usize {
        self.utterance.as_ref().map_or(0, |u| u.buffer.len())
            + self.finishing.iter().map(|u| u.buffer.len()).sum::<usize>()
            + self.pre_roll.len()
            + self.vad_pending.len()
    }

    pub fn dropped_partials(&self) -> u64 {
        self.dropped_partials
    }

    /// Feeds 16 kHz mono audio whose first sample is at media time `timestamp`. Samples must be
    /// finite (see [`crate::audio::sanitize`]).
    pub fn push_audio(&mut self, timestamp: f64, samples: &[f32]) -> Result<()> {
        if self.vad_pending.is_empty() {
            self.vad_pending_start = timestamp;
        }
        self.vad_pending.extend_from_slice(samples);
        let window = self.vad.window_samples();
        let mut consumed = 0;
        while self.vad_pending.len() - consumed >= window {
            let start = self.vad_pending_start + consumed as f64 / SAMPLE_RATE as f64;
            let end = start + window as f64 / SAMPLE_RATE as f64;
            let chunk = &self.vad_pending[consumed..consumed + window];
            let probability = self.vad.probability(chunk)?;
            let chunk = chunk.to_vec();
            consumed += window;
            self.now = end;
            self.take_audio(&chunk);
            if let Some(event) = self.endpointer.on_window(start, end, probability) {
                self.on_vad(event);
            }
            self.schedule_partial();
        }
        self.vad_pending.drain(..consumed);
        self.vad_pending_start += consumed as f64 / SAMPLE_RATE as f64;
        Ok(())
    }

    /// When [`StreamingRecognizer::handle_timeout`] must be called if no audio arrives.
    pub fn poll_timeout(&self) -> Option<f64> {
        self.endpointer.poll_timeout()
    }

    /// Advances media time without audio (the transport went quiet): ends speech on time.
    pub fn handle_timeout(&mut self, now: f64) {
        self.now = self.now.max(now);
        if let Some(event) = self.endpointer.handle_timeout(now) {
            self.on_vad(event);
        }
    }

    pub fn poll_event(&mut self) -> Option<AsrEvent> {
        self.events.pop_front()
    }

    /// The next decode to run, if one is due and none is in flight (one at a time per stream).
    pub fn poll_decode(&mut self) -> Option<DecodeRequest> {
        if self.in_flight.is_some() {
            return None;
        }
        // A finishing utterance goes first: its Final is what the turn manager waits for.
        let waiting = self.finishing.iter_mut().find(|u| !u.final_ready);
        let (purpose, utterance) = match (waiting, &mut self.utterance) {
            (Some(u), _) => (Purpose::Final, u),
            (None, Some(u)) if u.last_decode_requested.is_nan() => (Purpose::Partial, u),
            _ => return None,
        };
        let id = self.next_decode;
        self.next_decode += 1;
        let audio_end = utterance.buffer_end();
        let at_pause = std::mem::take(&mut utterance.due_at_pause);
        self.in_flight = Some(InFlight {
            id,
            utterance: utterance.id,
            purpose,
            at_pause,
            audio_start: utterance.buffer_start,
            audio_end,
        });
        utterance.last_decode_requested = self.now;
        Some(DecodeRequest {
            id,
            audio: utterance.buffer.clone(),
            prompt: utterance.prompt(),
            may_be_final: at_pause || purpose == Purpose::Final,
        })
    }

    /// A decode this recognizer no longer waits for: the driver may abort it (its result, if it
    /// still comes, is ignored) and should then ask [`StreamingRecognizer::poll_decode`] again.
    pub fn poll_abandoned_decode(&mut self) -> Option<u64> {
        self.abandoned.pop_front()
    }

    fn abandon_in_flight(&mut self) {
        if let Some(f) = self.in_flight.take() {
            // At most one decode is in flight, and the driver drains this after every push: the
            // bound only matters for a driver that never looks.
            if self.abandoned.len() >= 8 {
                self.abandoned.pop_front();
            }
            self.abandoned.push_back(f.id);
        }
    }

    /// Hands back the result of the decode `id`; `decode_ms` is its wall time.
    pub fn on_decode_result(&mut self, id: u64, result: Result<Hypothesis>, decode_ms: f64) {
        let Some(flight) = self.in_flight.take_if(|f| f.id == id) else {
            tracing::debug!(id, "a stale decode result (its utterance ended meanwhile)");
            return;
        };
        let hypothesis = match result {
            Ok(h) => clean(h),
            Err(e) => {
                tracing::warn!("decode failed: {e}");
                Hypothesis::default()
            }
        };
        // Word times are relative to the decoded audio.
        let words: Vec<Word> = hypothesis
            .words
            .into_iter()
            .map(|w| Word {
                start: w.start + flight.audio_start,
                end: (w.end + flight.audio_start).min(flight.audio_end),
                text: w.text,
            })
            .collect();

        if let Some(u) = self.finishing.iter_mut().find(|u| u.id == flight.utterance) {
            u.latest_decode_ms = decode_ms;
            u.latest_at_pause = flight.at_pause;
            u.latest = Some((flight.audio_end, words));
            u.final_ready = true;
            self.flush_finals();
            return;
        }
        let Some(u) = self.utterance.as_mut().filter(|u| u.id == flight.utterance) else {
            return; // the utterance was dropped meanwhile
        };
        debug_assert_eq!(flight.purpose, Purpose::Partial);
        // Whisper is unreliable on very short windows, and the last word of a window that ends
        // mid-speech is often cut: neither is committed.
        let window_s = flight.audio_end - flight.audio_start;
        let hold_back = if flight.at_pause { 0 } else { 1 };
        if window_s >= MIN_COMMIT_WINDOW_S {
            agree(u, &words, hold_back);
        } else {
            u.previous = after_committed(&words, &u.committed, &u.context).to_vec();
        }
        u.latest_decode_ms = decode_ms;
        u.latest_at_pause = flight.at_pause;
        u.latest = Some((flight.audio_end, words));
        let partial = AsrEvent::Partial {
            committed: u.committed_text(),
            tentative: join_words(&u.previous),
            audio_end: flight.audio_end,
        };
        self.trim();
        self.push_event(partial);
    }

    fn take_audio(&mut self, chunk: &[f32]) {
        match &mut self.utterance {
            Some(u) => u.buffer.extend_from_slice(chunk),
            None => {
                self.pre_roll.extend(chunk.iter().copied());
                let keep = (self.config.pre_roll_s * SAMPLE_RATE as f64) as usize;
                let excess = self.pre_roll.len().saturating_sub(keep);
                self.pre_roll.drain(..excess);
            }
        }
        self.enforce_max_window();
    }

    fn on_vad(&mut self, event: VadEvent) {
        match event {
            VadEvent::SpeechStarted { at } => {
                // Speech again while the previous Final is still decoding: that one goes on.
                let pre_roll: Vec<f32> = self.pre_roll.drain(..).collect();
                let buffer_start = self.now - pre_roll.len() as f64 / SAMPLE_RATE as f64;
                self.utterance = Some(Utterance {
                    id: self.next_utterance,
                    start: at,
                    buffer: pre_roll,
                    buffer_start,
                    context: Vec::new(),
                    committed: Vec::new(),
                    previous: Vec::new(),
                    last_decode_requested: f64::NEG_INFINITY,
                    due_at_pause: false,
                    latest: None,
                    ended_at: None,
                    latest_decode_ms: 0.0,
                    latest_at_pause: false,
                    final_ready: false,
                });
                self.next_utterance += 1;
                self.push_event(AsrEvent::SpeechStarted { at });
            }
            VadEvent::PauseStarted { at } => {
                // Decode now: if the pause turns out to be the endpoint, this is the final decode.
                if let Some(u) = &mut self.utterance {
                    // A partial requested after the speech stopped already is the pause decode,
                    // part done: its window ends in the silence too.
                    let reaching = self
                        .in_flight
                        .as_mut()
                        .filter(|f| f.utterance == u.id && f.audio_end >= at - HALF_SAMPLE_S);
                    if let Some(f) = reaching {
                        tracing::debug!(id = f.id, "the partial running reaches the pause");
                        f.at_pause = true;
                        self.push_event(AsrEvent::Paused { at });
                        return;
                    }
                    u.last_decode_requested = f64::NAN;
                    u.due_at_pause = true;
                    // A decode of audio from before the pause is superseded by the pause decode,
                    // and waiting for it would delay the speculation and the Final by up to a
                    // whole decode.
                    let stale = self
                        .in_flight
                        .as_ref()
                        .is_some_and(|f| f.utterance == u.id && !f.at_pause);
                    if stale {
                        self.abandon_in_flight();
                    }
                }
                self.push_event(AsrEvent::Paused { at });
            }
            VadEvent::SpeechResumed { at } => self.push_event(AsrEvent::Resumed { at }),
            VadEvent::SpeechEnded { pause_at } => {
                self.push_event(AsrEvent::SpeechEnded { at: pause_at });
                let Some(mut u) = self.utterance.take() else {
                    return;
                };
                u.ended_at = Some(pause_at);
                let covers = |end: f64| end >= pause_at - HALF_SAMPLE_S;
                let latest_covers_pause = u.latest.as_ref().is_some_and(|(end, _)| covers(*end));
                let in_flight_covers_pause = self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.utterance == u.id && covers(f.audio_end));
                if latest_covers_pause {
                    u.final_ready = true;
                } else if in_flight_covers_pause {
                    // The pause decode is running: its result becomes the Final.
                    if let Some(f) = &mut self.in_flight {
                        f.purpose = Purpose::Final;
                    }
                    u.latest = None;
                } else if self.in_flight.as_ref().is_some_and(|f| f.utterance == u.id) {
                    // A stale partial is running; its result is ignored.
                    self.abandon_in_flight();
                }
                self.finishing.push_back(u);
                self.flush_finals();
            }
        }
    }

    /// Marks a partial decode as due every `hop_s` while in speech.
    fn schedule_partial(&mut self) {
        let hop = self.config.hop_s;
        if let Some(u) = &mut self.utterance {
            if !u.last_decode_requested.is_nan() && self.now - u.last_decode_requested >= hop {
                u.last_decode_requested = f64::NAN; // NaN marks "due"
            }
        }
    }

    /// Emits the Finals that are ready, in utterance order.
    fn flush_finals(&mut self) {
        while self.finishing.front().is_some_and(|u| u.final_ready) {
            let u = self.finishing.pop_front().expect("checked just above");
            self.emit_final(u);
        }
    }

    /// The Final is the context cut from the window plus the newest decode of the whole window.
    /// It is not bound by the committed words: those came from shorter windows, and the turn
    /// manager compares the Final with what it speculated on anyway.
    fn emit_final(&mut self, u: Utterance) {
        let mut words: Vec<Word> = u.context.clone();
        match &u.latest {
            Some((_, latest)) => {
                words.extend(drop_repeated_context(latest, &u.context).iter().cloned())
            }
            None => words.extend(u.committed.iter().cloned()),
        }
        let end = u.ended_at.unwrap_or(self.now);
        let event = AsrEvent::Final {
            text: join_words(&words),
            start: u.start,
            end,
            words,
            decode_ms: u.latest_decode_ms,
            from_pause_decode: u.latest_at_pause,
        };
        self.push_event(event);
    }

    fn push_event(&mut self, event: AsrEvent) {
        if self.events.len() >= EVENT_QUEUE_CAPACITY {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, AsrEvent::Partial { .. }))
            {
                self.events.remove(i);
                self.dropped_partials += 1;
            }
        }
        self.events.push_back(event);
    }

    /// Cuts the window at the last committed sentence end once it is long.
    fn trim(&mut self) {
        let Some(u) = &mut self.utterance else {
            return;
        };
        let duration = u.buffer_end() - u.buffer_start;
        if duration < self.config.trim_after_s {
            return;
        }
        let sentence_end = u
            .committed
            .iter()
            .rposition(|w| w.text.ends_with(['.', '?', '!']));
        let cut_after = match sentence_end {
            Some(i) => i,
            // Past the hard bound, any committed word will do.
            None if duration >= self.config.max_window_s && !u.committed.is_empty() => {
                u.committed.len() - 1
            }
            None => return,
        };
        let cut_time = u.committed[cut_after].end;
        let cut_samples = (((cut_time - u.buffer_start) * SAMPLE_RATE as f64).max(0.0) as usize)
            .min(u.buffer.len());
        u.buffer.drain(..cut_samples);
        u.buffer_start += cut_samples as f64 / SAMPLE_RATE as f64;
        let moved: Vec<Word> = u.committed.drain(..=cut_after).collect();
        u.context.extend(moved);
        u.latest = None;
    }

    /// Never let the window outgrow `max_window_s`: drop the oldest audio if trimming could not.
    fn enforce_max_window(&mut self) {
        let max = (self.config.max_window_s * SAMPLE_RATE as f64) as usize;
        for u in [&mut self.utterance].into_iter().flatten() {
            if u.buffer.len() > max {
                let excess = u.buffer.len() - max;
                tracing::warn!(
                    dropped_s = excess as f64 / SAMPLE_RATE as f64,
                    "ASR window full with nothing committed; dropping the oldest audio"
                );
                u.buffer.drain(..excess);
                u.buffer_start += excess as f64 / SAMPLE_RATE as f64;
            }
        }
    }
}

fn normalize(word: &str) -> String {
    word.chars()
        .filter(|c| c.is_alphanumeric() || *c == '\'')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The words of `hypothesis` (a decode of the whole window) after the `committed_in_window`
/// words already committed from this window.
///
/// Alignment is by text, not time: whisper.cpp's token times are too coarse (several words often
/// share one timestamp) to find the seam. When the hypothesis still starts with the committed
/// words, the new words follow them; otherwise the seam is where the last committed words (up to
/// 3) reappear; failing that, position decides.
fn after_committed<'a>(
    hypothesis: &'a [Word],
    committed_in_window: &[Word],
    context: &[Word],
) -> &'a [Word] {
    let k = committed_in_window.len();
    let same = |a: &[Word], b: &[Word]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| normalize(&x.text) == normalize(&y.text))
    };
    if hypothesis.len() >= k && same(&hypothesis[..k], committed_in_window) {
        return drop_repeated_context(&hypothesis[k..], if k == 0 { context } else { &[] });
    }
    let committed: Vec<Word> = context.iter().chain(committed_in_window).cloned().collect();
    for m in (1..=3.min(committed.len())).rev() {
        let tail = &committed[committed.len() - m..];
        // Search near where the committed words should end.
        let lo = k.saturating_sub(3);
        let hi = (k + 3).min(hypothesis.len().saturating_sub(m));
        for j in lo..=hi {
            if j + m <= hypothesis.len() && same(&hypothesis[j..j + m], tail) {
                return &hypothesis[j + m..];
            }
        }
    }
    &hypothesis[k.min(hypothesis.len())..]
}

/// After a trim the window may start with the end of the text cut from it; skip that repeat.
fn drop_repeated_context<'a>(words: &'a [Word], context: &[Word]) -> &'a [Word] {
    for n in (1..=5.min(context.len()).min(words.len())).rev() {
        let tail = &context[context.len() - n..];
        if tail
            .iter()
            .zip(words)
            .all(|(a, b)| normalize(&a.text) == normalize(&b.text))
        {
            return &words[n..];
        }
    }
    words
}

/// LocalAgreement-2: commits the longest common prefix of this and the previous hypothesis,
/// except its last `hold_back` words.
fn agree(u: &mut Utterance, words: &[Word], hold_back: usize) {
    let new = after_committed(words, &u.committed, &u.context).to_vec();
    let agreed = new
        .iter()
        .zip(&u.previous)
        .take_while(|(a, b)| normalize(&a.text) == normalize(&b.text))
        .count()
        .min(new.len().saturating_sub(hold_back));
    u.committed.extend(new[..agreed].iter().cloned());
    u.previous = new[agreed..].to_vec();
}

/// Drops non-speech annotations ("[BLANK_AUDIO]", "(music)") and known silence hallucinations.
fn clean(mut h: Hypothesis) -> Hypothesis {
    let mut depth = 0i32;
    h.words.retain(|w| {
        let opens = w.text.starts_with(['[', '(', '*']);
        let closes = w.text.ends_with([']', ')', '*']);
        if opens {
            depth += 1;
        }
        let inside = depth > 0;
        if closes && depth > 0 {
            depth -= 1;
        }
        !inside
    });
    let text = normalize_phrase(&join_words(&h.words));
    if h.no_speech_probability > 0.9
        || (h.no_speech_probability > 0.3 && HALLUCINATIONS.contains(&text.as_str()))
    {
        h.words.clear();
    }
    h
}

fn normalize_phrase(text: &str) -> String {
    text.split_whitespace()
        .map(normalize)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::whisper::DecodeOptions;

    fn words(spec: &[(&str, f64)]) -> Vec<Word> {
        spec.iter()
            .map(|&(t, s)| Word {
                text: t.into(),
                start: s,
                end: s + 0.3,
            })
            .collect()
    }

    fn utterance() -> Utterance {
        Utterance {
            id: 0,
            start: 0.0,
            buffer: Vec::new(),
            buffer_start: 0.0,
            context: Vec::new(),
            committed: Vec::new(),
            previous: Vec::new(),
            last_decode_requested: 0.0,
            due_at_pause: false,
            latest: None,
            ended_at: None,
            latest_decode_ms: 0.0,
            latest_at_pause: false,
            final_ready: false,
        }
    }

    #[test]
    fn local_agreement_commits_the_common_prefix_only() {
        let mut u = utterance();
        agree(&mut u, &words(&[("is", 0.0), ("my", 0.4)]), 0);
        assert!(u.committed.is_empty(), "one hypothesis commits nothing");
        agree(
            &mut u,
            &words(&[("Is", 0.0), ("my", 0.4), ("hemo", 0.8)]),
            0,
        );
        assert_eq!(join_words(&u.committed), "Is my");
        agree(
            &mut u,
            &words(&[
                ("Is", 0.0),
                ("my", 0.4),
                ("hemoglobin", 0.8),
                ("normal?", 1.3),
            ]),
            1,
        );
        assert_eq!(join_words(&u.committed), "Is my", "hemo != hemoglobin");
        let last = words(&[
            ("Is", 0.0),
            ("my", 0.4),
            ("hemoglobin", 0.8),
            ("normal?", 1.3),
        ]);
        agree(&mut u, &last, 1);
        assert_eq!(
            join_words(&u.committed),
            "Is my hemoglobin",
            "the last word is held back"
        );
        agree(&mut u, &last, 0);
        assert_eq!(join_words(&u.committed), "Is my hemoglobin normal?");
    }

    /// Speech wherever the audio is loud: a VAD for scripted tests.
    struct LoudnessVad;

    impl SpeechProbability for LoudnessVad {
        fn window_samples(&self) -> usize {
            320
        }
        fn probability(&mut self, window: &[f32]) -> Result<f32> {
            Ok(if window[0] > 0.5 { 0.9 } else { 0.0 })
        }
        fn reset(&mut self) {}
        fn name(&self) -> &'static str {
            "loudness"
        }
    }

    #[test]
    fn finals_survive_slow_decodes_and_leave_in_order() {
        let mut r = StreamingRecognizer::new(StreamingConfig::default(), Box::new(LoudnessVad));
        // Two utterances; decodes are so slow that none finishes before both have ended.
        let mut audio = vec![0.0f32; 8_000];
        audio.extend(vec![1.0f32; 16_000]);
        audio.extend(vec![0.0f32; 8_000]);
        audio.extend(vec![1.0f32; 16_000]);
        audio.extend(vec![0.0f32; 16_000]);
        let mut requests = Vec::new();
        for (i, frame) in audio.chunks(320).enumerate() {
            r.push_audio(i as f64 * 0.02, frame).unwrap();
            requests.extend(r.poll_decode());
        }
        let mut finals = Vec::new();
        let mut answered = 0;
        while let Some(request) = requests.pop().or_else(|| r.poll_decode()) {
            answered += 1;
            assert!(answered < 20, "decodes never settle");
            let hypothesis = Hypothesis {
                words: vec![Word {
                    text: "hello".into(),
                    start: 0.0,
                    end: 0.5,
                }],
                no_speech_probability: 0.0,
            };
            r.on_decode_result(request.id, Ok(hypothesis), 500.0);
            while let Some(e) = r.poll_event() {
                if let AsrEvent::Final { text, .. } = e {
                    finals.push(text);
                }
            }
        }
        // Before the fix the second ended utterance replaced the first one still decoding.
        assert_eq!(finals, vec!["hello", "hello"]);
    }

    #[test]
    fn a_pause_abandons_the_decode_of_older_audio_and_its_own_decode_becomes_the_final() {
        let mut r = StreamingRecognizer::new(StreamingConfig::default(), Box::new(LoudnessVad));
        let mut t = 0.0;
        let mut push = |r: &mut StreamingRecognizer, loud: bool, seconds: f64| {
            let frame = [if loud { 1.0 } else { 0.0 }; 320];
            for _ in 0..(seconds / 0.02).round() as usize {
                r.push_audio(t, &frame).unwrap();
                t += 0.02;
            }
        };
        push(&mut r, true, 1.0);
        let mid_speech = r.poll_decode().expect("a partial decode is due in speech");
        assert!(!mid_speech.may_be_final);
        push(&mut r, true, 0.1);
        push(&mut r, false, 0.06);
        assert_eq!(r.poll_abandoned_decode(), Some(mid_speech.id));
        let at_pause = r
            .poll_decode()
            .expect("the pause decode starts without waiting for the abandoned one");
        assert!(at_pause.may_be_final);
        let options = DecodeOptions {
            threads: 1,
            final_threads: 2,
            ..DecodeOptions::default()
        };
        assert_eq!(options.for_request(&mid_speech).threads, 1);
        assert_eq!(options.for_request(&at_pause).threads, 2);
        let hello = Hypothesis {
            words: vec![Word {
                text: "hello".into(),
                start: 0.0,
                end: 0.5,
            }],
            no_speech_probability: 0.0,
        };
        // The abandoned decode's result, should it still come, changes nothing.
        r.on_decode_result(mid_speech.id, Ok(Hypothesis::default()), 100.0);
        r.on_decode_result(at_pause.id, Ok(hello), 100.0);
        push(&mut r, false, 0.3);
        let events: Vec<AsrEvent> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, AsrEvent::Final { text, from_pause_decode: true, .. } if text == "hello")),
            "{events:?}"
        );
        assert!(r.poll_decode().is_none(), "no decode after the endpoint");
    }

    #[test]
    fn a_partial_requested_once_speech_stopped_serves_as_the_pause_decode() {
        let mut r = StreamingRecognizer::new(StreamingConfig::default(), Box::new(LoudnessVad));
        let mut t = 0.0;
        let mut push = |r: &mut StreamingRecognizer, loud: bool, seconds: f64| {
            let frame = [if loud { 1.0 } else { 0.0 }; 320];
            for _ in 0..(seconds / 0.02).round() as usize {
                r.push_audio(t, &frame).unwrap();
                t += 0.02;
            }
        };
        push(&mut r, true, 1.0);
        // Requested with the last loud window, before the VAD has seen the silence after it.
        let partial = r.poll_decode().expect("a partial decode is due in speech");
        push(&mut r, false, 0.06);
        assert_eq!(r.poll_abandoned_decode(), None, "it reaches the pause");
        assert!(
            r.poll_decode().is_none(),
            "no second decode of the same audio"
        );
        let hello = Hypothesis {
            words: vec![Word {
                text: "hello".into(),
                start: 0.3,
                end: 0.9,
            }],
            no_speech_probability: 0.0,
        };
        r.on_decode_result(partial.id, Ok(hello), 100.0);
        push(&mut r, false, 0.3);
        let events: Vec<AsrEvent> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(
            events.iter().any(|e| matches!(e,
                AsrEvent::Final { text, from_pause_decode: true, .. } if text == "hello")),
            "{events:?}"
        );
        assert!(r.poll_decode().is_none(), "no decode after the endpoint");
    }

    #[test]
    fn the_seam_is_found_by_text() {
        let committed = words(&[("Is", 0.0), ("my", 0.4)]);
        // Same start: the new words follow the committed ones.
        let hyp = words(&[("is", 0.0), ("my", 0.4), ("blood", 0.8)]);
        assert_eq!(join_words(after_committed(&hyp, &committed, &[])), "blood");
        // The decoder changed its mind about an early word: the seam is where "my" reappears.
        let hyp = words(&[("This", 0.0), ("is", 0.2), ("my", 0.4), ("blood", 0.8)]);
        assert_eq!(join_words(after_committed(&hyp, &committed, &[])), "blood");
        // After a trim the window may repeat the end of the context.
        let context = words(&[("results.", 0.0)]);
        let hyp = words(&[("results.", 0.0), ("Thanks", 0.5)]);
        assert_eq!(join_words(after_committed(&hyp, &[], &context)), "Thanks");
    }

    #[test]
    fn annotations_and_hallucinations_on_silence_are_dropped() {
        let h = Hypothesis {
            words: words(&[("[BLANK_AUDIO]", 0.0)]),
            no_speech_probability: 0.1,
        };
        assert!(clean(h).words.is_empty());
        let h = Hypothesis {
            words: words(&[("Thank", 0.0), ("you.", 0.3)]),
            no_speech_probability: 0.6,
        };
        assert!(clean(h).words.is_empty());
        // Said with confidence, "Thank you." is kept: callers do say it.
        let h = Hypothesis {
            words: words(&[("Thank", 0.0), ("you.", 0.3)]),
            no_speech_probability: 0.05,
        };
        assert_eq!(clean(h).words.len(), 2);
    }
}
