//! Criterion micro-benchmarks of the TTS stage: the clause chunker over a streamed reply, text
//! normalisation, and phonemize + synthesize one first clause with the real Piper voice from the
//! cache (`talkline models fetch`).
//!
//! ```sh
//! cargo bench -p talkline-tts --bench tts
//! ```

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use talkline_tts::chunker::{ChunkerConfig, ClauseChunker};
use talkline_tts::{onnx, PiperVoice, VoiceOptions};

const REPLY: &str = "Your results are back, and they look good. Your hemoglobin is 13.5 g/dL, \
    within the normal range. Your blood pressure was 120/80 on March 3rd, which is fine.";

/// A file of the model cache, or a panic naming the command that fetches it.
fn model(model: &str, file: &str) -> PathBuf {
    let root = std::env::var_os("TALKLINE_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("talkline")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/talkline")))
        .expect("HOME is set");
    let path = root.join(model).join(file);
    assert!(
        path.exists(),
        "{} is missing: run `talkline models fetch --only {model}`",
        path.display()
    );
    path
}

fn benches(c: &mut Criterion) {
    // LLM deltas are a few characters each.
    let deltas: Vec<String> = REPLY
        .as_bytes()
        .chunks(4)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    c.bench_function("chunker, one reply in 4-byte deltas", |b| {
        b.iter(|| {
            let mut chunker = ClauseChunker::new(ChunkerConfig::default());
            let mut n = 0;
            for d in &deltas {
                n += chunker.push(d).len();
            }
            n + usize::from(chunker.finish().is_some())
        })
    });
    c.bench_function("normalize one reply", |b| {
        b.iter(|| talkline_tts::normalize::normalize(std::hint::black_box(REPLY)))
    });

    let env = onnx::environment(&model("onnxruntime", "libonnxruntime.so.1.32.0"))
        .expect("ONNX Runtime loads");
    let options = VoiceOptions {
        threads: 1,
        espeak_data: model("piper-espeak-data", "espeak-ng-data")
            .parent()
            .map(PathBuf::from),
        warm_up: true,
        ..VoiceOptions::default()
    };
    let mut voice = PiperVoice::load(&env, &model("piper-joe", "en_US-joe-medium.onnx"), &options)
        .expect("the Piper voice loads");
    let mut group = c.benchmark_group("piper");
    group.sample_size(20);
    group.bench_function(
        "phonemize + synthesize \"Your results are back,\" (1 thread)",
        |b| b.iter(|| voice.speak("Your results are back,").expect("speaks")),
    );
    group.finish();
}

criterion_group!(tts, benches);
criterion_main!(tts);
