//! One scripted caller over a real transport (WebSocket, WebRTC or SIP, see [`super::link`]):
//! streams the scenario's turns in real time, 20 ms a frame, reacts to the agent (waits for its
//! reply to play out, or barges in on it), and logs the arrival time of every agent frame and
//! event. It measures nothing itself: the analysis in [`super::analyze`] turns the log into
//! latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::link::{Incoming, Link, Transport};
use super::scenario::{TurnAudio, RATE};

/// Samples in one 20 ms frame at [`RATE`].
const FRAME: usize = RATE as usize / 50;
const FRAME_S: f64 = 0.02;
/// For the first turn: how long to listen for a greeting before speaking.
const GREETING_WAIT_S: f64 = 1.5;
/// Over a transport without events (SIP), the agent's reply has played out once it has been
/// silent this long. The server sends no RTP at all between replies (the session emits frames
/// only while it has audio), and inside a reply the silences are Piper's pauses between clauses
/// and sentences or the queue running dry while the next clause is synthesised: at most 0.48 s
/// in `--quick` runs over WebSocket and SIP on a loaded 2-core machine. Too short, and the
/// caller speaks into a reply still under way, turning a planned turn into an unplanned
/// barge-in; too long costs only idle time before the next turn, which no figure includes
/// (every latency is measured from the true end of speech). Hence a full second, twice the
/// longest pause seen and well above the 0.4 s the analysis takes as a barge-in stop.
const REPLY_END_SILENCE_S: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Longest wait for a reply before the caller moves on.
    pub reply_timeout_s: f64,
    /// Listening after the last reply has played out.
    pub tail_s: f64,
    pub transport: Transport,
}

/// Where each turn's speech sits on the session's media clock (seconds since the first frame;
/// the wall clock of the caller runs on it: frame k leaves at (k + 1) * 20 ms).
#[derive(Debug, Clone)]
pub struct SpokenTurn {
    pub speech_start_s: f64,
    pub speech_end_s: f64,
    pub barge_in: bool,
    /// For a barge-in: when the agent audio it interrupts began arriving, if it did.
    pub agent_audio_began_s: Option<f64>,
}

#[derive(Debug, Default)]
pub struct SessionLog {
    pub turns: Vec<SpokenTurn>,
    /// Agent frames: arrival on the media axis (s) and whether audible.
    pub audio: Vec<(f64, bool)>,
    /// JSON events with their arrival times.
    pub events: Vec<(f64, serde_json::Value)>,
    /// How late the caller sent its worst frame: harness health, reported beside the numbers.
    pub max_send_lag_ms: f64,
    pub error: Option<String>,
}

enum Phase {
    /// Waiting for the agent before turn `turn` (or, past the last turn, before hanging up).
    Wait {
        turn: usize,
    },
    Pause {
        turn: usize,
        until_s: f64,
    },
    Speak {
        turn: usize,
        pos: usize,
    },
    Hangup {
        at_s: f64,
    },
}

/// Runs one caller through `turns`; the log is returned even when the session fails midway.
pub async fn drive(addr: &str, turns: Arc<Vec<TurnAudio>>, opts: DriveOptions) -> SessionLog {
    let mut log = SessionLog::default();
    if let Err(e) = drive_inner(addr, &turns, &opts, &mut log).await {
        log.error = Some(format!("{e:#}"));
    }
    log
}

async fn drive_inner(
    addr: &str,
    turns: &[TurnAudio],
    opts: &DriveOptions,
    log: &mut SessionLog,
) -> anyhow::Result<()> {
    let mut link = Link::connect(opts.transport, addr).await?;
    // Hang up however the conversation ended: a SIP call left up holds a server slot until its
    // media timeout.
    let result = converse(&mut link, turns, opts, log).await;
    link.hang_up().await;
    result
}

