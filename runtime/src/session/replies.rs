//! Agent utterances on threads of their own: fixed sentences through the voice, LLM answers
//! through the agent's guard into the voice, each message tagged with its thread.
//!
//! An utterance that cannot be given (the LLM fails or stalls, the voice yields no audio) ends
//! with the fallback line, synthesized once per process so that it plays even when the voice is
//! what failed.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use talkline_llm::{CancelToken, ChatSession, GenerateParams, LlmError, Sampling};
use talkline_tts::stream::{self, AudioChunk, StreamConfig};
use talkline_tts::{PiperVoice, TtsError};
use tokio::sync::mpsc;

use super::{enqueue, lock, Afterwards, AgentAudio, Playing, ReplyState, Shared};
use crate::agent::{Agent, AgentAction, LlmRequest, ReplyVerdict};
use crate::turn::ReplyId;

/// The longest the LLM waits, once the voice has its first chunk, for that chunk's first audio.
/// On a machine with few cores the LLM writing ahead takes the cores from the voice's first
/// window, which is what the caller waits for, while the words it writes are not wanted until
/// the first chunk (a second or so of speech) has played. The cap keeps a stalled voice from
/// stalling the reply's text.
const FIRST_AUDIO_PRIORITY_WAIT: Duration = Duration::from_millis(400);
/// How often the waiting LLM looks at its reply's cancel token.
const FIRST_AUDIO_POLL: Duration = Duration::from_millis(5);

pub(super) enum ReplyMsg {
    EndOfUtterance {
        text: String,
        probability: f32,
    },
    FirstToken {
        reply: ReplyId,
        thread: u64,
        at: Instant,
    },
    Audio {
        reply: ReplyId,
        thread: u64,
        chunk: talkline_tts::stream::AudioChunk,
    },
    Done {
        reply: ReplyId,
        thread: u64,
        text: String,
    },
    Failed {
        reply: ReplyId,
        thread: u64,
        failure: Failure,
    },
}

/// The stage an utterance failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Llm,
    Tts,
}

impl Stage {
    pub(super) fn name(self) -> &'static str {
        match self {
            Stage::Llm => "llm",
            Stage::Tts => "tts",
        }
    }
}

/// Why an utterance could not be given, and what of it was spoken before.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) stage: Stage,
    /// A stable name: `connect`, `http_status`, `timeout`, `stream`, `no_audio`, ...
    pub(super) kind: &'static str,
    /// For the log: never carries what the caller or the model said.
    pub(super) detail: String,
    /// Text released to the voice before the failure, all of it synthesized and forwarded.
    pub(super) spoken: String,
}

impl Failure {
    fn llm(e: &LlmError, spoken: String) -> Self {
        Failure {
            stage: Stage::Llm,
            kind: e.kind(),
            detail: e.redacted(),
            spoken,
        }
    }

    fn tts(e: &TtsError) -> Self {
        Failure {
            stage: Stage::Tts,
            kind: "synthesis",
            detail: e.to_string(),
            spoken: String::new(),
        }
    }

    /// The utterance ended without a sample of audio.
    fn silent(text: &str) -> Self {
        let (stage, kind, detail) = if text.trim().is_empty() {
            (Stage::Llm, "empty_reply", "the LLM answered nothing")
        } else {
            (Stage::Tts, "no_audio", "the voice yielded no audio")
        };
        Failure {
            stage,
            kind,
            detail: detail.into(),
            spoken: String::new(),
        }
    }

    fn thread(what: &str, e: &std::io::Error) -> Self {
        Failure {
            stage: Stage::Tts,
            kind: "thread",
            detail: format!("cannot start a {what} thread: {e}"),
            spoken: String::new(),
        }
    }
}

/// How long a closing session waits for its utterance threads; each checks its cancel token at
/// least every few tens of milliseconds, so only a wedged model run takes longer.
pub(super) const THREADS_JOIN_TIMEOUT: Duration = Duration::from_secs(3);

/// `[agent] fallback_line`, synthesized once per process at the voice's own rate.
pub struct FallbackLine {
    text: String,
    chunks: Vec<AudioChunk>,
}

