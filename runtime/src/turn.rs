//! The turn manager: when the agent starts, commits, cancels and stops its reply.
//!
//! Sans-I/O and driven by media time: it consumes ASR events and playback reports, is told the
//! time, exposes `poll_timeout`/`handle_timeout`, and emits [`TurnAction`]s for the session to
//! carry out. It never touches audio, models or clocks, so every policy here is unit-tested on a
//! virtual clock.
//!
//! Policies:
//! - **Speculative start.** When the user has paused for `speculate_after_pause_s` and a
//!   transcript of the audio up to the pause exists, the reply starts on it with its audio held.
//!   If the user resumes, or the turn's final text differs (after normalisation), the speculation
//!   is cancelled (a miss) and never heard; otherwise it is committed (a hit).
//! - **End of turn.** After the ASR's final, the turn ends after a delay between
//!   `min_end_delay_s` and `max_end_delay_s` past the end of speech: short when the text ends
//!   like a finished sentence or the LLM's end-of-utterance probability is high, long otherwise.
//! - **Barge-in.** User speech lasting `barge_in_min_speech_s` while the agent replies stops the
//!   output at once and cancels the reply; shorter sounds (backchannels, coughs) do not. Pauses
//!   within the speech do not count, and while an echo canceller has not yet found the echo path
//!   the minimum is `barge_in_min_speech_echo_unknown_s`.
//! - **Echo guard.** While agent audio plays, the VAD threshold is raised to
//!   `echo_guard_threshold`, so the agent's own voice looped back is not taken for the user.

use std::collections::VecDeque;

use talkline_asr::streaming::AsrEvent;

/// Turn-taking, `[turn]` in `talkline.toml` (every field optional).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Silence after which the LLM starts on the transcript of the audio up to the pause, before
    /// the turn ends (its audio is held until the turn is confirmed).
    pub speculate_after_pause_s: f64,
    /// Silence after a turn that sounds finished (final punctuation) before the agent answers.
    pub min_end_delay_s: f64,
    /// Silence after an unpunctuated turn that could be complete ("is my hemoglobin normal"):
    /// Whisper often leaves the final mark off, and the LLM's end-of-utterance estimate leans on
    /// punctuation, so this is the common case and must not pay the full wait.
    pub unsure_end_delay_s: f64,
    /// Silence after a turn that sounds cut off ("I wanted to ask about", "and", a comma).
    pub max_end_delay_s: f64,
    /// End-of-utterance probability at or above which the turn ends without waiting.
    pub end_of_utterance_threshold: f32,
    /// Speech over the agent shorter than this (a backchannel, a cough) does not interrupt it.
    pub barge_in_min_speech_s: f64,
    /// The same while the echo canceller has not yet found the echo path (the first seconds of
    /// a call, or after the path moved): until then the agent's own voice can leak through it
    /// as speech, so interrupting the agent takes longer speech. Applies only with
    /// `[audio] echo_cancellation`.
    pub barge_in_min_speech_echo_unknown_s: f64,
    /// The VAD's speech threshold: `[vad] threshold`, not set here.
    #[serde(skip)]
    pub vad_threshold: f32,
    /// The VAD threshold while the agent speaks: stronger evidence before its own voice, leaking
    /// back, can count as the caller.
    pub echo_guard_threshold: f32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            // The VAD's pause begins some 50 ms after the true end of speech (Silero hears the
            // last sounds fade), so this is about 150 ms of real silence. 0.10 instead of 0.15
            // lets the LLM start as soon as a fast pause decode is done (it had waited on the
            // timer in 4 of 9 hits): its first token came 25 ms sooner (p50, `talkline bench
            // --reps 3`, 45 turns a side, 2026-11-29), while voice-to-voice p50 stayed within
            // the machine's noise. A pause inside the turn costs only a cancelled speculation.
            speculate_after_pause_s: 0.10,
            min_end_delay_s: 0.0,
            unsure_end_delay_s: 0.2,
            max_end_delay_s: 0.5,
            end_of_utterance_threshold: 0.5,
            barge_in_min_speech_s: 0.3,
            barge_in_min_speech_echo_unknown_s: 0.8,
            vad_threshold: 0.5,
            echo_guard_threshold: 0.8,
        }
    }
}

pub type ReplyId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The user went on speaking after the pause the speculation started in.
    UserResumed,
    /// The final transcript differs from the speculated one.
    TranscriptChanged,
    /// The user interrupted the agent.
    BargeIn,
}

/// What the session must do.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnAction {
    /// Generate a reply to `user_text`. A speculative reply synthesizes but holds its audio until
    /// [`TurnAction::CommitReply`].
    StartReply {
        reply: ReplyId,
        user_text: String,
        speculative: bool,
    },
    /// The speculation was right: release its audio.
    CommitReply {
        reply: ReplyId,
    },
    /// Say `withdrawn` after all, as `reply`: the caller spoke before a word of it played, but what
    /// they said held no words (a cough, a breath, a line click), so their turn is still unanswered.
    /// The agent has already acted on that turn; its action is run again, not asked for again.
    RetryReply {
        reply: ReplyId,
        withdrawn: ReplyId,
    },
    CancelReply {
        reply: ReplyId,
        reason: CancelReason,
    },
    /// Stop agent audio now and drop what is queued (barge-in).
    StopOutput,
    /// Ask the LLM how likely the user is done after `text`; answer with
    /// [`TurnManager::on_end_of_utterance`].
    EstimateEndOfUtterance {
        text: String,
    },
    SetVadThreshold {
        threshold: f32,
    },
}

