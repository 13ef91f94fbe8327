//! Agent utterances on threads of their own: fixed sentences through the voice, LLM answers
//! through the agent's guard into the voice, each message tagged with its thread.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use talkline_llm::{CancelToken, ChatSession, GenerateParams, Sampling};
use talkline_tts::stream::{self, StreamConfig};
use tokio::sync::mpsc;

use super::{lock, Afterwards, ReplyState, Shared};
use crate::agent::{Agent, AgentAction, LlmRequest, ReplyVerdict};
use crate::turn::ReplyId;

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
        error: String,
    },
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
}

impl Launcher {
    pub(super) fn run(&mut self, reply: ReplyId, r: &mut ReplyState, action: AgentAction) {
        self.threads += 1;
        r.thread = self.threads;
        r.cancel = CancelToken::new();
        let (thread, cancel) = (r.thread, r.cancel.clone());
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
        match action {
            AgentAction::Say(text) => speak(text),
            AgentAction::Transfer { reason, say } => {
                r.afterwards = Afterwards::Transfer;
                r.transfer_reason = reason;
                speak(say);
            }
            AgentAction::Hangup { say } => {
                r.afterwards = Afterwards::HangUp;
                speak(say);
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
                );
            }
        }
    }
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
) {
    let span = tracing::info_span!("speech", reply);
    let spawned = std::thread::Builder::new()
        .name(format!("speech-{reply}"))
        .spawn(move || {
            let _speech = span.enter();
            let result = (|| -> anyhow::Result<()> {
                let config = StreamConfig {
                    output_rate: Some(out_rate),
                    ..StreamConfig::default()
                };
                let (mut text_in, mut audio_out) = stream::start(shared.voice.clone(), config)?;
                text_in.push(&text)?;
                text_in.finish()?;
                forward_audio(&mut audio_out, reply, thread, &cancel, &tx);
                Ok(())
            })();
            let msg = match result {
                Ok(()) => ReplyMsg::Done {
                    reply,
                    thread,
                    text,
                },
                Err(e) => ReplyMsg::Failed {
                    reply,
                    thread,
                    error: format!("{e:#}"),
                },
            };
            let _ = tx.blocking_send(msg);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a speech thread: {e}");
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
) {
    let (reply, thread) = (job.reply, job.thread);
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
                        forward_audio(&mut audio_out, reply, thread, &audio_cancel, &audio_tx);
                    })?;
                let params = GenerateParams {
                    max_tokens: job.request.max_tokens.min(shared.max_tokens),
                    sampling: Sampling::Greedy,
                };
                // The LLM stops on its own token when the guard replaces the answer; the voice
                // goes on to speak the safe line.
                let llm_cancel = CancelToken::new();
                let mut text = GuardedText {
                    agent: job.checks.then_some(&*agent),
                    spoken: String::new(),
                    pending: String::new(),
                    replaced: false,
                };
                let mut first = true;
                let _llm = tracing::info_span!("llm").entered();
                let mut chat = chat
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the chat session is poisoned"))?;
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
                })?;
                drop(chat);
                drop(_llm);
                if !cancel.is_cancelled() {
                    if let Some(speak) = text.finish() {
                        let _ = text_in.push(&speak);
                    }
                    let _ = text_in.finish();
                } else {
                    drop(text_in);
                }
                let _ = collector.join();
                Ok(text.spoken)
            })();
            let msg = match result {
                Ok(text) => ReplyMsg::Done {
                    reply,
                    thread,
                    text,
                },
                Err(e) => ReplyMsg::Failed {
                    reply,
                    thread,
                    error: format!("{e:#}"),
                },
            };
            let _ = tx.blocking_send(msg);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a reply thread: {e}");
    }
}

/// Hands each synthesized chunk to the control loop until the voice is done, the reply is
/// cancelled (dropping `audio_out` then stops synthesis) or the session is gone.
fn forward_audio(
    audio_out: &mut stream::AudioOutput,
    reply: ReplyId,
    thread: u64,
    cancel: &CancelToken,
    tx: &mpsc::Sender<ReplyMsg>,
) {
    while let Some(chunk) = audio_out.recv() {
        if cancel.is_cancelled() {
            break;
        }
        match chunk {
            Ok(chunk) => {
                let msg = ReplyMsg::Audio {
                    reply,
                    thread,
                    chunk,
                };
                if tx.blocking_send(msg).is_err() {
                    break;
                }
            }
            Err(e) => tracing::warn!("a chunk failed to synthesize: {e}"),
        }
    }
}