impl FallbackLine {
    /// Synthesizes `text` now; an empty text is a silent fallback. Fails when the voice cannot
    /// say it, so a line that could never play is reported at start-up.
    pub fn synthesize(voice: &Arc<Mutex<PiperVoice>>, text: &str) -> anyhow::Result<Self> {
        let text = text.trim().to_string();
        let mut chunks = Vec::new();
        if !text.is_empty() {
            // Whole chunks: the line is resampled chunk by chunk for each session's rate, and
            // its latency does not matter (it is ready before any call).
            let config = StreamConfig {
                first_window_frames: None,
                ..StreamConfig::default()
            };
            let (mut text_in, mut audio_out) = stream::start(voice.clone(), config)?;
            text_in.push(&text)?;
            text_in.finish()?;
            while let Some(chunk) = audio_out.recv() {
                chunks.push(chunk?);
            }
            anyhow::ensure!(
                chunks.iter().any(|c| !c.samples.is_empty()),
                "[agent] fallback_line {text:?} yields no audio from the voice"
            );
        }
        Ok(FallbackLine { text, chunks })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The line at a session's output rate. A line that cannot be resampled is left silent
    /// rather than failing the call.
    pub(super) fn for_session(&self, rate: u32) -> SessionFallback {
        let resampled: Result<Vec<AudioChunk>, TtsError> = self
            .chunks
            .iter()
            .filter(|c| !c.samples.is_empty())
            .map(|c| {
                let mut c = c.clone();
                if c.sample_rate != rate {
                    c.samples = talkline_tts::resample::resample(&c.samples, c.sample_rate, rate)?;
                    for (_, t) in &mut c.word_ends {
                        *t = *t * u64::from(rate) / u64::from(c.sample_rate);
                    }
                    c.sample_rate = rate;
                }
                Ok(c)
            })
            .collect();
        let audio = resampled.unwrap_or_else(|e| {
            tracing::warn!("the fallback line cannot be resampled to {rate} Hz: {e}");
            Vec::new()
        });
        SessionFallback {
            line: self.text.clone(),
            audio,
        }
    }
}

/// The fallback line of one session, at its output rate.
pub(super) struct SessionFallback {
    pub(super) line: String,
    audio: Vec<AudioChunk>,
}

impl SessionFallback {
    /// Queues the line after whatever of reply `reply` was already queued. Without audio to play
    /// the reply still gets an (empty) turn at the floor, so the turn ends the usual way.
    pub(super) fn play(
        &self,
        queue: &mut AgentAudio,
        playing: &mut Option<Playing>,
        reply: ReplyId,
        r: &mut ReplyState,
        now: f64,
    ) {
        // The history keeps what was heard: the words spoken before the failure, then the line.
        let before = if r.first_audio_at.is_some() {
            r.generated.trim()
        } else {
            ""
        };
        r.generated = [before, self.line.as_str()]
            .iter()
            .filter(|t| !t.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        r.failed = false;
        let start = match playing {
            Some(p) if p.reply != reply => return, // another reply holds the floor
            Some(p) => p.queued,
            None => 0,
        };
        for chunk in &self.audio {
            enqueue(queue, playing, reply, chunk.clone(), now);
        }
        let p = playing.get_or_insert_with(|| Playing::new(reply, now));
        if !self.audio.is_empty() {
            p.fallback_at = Some(start);
        }
    }
}

/// Starts what an agent asks for on threads of their own, numbering each so that a reply
/// restarted under the same id ignores what its previous thread still sends.
pub(super) struct Launcher {
    pub(super) shared: Arc<Shared>,
    pub(super) chat: Arc<Mutex<Box<dyn ChatSession>>>,
    pub(super) agent: Arc<Mutex<Box<dyn Agent>>>,
    pub(super) out_rate: u32,
    pub(super) tx: mpsc::Sender<ReplyMsg>,
    pub(super) threads: u64,
    /// Every utterance thread not yet seen to end, joined when the session closes.
    pub(super) handles: Vec<JoinHandle<()>>,
}

impl Launcher {
    pub(super) fn run(&mut self, reply: ReplyId, r: &mut ReplyState, action: AgentAction) {
        self.threads += 1;
        r.thread = self.threads;
        r.cancel = CancelToken::new();
        // What an earlier thread of this reply reported no longer stands.
        r.done = false;
        r.failed = false;
        r.generated.clear();
        r.action = Some(action.clone());
        let (thread, cancel) = (r.thread, r.cancel.clone());
        self.handles.retain(|h| !h.is_finished());
        let speak = |text: String| {
            spawn_speech(
                reply,
                thread,
                self.shared.clone(),
                text,
                self.out_rate,
                cancel.clone(),
                self.tx.clone(),
            )
        };
        let handle = match action {
            AgentAction::Say(text) => speak(text),
            AgentAction::Transfer { reason, say } => {
                r.afterwards = Afterwards::Transfer;
                r.transfer_reason = reason;
                speak(say)
            }
            AgentAction::Hangup { say } => {
                r.afterwards = Afterwards::HangUp;
                speak(say)
            }
            AgentAction::AskLlm(request) => {
                let checks = lock(&self.agent).checks_replies();
                spawn_reply(
                    ReplyJob {
                        reply,
                        thread,
                        request,
                        checks,
                    },
                    self.shared.clone(),
                    self.chat.clone(),
                    self.agent.clone(),
                    self.out_rate,
                    cancel.clone(),
                    self.tx.clone(),
                )
            }
        };
        self.handles.extend(handle);
    }