async fn converse(
    link: &mut Link,
    turns: &[TurnAudio],
    opts: &DriveOptions,
    log: &mut SessionLog,
) -> anyhow::Result<()> {
    let events = opts.transport.has_events();
    let start = Instant::now();
    let mut ticks = tokio::time::interval_at(
        (start + Duration::from_millis(20)).into(),
        Duration::from_millis(20),
    );
    // Burst: a late caller catches up, so the media clock stays on the wall clock.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut frames_sent: u64 = 0;
    let mut phase = Phase::Wait { turn: 0 };
    // The reply the caller is waiting on: audible audio after `reference_s` and a `turn` event
    // after that audio (the server sends it once the reply has played out).
    let mut reference_s = 0.0;
    let mut agent_began: Option<f64> = None;
    // The last audible agent frame of the reply being waited on (transports without events).
    let mut agent_last: Option<f64> = None;
    let mut agent_done = false;
    let silence = vec![0i16; FRAME];

    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let now = frames_sent as f64 * FRAME_S;
                let lag = start.elapsed().as_secs_f64() - (now + FRAME_S);
                log.max_send_lag_ms = log.max_send_lag_ms.max(lag * 1000.0);
                if !events && agent_last.is_some_and(|last| now - last > REPLY_END_SILENCE_S) {
                    agent_done = true;
                }
                // Advance through phases that need no audio of their own first.
                loop {
                    match phase {
                        Phase::Wait { turn } if turn < turns.len() => {
                            let t = &turns[turn];
                            let waited = now - reference_s;
                            if let Some(after) = t.barge_in_after_ms {
                                let due = agent_began.map(|b| b + after as f64 / 1000.0);
                                if due.is_some_and(|d| now >= d) || waited > opts.reply_timeout_s {
                                    phase = Phase::Speak { turn, pos: 0 };
                                    continue;
                                }
                            } else {
                                let idle_wait = if turn == 0 { GREETING_WAIT_S } else { opts.reply_timeout_s };
                                let ready = match agent_began {
                                    Some(_) => agent_done || waited > opts.reply_timeout_s * 2.0,
                                    None => waited > idle_wait || (turn == 0 && t.pause_before_ms == 0),
                                };
                                if ready {
                                    phase = Phase::Pause { turn, until_s: now + t.pause_before_ms as f64 / 1000.0 };
                                    continue;
                                }
                            }
                        }
                        Phase::Wait { .. } => {
                            let waited = now - reference_s;
                            let ready = match agent_began {
                                Some(_) => agent_done || waited > opts.reply_timeout_s * 2.0,
                                None => waited > opts.reply_timeout_s,
                            };
                            if ready {
                                phase = Phase::Hangup { at_s: now + opts.tail_s };
                                continue;
                            }
                        }
                        Phase::Pause { turn, until_s } if now >= until_s => {
                            phase = Phase::Speak { turn, pos: 0 };
                            continue;
                        }
                        _ => {}
                    }
                    break;
                }
                let frame: &[i16] = match &mut phase {
                    Phase::Speak { turn, pos } => {
                        let t = &turns[*turn];
                        if *pos == 0 {
                            let base = now;
                            log.turns.push(SpokenTurn {
                                speech_start_s: base + t.speech_start as f64 / RATE as f64,
                                speech_end_s: base + t.speech_end as f64 / RATE as f64,
                                barge_in: t.barge_in_after_ms.is_some(),
                                agent_audio_began_s: if t.barge_in_after_ms.is_some() { agent_began } else { None },
                            });
                        }
                        let end = (*pos + FRAME).min(t.pcm.len());
                        let chunk = &t.pcm[*pos..end];
                        *pos = end;
                        chunk
                    }
                    Phase::Hangup { at_s } if now >= *at_s => break,
                    _ => &silence,
                };
                let mut frame = frame.to_vec();
                frame.resize(FRAME, 0);
                link.send(&frame).await?;
                frames_sent += 1;
                if let Phase::Speak { turn, pos } = phase {
                    if pos >= turns[turn].pcm.len() {
                        // From here the caller waits on the reply to this turn.
                        reference_s = log.turns.last().map_or(now, |t| t.speech_end_s);
                        agent_began = None;
                        agent_last = None;
                        agent_done = false;
                        phase = Phase::Wait { turn: turn + 1 };
                    }
                }
            }
            incoming = link.recv() => {
                // Media time t is spoken at wall time start + t (frame k leaves at start + (k + 1) * 20 ms,
                // once its last sample has been spoken), so arrivals share the media axis.
                let at = start.elapsed().as_secs_f64();
                match incoming? {
                    None => bail!("the server closed the session"),
                    Some(Incoming::Audio { audible }) => {
                        if audible && at > reference_s && agent_began.is_none() {
                            agent_began = Some(at);
                        }
                        if audible && agent_began.is_some() {
                            agent_last = Some(at);
                        }
                        log.audio.push((at, audible));
                    }
                    Some(Incoming::Event(v)) => {
                        if v["type"] == "turn" && agent_began.is_some_and(|b| at >= b) {
                            agent_done = true;
                        }
                        if v["type"] == "bye" {
                            log.events.push((at, v));
                            bail!("the server ended the session");
                        }
                        log.events.push((at, v));
                    }
                }
            }
        }
    }
    // Late events (the last turn's) may still be on their way.
    let drain_until = Instant::now() + Duration::from_secs(if events { 2 } else { 0 });
    while let Ok(Ok(Some(incoming))) =
        tokio::time::timeout_at(drain_until.into(), link.recv()).await
    {
        if let Incoming::Event(v) = incoming {
            log.events.push((start.elapsed().as_secs_f64(), v));
        }
    }
    Ok(())
}