impl TurnAction {
    /// The action without the caller's words, for logs (which must never hold patient data).
    pub fn redacted(&self) -> String {
        match self {
            TurnAction::StartReply {
                reply,
                user_text,
                speculative,
            } => format!(
                "StartReply {{ reply: {reply}, speculative: {speculative}, user_words: {} }}",
                user_text.split_whitespace().count()
            ),
            TurnAction::EstimateEndOfUtterance { text } => format!(
                "EstimateEndOfUtterance {{ words: {} }}",
                text.split_whitespace().count()
            ),
            other => format!("{other:?}"),
        }
    }
}

/// An ASR event without its words, for logs.
pub fn redacted_asr_event(event: &AsrEvent) -> String {
    let words = |t: &str| t.split_whitespace().count();
    match event {
        AsrEvent::Partial {
            committed,
            tentative,
            audio_end,
        } => format!(
            "Partial {{ committed_words: {}, tentative_words: {}, audio_end: {audio_end:.2} }}",
            words(committed),
            words(tentative)
        ),
        AsrEvent::Final {
            text,
            start,
            end,
            decode_ms,
            from_pause_decode,
            ..
        } => format!(
            "Final {{ words: {}, start: {start:.2}, end: {end:.2}, decode_ms: {decode_ms:.0}, \
             from_pause_decode: {from_pause_decode} }}",
            words(text)
        ),
        other => format!("{other:?}"),
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnStats {
    pub speculative_hits: u64,
    pub speculative_misses: u64,
    pub barge_ins: u64,
    pub ignored_short_speech: u64,
}

#[derive(Debug, Clone)]
struct Speculation {
    reply: ReplyId,
    text: String,
}

#[derive(Debug, Clone)]
enum Phase {
    /// The user has the floor (or nobody does).
    Listening,
    /// The agent's reply is being generated or played.
    Replying { reply: ReplyId, audio_playing: bool },
}

pub struct TurnManager {
    config: TurnConfig,
    phase: Phase,
    next_reply: ReplyId,
    actions: VecDeque<TurnAction>,
    stats: TurnStats,
    /// Final texts of this user turn's utterances so far.
    turn_text: Vec<String>,
    user_speaking: bool,
    /// The latest partial's full text and the media time its audio reached.
    latest_partial: Option<(String, f64)>,
    pause_at: Option<f64>,
    speculate_at: Option<f64>,
    speculation: Option<Speculation>,
    speech_end: Option<f64>,
    end_turn_at: Option<f64>,
    /// Speech that started while the agent replied, not yet long enough to interrupt.
    barge_in: Option<BargeInSpeech>,
    /// Utterances that have ended and whose Final has not come yet (the ASR sends them in order).
    finals_owed: u32,
    /// An echo canceller runs and has not found the echo path (see
    /// [`TurnConfig::barge_in_min_speech_echo_unknown_s`]).
    echo_unknown: bool,
    /// A reply cancelled by speech before any of it played, until that speech is transcribed:
    /// words start a turn of their own, no words bring the reply back ([`TurnAction::RetryReply`]).
    withdrawn: Option<ReplyId>,
}

/// Speech over the agent, counted toward `barge_in_min_speech_s`. Only speech counts: a pause
/// within it (the VAD's `Paused`, before the utterance has ended) holds the count, so that a blip
/// of the agent's own echo followed by silence is not taken for a caller who kept talking.
#[derive(Debug, Clone, Copy)]
struct BargeInSpeech {
    /// Speech before the current stretch.
    earlier_s: f64,
    /// When the current stretch of speech began; `None` while paused.
    since: Option<f64>,
}

impl BargeInSpeech {
    /// When the speech will have lasted `min_s`, if it goes on.
    fn due(&self, min_s: f64) -> Option<f64> {
        self.since.map(|since| since + (min_s - self.earlier_s))
    }
}

/// How long after the last end of speech the turn waits for an owed Final before it ends without
/// it (a Final lost on the way must not leave the caller unanswered).
const OWED_FINAL_WAIT_S: f64 = 3.0;

/// Media times this close are one instant: they are sums of sample counts over a rate, and a
/// decode whose audio ends where the pause starts must count as reaching it.
const SAME_INSTANT_S: f64 = 1e-6;

fn normalize(text: &str) -> String {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How finished a turn sounds from its text alone.
#[derive(Debug, PartialEq, Eq)]
enum Completeness {
    Finished,
    Unsure,
    CutOff,
}

/// Words English sentences do not end on: articles, possessives, prepositions, conjunctions,
/// auxiliaries and fillers. A turn ending on one is a speaker drawing breath.
const NON_FINAL_WORDS: &[&str] = &[
    "a", "an", "the", "my", "your", "his", "her", "our", "their", "its", "to", "of", "for", "with",
    "about", "in", "on", "at", "from", "by", "into", "than", "and", "or", "but", "so", "because",
    "if", "that", "which", "who", "when", "is", "are", "was", "were", "be", "am", "do", "does",
    "did", "have", "has", "can", "could", "would", "should", "will", "um", "uh", "er", "like",
];

fn completeness(text: &str) -> Completeness {
    let text = text.trim_end();
    if text.ends_with(['.', '?', '!']) {
        return Completeness::Finished;
    }
    if text.is_empty() || text.ends_with([',', ';', ':', '-']) {
        return Completeness::CutOff;
    }
    let last = text
        .rsplit(char::is_whitespace)
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase();
    if NON_FINAL_WORDS.contains(&last.as_str()) {
        Completeness::CutOff
    } else {
        Completeness::Unsure
    }
}

impl TurnManager {
    pub fn new(config: TurnConfig) -> Self {
        TurnManager {
            config,
            phase: Phase::Listening,
            next_reply: 0,
            actions: VecDeque::new(),
            stats: TurnStats::default(),
            turn_text: Vec::new(),
            user_speaking: false,
            latest_partial: None,
            pause_at: None,
            speculate_at: None,
            speculation: None,
            speech_end: None,
            end_turn_at: None,
            barge_in: None,
            finals_owed: 0,
            echo_unknown: false,
            withdrawn: None,
        }
    }

    pub fn stats(&self) -> TurnStats {
        self.stats
    }

    pub fn poll_action(&mut self) -> Option<TurnAction> {
        self.actions.pop_front()
    }

    /// A reply is about to start: its action is queued, or a speculation is due once the pause
    /// has lasted long enough. Background work on the chat session (a prefill cannot be stopped
    /// halfway) would only hold that reply up.
    pub fn reply_due(&self) -> bool {
        self.speculate_at.is_some()
            || self
                .actions
                .iter()
                .any(|a| matches!(a, TurnAction::StartReply { .. }))
    }

    pub fn poll_timeout(&self) -> Option<f64> {
        let barge_in_at = self
            .barge_in
            .and_then(|b| b.due(self.barge_in_min_speech_s()));
        [self.speculate_at, self.end_turn_at, barge_in_at]
            .into_iter()
            .flatten()
            .reduce(f64::min)
    }

    /// Whether the echo canceller has found the echo path; only a session with a canceller
    /// calls this.
    pub fn set_echo_path_found(&mut self, found: bool) {
        self.echo_unknown = !found;
    }

    fn barge_in_min_speech_s(&self) -> f64 {
        match self.echo_unknown {
            true => self
                .config
                .barge_in_min_speech_s
                .max(self.config.barge_in_min_speech_echo_unknown_s),
            false => self.config.barge_in_min_speech_s,
        }
    }

    pub fn handle_timeout(&mut self, now: f64) {
        self.handle_timeout_heard(now, now);
    }

    /// Fires the due timers, where `heard` (at most `now`) is the media time the VAD has run to.
    /// Ending the turn and interrupting the agent wait until the silence or the speech they
    /// count on has been heard: audio that has arrived but not been run may hold the words that
    /// change the decision. A speculation does not wait: its audio is held, and words heard
    /// later cancel it.
    pub fn handle_timeout_heard(&mut self, now: f64, heard: f64) {
        if self.speculate_at.is_some_and(|t| t <= now) {
            self.speculate_at = None;
            self.try_speculate();
        }
        let now = heard;
        if self.end_turn_at.is_some_and(|t| t <= now) {
            self.end_turn_at = None;
            self.end_turn(now);
        }
        let min_s = self.barge_in_min_speech_s();
        if self
            .barge_in
            .and_then(|b| b.due(min_s))
            .is_some_and(|t| t <= now)
        {
            self.barge_in = None;
            self.barge_in();
        }
    }

    pub fn on_asr(&mut self, now: f64, event: &AsrEvent) {
        match event {
            AsrEvent::SpeechStarted { at } => {
                self.user_speaking = true;
                self.speech_end = None;
                self.end_turn_at = None;
                self.latest_partial = None;
                match self.phase {
                    Phase::Replying { .. } => {
                        self.barge_in = Some(BargeInSpeech {
                            earlier_s: 0.0,
                            since: Some(*at),
                        });
                    }
                    Phase::Listening => self.cancel_speculation(CancelReason::UserResumed),
                }
            }
            AsrEvent::Partial {
                committed,
                tentative,
                audio_end,
            } => {
                // The whole hypothesis, tentative tail included: only a partial whose audio
                // reaches the pause is speculated on (see `try_speculate`), and that is the pause
                // decode, the very decode the recognizer turns into the Final if the pause becomes
                // the endpoint. Its last word is whole (the window ends in silence), so waiting for
                // LocalAgreement to commit it would only miss turns that end as the user stops.
                let text = format!("{} {}", committed.trim(), tentative.trim());
                self.latest_partial = Some((text.trim().to_string(), *audio_end));
                self.try_speculate();
            }
            AsrEvent::Paused { at } => {
                self.pause_at = Some(*at);
                self.speculate_at = Some(at + self.config.speculate_after_pause_s);
                if let Some(b) = &mut self.barge_in {
                    if let Some(since) = b.since.take() {
                        b.earlier_s += (at - since).max(0.0);
                    }
                }
            }
            AsrEvent::Resumed { at } => {
                if let Some(b) = &mut self.barge_in {
                    b.since.get_or_insert(*at);
                }
                self.pause_at = None;
                self.speculate_at = None;
                self.cancel_speculation(CancelReason::UserResumed);
            }
            AsrEvent::SpeechEnded { at } => {
                self.user_speaking = false;
                self.speech_end = Some(*at);
                self.finals_owed += 1;
                // The utterance is over: its Final, not a partial of it, is what comes next, and
                // a partial left here would be joined to that Final by a late speculation.
                self.pause_at = None;
                self.speculate_at = None;
                self.latest_partial = None;
                if self.barge_in.take().is_some() {
                    // Shorter than the barge-in threshold: a backchannel or a cough.
                    self.stats.ignored_short_speech += 1;
                }
            }
            AsrEvent::Final { text, .. } => {
                self.finals_owed = self.finals_owed.saturating_sub(1);
                if matches!(self.phase, Phase::Replying { .. }) {
                    return; // speech the barge-in rule ignored
                }
                if !text.trim().is_empty() {
                    self.turn_text.push(text.trim().to_string());
                    self.withdrawn = None;
                }
                if self.turn_text.is_empty() && self.finals_owed == 0 && !self.user_speaking {
                    if let Some(withdrawn) = self.withdrawn.take() {
                        let reply = self.new_reply();
                        self.actions
                            .push_back(TurnAction::RetryReply { reply, withdrawn });
                        self.phase = Phase::Replying {
                            reply,
                            audio_playing: false,
                        };
                        return;
                    }
                }
                // An empty final (noise) still ends an utterance: the words of the turn's
                // earlier utterances must not wait for a next one that may never come.
                if self.turn_text.is_empty() {
                    return;
                }
                let turn = self.turn_text.join(" ");
                let end = self.speech_end.unwrap_or(now);
                let delay = match completeness(&turn) {
                    Completeness::Finished => self.config.min_end_delay_s,
                    Completeness::Unsure => self.config.unsure_end_delay_s,
                    Completeness::CutOff => self.config.max_end_delay_s,
                };
                // Possibly past already: it fires once the VAD has heard that far (see
                // `handle_timeout_heard`), not once audio has merely arrived.
                let end_turn_at = end + delay;
                self.end_turn_at = Some(end_turn_at);
                // The estimate can only bring the end forward, to `min_end_delay_s` after the
                // speech; when that is no sooner (the Final itself came late enough), it would be
                // an LLM run for nothing, just when the reply needs the cores.
                if (end + self.config.min_end_delay_s).max(now) < end_turn_at {
                    self.actions
                        .push_back(TurnAction::EstimateEndOfUtterance { text: turn });
                }
            }
        }
    }

    /// The LLM's probability that the user is done after `text` (the current turn's text).
    pub fn on_end_of_utterance(&mut self, now: f64, text: &str, probability: f32) {
        if self.user_speaking || normalize(text) != normalize(&self.turn_text.join(" ")) {
            return; // stale
        }
        if probability >= self.config.end_of_utterance_threshold {
            let end = self.speech_end.unwrap_or(now) + self.config.min_end_delay_s;
            self.end_turn_at = Some(self.end_turn_at.map_or(end, |t| t.min(end)));
        }
    }

    /// The agent speaks first (a greeting): an agent turn the caller can barge in on.
    pub fn greet(&mut self) -> ReplyId {
        self.withdrawn = None;
        let reply = self.new_reply();
        self.phase = Phase::Replying {
            reply,
            audio_playing: false,
        };
        reply
    }

    /// The output began playing the reply's audio.
    pub fn on_agent_audio_started(&mut self, reply: ReplyId) {
        if let Phase::Replying {
            reply: current,
            audio_playing,
        } = &mut self.phase
        {
            if *current == reply && !*audio_playing {
                *audio_playing = true;
                self.actions.push_back(TurnAction::SetVadThreshold {
                    threshold: self.config.echo_guard_threshold,
                });
            }
        }
    }

    /// The reply finished playing (or was cut): the floor returns to the user.
    pub fn on_agent_audio_finished(&mut self, reply: ReplyId) {
        if let Phase::Replying {
            reply: current,
            audio_playing,
        } = self.phase
        {
            if current == reply {
                self.phase = Phase::Listening;
                if audio_playing {
                    self.restore_vad();
                }
            }
        }
    }

    fn restore_vad(&mut self) {
        self.actions.push_back(TurnAction::SetVadThreshold {
            threshold: self.config.vad_threshold,
        });
    }

    fn new_reply(&mut self) -> ReplyId {
        self.next_reply += 1;
        self.next_reply
    }

    fn try_speculate(&mut self) {
        let (Some(pause_at), None) = (self.pause_at, &self.speculation) else {
            return;
        };
        if self.speculate_at.is_some() || !matches!(self.phase, Phase::Listening) {
            return; // not paused long enough yet, or the agent has the floor
        }
        // Only a transcript of the audio up to the pause is worth speculating on.
        let Some((text, _)) = self
            .latest_partial
            .clone()
            .filter(|(text, end)| *end >= pause_at - SAME_INSTANT_S && !text.is_empty())
        else {
            return;
        };
        let user_text = self
            .turn_text
            .iter()
            .cloned()
            .chain([text])
            .collect::<Vec<_>>()
            .join(" ");
        let reply = self.new_reply();
        self.speculation = Some(Speculation {
            reply,
            text: user_text.clone(),
        });
        self.actions.push_back(TurnAction::StartReply {
            reply,
            user_text,
            speculative: true,
        });
    }

    fn cancel_speculation(&mut self, reason: CancelReason) {
        if let Some(s) = self.speculation.take() {
            self.stats.speculative_misses += 1;
            self.actions.push_back(TurnAction::CancelReply {
                reply: s.reply,
                reason,
            });
        }
    }

    fn end_turn(&mut self, now: f64) {
        if self.user_speaking || self.turn_text.is_empty() {
            return;
        }
        // Words the caller said after these are still being transcribed (a starved decoder):
        // they are part of this turn, and a Final that comes while the agent replies is dropped.
        // Their Final sets the end of turn again; this retry is for one that never comes.
        if self.finals_owed > 0 {
            let give_up_at = self.speech_end.unwrap_or(now) + OWED_FINAL_WAIT_S;
            if now < give_up_at {
                self.end_turn_at = Some(give_up_at);
                return;
            }
            self.finals_owed = 0;
        }
        let user_text = std::mem::take(&mut self.turn_text).join(" ");
        self.pause_at = None;
        self.speculate_at = None;
        let reply = match self.speculation.take() {
            Some(s) if normalize(&s.text) == normalize(&user_text) => {
                self.stats.speculative_hits += 1;
                self.actions
                    .push_back(TurnAction::CommitReply { reply: s.reply });
                s.reply
            }
            other => {
                if let Some(s) = other {
                    self.stats.speculative_misses += 1;
                    self.actions.push_back(TurnAction::CancelReply {
                        reply: s.reply,
                        reason: CancelReason::TranscriptChanged,
                    });
                }
                let reply = self.new_reply();
                self.actions.push_back(TurnAction::StartReply {
                    reply,
                    user_text,
                    speculative: false,
                });
                reply
            }
        };
        self.phase = Phase::Replying {
            reply,
            audio_playing: false,
        };
    }

    fn barge_in(&mut self) {
        let Phase::Replying {
            reply,
            audio_playing,
        } = self.phase
        else {
            return;
        };
        if !self.user_speaking {
            return;
        }
        self.stats.barge_ins += 1;
        self.withdrawn = (!audio_playing).then_some(reply);
        self.actions.push_back(TurnAction::StopOutput);
        self.actions.push_back(TurnAction::CancelReply {
            reply,
            reason: CancelReason::BargeIn,
        });
        if audio_playing {
            self.restore_vad();
        }
        self.phase = Phase::Listening;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(text: &str, audio_end: f64) -> AsrEvent {
        AsrEvent::Partial {
            committed: text.into(),
            tentative: String::new(),
            audio_end,
        }
    }

    fn final_(text: &str, end: f64) -> AsrEvent {
        AsrEvent::Final {
            text: text.into(),
            start: 0.0,
            end,
            words: Vec::new(),
            decode_ms: 0.0,
            from_pause_decode: true,
        }
    }

    fn drain(t: &mut TurnManager) -> Vec<TurnAction> {
        std::iter::from_fn(|| t.poll_action()).collect()
    }

    /// Advances the virtual clock to `now`, firing due timers.
    fn tick(t: &mut TurnManager, now: f64) {
        while let Some(deadline) = t.poll_timeout().filter(|d| *d <= now) {
            t.handle_timeout(deadline);
        }
    }

    #[test]
    fn speculation_hit_starts_at_the_pause_and_commits_at_the_end_of_turn() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.0, &partial("Is my", 1.0));
        t.on_asr(1.83, &AsrEvent::Paused { at: 1.8 });
        t.on_asr(1.9, &partial("Is my hemoglobin normal?", 1.83));
        assert!(drain(&mut t).is_empty(), "not paused 150 ms yet");
        tick(&mut t, 1.95);
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::StartReply {
                reply: 1,
                user_text: "Is my hemoglobin normal?".into(),
                speculative: true
            }]
        );
        t.on_asr(2.0, &AsrEvent::SpeechEnded { at: 1.8 });
        t.on_asr(2.0, &final_("is my hemoglobin normal", 1.8));
        // 200 ms of silence already is the wait an unpunctuated turn gets: no estimate could
        // end it sooner, so none is asked for.
        tick(&mut t, 2.0);
        assert_eq!(drain(&mut t), vec![TurnAction::CommitReply { reply: 1 }]);
        assert_eq!(t.stats().speculative_hits, 1);
    }

    #[test]
    fn a_partial_whose_audio_ends_where_the_pause_starts_is_speculated_on() {
        // The recognizer's decode requested with the last window of speech: its audio end and
        // the pause's start are one instant, summed differently.
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(
            1.03,
            &AsrEvent::Paused {
                at: 1.000_000_000_000_000_4,
            },
        );
        t.on_asr(1.1, &partial("Is my hemoglobin normal?", 1.0));
        tick(&mut t, 1.16);
        assert!(matches!(
            drain(&mut t)[..],
            [TurnAction::StartReply {
                speculative: true,
                ..
            }]
        ));
    }

    #[test]
    fn the_turn_waits_for_the_final_of_words_said_after_a_pause() {
        // A starved decoder: "one, two," ends, "three, four" is said and ends too, and only then
        // does the first Final come. The turn is both, not the first half answered alone.
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.4, &AsrEvent::SpeechEnded { at: 1.2 });
        t.on_asr(1.5, &AsrEvent::SpeechStarted { at: 1.4 });
        t.on_asr(2.5, &AsrEvent::SpeechEnded { at: 2.3 });
        t.on_asr(2.6, &final_("1, 2,", 1.2));
        tick(&mut t, 2.9);
        assert!(
            !drain(&mut t)
                .iter()
                .any(|a| matches!(a, TurnAction::StartReply { .. })),
            "the second half is still being transcribed"
        );
        t.on_asr(3.0, &final_("3, 4.", 2.3));
        tick(&mut t, 3.0);
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::StartReply {
                reply: 1,
                user_text: "1, 2, 3, 4.".into(),
                speculative: false
            }]
        );
    }

    #[test]
    fn the_turn_ends_only_on_silence_the_vad_has_heard_but_speculation_runs_ahead() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.23, &AsrEvent::Paused { at: 1.2 });
        t.on_asr(1.3, &partial("Is my glucose normal?", 1.23));
        // The listener lags 300 ms behind the audio received.
        t.handle_timeout_heard(1.36, 1.06);
        assert!(matches!(
            drain(&mut t)[..],
            [TurnAction::StartReply {
                speculative: true,
                ..
            }]
        ));
        t.on_asr(1.5, &AsrEvent::SpeechEnded { at: 1.2 });
        t.on_asr(1.5, &final_("Is my glucose normal?", 1.2));
        t.handle_timeout_heard(1.5, 1.15);
        assert!(
            drain(&mut t).is_empty(),
            "the end of speech is not heard yet"
        );
        t.handle_timeout_heard(1.55, 1.21);
        assert_eq!(drain(&mut t), vec![TurnAction::CommitReply { reply: 1 }]);
    }

    #[test]
    fn a_final_that_never_comes_holds_the_turn_only_for_a_while() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.4, &AsrEvent::SpeechEnded { at: 1.2 });
        t.on_asr(1.5, &AsrEvent::SpeechStarted { at: 1.4 });
        t.on_asr(2.5, &AsrEvent::SpeechEnded { at: 2.3 });
        t.on_asr(2.6, &final_("Is my glucose normal?", 1.2));
        tick(&mut t, 2.3 + OWED_FINAL_WAIT_S - 0.01);
        assert!(drain(&mut t).is_empty());
        tick(&mut t, 2.3 + OWED_FINAL_WAIT_S);
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::StartReply {
                reply: 1,
                user_text: "Is my glucose normal?".into(),
                speculative: false
            }]
        );
    }

    #[test]
    fn a_reply_is_due_from_the_pause_until_its_start_is_polled() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.0, &partial("Is my", 1.0));
        assert!(!t.reply_due(), "the user is speaking");
        t.on_asr(1.83, &AsrEvent::Paused { at: 1.8 });
        t.on_asr(1.9, &partial("Is my hemoglobin normal?", 1.83));
        assert!(t.reply_due(), "the speculation's timer runs");
        tick(&mut t, 1.95);
        assert!(t.reply_due(), "the speculation is queued");
        drain(&mut t);
        assert!(!t.reply_due(), "the reply has started");
        t.on_asr(2.1, &AsrEvent::Resumed { at: 2.1 });
        drain(&mut t);
        t.on_asr(2.5, &AsrEvent::Paused { at: 2.5 });
        t.on_asr(2.6, &AsrEvent::Resumed { at: 2.6 });
        assert!(!t.reply_due(), "a resumed pause calls for no reply");
    }

    #[test]
    fn the_user_resuming_cancels_the_speculation_which_is_never_committed() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.23, &AsrEvent::Paused { at: 1.2 });
        t.on_asr(1.3, &partial("My doctor said", 1.23));
        tick(&mut t, 1.35);
        assert!(matches!(
            drain(&mut t)[..],
            [TurnAction::StartReply {
                reply: 1,
                speculative: true,
                ..
            }]
        ));
        t.on_asr(1.5, &AsrEvent::Resumed { at: 1.45 });
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::CancelReply {
                reply: 1,
                reason: CancelReason::UserResumed
            }]
        );
        t.on_asr(3.0, &AsrEvent::SpeechEnded { at: 2.8 });
        t.on_asr(3.0, &final_("My doctor said my cholesterol is high.", 2.8));
        tick(&mut t, 3.0);
        let actions = drain(&mut t);
        assert!(actions.contains(&TurnAction::StartReply {
            reply: 2,
            user_text: "My doctor said my cholesterol is high.".into(),
            speculative: false
        }));
        assert!(!actions
            .iter()
            .any(|a| matches!(a, TurnAction::CommitReply { .. })));
        assert_eq!(t.stats().speculative_misses, 1);
    }

    #[test]
    fn what_goes_to_the_log_holds_no_words_of_the_caller() {
        let secret = "my date of birth is March fourth";
        let logged = [
            TurnAction::StartReply {
                reply: 1,
                user_text: secret.into(),
                speculative: true,
            }
            .redacted(),
            TurnAction::EstimateEndOfUtterance {
                text: secret.into(),
            }
            .redacted(),
            redacted_asr_event(&AsrEvent::Partial {
                committed: secret.into(),
                tentative: secret.into(),
                audio_end: 1.0,
            }),
            redacted_asr_event(&final_(secret, 1.0)),
        ];
        for line in logged {
            assert!(!line.contains("March") && !line.contains("birth"), "{line}");
        }
    }

    #[test]
    fn a_pause_that_ends_the_utterance_before_its_timer_speculates_nothing_twice() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.03, &AsrEvent::Paused { at: 1.0 });
        t.on_asr(1.1, &partial("is my blood sugar okay", 1.03));
        t.on_asr(1.12, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.12, &final_("is my blood sugar okay", 1.0));
        tick(&mut t, 1.3);
        let starts: Vec<_> = drain(&mut t)
            .into_iter()
            .filter_map(|a| match a {
                TurnAction::StartReply { user_text, .. } => Some(user_text),
                _ => None,
            })
            .collect();
        assert_eq!(starts, ["is my blood sugar okay"]);
    }

    #[test]
    fn a_partial_from_before_the_pause_is_not_speculated_on() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(
            0.95,
            &AsrEvent::Partial {
                committed: "Is my".into(),
                tentative: "hemo".into(),
                audio_end: 0.95,
            },
        );
        t.on_asr(1.03, &AsrEvent::Paused { at: 1.0 });
        tick(&mut t, 1.3);
        assert!(
            drain(&mut t).is_empty(),
            "its last word may be cut: wait for the pause decode"
        );
    }

    #[test]
    fn the_pause_decode_is_speculated_on_whole_and_hits_when_it_becomes_the_final() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.03, &AsrEvent::Paused { at: 1.0 });
        t.on_asr(
            1.15,
            &AsrEvent::Partial {
                committed: "Is my".into(),
                tentative: "blood pressure normal?".into(),
                audio_end: 1.03,
            },
        );
        tick(&mut t, 1.15);
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::StartReply {
                reply: 1,
                user_text: "Is my blood pressure normal?".into(),
                speculative: true
            }]
        );
        t.on_asr(1.25, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.25, &final_("Is my blood pressure normal?", 1.0));
        tick(&mut t, 1.25);
        let actions = drain(&mut t);
        assert!(actions.contains(&TurnAction::CommitReply { reply: 1 }));
        assert_eq!(t.stats().speculative_hits, 1);
    }

    #[test]
    fn a_different_final_replaces_the_speculation() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.03, &AsrEvent::Paused { at: 1.0 });
        t.on_asr(1.1, &partial("Is my human love in normal", 1.03));
        tick(&mut t, 1.2);
        drain(&mut t);
        t.on_asr(1.2, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.3, &final_("Is my hemoglobin normal?", 1.0));
        tick(&mut t, 1.3);
        let actions = drain(&mut t);
        assert!(actions.contains(&TurnAction::CancelReply {
            reply: 1,
            reason: CancelReason::TranscriptChanged
        }));
        assert!(actions.iter().any(|a| matches!(
            a,
            TurnAction::StartReply {
                reply: 2,
                speculative: false,
                ..
            }
        )));
    }

    /// Seen with twenty calls on two cores: late audio split a question after its first word,
    /// the user was speaking again when that turn came due, and the rest decoded to nothing.
    #[test]
    fn an_empty_final_after_words_still_ends_the_turn() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.8, &AsrEvent::SpeechStarted { at: 0.5 });
        t.on_asr(1.66, &AsrEvent::SpeechEnded { at: 0.64 });
        t.on_asr(1.66, &final_("What", 0.64));
        t.on_asr(1.7, &AsrEvent::SpeechStarted { at: 0.64 });
        tick(&mut t, 1.7);
        assert!(drain(&mut t).is_empty(), "the user is speaking");
        t.on_asr(2.0, &AsrEvent::SpeechEnded { at: 1.79 });
        t.on_asr(4.9, &final_("", 1.79));
        tick(&mut t, 4.9);
        assert!(drain(&mut t).contains(&TurnAction::StartReply {
            reply: 1,
            user_text: "What".into(),
            speculative: false
        }));
    }

    #[test]
    fn an_unfinished_sentence_waits_longer_unless_the_llm_says_it_is_done() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.2, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.25, &final_("I wanted to ask about", 1.0));
        // The wait is long enough for the LLM's estimate to matter: it is asked for.
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::EstimateEndOfUtterance {
                text: "I wanted to ask about".into()
            }]
        );
        assert_eq!(
            t.poll_timeout(),
            Some(1.5),
            "max delay past the end of speech"
        );
        t.on_end_of_utterance(1.3, "I wanted to ask about", 0.1);
        tick(&mut t, 1.49);
        assert!(drain(&mut t).is_empty());
        // The user goes on before the turn ends: one turn, both utterances.
        t.on_asr(1.49, &AsrEvent::SpeechStarted { at: 1.45 });
        t.on_asr(2.6, &AsrEvent::SpeechEnded { at: 2.4 });
        t.on_asr(2.65, &final_("my potassium.", 2.4));
        tick(&mut t, 2.65);
        let actions = drain(&mut t);
        assert!(
            actions.contains(&TurnAction::StartReply {
                reply: 1,
                user_text: "I wanted to ask about my potassium.".into(),
                speculative: false
            }),
            "{actions:?}"
        );
    }

    fn replying(t: &mut TurnManager) -> ReplyId {
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.2, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.2, &final_("Is my hemoglobin normal?", 1.0));
        tick(t, 1.2);
        drain(t);
        t.on_agent_audio_started(1);
        assert_eq!(
            drain(t),
            vec![TurnAction::SetVadThreshold { threshold: 0.8 }],
            "echo guard on while the agent speaks"
        );
        1
    }

    #[test]
    fn barge_in_stops_output_and_cancels_the_reply() {
        let mut t = TurnManager::new(TurnConfig::default());
        let reply = replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        tick(&mut t, 2.29);
        assert!(drain(&mut t).is_empty(), "not yet 300 ms of speech");
        tick(&mut t, 2.3);
        assert_eq!(
            drain(&mut t),
            vec![
                TurnAction::StopOutput,
                TurnAction::CancelReply {
                    reply,
                    reason: CancelReason::BargeIn
                },
                TurnAction::SetVadThreshold { threshold: 0.5 },
            ]
        );
        assert_eq!(t.stats().barge_ins, 1);
    }

    /// The reply to "Is my hemoglobin normal?" was generating, none of it played, when the caller
    /// made a sound long enough to count as speech.
    fn withdrawn_before_a_word_played(t: &mut TurnManager) -> ReplyId {
        t.on_asr(0.5, &AsrEvent::SpeechStarted { at: 0.4 });
        t.on_asr(1.2, &AsrEvent::SpeechEnded { at: 1.0 });
        t.on_asr(1.2, &final_("Is my hemoglobin normal?", 1.0));
        tick(t, 1.2);
        drain(t);
        t.on_asr(1.4, &AsrEvent::SpeechStarted { at: 1.3 });
        tick(t, 1.6);
        assert_eq!(
            drain(t),
            vec![
                TurnAction::StopOutput,
                TurnAction::CancelReply {
                    reply: 1,
                    reason: CancelReason::BargeIn
                },
            ]
        );
        t.on_asr(1.9, &AsrEvent::SpeechEnded { at: 1.7 });
        1
    }

    /// sip_scale: under load, twenty calls on two cores, one caller's question was split in two
    /// and the second half transcribed to nothing; the reply to the first half had been cancelled
    /// by that second half, and the caller was never answered.
    #[test]
    fn a_reply_withdrawn_for_speech_that_held_no_words_is_said_after_all() {
        let mut t = TurnManager::new(TurnConfig::default());
        let withdrawn = withdrawn_before_a_word_played(&mut t);
        t.on_asr(2.2, &final_("", 1.7));
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::RetryReply {
                reply: 2,
                withdrawn
            }]
        );
        // It is an agent turn like any other: speech over it is a barge-in.
        t.on_agent_audio_started(2);
        drain(&mut t);
        t.on_asr(3.1, &AsrEvent::SpeechStarted { at: 3.0 });
        tick(&mut t, 3.3);
        assert!(drain(&mut t).contains(&TurnAction::StopOutput));
    }

    #[test]
    fn words_after_a_withdrawn_reply_are_a_turn_of_their_own() {
        let mut t = TurnManager::new(TurnConfig::default());
        withdrawn_before_a_word_played(&mut t);
        t.on_asr(2.2, &final_("and my cholesterol", 1.7));
        tick(&mut t, 2.8);
        let actions = drain(&mut t);
        assert!(
            actions.iter().any(|a| matches!(a,
                TurnAction::StartReply { user_text, speculative: false, .. } if user_text == "and my cholesterol")),
            "{actions:?}"
        );
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, TurnAction::RetryReply { .. })),
            "{actions:?}"
        );
        // Nor does a later empty utterance bring the old reply back.
        t.on_agent_audio_started(2);
        t.on_agent_audio_finished(2);
        drain(&mut t);
        t.on_asr(4.0, &AsrEvent::SpeechStarted { at: 3.9 });
        t.on_asr(4.5, &AsrEvent::SpeechEnded { at: 4.3 });
        t.on_asr(4.6, &final_("", 4.3));
        tick(&mut t, 5.0);
        assert!(drain(&mut t).is_empty());
    }

    #[test]
    fn a_reply_cut_after_it_began_playing_is_not_said_again() {
        let mut t = TurnManager::new(TurnConfig::default());
        replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        tick(&mut t, 2.3);
        drain(&mut t);
        t.on_asr(2.6, &AsrEvent::SpeechEnded { at: 2.4 });
        t.on_asr(2.7, &final_("", 2.4));
        tick(&mut t, 3.5);
        assert!(drain(&mut t).is_empty());
    }

    #[test]
    fn a_cough_or_backchannel_does_not_interrupt() {
        let mut t = TurnManager::new(TurnConfig::default());
        replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        t.on_asr(2.25, &AsrEvent::SpeechEnded { at: 2.15 });
        t.on_asr(2.3, &final_("mm-hmm", 2.15));
        tick(&mut t, 3.0);
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.stats().ignored_short_speech, 1);
        t.on_agent_audio_finished(1);
        assert_eq!(
            drain(&mut t),
            vec![TurnAction::SetVadThreshold { threshold: 0.5 }]
        );
    }

    /// serve_echo: 160 ms of the agent's own echo leaked, then silence; the VAD reports the end of
    /// the utterance only 200 ms into the pause, and the barge-in timer, counting the pause as
    /// speech, interrupted the agent before that.
    #[test]
    fn only_speech_counts_toward_a_barge_in_not_the_pause_after_it() {
        let mut t = TurnManager::new(TurnConfig::default());
        replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        t.on_asr(2.2, &AsrEvent::Paused { at: 2.16 });
        tick(&mut t, 2.36);
        assert!(drain(&mut t).is_empty(), "160 ms of speech, then a pause");
        t.on_asr(2.38, &AsrEvent::SpeechEnded { at: 2.16 });
        tick(&mut t, 3.0);
        assert!(drain(&mut t).is_empty());
        assert_eq!(t.stats().ignored_short_speech, 1);

        // Speech on both sides of a short pause adds up: 160 ms, then 140 ms more.
        let mut t = TurnManager::new(TurnConfig::default());
        let reply = replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        t.on_asr(2.2, &AsrEvent::Paused { at: 2.16 });
        t.on_asr(2.3, &AsrEvent::Resumed { at: 2.26 });
        let due = t.poll_timeout().expect("the barge-in timer runs again");
        assert!((due - 2.4).abs() < 1e-9, "{due}");
        tick(&mut t, 2.39);
        assert!(drain(&mut t).is_empty());
        tick(&mut t, 2.41);
        assert_eq!(
            drain(&mut t).first(),
            Some(&TurnAction::StopOutput),
            "{reply}: 300 ms of speech in all"
        );
    }

    /// serve_echo: 450 ms of the agent's voice leaked back 1.2 s into a call's first reply,
    /// before the canceller had found the echo path.
    #[test]
    fn before_the_echo_path_is_found_a_barge_in_takes_longer_speech() {
        let mut t = TurnManager::new(TurnConfig::default());
        t.set_echo_path_found(false);
        let reply = replying(&mut t);
        t.on_asr(2.1, &AsrEvent::SpeechStarted { at: 2.0 });
        tick(&mut t, 2.45);
        assert!(
            drain(&mut t).is_empty(),
            "echo may still leak: 0.8 s needed"
        );
        t.set_echo_path_found(true);
        tick(&mut t, 2.46);
        assert_eq!(
            drain(&mut t).first(),
            Some(&TurnAction::StopOutput),
            "{reply}: once the path is found, 0.3 s of speech is enough"
        );
    }

    #[test]
    fn the_end_of_turn_wait_follows_how_finished_the_words_sound() {
        for (text, expected) in [
            ("Is my hemoglobin normal?", Completeness::Finished),
            ("Thanks.", Completeness::Finished),
            ("is my hemoglobin normal", Completeness::Unsure),
            ("call me back tomorrow", Completeness::Unsure),
            ("I wanted to ask about", Completeness::CutOff),
            ("my results and", Completeness::CutOff),
            ("so, um", Completeness::CutOff),
            ("well,", Completeness::CutOff),
        ] {
            assert_eq!(completeness(text), expected, "{text:?}");
        }
    }
}