    /// Keeps a helper thread of the session (a prefill, an end-of-utterance estimate) to be
    /// joined with the utterance threads; the ones already ended are let go.
    pub(super) fn track(&mut self, handle: Option<JoinHandle<()>>) {
        self.handles.retain(|h| !h.is_finished());
        self.handles.extend(handle);
    }

    /// Waits up to `within` for every utterance thread to end (their replies must have been
    /// cancelled and the reply queue closed, or they may wait on it); says how many did not.
    pub(super) async fn join(&mut self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        while self.handles.iter().any(|h| !h.is_finished())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (done, left): (Vec<_>, Vec<_>) =
            self.handles.drain(..).partition(JoinHandle::is_finished);
        for h in done {
            if h.join().is_err() {
                tracing::error!("an utterance thread panicked");
            }
        }
        if !left.is_empty() {
            tracing::warn!(
                threads = left.len(),
                "utterance threads outlived their session"
            );
        }
        left.len()
    }
}

/// Tells the control loop a thread could not be started, so the reply does not wait forever.
fn report_spawn_error(
    tx: &mpsc::Sender<ReplyMsg>,
    reply: ReplyId,
    thread: u64,
    what: &str,
    e: &std::io::Error,
) {
    tracing::error!("cannot start a {what} thread: {e}");
    let failure = Failure::thread(what, e);
    let _ = tx.try_send(ReplyMsg::Failed {
        reply,
        thread,
        failure,
    });
}

/// Speaks a fixed text (a greeting, an agent's sentence): the TTS stream alone, no LLM.
fn spawn_speech(
    reply: ReplyId,
    thread: u64,
    shared: Arc<Shared>,
    text: String,
    out_rate: u32,
    cancel: CancelToken,
    tx: mpsc::Sender<ReplyMsg>,
) -> Option<JoinHandle<()>> {
    let span = tracing::info_span!("speech", reply);
    let thread_tx = tx.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("speech-{reply}"))
        .spawn(move || {
            let _speech = span.enter();
            let result = (|| -> Result<u64, TtsError> {
                let config = StreamConfig {
                    output_rate: Some(out_rate),
                    chunker: shared.chunker,
                    ..StreamConfig::default()
                };
                let (mut text_in, mut audio_out) = stream::start(shared.voice.clone(), config)?;
                text_in.push(&text)?;
                text_in.finish()?;
                Ok(forward_audio(
                    &mut audio_out,
                    reply,
                    thread,
                    &cancel,
                    &tx,
                    None,
                ))
            })();
            let msg = match result {
                Ok(0) if !cancel.is_cancelled() => ReplyMsg::Failed {
                    reply,
                    thread,
                    failure: Failure::silent(&text),
                },
                Ok(_) => ReplyMsg::Done {
                    reply,
                    thread,
                    text,
                },
                Err(e) => ReplyMsg::Failed {
                    reply,
                    thread,
                    failure: Failure::tts(&e),
                },
            };
            let _ = tx.blocking_send(msg);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            report_spawn_error(&thread_tx, reply, thread, "speech", &e);
            None
        }
    }
}

/// One LLM answer to speak.
struct ReplyJob {
    reply: ReplyId,
    thread: u64,
    request: LlmRequest,
    /// Pass each clause through the agent's guard before it is spoken.
    checks: bool,
}

/// The LLM's words on their way to the voice: straight through, or clause by clause past the
/// agent's guard, which may replace the rest of the answer with a safe line.
struct GuardedText<'a> {
    agent: Option<&'a Mutex<Box<dyn Agent>>>,
    /// Released to the voice.
    spoken: String,
    /// Waiting for its clause to end before the guard sees it.
    pending: String,
    replaced: bool,
}

