//! `talkline converse`: the whole pipeline over a recorded conversation, as if it were spoken live.
//!
//! The user's audio is fed in 20 ms frames on a media clock. ASR decodes are charged to that clock
//! (see `talkline_asr::offline`). A reply runs when the turn manager asks for it: the LLM streams
//! into the TTS stream, whose synthesis runs on its own thread at the same time, and the wall-clock
//! offsets of the first token and of each audio chunk are measured; the reply's audio is then
//! placed on the agent's track at `start + offset`. The user's audio keeps flowing meanwhile, so a
//! user who talks over the agent barges in exactly where the recording says. What is optimistic:
//! while a reply is generated, the ASR's own decodes do not compete with it for the CPU.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use talkline_asr::streaming::{AsrEvent, StreamingRecognizer};
use talkline_asr::whisper::{Hypothesis, SAMPLE_RATE};
use talkline_llm::{CancelToken, ChatSession, GenerateParams, Message, Sampling};
use talkline_tts::stream::{self, AudioOutput, StreamConfig};
use talkline_tts::PiperVoice;

use crate::config::Config;
use crate::models::ModelStore;
use crate::turn::{CancelReason, TurnAction, TurnConfig, TurnManager};

/// The default system prompt: short answers suit a voice.
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a friendly phone assistant. Answer in one or two short sentences.";

#[derive(Debug, clap::Args)]
pub struct ConverseArgs {
    /// The user's side of the conversation: a WAV file (any rate, mono or stereo).
    #[arg(long)]
    pub input: PathBuf,
    /// Stereo 16 kHz WAV: the user on the left, the agent on the right, on one timeline.
    #[arg(long)]
    pub output: PathBuf,
    /// Write one JSON event per turn (latencies, texts, speculation, interruption) to this file.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// System prompt of the agent.
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    /// Most tokens in one reply.
    #[arg(long, default_value_t = 60)]
    pub max_tokens: usize,
    /// Run the live session in real time instead (the path `talkline serve` uses): the input
    /// is fed at its own pace and the agent's frames are placed where they arrive.
    #[arg(long)]
    pub realtime: bool,
    /// The agent to talk to (default: `[agent] kind`). `lab-results` runs the live session in
    /// real time, where agents live, with `[agent.lab_results]` from the config.
    #[arg(long, value_enum, value_name = "AGENT")]
    pub agent: Option<crate::chat::AgentChoice>,
}

const FRAME: usize = SAMPLE_RATE as usize / 50;
const MS: f64 = 1000.0;

/// One reply's audio, placed on the agent track.
struct Reply {
    id: u64,
    user_text: String,
    speculative: bool,
    /// Media time the reply was started.
    started: f64,
    /// Media time the audio may play from (speculative replies: once committed).
    release: Option<f64>,
    text: String,
    /// Everything the LLM wrote (`text` becomes what was heard when interrupted).
    generated: String,
    /// Media time output was stopped by a barge-in.
    stopped_at: Option<f64>,
    first_token_s: Option<f64>,
    /// (arrival offset from `started`, samples) per chunk.
    chunks: Vec<(f64, Vec<f32>)>,
    audio: AudioOutput,
    /// Set once placed: media start and end of playback.
    playback: Option<(f64, f64)>,
    speech_end: Option<f64>,
    asr_final: Option<f64>,
    missed: bool,
}

#[derive(Default)]
struct TurnTimes {
    speech_end: Option<f64>,
    asr_final: Option<f64>,
    /// A speculation of this turn was discarded.
    missed: bool,
}

