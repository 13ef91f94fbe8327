//! A live conversation: audio in, audio and events out, in real time.
//!
//! Transport-agnostic: a transport feeds 16 kHz mono audio and carries [`SessionOutput`] back.
//! One tokio task runs the session's control loop; Whisper runs on the stream's own thread
//! ([`AsrEngine`]); each reply runs the LLM on a thread of its own feeding the TTS stream's
//! synthesis thread ([`replies`]); the echo canceller has a thread of its own ([`echo_path`]).
//! The loop is the only owner of session state, so nothing is shared mutably across tasks but
//! the chat session, which one reply thread at a time holds, and the call's agent, whose guard
//! the reply threads consult clause by clause.
//!
//! Output is paced here at 20 ms frames: a barge-in clears the queue, so the next frame after the
//! decision is silent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use talkline_asr::engine::AsrEngine;
use talkline_asr::streaming::{AsrEvent, StreamingConfig};
use talkline_asr::vad::SpeechProbability;
use talkline_llm::{CancelToken, ChatModel, ChatSession, Message};
use talkline_tts::PiperVoice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod agent_audio;
mod echo_path;
mod media_clock;
mod replies;

use agent_audio::AgentAudio;
use echo_path::{EchoPath, CLEANED_QUEUE};
use media_clock::MediaClock;
pub use replies::FallbackLine;
use replies::{Launcher, ReplyMsg, THREADS_JOIN_TIMEOUT};

use crate::agent::{Agent, AgentAction, AgentFactory, LlmRequest};
use crate::metrics::{Speculation, TurnLatencies};
use crate::turn::{CancelReason, ReplyId, TurnAction, TurnConfig, TurnManager};

/// ASR events waiting for the control loop. Policy when full: drop the event (a newer partial
/// supersedes it) and count it; the ASR thread never blocks on the session.
pub const ASR_EVENT_QUEUE: usize = 64;
/// Messages from reply threads. Policy when full: the reply thread waits (back-pressure on the
/// LLM and TTS, never on live audio).
pub const REPLY_QUEUE: usize = 32;
/// Output frames waiting for the transport. Policy when full: drop the frame and count it; a
/// stalled client never blocks the session.
pub const OUTPUT_QUEUE: usize = 50;

const FRAME_S: f64 = 0.02;
/// How soon the loop looks again at a turn timer that is due by the audio received but not yet
/// by the audio the VAD has run (normally under a millisecond of work away).
const TIMER_RECHECK: Duration = Duration::from_millis(3);

/// What every session shares: models loaded once per process.
pub struct Shared {
    pub asr: AsrEngine,
    pub streaming: StreamingConfig,
    pub vad: Box<dyn Fn() -> Box<dyn SpeechProbability> + Send + Sync>,
    pub chat: Arc<dyn ChatModel>,
    pub voice: Arc<Mutex<PiperVoice>>,
    /// Process-wide counters and latency histograms (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancel the agent's own voice looped back into the caller's audio (see [`crate::echo`]).
    pub echo_cancellation: bool,
    /// Makes each call's agent: what is said in answer to each turn (see [`crate::agent`]).
    pub agents: AgentFactory,
    /// No audio from the caller for this long ends the session.
    pub idle_timeout: Duration,
    pub max_tokens: usize,
    pub turn: TurnConfig,
    /// Said when a reply cannot be given (see [`replies`]).
    pub fallback: FallbackLine,
    /// Where replies are cut into chunks for the voice (`[tts]`).
    pub chunker: talkline_tts::chunker::ChunkerConfig,
}

/// What the session sends to its transport.
#[derive(Debug, Clone)]
pub enum SessionOutput {
    /// 20 ms of agent audio at the session's output rate.
    Audio(Vec<f32>),
    /// Drop any audio already queued on the client (barge-in).
    Clear,
    Event(serde_json::Value),
}

/// What follows an agent utterance once it has been played.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Afterwards {
    #[default]
    Listen,
    /// Hand the caller to a human (an event for the transport: SIP REFER, a browser's UI).
    Transfer,
    HangUp,
}