impl GuardedText<'_> {
    /// Takes a piece of the answer; returns text to speak now, if any.
    fn push(&mut self, piece: &str) -> Option<String> {
        if self.replaced {
            return None;
        }
        let Some(agent) = self.agent else {
            self.spoken.push_str(piece);
            return Some(piece.to_string());
        };
        self.pending.push_str(piece);
        let clause_ended = self
            .pending
            .trim_end()
            .ends_with(['.', ',', ';', ':', '!', '?']);
        if clause_ended {
            self.release(agent)
        } else {
            None
        }
    }

    /// The end of the answer: the last words, checked.
    fn finish(&mut self) -> Option<String> {
        match self.agent {
            Some(agent) if !self.replaced && !self.pending.trim().is_empty() => self.release(agent),
            _ => None,
        }
    }

    fn release(&mut self, agent: &Mutex<Box<dyn Agent>>) -> Option<String> {
        let candidate = format!("{}{}", self.spoken, self.pending);
        let verdict = lock(agent).check_reply(&candidate);
        match verdict {
            ReplyVerdict::Speak => {
                self.spoken = candidate;
                Some(std::mem::take(&mut self.pending))
            }
            ReplyVerdict::Replace(line) => {
                self.replaced = true;
                self.pending.clear();
                let line = format!(" {}", line.trim());
                self.spoken.push_str(&line);
                Some(line)
            }
        }
    }
}

fn spawn_reply(
    job: ReplyJob,
    shared: Arc<Shared>,
    chat: Arc<Mutex<Box<dyn ChatSession>>>,
    agent: Arc<Mutex<Box<dyn Agent>>>,
    out_rate: u32,
    cancel: CancelToken,
    tx: mpsc::Sender<ReplyMsg>,
) -> Option<JoinHandle<()>> {
    let (reply, thread) = (job.reply, job.thread);
    let span = tracing::info_span!("reply", reply);
    let thread_tx = tx.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("reply-{reply}"))
        .spawn(move || {
            let _reply = span.enter();
            let result = (|| -> Result<(String, u64), Failure> {
                let config = StreamConfig {
                    output_rate: Some(out_rate),
                    chunker: shared.chunker,
                    ..StreamConfig::default()
                };
                let (mut text_in, mut audio_out) =
                    stream::start(shared.voice.clone(), config).map_err(|e| Failure::tts(&e))?;
                let audio_tx = tx.clone();
                let audio_cancel = cancel.clone();
                let tts_span = tracing::info_span!("tts");
                let (voiced_tx, voiced_rx) = std::sync::mpsc::sync_channel::<()>(1);
                let collector = std::thread::Builder::new()
                    .name(format!("reply-{reply}-audio"))
                    .spawn(move || {
                        let _tts = tts_span.enter();
                        forward_audio(
                            &mut audio_out,
                            reply,
                            thread,
                            &audio_cancel,
                            &audio_tx,
                            Some(voiced_tx),
                        )
                    })
                    .map_err(|e| Failure::thread("reply audio", &e))?;
                let params = GenerateParams {
                    max_tokens: job.request.max_tokens.min(shared.max_tokens),
                    sampling: Sampling::Greedy,
                };
                // The LLM stops on its own token when the guard replaces the answer; the voice
                // goes on to speak the safe line. A cancelled reply stops it too, even while it
                // waits on the network between tokens.
                let llm_cancel = cancel.child();
                let mut text = GuardedText {
                    agent: job.checks.then_some(&*agent),
                    spoken: String::new(),
                    pending: String::new(),
                    replaced: false,
                };
                let mut first = true;
                let mut voice_started = false;
                let llm_span = tracing::info_span!("llm").entered();
                let waiting = Instant::now();
                let mut chat = chat.lock().map_err(|_| Failure {
                    stage: Stage::Llm,
                    kind: "poisoned",
                    detail: "the chat session is poisoned by an earlier panic".into(),
                    spoken: String::new(),
                })?;
                tracing::debug!(
                    wait_ms = waiting.elapsed().as_secs_f64() * 1000.0,
                    "the chat session is free"
                );
                let replied =
                    chat.reply(&job.request.messages, &params, &llm_cancel, &mut |piece| {
                        if first {
                            first = false;
                            let _ = tx.blocking_send(ReplyMsg::FirstToken {
                                reply,
                                thread,
                                at: Instant::now(),
                            });
                        }
                        if cancel.is_cancelled() {
                            llm_cancel.cancel();
                            return;
                        }
                        if let Some(speak) = text.push(piece) {
                            if text_in.push(&speak).is_err() {
                                llm_cancel.cancel();
                            }
                        }
                        if text.replaced {
                            llm_cancel.cancel();
                        }
                        if !voice_started && text_in.chunks_sent() > 0 {
                            voice_started = true;
                            wait_for_first_audio(&voiced_rx, &cancel);
                        }
                    });
                drop(chat);
                if let Ok(r) = &replied {
                    let s = &r.stats;
                    // Counts and times only: never the words.
                    tracing::debug!(
                        prompt_tokens = s.prompt_tokens,
                        reused_tokens = s.reused_tokens,
                        prefill_ms = s.prefill_time.as_secs_f64() * 1000.0,
                        first_token_ms = s.time_to_first_token.as_secs_f64() * 1000.0,
                        generated_tokens = s.generated_tokens,
                        "reply generated"
                    );
                }
                drop(llm_span);
                let llm_error = replied.err();
                if cancel.is_cancelled() {
                    drop(text_in);
                } else {
                    // After a failure only what the voice already has is said (the guard has not
                    // seen the rest); the fallback line then follows it.
                    if llm_error.is_none() {
                        if let Some(speak) = text.finish() {
                            let _ = text_in.push(&speak);
                        }
                    }
                    let _ = text_in.finish();
                }
                let samples = collector.join().unwrap_or(0);
                match llm_error {
                    Some(e) => Err(Failure::llm(&e, text.spoken)),
                    None => Ok((text.spoken, samples)),
                }
            })();
            let msg = match result {
                Ok((text, 0)) if !cancel.is_cancelled() => ReplyMsg::Failed {
                    reply,
                    thread,
                    failure: Failure::silent(&text),
                },
                Ok((text, _)) => ReplyMsg::Done {
                    reply,
                    thread,
                    text,
                },
                Err(failure) => ReplyMsg::Failed {
                    reply,
                    thread,
                    failure,
                },
            };
            let _ = tx.blocking_send(msg);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            report_spawn_error(&thread_tx, reply, thread, "reply", &e);
            None
        }
    }
}

