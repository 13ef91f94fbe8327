//! `talkline transcribe FILE.wav`: the streaming recognizer over a recorded file.

use std::path::{Path, PathBuf};

use talkline_asr::offline::transcribe_stream;
use talkline_asr::streaming::{AsrEvent, StreamingRecognizer};

use crate::config::Config;
use crate::models::ModelStore;

#[derive(Debug, clap::Args)]
pub struct TranscribeArgs {
    /// A WAV file (any sample rate, 8-32 bit PCM or float, mono or stereo).
    pub file: PathBuf,
    /// Also print the partial transcripts as they would have appeared live.
    #[arg(long)]
    pub partials: bool,
    /// Print every event as a JSON line, with media timestamps and the end-of-speech -> final
    /// latency of each utterance.
    #[arg(long)]
    pub json: bool,
    /// Whisper threads (default: from the config).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: TranscribeArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let (config, _) = Config::load(config_path)?;
    let store = ModelStore::open_default()?;
    let audio = talkline_asr::audio::read_wav_16k(&args.file)?;
    let model = crate::stages::load_whisper(&config, &store)?;
    let mut session = model.session()?;
    let vad = crate::stages::load_vad(&config, &store);
    let mut recognizer = StreamingRecognizer::new(config.streaming(), vad);
    let mut options = config.asr.decode_options();
    if let Some(threads) = args.threads {
        options.threads = threads;
        options.final_threads = threads;
    }
    let events = transcribe_stream(&mut recognizer, &mut session, &options, &audio)?;
    let mut speech_end_detected = None;
    for timed in events {
        match &timed.event {
            AsrEvent::SpeechEnded { .. } => speech_end_detected = Some(timed.media_time),
            AsrEvent::Final { text, .. } if !args.json && !text.is_empty() => println!("{text}"),
            AsrEvent::Partial {
                committed,
                tentative,
                ..
            } if args.partials && !args.json => {
                println!("  [{:7.2}s] {committed} | {tentative}", timed.media_time);
            }
            _ => {}
        }
        if args.json {
            println!("{}", event_json(&timed, speech_end_detected));
        }
    }
    Ok(())
}

fn event_json(
    timed: &talkline_asr::offline::TimedEvent,
    speech_end_detected: Option<f64>,
) -> String {
    use serde_json::json;
    let t = timed.media_time;
    let value = match &timed.event {
        AsrEvent::SpeechStarted { at } => json!({"type": "speech_started", "t": t, "at": at}),
        AsrEvent::SpeechEnded { at } => json!({"type": "speech_ended", "t": t, "at": at}),
        AsrEvent::Paused { at } => json!({"type": "paused", "t": t, "at": at}),
        AsrEvent::Resumed { at } => json!({"type": "resumed", "t": t, "at": at}),
        AsrEvent::Partial {
            committed,
            tentative,
            audio_end,
        } => json!({"type": "partial", "t": t, "committed": committed, "tentative": tentative,
                    "audio_end": audio_end, "decode_ms": timed.decode_ms,
                    "lag_ms": (t - audio_end) * 1000.0}),
        AsrEvent::Final {
            text,
            start,
            end,
            words,
            decode_ms,
            from_pause_decode,
        } => json!({"type": "final", "t": t, "text": text, "start": start, "end": end,
                   "words": words.iter().map(|w| json!({"w": w.text, "start": w.start, "end": w.end})).collect::<Vec<_>>(),
                   "endpoint_detect_ms": speech_end_detected.map(|d| (d - end) * 1000.0),
                   "decode_ms": decode_ms,
                   "from_pause_decode": from_pause_decode,
                   "eos_to_final_ms": (t - end) * 1000.0}),
    };
    value.to_string()
}
