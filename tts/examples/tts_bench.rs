//! Time to first audio and real-time factor of the Piper voice, for `benches/tts/run.sh`,
//! which runs Python piper-tts on the same sentences, voice and threads and prints the ratios.
//!
//! A plain binary rather than a criterion bench: the first-audio time goes through the streaming
//! path (chunker, worker thread, queues), and both sides must print the same distributions in one
//! run. Prints one JSON object.
//!
//! ```sh
//! cargo run -p talkline-tts --example tts_bench -- MODEL.onnx LIBONNXRUNTIME ESPEAK_DATA_PARENT [THREADS]
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use talkline_tts::stream::{self, StreamConfig};
use talkline_tts::{onnx, PiperVoice, VoiceOptions};

/// The first clause of an answer, as the chunker would cut it.
const FIRST_CLAUSE: &str = "Your results are back,";
/// About 15 s of speech, without numbers, so both sides read the same words.
const PARAGRAPH: &str = "Your results are back, and they look good. Your hemoglobin is within the \
    normal range, and so are your white cells. Your cholesterol is a little high, so we should talk \
    about diet and exercise at your next visit. Please call the clinic if you have any questions.";
const FIRST_AUDIO_RUNS: usize = 20;
const RTF_RUNS: usize = 5;

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    values[i]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err(
            "usage: tts_bench MODEL.onnx LIBONNXRUNTIME ESPEAK_DATA_PARENT [THREADS]".into(),
        );
    }
    let threads: usize = args.get(3).map_or(Ok(1), |t| t.parse())?;
    let env = onnx::environment(&PathBuf::from(&args[1]))?;
    let options = VoiceOptions {
        threads,
        espeak_data: Some(PathBuf::from(&args[2])),
        warm_up: true,
        ..VoiceOptions::default()
    };
    let voice = Arc::new(Mutex::new(PiperVoice::load(
        &env,
        &PathBuf::from(&args[0]),
        &options,
    )?));

    // Time to first audio: the first clause is complete -> its audio is out of the stream.
    let mut first_audio_ms = Vec::new();
    for _ in 0..FIRST_AUDIO_RUNS {
        let (mut input, mut output) = stream::start(Arc::clone(&voice), StreamConfig::default())?;
        let t0 = Instant::now();
        // The comma and the space after it: the chunker knows the clause is complete.
        input.push(FIRST_CLAUSE)?;
        input.push(" ")?;
        let chunk = output.recv().ok_or("no audio")??;
        first_audio_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert!(!chunk.samples.is_empty());
        output.cancel(0);
    }

    // Real-time factor: synthesis time over audio duration, whole paragraph.
    let mut rtf = Vec::new();
    let mut v = voice.lock().map_err(|_| "voice lock poisoned")?;
    let rate = f64::from(v.sample_rate());
    for _ in 0..RTF_RUNS {
        let t0 = Instant::now();
        let audio = v.speak(PARAGRAPH)?;
        rtf.push(t0.elapsed().as_secs_f64() / (audio.len() as f64 / rate));
    }
    println!(
        "{{\"impl\": \"talkline\", \"threads\": {threads}, \"first_audio_ms_p50\": {:.1}, \"first_audio_ms_p95\": {:.1}, \"rtf_p50\": {:.4}, \"rtf_p95\": {:.4}}}",
        percentile(&mut first_audio_ms, 0.5),
        percentile(&mut first_audio_ms, 0.95),
        percentile(&mut rtf, 0.5),
        percentile(&mut rtf, 0.95),
    );
    Ok(())
}