/// Why the LLM stopped waiting for the voice's first audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstAudioWait {
    Voiced,
    Cancelled,
    /// The voice ended (or failed) without audio.
    VoiceGone,
    /// [`FIRST_AUDIO_PRIORITY_WAIT`] passed.
    GaveUp,
}

/// Holds the LLM's thread until the voice's first audio exists ([`FIRST_AUDIO_PRIORITY_WAIT`]
/// at most), the reply is cancelled or the voice has ended.
fn wait_for_first_audio(
    voiced: &std::sync::mpsc::Receiver<()>,
    cancel: &CancelToken,
) -> FirstAudioWait {
    use std::sync::mpsc::RecvTimeoutError;
    let waiting = Instant::now();
    let outcome = loop {
        if cancel.is_cancelled() {
            break FirstAudioWait::Cancelled;
        }
        if waiting.elapsed() >= FIRST_AUDIO_PRIORITY_WAIT {
            break FirstAudioWait::GaveUp;
        }
        match voiced.recv_timeout(FIRST_AUDIO_POLL) {
            Ok(()) => break FirstAudioWait::Voiced,
            Err(RecvTimeoutError::Disconnected) => break FirstAudioWait::VoiceGone,
            Err(RecvTimeoutError::Timeout) => {}
        }
    };
    tracing::debug!(
        wait_ms = waiting.elapsed().as_secs_f64() * 1000.0,
        ?outcome,
        "the LLM waited for the voice's first audio"
    );
    outcome
}

