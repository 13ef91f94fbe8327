//! One scripted caller over the real WebSocket transport: streams the scenario's turns in real
//! time, 20 ms a frame, reacts to the agent (waits for its reply to play out, or barges in on it),
//! and logs the arrival time of every agent frame and event. It measures nothing itself: the
//! analysis in [`super::analyze`] turns the log into latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::scenario::{TurnAudio, RATE};

/// Samples in one 20 ms frame at [`RATE`].
const FRAME: usize = RATE as usize / 50;
const FRAME_S: f64 = 0.02;
/// An agent frame with any sample above 1% of full scale is audible (the Pipecat anchor's rule).
const AUDIBLE: i32 = 327;
/// For the first turn: how long to listen for a greeting before speaking.
const GREETING_WAIT_S: f64 = 1.5;

#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Longest wait for a reply before the caller moves on.
    pub reply_timeout_s: f64,
    /// Listening after the last reply has played out.
    pub tail_s: f64,
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
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .with_context(|| format!("connecting to ws://{addr}/ws"))?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        format!(r#"{{"type":"hello","sample_rate":{RATE}}}"#).into(),
    ))
    .await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .context("no ready within 10 s")?
            .context("closed before ready")??;
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).context("a non-JSON event")?;
            match v["type"].as_str() {
                Some("ready") => break,
                Some("error") => bail!("server error: {}", v["message"]),
                _ => {}
            }
        }
    }

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
    let mut agent_done = false;
    let silence = vec![0i16; FRAME];

    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let now = frames_sent as f64 * FRAME_S;
                let lag = start.elapsed().as_secs_f64() - (now + FRAME_S);
                log.max_send_lag_ms = log.max_send_lag_ms.max(lag * 1000.0);
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
                let mut bytes: Vec<u8> = frame.iter().flat_map(|s| s.to_le_bytes()).collect();
                bytes.resize(FRAME * 2, 0);
                tx.send(Message::Binary(bytes.into())).await.context("sending audio")?;
                frames_sent += 1;
                if let Phase::Speak { turn, pos } = phase {
                    if pos >= turns[turn].pcm.len() {
                        // From here the caller waits on the reply to this turn.
                        reference_s = log.turns.last().map_or(now, |t| t.speech_end_s);
                        agent_began = None;
                        agent_done = false;
                        phase = Phase::Wait { turn: turn + 1 };
                    }
                }
            }
            msg = rx.next() => {
                // Media time t is spoken at wall time start + t (frame k leaves at start + (k + 1) * 20 ms,
                // once its last sample has been spoken), so arrivals share the media axis.
                let at = start.elapsed().as_secs_f64();
                let Some(msg) = msg else { bail!("the server closed the session") };
                match msg.context("reading from the server")? {
                    Message::Binary(b) => {
                        let audible = b
                            .chunks_exact(2)
                            .any(|s| i32::from(i16::from_le_bytes([s[0], s[1]])).abs() > AUDIBLE);
                        if audible && at > reference_s && agent_began.is_none() {
                            agent_began = Some(at);
                        }
                        log.audio.push((at, audible));
                    }
                    Message::Text(t) => {
                        let v: serde_json::Value = serde_json::from_str(&t).context("a non-JSON event")?;
                        if v["type"] == "turn" && agent_began.is_some_and(|b| at >= b) {
                            agent_done = true;
                        }
                        if v["type"] == "bye" {
                            log.events.push((at, v));
                            bail!("the server ended the session");
                        }
                        log.events.push((at, v));
                    }
                    Message::Close(_) => bail!("the server closed the session"),
                    _ => {}
                }
            }
        }
    }
    tx.send(Message::Text(r#"{"type":"bye"}"#.into())).await?;
    // Late events (the last turn's) may still be on their way.
    let drain_until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(drain_until.into(), rx.next()).await {
        if let Message::Text(t) = msg {
            if let Ok(v) = serde_json::from_str(&t) {
                log.events.push((start.elapsed().as_secs_f64(), v));
            }
        }
    }
    Ok(())
}