pub fn run(args: ConverseArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let (mut config, _) = Config::load(config_path)?;
    match args.agent {
        Some(crate::chat::AgentChoice::LabResults) => {
            config.agent.kind = crate::config::AgentKind::LabResults
        }
        Some(crate::chat::AgentChoice::Assistant) => {
            config.agent.kind = crate::config::AgentKind::Assistant
        }
        None => {}
    }
    let store = ModelStore::open_default()?;
    let user_audio = talkline_asr::audio::read_wav_16k(&args.input)?;
    // The simulated clock drives the assistant only; any other agent runs in the live session.
    if args.realtime || config.agent.kind != crate::config::AgentKind::Assistant {
        return run_realtime(&args, &config, &store, user_audio);
    }
    let whisper = crate::stages::load_whisper(&config, &store)?;
    let mut asr_session = whisper.session()?;
    let vad = crate::stages::load_vad(&config, &store);
    let streaming = config.streaming();
    let hysteresis = streaming.vad.threshold - streaming.vad.release_threshold;
    let mut recognizer = StreamingRecognizer::new(streaming, vad);
    let chat_model = crate::stages::load_chat_model(&config, &store)?;
    let mut chat = chat_model.new_session()?;
    let voice = Arc::new(Mutex::new(crate::stages::load_voice(&config, &store)?));
    eprintln!("talkline converse: LLM {}", chat_model.describe());

    let asr_options = config.asr.decode_options();
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: Sampling::Greedy,
    };
    let mut turns = TurnManager::new(TurnConfig {
        vad_threshold: config.vad.threshold,
        ..config.turn.clone()
    });
    let mut history = vec![Message::system(args.system.clone())];
    let mut agent_track: Vec<f32> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    // A reply cancelled before it played, with the words it answered (see `RetryReply`).
    let mut withdrawn: Option<(u64, String)> = None;
    let mut times = TurnTimes::default();
    let mut events_out = match &args.events {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut table = Vec::new();
    let mut pending_decode: Option<(u64, talkline_asr::Result<Hypothesis>, f64, f64)> = None;

    // Runs past the input's end until the last reply has played.
    let mut now = 0.0f64;
    let mut frame_index = 0usize;
    loop {
        let frame_start = frame_index * FRAME;
        let input_done = frame_start >= user_audio.len();
        // A reply leaves the list once its playback has ended and been recorded.
        let playing_or_pending = replies
            .iter()
            .any(|r| r.playback.is_some() || r.release.is_some());
        if input_done
            && !playing_or_pending
            && pending_decode.is_none()
            && turns.poll_timeout().is_none()
            && recognizer.poll_timeout().is_none()
        {
            break;
        }
        if frame_index > (user_audio.len() / FRAME) + 50 * 600 {
            anyhow::bail!("the conversation did not settle within 10 minutes after the input");
        }

        // ASR: the decode in flight finishes when its wall time has passed on the media clock.
        if let Some((id, result, ms, ready)) = pending_decode.take() {
            if ready <= now {
                recognizer.on_decode_result(id, result, ms);
            } else {
                pending_decode = Some((id, result, ms, ready));
            }
        }
        if !input_done {
            let end = (frame_start + FRAME).min(user_audio.len());
            recognizer.push_audio(now, &user_audio[frame_start..end])?;
        } else {
            recognizer.handle_timeout(now);
        }
        // An abandoned decode stops at once, as the live engine aborts it.
        while let Some(id) = recognizer.poll_abandoned_decode() {
            pending_decode.take_if(|p| p.0 == id);
        }
        if pending_decode.is_none() {
            if let Some(request) = recognizer.poll_decode() {
                let options = asr_options.for_request(&request);
                let started = Instant::now();
                let result = asr_session.decode(&request.audio, &options);
                let ms = started.elapsed().as_secs_f64() * MS;
                pending_decode = Some((request.id, result, ms, now + ms / MS));
            }
        }
        while let Some(event) = recognizer.poll_event() {
            match &event {
                AsrEvent::SpeechEnded { at } => times.speech_end = Some(*at),
                AsrEvent::Final { .. } => times.asr_final = Some(now),
                _ => {}
            }
            turns.on_asr(now, &event);
        }

        while let Some(deadline) = turns.poll_timeout().filter(|t| *t <= now) {
            turns.handle_timeout(deadline);
        }

        while let Some(action) = turns.poll_action() {
            tracing::debug!(now, action = %action.redacted(), "turn action");
            match action {
                TurnAction::StartReply {
                    reply,
                    user_text,
                    speculative,
                } => {
                    let mut messages = history.clone();
                    messages.push(Message::user(user_text.clone()));
                    let mut r = generate(&mut *chat, &voice, &messages, &params, reply, now)?;
                    r.user_text = user_text;
                    r.speculative = speculative;
                    r.speech_end = times.speech_end;
                    r.asr_final = times.asr_final;
                    if !speculative {
                        r.release = Some(now);
                        r.missed = std::mem::take(&mut times.missed);
                    }
                    replies.push(r);
                }
                TurnAction::CommitReply { reply } => {
                    if let Some(r) = replies.iter_mut().find(|r| r.id == reply) {
                        r.release = Some(now);
                        r.speech_end = times.speech_end;
                        r.asr_final = times.asr_final;
                    }
                }
                TurnAction::CancelReply { reply, reason } => {
                    if let Some(i) = replies.iter().position(|r| r.id == reply) {
                        if replies[i].playback.is_none() {
                            // Never heard: it leaves no trace in the history or the audio.
                            times.missed |= replies[i].speculative;
                            let r = replies.remove(i);
                            if reason == CancelReason::BargeIn {
                                withdrawn = Some((reply, r.user_text));
                            }
                        }
                    }
                }
                TurnAction::RetryReply {
                    reply,
                    withdrawn: id,
                } => {
                    if let Some((_, user_text)) = withdrawn.take().filter(|(w, _)| *w == id) {
                        let mut messages = history.clone();
                        messages.push(Message::user(user_text.clone()));
                        let mut r = generate(&mut *chat, &voice, &messages, &params, reply, now)?;
                        r.user_text = user_text;
                        r.speech_end = times.speech_end;
                        r.asr_final = times.asr_final;
                        r.release = Some(now);
                        replies.push(r);
                    } else {
                        turns.on_agent_audio_finished(reply);
                    }
                }
                TurnAction::StopOutput => {
                    // Cut at this frame: the agent is silent from the next sample on.
                    let cut = (now * SAMPLE_RATE as f64) as usize;
                    for r in replies.iter_mut() {
                        if let Some((start, end)) = r.playback {
                            if start <= now && now < end {
                                let played = ((now - start) * SAMPLE_RATE as f64) as u64;
                                let heard = r.audio.heard(played);
                                r.text = heard.text;
                                r.stopped_at = Some(now);
                                r.playback = Some((start, now));
                                agent_track
                                    .truncate(cut.max((start * SAMPLE_RATE as f64) as usize));
                            }
                        }
                    }
                }
                TurnAction::EstimateEndOfUtterance { text } => {
                    let mut messages = history.clone();
                    messages.push(Message::user(text.clone()));
                    if let Ok(Some(p)) = chat.end_of_turn_probability(&messages) {
                        turns.on_end_of_utterance(now, &text, p);
                    }
                }
                TurnAction::SetVadThreshold { threshold } => {
                    let release = (threshold - hysteresis).max(0.01);
                    recognizer
                        .endpointer_mut()
                        .set_thresholds(threshold, release);
                }
            }
        }

        // Place released replies on the agent track, after whatever plays before them.
        for r in replies.iter_mut() {
            if r.playback.is_some() {
                continue;
            }
            let Some(release) = r.release else { continue };
            let Some(first_offset) = r.chunks.first().map(|c| c.0) else {
                continue;
            };
            let start = release
                .max(r.started + first_offset)
                .max(agent_track.len() as f64 / SAMPLE_RATE as f64);
            if start > now {
                continue;
            }
            let mut position = (now * SAMPLE_RATE as f64) as usize;
            let begin = position;
            for (offset, samples) in &r.chunks {
                let ready = ((r.started + offset) * SAMPLE_RATE as f64) as usize;
                position = position.max(ready);
                if agent_track.len() < position {
                    agent_track.resize(position, 0.0);
                }
                agent_track.truncate(position);
                agent_track.extend_from_slice(samples);
                position = agent_track.len();
            }
            r.playback = Some((
                begin as f64 / SAMPLE_RATE as f64,
                position as f64 / SAMPLE_RATE as f64,
            ));
            tracing::debug!(reply = r.id, ?r.playback, "placed");
            turns.on_agent_audio_started(r.id);
        }

        // A reply whose playback ended (or was cut) joins the history with the words heard.
        let mut finished = Vec::new();
        for (i, r) in replies.iter().enumerate() {
            if let Some((_, end)) = r.playback {
                if end <= now {
                    finished.push(i);
                }
            }
        }
        for i in finished.into_iter().rev() {
            let r = replies.remove(i);
            tracing::debug!(reply = r.id, now, ?r.playback, "finished");
            turns.on_agent_audio_finished(r.id);
            let (start, end) = r.playback.expect("finished replies have played");
            let interrupted = r.chunks.iter().map(|c| c.1.len()).sum::<usize>() as f64
                / SAMPLE_RATE as f64
                > end - start + 0.021;
            history.push(Message::user(r.user_text.clone()));
            history.push(Message::assistant(r.text.clone()));
            let speech_end = r.speech_end.unwrap_or(r.started);
            let row = json!({
                "type": "turn",
                "user_text": r.user_text,
                "agent_text": r.text,
                "speech_end_ms": speech_end * MS,
                "asr_final_ms": r.asr_final.map(|t| (t - speech_end) * MS),
                "llm_first_token_ms": r.first_token_s.map(|t| (r.started + t - speech_end) * MS),
                "tts_first_audio_ms": r.chunks.first().map(|c| (r.started + c.0 - speech_end) * MS),
                "first_audio_out_ms": start * MS,
                "voice_to_voice_ms": (start - speech_end) * MS,
                "speculative": if r.speculative { "hit" } else if r.missed { "miss" } else { "none" },
                "interrupted": interrupted,
                "agent_generated_text": r.generated,
                "stopped_at_ms": r.stopped_at.map(|t| t * MS),
                "playback_end_ms": end * MS,
            });
            if let Some(out) = &mut events_out {
                writeln!(out, "{row}")?;
            }
            table.push(row);
        }

        now += FRAME as f64 / SAMPLE_RATE as f64;
        frame_index += 1;
    }

    write_stereo(&args.output, &user_audio, &agent_track)?;
    print_table(&table);
    let stats = turns.stats();
    println!(
        "speculation: {} hit(s), {} miss(es); barge-ins: {}",
        stats.speculative_hits, stats.speculative_misses, stats.barge_ins
    );
    Ok(())
}