/// Hands each synthesized chunk to the control loop until the voice is done, the reply is
/// cancelled (dropping `audio_out` then stops synthesis) or the session is gone. Returns the
/// samples handed over. A chunk without samples (text the voice cannot say) is not handed over:
/// its words were never heard. `voiced`, if any, hears of the first chunk with samples.
fn forward_audio(
    audio_out: &mut stream::AudioOutput,
    reply: ReplyId,
    thread: u64,
    cancel: &CancelToken,
    tx: &mpsc::Sender<ReplyMsg>,
    voiced: Option<std::sync::mpsc::SyncSender<()>>,
) -> u64 {
    let mut samples = 0u64;
    while let Some(chunk) = audio_out.recv() {
        if cancel.is_cancelled() {
            break;
        }
        match chunk {
            // A piece within a word, with nothing to play; one with words is still queued, or
            // they would be missing from what was heard.
            Ok(chunk) if chunk.samples.is_empty() && chunk.text.is_empty() => {}
            Ok(chunk) => {
                let n = chunk.samples.len() as u64;
                if let Some(voiced) = voiced.as_ref().filter(|_| n > 0) {
                    // Full after the first: only the first matters.
                    let _ = voiced.try_send(());
                }
                let msg = ReplyMsg::Audio {
                    reply,
                    thread,
                    chunk,
                };
                if tx.blocking_send(msg).is_err() {
                    break;
                }
                samples += n;
            }
            Err(e) => tracing::warn!("a chunk failed to synthesize: {e}"),
        }
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_llm_waits_for_the_first_audio_until_it_exists_the_reply_is_cancelled_or_the_voice_ends()
    {
        let cancel = CancelToken::new();
        let (voiced_tx, voiced_rx) = std::sync::mpsc::sync_channel(1);
        voiced_tx.send(()).expect("the receiver is alive");
        assert_eq!(
            wait_for_first_audio(&voiced_rx, &cancel),
            FirstAudioWait::Voiced
        );

        let cancelled = CancelToken::new();
        cancelled.cancel();
        assert_eq!(
            wait_for_first_audio(&voiced_rx, &cancelled),
            FirstAudioWait::Cancelled
        );

        let (_, nothing) = std::sync::mpsc::sync_channel::<()>(1);
        assert_eq!(
            wait_for_first_audio(&nothing, &cancel),
            FirstAudioWait::VoiceGone
        );

        // A voice that stays silent: the LLM goes on after the cap.
        assert_eq!(
            wait_for_first_audio(&voiced_rx, &cancel),
            FirstAudioWait::GaveUp
        );
    }

    fn chunk(text: &str, samples: usize) -> AudioChunk {
        AudioChunk {
            index: 0,
            text: text.into(),
            ends_chunk: true,
            samples: vec![0.1; samples],
            sample_rate: 16_000,
            skipped: Vec::new(),
            word_ends: vec![(text.len(), samples as u64)],
            timed_by_model: false,
        }
    }

    fn line(text: &str, samples: usize) -> SessionFallback {
        SessionFallback {
            line: text.into(),
            audio: if samples > 0 {
                vec![chunk(text, samples)]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn the_fallback_line_follows_the_words_already_queued_and_the_history_keeps_both() {
        let (mut queue, mut playing) = (AgentAudio::new(16_000), None);
        let mut r = ReplyState::new("question".into(), 0.0);
        enqueue(&mut queue, &mut playing, 1, chunk("One moment.", 200), 0.0);
        r.first_audio_at = Some(0.0);
        r.generated = "One moment. ".into();
        line("Sorry.", 300).play(&mut queue, &mut playing, 1, &mut r, 0.0);
        assert_eq!(r.generated, "One moment. Sorry.");
        let p = playing.expect("the reply holds the floor");
        assert_eq!(
            (p.fallback_at, p.queued, queue.len()),
            (Some(200), 500, 500)
        );
    }

    #[test]
    fn words_never_voiced_are_not_kept_and_a_silent_line_still_ends_the_turn() {
        let (mut queue, mut playing) = (AgentAudio::new(16_000), None);
        let mut r = ReplyState::new("question".into(), 0.0);
        r.generated = "\u{1F642}".into();
        line("Sorry.", 300).play(&mut queue, &mut playing, 1, &mut r, 0.0);
        assert_eq!(r.generated, "Sorry.");
        assert_eq!(playing.as_ref().and_then(|p| p.fallback_at), Some(0));

        let (mut queue, mut playing) = (AgentAudio::new(16_000), None);
        line("", 0).play(&mut queue, &mut playing, 2, &mut r, 0.0);
        let p = playing.expect("an empty turn at the floor, so the reply finishes");
        assert_eq!((p.reply, p.queued, p.fallback_at), (2, 0, None));
    }
}