struct ReplyState {
    cancel: CancelToken,
    user_text: String,
    speculative: bool,
    committed: bool,
    /// Audio not yet queued for output (held while speculative).
    held: Vec<talkline_tts::stream::AudioChunk>,
    done: bool,
    generated: String,
    started_at: f64,
    first_token_at: Option<f64>,
    first_audio_at: Option<f64>,
    speech_end: Option<f64>,
    asr_final: Option<f64>,
    missed: bool,
    /// The thread whose messages count: a reply restarted under the same id ignores its old one.
    thread: u64,
    /// The LLM request a speculative reply was started with.
    request: Option<LlmRequest>,
    /// What the agent asked for, kept so that a reply withdrawn before it played can be run again
    /// without asking the agent twice ([`TurnAction::RetryReply`]).
    action: Option<AgentAction>,
    afterwards: Afterwards,
    transfer_reason: String,
    /// The utterance failed; the fallback line plays once the reply is committed.
    failed: bool,
}

impl ReplyState {
    fn new(user_text: String, started_at: f64) -> Self {
        ReplyState {
            cancel: CancelToken::new(),
            user_text,
            speculative: false,
            committed: true,
            held: Vec::new(),
            done: false,
            generated: String::new(),
            started_at,
            first_token_at: None,
            first_audio_at: None,
            speech_end: None,
            asr_final: None,
            missed: false,
            thread: 0,
            request: None,
            action: None,
            afterwards: Afterwards::Listen,
            transfer_reason: String::new(),
            failed: false,
        }
    }

    /// Whether a message from `thread` is about the reply's current work.
    fn current(&self, thread: u64) -> bool {
        self.thread == thread
    }
}

/// The agent's lock: a poisoned one (a panic elsewhere) still holds a usable agent.
fn lock(agent: &Mutex<Box<dyn Agent>>) -> std::sync::MutexGuard<'_, Box<dyn Agent>> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

/// A chunk of a reply as queued for output.
struct QueuedChunk {
    text: String,
    /// (byte end of each word in `text`, samples into the chunk when it has been spoken)
    word_ends: Vec<(usize, u64)>,
    /// Samples into the reply where the chunk starts, and its length.
    start: u64,
    len: u64,
}

/// The reply being played: chunk texts with their word end positions, for "what was heard".
struct Playing {
    reply: ReplyId,
    played: u64,
    chunks: Vec<QueuedChunk>,
    queued: u64,
    first_out_at: f64,
    /// Samples into the reply where the fallback line starts, until it is announced.
    fallback_at: Option<u64>,
    /// Output ticks on which the reply had begun and more of it was coming, but none was queued:
    /// a gap the caller hears inside the reply (the voice fell behind the playback).
    starved_ticks: u64,
}

impl Playing {
    fn new(reply: ReplyId, now: f64) -> Self {
        Playing {
            reply,
            played: 0,
            chunks: Vec::new(),
            queued: 0,
            first_out_at: now,
            fallback_at: None,
            starved_ticks: 0,
        }
    }

    fn heard(&self) -> String {
        let mut words = Vec::new();
        for chunk in &self.chunks {
            if self.played >= chunk.start + chunk.len {
                // A piece within a word has no text of its own.
                if !chunk.text.trim().is_empty() {
                    words.push(chunk.text.trim().to_string());
                }
                continue;
            }
            let heard_to = chunk
                .word_ends
                .iter()
                .take_while(|(_, at)| chunk.start + at <= self.played)
                .last()
                .map_or(0, |(byte_end, _)| *byte_end);
            if heard_to > 0 {
                let end = (0..=heard_to.min(chunk.text.len()))
                    .rev()
                    .find(|&i| chunk.text.is_char_boundary(i))
                    .unwrap_or(0);
                words.push(chunk.text[..end].trim().to_string());
            }
            break;
        }
        words.join(" ")
    }
}

/// Runs one session until the input ends or `cancel` fires. `input` carries 16 kHz mono audio.
/// Everything it logs, on any thread, is inside a `session` span; each reply inside a `reply`
/// span with `llm` and `tts` spans under it.
pub async fn run(
    shared: Arc<Shared>,
    out_rate: u32,
    input: mpsc::Receiver<Vec<f32>>,
    output: mpsc::Sender<SessionOutput>,
    cancel: CancellationToken,
    name: String,
) -> anyhow::Result<()> {
    run_with_keys(shared, out_rate, input, None, output, cancel, name).await
}

