//! `talkline say TEXT --output out.wav`: text to speech through the streaming TTS path (clause
//! chunks, normalisation, Piper, resampling), written as a 16-bit WAV.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use talkline_tts::stream::{self, StreamConfig};

use crate::config::Config;
use crate::models::ModelStore;

#[derive(Debug, clap::Args)]
pub struct SayArgs {
    /// The text to speak; `-` reads it from standard input.
    pub text: String,
    /// Where to write the WAV file (16-bit mono PCM).
    #[arg(short, long)]
    pub output: PathBuf,
    /// A Piper voice `.onnx` (its `.onnx.json` beside it). Default: `[tts] voice`, else the
    /// embedded en_US-joe-medium.
    #[arg(long)]
    pub voice: Option<PathBuf>,
    /// Output sample rate in Hz, e.g. 48000 (WebRTC), 16000 or 8000 (telephony). Default: the
    /// voice's own rate.
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u32).range(8_000..=192_000))]
    pub rate: Option<u32>,
    /// Speaker id, for multi-speaker voices. Default: `[tts] speaker`, else the voice's default.
    #[arg(long)]
    pub speaker: Option<u32>,
    /// ONNX Runtime threads for the voice.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub fn run(args: SayArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let text = if args.text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the text from standard input")?;
        s
    } else {
        args.text.clone()
    };
    if text.trim().is_empty() {
        anyhow::bail!("nothing to say: the text is empty");
    }

    let (config, _) = Config::load(config_path)?;
    let store = ModelStore::open_default()?;
    let loading = Instant::now();
    let voice = crate::stages::voice(
        &config,
        &store,
        args.voice.as_deref(),
        args.threads,
        args.speaker,
    )?;
    let voice_rate = voice.sample_rate();
    let rate = args.rate.unwrap_or(voice_rate);
    tracing::info!(
        voice = %voice.path().display(),
        ms = loading.elapsed().as_millis() as u64,
        "voice loaded and warmed up"
    );

    let stream_config = StreamConfig {
        output_rate: Some(rate),
        ..StreamConfig::default()
    };
    let started = Instant::now();
    let (mut input, mut output) = stream::start(Arc::new(Mutex::new(voice)), stream_config)?;
    // The whole text is known, but it goes through the streaming path a live answer takes; a
    // thread feeds it so the bounded text queue can apply back-pressure.
    let producer = std::thread::Builder::new()
        .name("say-text".into())
        .spawn(move || -> talkline_tts::Result<()> {
            input.push(&text)?;
            input.finish()
        })
        .context("starting the text thread")?;

    let mut samples: Vec<f32> = Vec::new();
    let mut first_audio = None;
    let mut chunks = 0;
    while let Some(chunk) = output.recv() {
        let chunk = chunk.context("synthesizing")?;
        for s in &chunk.skipped {
            eprintln!("note: left out {s} in chunk {}", chunk.index + 1);
        }
        if !chunk.samples.is_empty() {
            first_audio.get_or_insert_with(|| started.elapsed());
        }
        chunks += usize::from(chunk.ends_chunk);
        samples.extend_from_slice(&chunk.samples);
    }
    let synth_time = started.elapsed();
    match producer.join() {
        Ok(result) => result.context("feeding the text")?,
        Err(_) => anyhow::bail!("the text thread panicked"),
    }
    if samples.is_empty() {
        anyhow::bail!("nothing to say: every character was left out (see the notes above)");
    }
    write_wav(&args.output, &samples, rate)?;
    let seconds = samples.len() as f64 / f64::from(rate);
    println!(
        "wrote {}: {seconds:.2} s at {rate} Hz, {chunks} chunk(s); first audio after {} ms, \
         real-time factor {:.3}",
        args.output.display(),
        first_audio.unwrap_or(synth_time).as_millis(),
        synth_time.as_secs_f64() / seconds
    );
    Ok(())
}

fn write_wav(path: &Path, samples: &[f32], rate: u32) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)
        .with_context(|| format!("creating {}", path.display()))?;
    for s in samples {
        writer
            .write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    writer
        .finalize()
        .with_context(|| format!("writing {}", path.display()))
}
