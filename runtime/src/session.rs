//! A live conversation: audio in, audio and events out, in real time.
//!
//! Transport-agnostic: a transport feeds 16 kHz mono audio and carries [`SessionOutput`] back.
//! One tokio task runs the session's control loop; Whisper runs on the stream's own thread
//! ([`AsrEngine`]); each reply runs the LLM on a thread of its own feeding the TTS stream's
//! synthesis thread. The loop is the only owner of session state, so nothing is shared mutably
//! across tasks but the chat session, which one reply thread at a time holds.
//!
//! Output is paced here at 20 ms frames: a barge-in clears the queue, so the next frame after the
//! decision is silent.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use talkline_asr::engine::AsrEngine;
use talkline_asr::streaming::{AsrEvent, StreamingConfig};
use talkline_asr::vad::SpeechProbability;
use talkline_llm::{CancelToken, ChatModel, ChatSession, GenerateParams, Message, Sampling};
use talkline_tts::stream::{self, StreamConfig};
use talkline_tts::PiperVoice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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

/// What every session shares: models loaded once per process.
pub struct Shared {
    pub asr: AsrEngine,
    pub streaming: StreamingConfig,
    pub vad: Box<dyn Fn() -> Box<dyn SpeechProbability> + Send + Sync>,
    pub chat: Arc<dyn ChatModel>,
    pub voice: Arc<Mutex<PiperVoice>>,
    /// Process-wide counters and latency histograms (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    pub system_prompt: String,
    /// Spoken first, before the caller says anything.
    pub greeting: Option<String>,
    /// No audio from the caller for this long ends the session.
    pub idle_timeout: Duration,
    pub max_tokens: usize,
    pub turn: TurnConfig,
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

enum ReplyMsg {
    EndOfUtterance {
        text: String,
        probability: f32,
    },
    FirstToken {
        reply: ReplyId,
        at: Instant,
    },
    Audio {
        reply: ReplyId,
        chunk: talkline_tts::stream::AudioChunk,
    },
    Done {
        reply: ReplyId,
        text: String,
    },
    Failed {
        reply: ReplyId,
        error: String,
    },
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
}

impl Playing {
    fn heard(&self) -> String {
        let mut words = Vec::new();
        for chunk in &self.chunks {
            if self.played >= chunk.start + chunk.len {
                words.push(chunk.text.trim().to_string());
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
    let span = tracing::info_span!("session", session = %name);
    run_session(shared, out_rate, input, output, cancel, name)
        .instrument(span)
        .await
}

async fn run_session(
    shared: Arc<Shared>,
    out_rate: u32,
    mut input: mpsc::Receiver<Vec<f32>>,
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
    let chat: Arc<Mutex<Box<dyn ChatSession>>> = Arc::new(Mutex::new(shared.chat.new_session()?));
    let (reply_tx, mut reply_rx) = mpsc::channel(REPLY_QUEUE);
    let mut turns = TurnManager::new(shared.turn.clone());
    let mut replies_seed: Vec<(ReplyId, String)> = Vec::new();
    let mut history = vec![Message::system(shared.system_prompt.clone())];
    if let Some(greeting) = &shared.greeting {
        // The greeting is an agent turn like any reply: it can be barged in on.
        let reply = turns.greet();
        replies_seed.push((reply, greeting.clone()));
    }
    let mut replies: HashMap<ReplyId, ReplyState> = HashMap::new();
    for (reply, text) in replies_seed.drain(..) {
        replies.insert(
            reply,
            ReplyState {
                cancel: CancelToken::new(),
                user_text: String::new(),
                speculative: false,
                committed: true,
                held: Vec::new(),
                done: false,
                generated: String::new(),
                started_at: 0.0,
                first_token_at: None,
                first_audio_at: None,
                speech_end: None,
                asr_final: None,
                missed: false,
            },
        );
        spawn_speech(reply, shared.clone(), text, out_rate, reply_tx.clone());
    }
    let mut queue: VecDeque<f32> = VecDeque::new();
    let mut playing: Option<Playing> = None;
    let frame = (out_rate as f64 * FRAME_S) as usize;
    let mut dropped_frames = 0u64;

    // The media clock: audio received, extrapolated by wall time when the client goes quiet.
    let mut media_samples = 0u64;
    let mut last_audio = Instant::now();
    let started = Instant::now();
    let media_now = |media_samples: u64, last_audio: Instant| {
        let base = media_samples as f64 / 16_000.0;
        let gap = last_audio.elapsed().as_secs_f64();
        if gap > 0.1 {
            base + gap
        } else {
            base
        }
    };
    let mut speech_end: Option<f64> = None;
    let mut asr_final: Option<f64> = None;
    let mut missed = false;
    // One background prefill at a time (see `prefill_while_speaking`).
    let prefill_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));

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
            audio = input.recv() => {
                let Some(audio) = audio else { break Ok(()) };
                asr.push(media_samples as f64 / 16_000.0, &audio);
                media_samples += audio.len() as u64;
                last_audio = Instant::now();
            }
            Some(event) = asr_rx.recv() => {
                let now = media_now(media_samples, last_audio);
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
                tracing::debug!(session = %name, now, ?event, "asr");
                match &event {
                    AsrEvent::SpeechStarted { .. } => {
                        prefill_while_speaking(&chat, &prefill_busy, &history, String::new());
                    }
                    AsrEvent::Partial { committed, .. } if !committed.is_empty() => {
                        prefill_while_speaking(&chat, &prefill_busy, &history, committed.clone());
                    }
                    _ => {}
                }
                turns.on_asr(now, &event);
            }
            Some(msg) = reply_rx.recv() => {
                let now = media_now(media_samples, last_audio);
                let at = |i: Instant| now - i.elapsed().as_secs_f64();
                match msg {
                    ReplyMsg::FirstToken { reply, at: i } => {
                        if let Some(r) = replies.get_mut(&reply) { r.first_token_at = Some(at(i)); }
                    }
                    ReplyMsg::Audio { reply, chunk } => {
                        if let Some(r) = replies.get_mut(&reply) {
                            r.first_audio_at.get_or_insert(now);
                            if r.committed {
                                enqueue(&mut queue, &mut playing, reply, chunk, now);
                            } else {
                                r.held.push(chunk);
                            }
                        }
                    }
                    ReplyMsg::Done { reply, text } => {
                        if let Some(r) = replies.get_mut(&reply) { r.done = true; r.generated = text; }
                    }
                    ReplyMsg::EndOfUtterance { text, probability } => {
                        tracing::debug!(session = %name, probability, "end-of-utterance probability");
                        turns.on_end_of_utterance(now, &text, probability);
                    }
                    ReplyMsg::Failed { reply, error } => {
                        tracing::warn!(reply, %error, "reply failed");
                        shared.metrics.reply_failed();
                        send(&output, SessionOutput::Event(json!({"type": "error", "message": "the agent could not answer"})), &mut dropped_frames);
                        if let Some(r) = replies.get_mut(&reply) { r.done = true; }
                    }
                }
            }
            _ = tick.tick() => {
                if last_audio.elapsed() > shared.idle_timeout && playing.is_none() {
                    send(&output, SessionOutput::Event(json!({"type": "bye", "reason": "idle"})), &mut dropped_frames);
                    break Ok(());
                }
                let now = media_now(media_samples, last_audio);
                asr.tick(now);
                while let Some(deadline) = turns.poll_timeout().filter(|t| *t <= now) {
                    turns.handle_timeout(deadline);
                }
                // One paced frame of agent audio.
                if !queue.is_empty() {
                    let n = frame.min(queue.len());
                    let mut out: Vec<f32> = queue.drain(..n).collect();
                    out.resize(frame, 0.0);
                    if let Some(p) = &mut playing { p.played += n as u64; }
                    send(&output, SessionOutput::Audio(out), &mut dropped_frames);
                }
                // A reply that has played out returns the floor.
                let finished = playing.as_ref().is_some_and(|p| {
                    queue.is_empty() && p.played >= p.queued && replies.get(&p.reply).is_none_or(|r| r.done && r.held.is_empty())
                });
                if finished {
                    let p = playing.take().expect("checked just above");
                    finish_reply(&mut turns, &mut replies, &mut history, &p, false, &output, started, &shared.metrics);
                }
            }
        }
        // Carry out what the turn manager decided.
        while let Some(action) = turns.poll_action() {
            let now = media_now(media_samples, last_audio);
            tracing::debug!(session = %name, now, ?action, "turn action");
            match action {
                TurnAction::StartReply {
                    reply,
                    user_text,
                    speculative,
                } => {
                    let mut messages = history.clone();
                    messages.push(Message::user(user_text.clone()));
                    let cancel_reply = CancelToken::new();
                    replies.insert(
                        reply,
                        ReplyState {
                            cancel: cancel_reply.clone(),
                            user_text: user_text.clone(),
                            speculative,
                            committed: !speculative,
                            held: Vec::new(),
                            done: false,
                            generated: String::new(),
                            started_at: now,
                            first_token_at: None,
                            first_audio_at: None,
                            speech_end,
                            asr_final,
                            missed: !speculative && std::mem::take(&mut missed),
                        },
                    );
                    spawn_reply(
                        reply,
                        shared.clone(),
                        chat.clone(),
                        messages,
                        out_rate,
                        cancel_reply,
                        reply_tx.clone(),
                    );
                }
                TurnAction::CommitReply { reply } => {
                    if let Some(r) = replies.get_mut(&reply) {
                        r.committed = true;
                        r.speech_end = speech_end;
                        r.asr_final = asr_final;
                        for chunk in std::mem::take(&mut r.held) {
                            enqueue(&mut queue, &mut playing, reply, chunk, now);
                        }
                    }
                }
                TurnAction::CancelReply { reply, reason } => {
                    if let Some(r) = replies.get(&reply) {
                        r.cancel.cancel();
                        if r.speculative && !r.committed {
                            missed = true;
                        }
                    }
                    if playing.as_ref().is_some_and(|p| p.reply == reply) {
                        let p = playing.take().expect("checked just above");
                        finish_reply(
                            &mut turns,
                            &mut replies,
                            &mut history,
                            &p,
                            reason == CancelReason::BargeIn,
                            &output,
                            started,
                            &shared.metrics,
                        );
                    } else {
                        replies.remove(&reply);
                    }
                }
                TurnAction::StopOutput => {
                    queue.clear();
                    send(&output, SessionOutput::Clear, &mut dropped_frames);
                }
                TurnAction::EstimateEndOfUtterance { text } => {
                    // One forward pass of the new tokens, on a thread: it waits for a prefill or a
                    // cancelled reply to let go of the chat session, never the control loop.
                    let mut messages = history.clone();
                    messages.push(Message::user(text.clone()));
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
                    if let Err(e) = spawned {
                        tracing::warn!("cannot estimate the end of utterance: {e}");
                    }
                }
                TurnAction::SetVadThreshold { threshold } => {
                    tracing::debug!(threshold, "echo guard");
                    asr.set_vad_thresholds(threshold, (threshold - 0.15).max(0.01));
                }
            }
        }
    };
    for r in replies.values() {
        r.cancel.cancel();
    }
    if dropped_frames > 0 {
        shared.metrics.audio_frames_dropped(dropped_frames);
        tracing::warn!(
            dropped_frames,
            "output frames dropped: the client read too slowly"
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
    history: &[Message],
    user_so_far: String,
) {
    use std::sync::atomic::Ordering;
    if busy.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut messages = history.to_vec();
    messages.push(Message::user(user_so_far));
    let (chat, busy_flag) = (chat.clone(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("prefill".into())
        .spawn(move || {
            if let Ok(mut session) = chat.try_lock() {
                if let Err(e) = session.prefill(&messages) {
                    tracing::debug!("prefill failed: {e}");
                }
            }
            busy_flag.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        busy.store(false, Ordering::Release);
    }
}

fn enqueue(
    queue: &mut VecDeque<f32>,
    playing: &mut Option<Playing>,
    reply: ReplyId,
    chunk: talkline_tts::stream::AudioChunk,
    now: f64,
) {
    let p = playing.get_or_insert_with(|| Playing {
        reply,
        played: 0,
        chunks: Vec::new(),
        queued: 0,
        first_out_at: now,
    });
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
    queue.extend(chunk.samples);
}

fn finish_reply(
    turns: &mut TurnManager,
    replies: &mut HashMap<ReplyId, ReplyState>,
    history: &mut Vec<Message>,
    p: &Playing,
    interrupted: bool,
    output: &mpsc::Sender<SessionOutput>,
    started: Instant,
    metrics: &crate::metrics::Metrics,
) {
    turns.on_agent_audio_finished(p.reply);
    let Some(r) = replies.remove(&p.reply) else {
        return;
    };
    let heard = if interrupted {
        p.heard()
    } else {
        r.generated.trim().to_string()
    };
    if !r.user_text.is_empty() {
        history.push(Message::user(r.user_text.clone()));
    }
    history.push(Message::assistant(heard.clone()));
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
        "session_uptime_ms": started.elapsed().as_secs_f64() * 1000.0,
    })));
}

/// Speaks a fixed text (the greeting): the TTS stream alone, no LLM.
fn spawn_speech(
    reply: ReplyId,
    shared: Arc<Shared>,
    text: String,
    out_rate: u32,
    tx: mpsc::Sender<ReplyMsg>,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("speech-{reply}"))
        .spawn(move || {
            let result = (|| -> anyhow::Result<()> {
                let config = StreamConfig {
                    output_rate: Some(out_rate),
                    ..StreamConfig::default()
                };
                let (mut text_in, mut audio_out) = stream::start(shared.voice.clone(), config)?;
                text_in.push(&text)?;
                text_in.finish()?;
                while let Some(chunk) = audio_out.recv() {
                    match chunk {
                        Ok(chunk) => {
                            if tx.blocking_send(ReplyMsg::Audio { reply, chunk }).is_err() {
                                break;
                            }
                        }
                        Err(e) => tracing::warn!("a chunk failed to synthesize: {e}"),
                    }
                }
                Ok(())
            })();
            let msg = match result {
                Ok(()) => ReplyMsg::Done { reply, text },
                Err(e) => ReplyMsg::Failed {
                    reply,
                    error: format!("{e:#}"),
                },
            };
            let _ = tx.blocking_send(msg);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the greeting thread: {e}");
    }
}

fn spawn_reply(
    reply: ReplyId,
    shared: Arc<Shared>,
    chat: Arc<Mutex<Box<dyn ChatSession>>>,
    messages: Vec<Message>,
    out_rate: u32,
    cancel: CancelToken,
    tx: mpsc::Sender<ReplyMsg>,
) {
    let span = tracing::info_span!("reply", reply);
    let spawned = std::thread::Builder::new()
        .name(format!("reply-{reply}"))
        .spawn(move || {
            let _reply = span.enter();
            let result = (|| -> anyhow::Result<String> {
                let config = StreamConfig {
                    output_rate: Some(out_rate),
                    ..StreamConfig::default()
                };
                let (mut text_in, mut audio_out) = stream::start(shared.voice.clone(), config)?;
                let audio_tx = tx.clone();
                let audio_cancel = cancel.clone();
                let tts_span = tracing::info_span!("tts");
                let collector = std::thread::Builder::new()
                    .name(format!("reply-{reply}-audio"))
                    .spawn(move || {
                        let _tts = tts_span.enter();
                        while let Some(chunk) = audio_out.recv() {
                            if audio_cancel.is_cancelled() {
                                break; // dropping audio_out stops synthesis
                            }
                            match chunk {
                                Ok(chunk) => {
                                    if audio_tx
                                        .blocking_send(ReplyMsg::Audio { reply, chunk })
                                        .is_err()
                                    {
                                        break;
                                    }
                                }
                                Err(e) => tracing::warn!("a chunk failed to synthesize: {e}"),
                            }
                        }
                    })?;
                let params = GenerateParams {
                    max_tokens: shared.max_tokens,
                    sampling: Sampling::Greedy,
                };
                let mut first = true;
                let _llm = tracing::info_span!("llm").entered();
                let mut chat = chat
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the chat session is poisoned"))?;
                let reply_text = chat.reply(&messages, &params, &cancel, &mut |piece| {
                    if first {
                        first = false;
                        let _ = tx.blocking_send(ReplyMsg::FirstToken {
                            reply,
                            at: Instant::now(),
                        });
                    }
                    if text_in.push(piece).is_err() {
                        cancel.cancel();
                    }
                })?;
                drop(chat);
                drop(_llm);
                if !cancel.is_cancelled() {
                    let _ = text_in.finish();
                } else {
                    drop(text_in);
                }
                let _ = collector.join();
                Ok(reply_text.text)
            })();
            let msg = match result {
                Ok(text) => ReplyMsg::Done { reply, text },
                Err(e) => ReplyMsg::Failed {
                    reply,
                    error: format!("{e:#}"),
                },
            };
            let _ = tx.blocking_send(msg);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a reply thread: {e}");
    }
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