/// [`run`], with the caller's DTMF keys (`0`-`9`, `*`, `#`) for the agent. The keys never reach
/// a log.
pub async fn run_with_keys(
    shared: Arc<Shared>,
    out_rate: u32,
    input: mpsc::Receiver<Vec<f32>>,
    keys: Option<mpsc::Receiver<char>>,
    output: mpsc::Sender<SessionOutput>,
    cancel: CancellationToken,
    name: String,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("session", session = %name);
    run_session(shared, out_rate, input, keys, output, cancel, name)
        .instrument(span)
        .await
}

async fn next_key(keys: &mut Option<mpsc::Receiver<char>>) -> Option<char> {
    match keys {
        Some(k) => k.recv().await,
        None => std::future::pending().await,
    }
}

async fn run_session(
    shared: Arc<Shared>,
    out_rate: u32,
    mut input: mpsc::Receiver<Vec<f32>>,
    mut keys: Option<mpsc::Receiver<char>>,
    output: mpsc::Sender<SessionOutput>,
    cancel: CancellationToken,
    name: String,
) -> anyhow::Result<()> {
    let (asr_tx, mut asr_rx) = mpsc::channel(ASR_EVENT_QUEUE);
    let asr =
        shared
            .asr
            .open_stream(&name, shared.streaming.clone(), (shared.vad)(), move |e| {
                if asr_tx.try_send(e).is_err() {
                    tracing::debug!("ASR event dropped: the session is behind");
                }
            })?;
    let (cleaned_tx, mut cleaned_rx) = mpsc::channel::<Vec<f32>>(CLEANED_QUEUE);
    let mut echo = EchoPath::new(shared.echo_cancellation, out_rate, cleaned_tx)?;
    // Samples handed to the ASR: the media time of the next one.
    let mut delivered = 0u64;
    let chat: Arc<Mutex<Box<dyn ChatSession>>> = Arc::new(Mutex::new(shared.chat.new_session()?));
    let (reply_tx, mut reply_rx) = mpsc::channel(REPLY_QUEUE);
    let mut turns = TurnManager::new(shared.turn.clone());
    let agent: Arc<Mutex<Box<dyn Agent>>> = Arc::new(Mutex::new(shared.agents.new_agent(&name)));
    let mut launcher = Launcher {
        shared: shared.clone(),
        chat: chat.clone(),
        agent: agent.clone(),
        out_rate,
        tx: reply_tx.clone(),
        threads: 0,
        handles: Vec::new(),
    };
    let fallback = shared.fallback.for_session(out_rate);
    let mut replies: HashMap<ReplyId, ReplyState> = HashMap::new();
    // The reply a caller's sound cancelled before any of it played, until that sound is
    // transcribed (see `TurnAction::RetryReply`).
    let mut withdrawn: Option<(ReplyId, ReplyState)> = None;
    let greeting = lock(&agent).greeting().filter(|g| !g.trim().is_empty());
    if let Some(greeting) = greeting {
        // The greeting is an agent turn like any reply: it can be barged in on.
        let reply = turns.greet();
        let mut r = ReplyState::new(String::new(), 0.0);
        launcher.run(reply, &mut r, AgentAction::Say(greeting));
        replies.insert(reply, r);
    }
    // Set when an utterance that ends the call has been played.
    let mut hang_up = false;
    let mut queue = AgentAudio::new(out_rate);
    let mut playing: Option<Playing> = None;
    let frame = (out_rate as f64 * FRAME_S) as usize;
    let mut dropped_frames = 0u64;

    let mut clock = MediaClock::new(Instant::now());
    let mut last_audio = Instant::now();
    let started = Instant::now();
    let report = TurnReport {
        output: &output,
        started,
        metrics: &shared.metrics,
    };
    let mut speech_end: Option<f64> = None;
    let mut asr_final: Option<f64> = None;
    let mut missed = false;
    // One background prefill at a time (see `prefill_while_speaking`).
    let prefill_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Wakes the loop to fire a turn timer the listener is about to reach (see below).
    let recheck = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(recheck);
    let mut recheck_armed = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let send = |output: &mpsc::Sender<SessionOutput>, msg: SessionOutput, dropped: &mut u64| {
        if output.try_send(msg).is_err() {
            *dropped += 1;
        }
    };
    let result = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = &mut recheck, if recheck_armed => recheck_armed = false,
            audio = input.recv() => {
                let Some(audio) = audio else { break Ok(()) };
                clock.on_audio(audio.len(), Instant::now());
                // Transports send 20 ms frames; half a second without any means the stream itself
                // paused (a half-duplex client). Shorter stalls are network or load bursts: the
                // canceller keeps its alignment through those, so they must not reset it.
                let after_gap = last_audio.elapsed() > Duration::from_millis(500);
                if let Some(audio) = echo.heard(audio, after_gap) {
                    asr.push(delivered as f64 / 16_000.0, &audio);
                    delivered += audio.len() as u64;
                }
                last_audio = Instant::now();
            }
            Some(audio) = cleaned_rx.recv() => {
                asr.push(delivered as f64 / 16_000.0, &audio);
                delivered += audio.len() as u64;
            }
            Some(event) = asr_rx.recv() => {
                let now = clock.now(Instant::now());
                match &event {
                    AsrEvent::Partial { committed, tentative, .. } => send(&output, SessionOutput::Event(
                        json!({"type": "partial", "committed": committed, "tentative": tentative})), &mut dropped_frames),
                    AsrEvent::Final { text, .. } => {
                        asr_final = Some(now);
                        send(&output, SessionOutput::Event(json!({"type": "final", "text": text})), &mut dropped_frames);
                    }
                    AsrEvent::SpeechEnded { at } => speech_end = Some(*at),
                    _ => {}
                }
                tracing::debug!(session = %name, now, event = %crate::turn::redacted_asr_event(&event), "asr");
                turns.on_asr(now, &event);
                // A prefill started just before a reply would make the reply wait for it.
                let prefill_words = match &event {
                    _ if turns.reply_due() => None,
                    AsrEvent::SpeechStarted { .. } => Some(""),
                    AsrEvent::Partial { committed, .. } if !committed.is_empty() => Some(committed.as_str()),
                    _ => None,
                };
                if let Some(words) = prefill_words {
                    let context = lock(&agent).speculate(words);
                    launcher.track(prefill_while_speaking(&chat, &prefill_busy, context));
                }
            }
            // Audio is taken only while a whole chunk fits; until then the reply threads wait.
            Some(msg) = reply_rx.recv(), if queue.has_room_for_a_chunk() => {
                let now = clock.now(Instant::now());
                let at = |i: Instant| now - i.elapsed().as_secs_f64();
                match msg {
                    ReplyMsg::FirstToken { reply, thread, at: i } => {
                        if let Some(r) = replies.get_mut(&reply).filter(|r| r.current(thread)) { r.first_token_at = Some(at(i)); }
                    }
                    ReplyMsg::Audio { reply, thread, chunk } => {
                        if let Some(r) = replies.get_mut(&reply).filter(|r| r.current(thread)) {
                            if r.first_audio_at.is_none() {
                                tracing::debug!(reply, now, committed = r.committed, "the reply's first audio");
                            }
                            r.first_audio_at.get_or_insert(now);
                            if r.committed {
                                enqueue(&mut queue, &mut playing, reply, chunk, now);
                            } else {
                                r.held.push(chunk);
                            }
                        }
                    }
                    ReplyMsg::Done { reply, thread, text } => {
                        if let Some(r) = replies.get_mut(&reply).filter(|r| r.current(thread)) { r.done = true; r.generated = text; }
                    }
                    ReplyMsg::EndOfUtterance { text, probability } => {
                        tracing::debug!(session = %name, probability, "end-of-utterance probability");
                        turns.on_end_of_utterance(now, &text, probability);
                    }
                    ReplyMsg::Failed { reply, thread, failure } => {
                        let Some(r) = replies.get_mut(&reply).filter(|r| r.current(thread)) else { continue };
                        let stage = failure.stage.name();
                        tracing::warn!(reply, stage, kind = failure.kind, error = %failure.detail, "reply failed; the fallback line follows");
                        shared.metrics.reply_failed();
                        send(&output, SessionOutput::Event(json!({"type": "error", "stage": stage, "kind": failure.kind, "message": "the agent could not answer"})), &mut dropped_frames);
                        r.done = true;
                        r.generated = failure.spoken;
                        r.failed = true;
                        if r.committed {
                            fallback.play(&mut queue, &mut playing, reply, r, now);
                        }
                    }
                }
            }
            Some(key) = next_key(&mut keys) => {
                let action = lock(&agent).on_dtmf(key);
                if let Some(action) = action {
                    // Keys speak over the agent: whatever it was saying stops, as for a barge-in.
                    queue.clear();
                    send(&output, SessionOutput::Clear, &mut dropped_frames);
                    if let Some(p) = playing.take() {
                        hang_up |= finish_reply(&mut turns, &mut replies, &agent, &p, true, &report);
                    }
                    for r in replies.values() { r.cancel.cancel(); }
                    replies.clear();
                    let reply = turns.greet();
                    let mut r = ReplyState::new(String::new(), clock.now(Instant::now()));
                    launcher.run(reply, &mut r, action);
                    replies.insert(reply, r);
                }
            }
            scheduled = tick.tick() => {
                let late = scheduled.elapsed();
                clock.on_tick(late, Instant::now());
                let late_ms = late.as_secs_f64() * 1000.0;
                if late_ms > 5.0 && !queue.is_empty() {
                    tracing::debug!(late_ms, "an output tick of agent audio came late");
                }
                if last_audio.elapsed() > shared.idle_timeout && playing.is_none() {
                    send(&output, SessionOutput::Event(json!({"type": "bye", "reason": "idle"})), &mut dropped_frames);
                    break Ok(());
                }
                asr.tick(clock.now(Instant::now()));
                // One paced frame of agent audio.
                if !queue.is_empty() {
                    let mut out = vec![0.0f32; frame];
                    let n = queue.pop_into(&mut out);
                    if let Some(p) = &mut playing {
                        if p.fallback_at.is_some_and(|at| at < p.played + n as u64) {
                            p.fallback_at = None;
                            send(&output, SessionOutput::Event(json!({"type": "fallback", "text": fallback.line})), &mut dropped_frames);
                        }
                        p.played += n as u64;
                    }
                    echo.played(&out);
                    send(&output, SessionOutput::Audio(out), &mut dropped_frames);
                } else {
                    echo.played_silence();
                    if let Some(p) = playing.as_mut().filter(|p| p.played > 0) {
                        if replies.get(&p.reply).is_some_and(|r| r.committed && !r.done) {
                            p.starved_ticks += 1;
                        }
                    }
                }
                // A reply that has played out returns the floor.
                let finished = playing.as_ref().is_some_and(|p| {
                    queue.is_empty() && p.played >= p.queued && replies.get(&p.reply).is_none_or(|r| r.done && r.held.is_empty())
                });
                if finished {
                    let p = playing.take().expect("checked just above");
                    hang_up |= finish_reply(&mut turns, &mut replies, &agent, &p, false, &report);
                }
            }
        }
        // Due turn timers fire after every event, not only on the tick: a Final whose end-of-turn
        // wait has already passed would otherwise make the reply wait up to a frame.
        //
        // Ending the turn and barge-in run on the audio the VAD has heard, not on what has
        // arrived: on a starved machine the listener lags, and a silence timer judged on arrivals
        // would end the turn while the words that break the silence wait unheard ("one, two,"
        // answered before "three, four"). A speculation runs on arrivals: its audio is held.
        // `heard_until` moves only after the events it covers are in `asr_rx`, so it is read
        // first and the timers wait while any event is still queued.
        let heard = asr.heard_until();
        let now = clock.now(Instant::now());
        if asr_rx.is_empty() {
            turns.set_echo_path_found(echo.path_found());
            turns.handle_timeout_heard(now, now.min(heard));
            // Due by arrivals, not yet heard (the frame that just came is being run): look again
            // in a moment rather than at the next tick.
            if turns.poll_timeout().is_some_and(|t| t <= now) {
                recheck
                    .as_mut()
                    .reset(tokio::time::Instant::now() + TIMER_RECHECK);
                recheck_armed = true;
            }
        }
        // Carry out what the turn manager decided.
        while let Some(action) = turns.poll_action() {
            let now = clock.now(Instant::now());
            tracing::debug!(session = %name, now, action = %action.redacted(), "turn action");
            match action {
                TurnAction::StartReply {
                    reply,
                    user_text,
                    speculative,
                } => {
                    let mut r = ReplyState::new(user_text.clone(), now);
                    r.speculative = speculative;
                    r.committed = !speculative;
                    r.speech_end = speech_end;
                    r.asr_final = asr_final;
                    r.missed = !speculative && std::mem::take(&mut missed);
                    if speculative {
                        // Early only if the agent can say, without acting on it, what it would
                        // ask; otherwise the reply starts when the turn is confirmed.
                        let request = lock(&agent).speculate(&user_text);
                        if let Some(request) = request {
                            r.request = Some(request.clone());
                            launcher.run(reply, &mut r, AgentAction::AskLlm(request));
                        }
                    } else {
                        let action = lock(&agent).on_user_turn(&user_text);
                        launcher.run(reply, &mut r, action);
                    }
                    replies.insert(reply, r);
                }
                TurnAction::CommitReply { reply } => {
                    if let Some(r) = replies.get_mut(&reply) {
                        r.committed = true;
                        r.speech_end = speech_end;
                        r.asr_final = asr_final;
                        // The turn is confirmed: now the agent acts on it. The early answer
                        // stands only if the agent asks for exactly what it was started with.
                        let action = lock(&agent).on_user_turn(&r.user_text);
                        let same = matches!(&action, AgentAction::AskLlm(request) if r.request.as_ref() == Some(request));
                        if !same {
                            r.cancel.cancel();
                            r.held.clear();
                            r.missed = r.request.is_some();
                            r.speculative = false;
                            r.first_token_at = None;
                            r.first_audio_at = None;
                            launcher.run(reply, r, action);
                        }
                        for chunk in std::mem::take(&mut r.held) {
                            enqueue(&mut queue, &mut playing, reply, chunk, now);
                        }
                        if r.failed {
                            fallback.play(&mut queue, &mut playing, reply, r, now);
                        }
                    }
                }
                TurnAction::CancelReply { reply, reason } => {
                    if let Some(r) = replies.get(&reply) {
                        r.cancel.cancel();
                        // A speculation the agent never started (no request) cost nothing.
                        if r.speculative && !r.committed && r.request.is_some() {
                            missed = true;
                        }
                    }
                    if playing.as_ref().is_some_and(|p| p.reply == reply) {
                        let p = playing.take().expect("checked just above");
                        hang_up |= finish_reply(
                            &mut turns,
                            &mut replies,
                            &agent,
                            &p,
                            reason == CancelReason::BargeIn,
                            &report,
                        );
                    } else if let Some(r) = replies.remove(&reply) {
                        // A goodbye cut before it played still ends the call.
                        hang_up |= r.committed && r.afterwards == Afterwards::HangUp;
                        if reason == CancelReason::BargeIn {
                            withdrawn = Some((reply, r));
                        }
                    }
                }
                TurnAction::RetryReply {
                    reply,
                    withdrawn: id,
                } => {
                    let old = withdrawn.take().filter(|(w, _)| *w == id).map(|(_, r)| r);
                    match old.and_then(|old| Some((old.action?, old.user_text))) {
                        Some((action, user_text)) => {
                            let mut r = ReplyState::new(user_text, now);
                            r.speech_end = speech_end;
                            r.asr_final = asr_final;
                            launcher.run(reply, &mut r, action);
                            replies.insert(reply, r);
                        }
                        // Nothing to say after all (the reply was never launched): the floor
                        // goes back to the caller.
                        None => turns.on_agent_audio_finished(reply),
                    }
                }
                TurnAction::StopOutput => {
                    queue.clear();
                    send(&output, SessionOutput::Clear, &mut dropped_frames);
                }
                TurnAction::EstimateEndOfUtterance { text } => {
                    // One forward pass of the new tokens, on a thread: it waits for a prefill or a
                    // cancelled reply to let go of the chat session, never the control loop.
                    let messages = lock(&agent)
                        .speculate(&text)
                        .map_or_else(|| vec![Message::user(text.clone())], |r| r.messages);
                    let (chat, tx) = (chat.clone(), reply_tx.clone());
                    let spawned = std::thread::Builder::new()
                        .name("end-of-utterance".into())
                        .spawn(move || {
                            let p = chat.lock().ok().and_then(|mut c| {
                                c.end_of_turn_probability(&messages).ok().flatten()
                            });
                            if let Some(probability) = p {
                                let _ = tx
                                    .blocking_send(ReplyMsg::EndOfUtterance { text, probability });
                            }
                        });
                    match spawned {
                        // Joined with the utterance threads when the session closes.
                        Ok(handle) => launcher.track(Some(handle)),
                        Err(e) => tracing::warn!("cannot estimate the end of utterance: {e}"),
                    }
                }
                TurnAction::SetVadThreshold { threshold } => {
                    tracing::debug!(threshold, "echo guard");
                    let vad = &shared.streaming.vad;
                    let hysteresis = vad.threshold - vad.release_threshold;
                    asr.set_vad_thresholds(threshold, (threshold - hysteresis).max(0.01));
                }
            }
        }
        // A reply's first audio goes out now, and its frames are paced from here: on the tick's
        // old phase it would wait up to a frame (10 ms on average) for nothing. Not with the echo
        // canceller: the tick feeds it its reference, one frame per tick, and a tick taken early
        // puts one frame more into it than the caller has played. That shifts the agent's audio
        // against its echo by a frame at every reply, and the filter found during one reply no
        // longer fits the next (measured: the second reply of a looped-back call leaked back as
        // the caller and barged itself in).
        if !echo.cancels() && !queue.is_empty() && playing.as_ref().is_some_and(|p| p.played == 0) {
            tick.reset_immediately();
        }
        if hang_up {
            send(
                &output,
                SessionOutput::Event(json!({"type": "bye", "reason": "agent"})),
                &mut dropped_frames,
            );
            break Ok(());
        }
    };
    // A reply the caller hung up on (or the server closed) was heard in part: it is still a turn,
    // reported as interrupted with the words played, like a barge-in.
    if let Some(p) = playing.take() {
        finish_reply(&mut turns, &mut replies, &agent, &p, true, &report);
    }
    for r in replies.values() {
        r.cancel.cancel();
    }
    // Closed first: a reply thread may be waiting for room in it.
    drop(reply_rx);
    launcher.join(THREADS_JOIN_TIMEOUT).await;
    if dropped_frames > 0 {
        shared.metrics.audio_frames_dropped(dropped_frames);
        tracing::warn!(
            dropped_frames,
            "output frames dropped: the client read too slowly"
        );
    }
    if queue.dropped_samples() > 0 {
        tracing::warn!(
            dropped_samples = queue.dropped_samples(),
            "agent audio dropped: its queue overflowed"
        );
    }
    asr.close();
    result
}

