//! Criterion micro-benchmarks of the ASR stage's hot paths, on the real models from the cache
//! (`talkline models fetch`): 20 ms of 48 kHz audio resampled to 16 kHz, one VAD window (Silero
//! and the energy fallback), and a Whisper tiny.en decode of 1 s of espeak-ng speech.
//!
//! ```sh
//! cargo bench -p talkline-asr --bench asr
//! ```

use std::path::PathBuf;
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion};
use talkline_asr::audio::{read_wav_16k, To16k};
use talkline_asr::vad::{EnergyVad, SileroVad, SpeechProbability};
use talkline_asr::whisper::{DecodeOptions, WhisperModel};

/// A file of the model cache, or a panic naming the command that fetches it: a benchmark on a
/// stand-in model would measure nothing worth reporting.
fn model(model: &str, file: &str) -> PathBuf {
    let root = std::env::var_os("TALKLINE_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("talkline")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/talkline")))
        .expect("HOME is set");
    let path = root.join(model).join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `talkline models fetch --only {model}`",
        path.display()
    );
    path
}

/// One second of real speech (espeak-ng), 16 kHz.
fn speech_1s() -> Vec<f32> {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = dir.path().join("s.wav");
    let ok = Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&wav)
        .arg("Is my hemoglobin normal? Please tell me.")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "espeak-ng is needed (apt-get install espeak-ng)");
    let mut pcm = read_wav_16k(&wav).expect("espeak-ng wrote a WAV");
    pcm.resize(16_000, 0.0);
    pcm
}

fn benches(c: &mut Criterion) {
    let frame: Vec<f32> = (0..960).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
    let mut resampler = To16k::new(48_000).expect("48 kHz is supported");
    c.bench_function("resample 20 ms 48k->16k", |b| {
        b.iter(|| resampler.push(std::hint::black_box(&frame)))
    });

    let speech = speech_1s();
    let mut energy = EnergyVad::default();
    let n = energy.window_samples();
    c.bench_function("VAD window, energy", |b| {
        b.iter(|| energy.probability(&speech[..n]))
    });

    let lib = model("onnxruntime", "libonnxruntime.so.1.32.0");
    let env = ort::init_from(&lib)
        .expect("ONNX Runtime loads")
        .build()
        .expect("one environment");
    let mut silero =
        SileroVad::load(&env, &model("silero-vad", "silero_vad.onnx")).expect("Silero VAD loads");
    let n = silero.window_samples();
    c.bench_function("VAD window, Silero", |b| {
        b.iter(|| silero.probability(&speech[..n]))
    });

    let whisper = WhisperModel::load(&model("whisper-tiny.en", "ggml-tiny.en-q8_0.bin"))
        .expect("Whisper loads");
    let mut session = whisper.session().expect("a decoding state");
    let options = DecodeOptions::default();
    let mut group = c.benchmark_group("whisper");
    group.sample_size(20);
    group.bench_function("decode 1 s, tiny.en q8_0, 1 thread", |b| {
        b.iter(|| session.decode(&speech, &options).expect("decodes"))
    });
    group.finish();
}

criterion_group!(asr, benches);
criterion_main!(asr);