/// Runs the LLM into a TTS stream and measures when text and audio become available.
fn generate(
    chat: &mut dyn ChatSession,
    voice: &Arc<Mutex<PiperVoice>>,
    messages: &[Message],
    params: &GenerateParams,
    id: u64,
    now: f64,
) -> anyhow::Result<Reply> {
    let config = StreamConfig {
        output_rate: Some(SAMPLE_RATE),
        ..StreamConfig::default()
    };
    let (mut input, mut output) = stream::start(voice.clone(), config)?;
    let t0 = Instant::now();
    // The audio side is drained on its own thread so each chunk's arrival time is real.
    let collector = std::thread::Builder::new()
        .name("converse-audio".into())
        .spawn(move || {
            let mut chunks = Vec::new();
            while let Some(chunk) = output.recv() {
                match chunk {
                    Ok(c) => chunks.push((t0.elapsed().as_secs_f64(), c.samples)),
                    Err(e) => tracing::warn!("a chunk failed to synthesize: {e}"),
                }
            }
            (chunks, output)
        })
        .context("starting the audio collector")?;
    let mut first_token = None;
    let mut push_error = None;
    let cancel = CancelToken::new();
    let reply = chat.reply(messages, params, &cancel, &mut |piece| {
        first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if let Err(e) = input.push(piece) {
            push_error.get_or_insert(e);
        }
    })?;
    if let Some(e) = push_error {
        return Err(e.into());
    }
    input.finish()?;
    let (chunks, audio) = collector
        .join()
        .map_err(|_| anyhow::anyhow!("the audio collector panicked"))?;
    Ok(Reply {
        id,
        user_text: String::new(),
        speculative: false,
        started: now,
        release: None,
        text: reply.text.trim().to_string(),
        generated: reply.text.trim().to_string(),
        stopped_at: None,
        first_token_s: first_token,
        chunks,
        audio,
        playback: None,
        speech_end: None,
        asr_final: None,
        missed: false,
    })
}