/// While the user speaks, runs the conversation so far and the committed words through the LLM
/// on a background thread, so that at the end of the turn only the last words and the reply
/// remain to compute (the cache keeps the longest common prefix). Skipped while a reply or another
/// prefill holds the chat session: it is an optimisation, never a wait.
fn prefill_while_speaking(
    chat: &Arc<Mutex<Box<dyn ChatSession>>>,
    busy: &Arc<std::sync::atomic::AtomicBool>,
    context: Option<LlmRequest>,
) -> Option<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    let Some(LlmRequest { messages, .. }) = context else {
        return None; // the agent does not say what it will ask before the turn is confirmed
    };
    if busy.swap(true, Ordering::AcqRel) {
        return None;
    }
    let (chat, busy_flag) = (chat.clone(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("prefill".into())
        .spawn(move || {
            if let Ok(mut session) = chat.try_lock() {
                let started = Instant::now();
                match session.prefill(&messages) {
                    Ok(()) => tracing::debug!(
                        ms = started.elapsed().as_secs_f64() * 1000.0,
                        "prefilled while the user speaks"
                    ),
                    Err(e) => tracing::debug!("prefill failed: {e}"),
                }
            }
            busy_flag.store(false, Ordering::Release);
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(_) => {
            busy.store(false, Ordering::Release);
            None
        }
    }
}

fn enqueue(
    queue: &mut AgentAudio,
    playing: &mut Option<Playing>,
    reply: ReplyId,
    chunk: talkline_tts::stream::AudioChunk,
    now: f64,
) {
    let p = playing.get_or_insert_with(|| Playing::new(reply, now));
    if p.reply != reply {
        return; // another reply holds the floor; this one was cancelled meanwhile
    }
    let len = chunk.samples.len() as u64;
    p.chunks.push(QueuedChunk {
        text: chunk.text,
        word_ends: chunk.word_ends,
        start: p.queued,
        len,
    });
    p.queued += len;
    queue.push(&chunk.samples);
}

/// Where a finished turn is reported: the transport's events and the process's metrics.
struct TurnReport<'a> {
    output: &'a mpsc::Sender<SessionOutput>,
    /// When the session started, for the events' uptime.
    started: Instant,
    metrics: &'a crate::metrics::Metrics,
}

fn finish_reply(
    turns: &mut TurnManager,
    replies: &mut HashMap<ReplyId, ReplyState>,
    agent: &Mutex<Box<dyn Agent>>,
    p: &Playing,
    interrupted: bool,
    report: &TurnReport<'_>,
) -> bool {
    let (output, started, metrics) = (report.output, report.started, report.metrics);
    turns.on_agent_audio_finished(p.reply);
    let Some(r) = replies.remove(&p.reply) else {
        return false;
    };
    let heard = if interrupted {
        p.heard()
    } else {
        r.generated.trim().to_string()
    };
    lock(agent).on_reply_spoken(&heard);
    if r.afterwards == Afterwards::Transfer {
        let _ = output.try_send(SessionOutput::Event(
            json!({"type": "transfer", "reason": r.transfer_reason}),
        ));
    }
    let end = r.speech_end.unwrap_or(r.started_at);
    let ms = |t: Option<f64>| t.map(|t| (t - end) * 1000.0);
    let speculation = if r.speculative {
        Speculation::hit
    } else if r.missed {
        Speculation::miss
    } else {
        Speculation::none
    };
    // The greeting answers nobody: it has no user turn to time.
    if !r.user_text.is_empty() {
        let seconds = |t: Option<f64>| t.map(|t| t - end);
        metrics.observe_turn(
            TurnLatencies {
                asr_final: seconds(r.asr_final),
                llm_first_token: seconds(r.first_token_at),
                tts_first_audio: seconds(r.first_audio_at),
                voice_to_voice: Some(p.first_out_at - end),
            },
            speculation,
            interrupted,
        );
    }
    let _ = output.try_send(SessionOutput::Event(json!({
        "type": "turn",
        "user_text": r.user_text,
        "agent_text": heard,
        "speech_end_ms": end * 1000.0,
        "asr_final_ms": ms(r.asr_final),
        "llm_first_token_ms": ms(r.first_token_at),
        "tts_first_audio_ms": ms(r.first_audio_at),
        "first_audio_out_ms": p.first_out_at * 1000.0,
        "voice_to_voice_ms": (p.first_out_at - end) * 1000.0,
        "speculative": format!("{speculation:?}"),
        "interrupted": interrupted,
        "starved_ms": p.starved_ticks as f64 * FRAME_S * 1000.0,
        "session_uptime_ms": started.elapsed().as_secs_f64() * 1000.0,
    })));
    if p.starved_ticks > 0 {
        tracing::debug!(
            reply = p.reply,
            starved_ms = p.starved_ticks as f64 * FRAME_S * 1000.0,
            "the voice fell behind the playback inside the reply"
        );
    }
    r.afterwards == Afterwards::HangUp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn playing(played: u64) -> Playing {
        Playing {
            reply: 1,
            played,
            chunks: vec![
                QueuedChunk {
                    text: "Hello there.".into(),
                    word_ends: vec![(5, 100), (12, 200)],
                    start: 0,
                    len: 220,
                },
                QueuedChunk {
                    text: "How are you?".into(),
                    word_ends: vec![(3, 50), (7, 120), (12, 200)],
                    start: 220,
                    len: 210,
                },
            ],
            queued: 430,
            first_out_at: 0.0,
            fallback_at: None,
            starved_ticks: 0,
        }
    }

    #[test]
    fn heard_text_stops_at_the_last_word_played_in_full() {
        assert_eq!(playing(50).heard(), "");
        assert_eq!(playing(150).heard(), "Hello");
        assert_eq!(playing(220).heard(), "Hello there.");
        assert_eq!(playing(350).heard(), "Hello there. How are");
        assert_eq!(playing(430).heard(), "Hello there. How are you?");
    }
}