/// Silence fed after the input so the last reply can play out.
const REALTIME_TAIL_S: f64 = 10.0;

fn run_realtime(
    args: &ConverseArgs,
    config: &Config,
    store: &ModelStore,
    user_audio: Vec<f32>,
) -> anyhow::Result<()> {
    use crate::session::{self, SessionOutput};
    let mut config = config.clone();
    config.agent.system_prompt = args.system.clone();
    let shared = Arc::new(crate::serve::load_shared(&config, store, args.max_tokens)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (agent_track, rows) = runtime.block_on(async move {
        let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Vec<f32>>(100);
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(session::OUTPUT_QUEUE);
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(session::run(
            shared,
            SAMPLE_RATE,
            in_rx,
            out_tx,
            cancel,
            "converse".into(),
        ));
        let start = Instant::now();
        let mut audio = user_audio;
        audio.resize(
            audio.len() + (REALTIME_TAIL_S * SAMPLE_RATE as f64) as usize,
            0.0,
        );
        let feeder = tokio::spawn(async move {
            for (i, frame) in audio.chunks(FRAME).enumerate() {
                let due = start + std::time::Duration::from_millis(20 * i as u64);
                tokio::time::sleep_until(due.into()).await;
                if in_tx.send(frame.to_vec()).await.is_err() {
                    break;
                }
            }
        });
        let mut agent_track: Vec<f32> = Vec::new();
        let mut rows = Vec::new();
        while let Some(out) = out_rx.recv().await {
            match out {
                SessionOutput::Audio(frame) => {
                    // Placed where it arrived, as a listener would hear it.
                    let at = (start.elapsed().as_secs_f64() * SAMPLE_RATE as f64) as usize;
                    let at = at.max(agent_track.len().saturating_sub(FRAME));
                    agent_track.resize(at, 0.0);
                    agent_track.extend(frame);
                }
                SessionOutput::Event(e) if e["type"] == "turn" => rows.push(e),
                _ => {}
            }
        }
        let _ = feeder.await;
        match task.await {
            Ok(result) => result.map(|()| (agent_track, rows)),
            Err(e) => Err(anyhow::anyhow!("the session failed: {e}")),
        }
    })?;
    let user_audio = talkline_asr::audio::read_wav_16k(&args.input)?;
    write_stereo(&args.output, &user_audio, &agent_track)?;
    if let Some(path) = &args.events {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for row in &rows {
            writeln!(out, "{row}")?;
        }
    }
    print_table(&rows);
    Ok(())
}

fn write_stereo(path: &Path, user: &[f32], agent: &[f32]) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)
        .with_context(|| format!("creating {}", path.display()))?;
    let to_i16 = |s: f32| (s.clamp(-1.0, 1.0) * 32767.0) as i16;
    for i in 0..user.len().max(agent.len()) {
        w.write_sample(to_i16(user.get(i).copied().unwrap_or(0.0)))?;
        w.write_sample(to_i16(agent.get(i).copied().unwrap_or(0.0)))?;
    }
    w.finalize()?;
    Ok(())
}

fn print_table(rows: &[serde_json::Value]) {
    println!("| turn | user | agent | ASR final ms | LLM 1st token ms | TTS 1st audio ms | voice-to-voice ms | speculative | interrupted |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    for (i, r) in rows.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            r["user_text"].as_str().unwrap_or(""),
            r["agent_text"].as_str().unwrap_or(""),
            ms(&r["asr_final_ms"]),
            ms(&r["llm_first_token_ms"]),
            ms(&r["tts_first_audio_ms"]),
            ms(&r["voice_to_voice_ms"]),
            r["speculative"].as_str().unwrap_or(""),
            r["interrupted"],
        );
    }
}
