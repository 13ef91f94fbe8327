//! Criterion micro-benchmark of the LLM stage: one decode step (one token through the forward
//! pass, KV cache rolled back after each) of the real SmolLM2-135M Q8_0 from the cache
//! (`talkline models fetch`), after a chat prompt.
//!
//! ```sh
//! cargo bench -p talkline-llm --bench llm
//! ```

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use talkline_llm::{local, CancelToken, LocalSession, Message};

/// A file of the model cache, or a panic naming the command that fetches it.
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

fn benches(c: &mut Criterion) {
    let path = model("smollm2-135m", "SmolLM2-135M-Instruct.Q8_0.gguf");
    let model = local::load(&path, 1).expect("the GGUF loads");
    let prompt = model
        .prompt_tokens(&[
            Message::system(
                "You are a friendly phone assistant. Answer in one or two short sentences.",
            ),
            Message::user("Is my hemoglobin normal?"),
        ])
        .expect("the chat template renders");
    let mut session = LocalSession::new(model.clone());
    session
        .sync(&prompt, &CancelToken::new())
        .expect("the prompt runs");
    let next = talkline_llm::sampling::argmax(session.logits());
    let len = session.cached_tokens().len();
    c.bench_function("decode step, SmolLM2-135M Q8_0, 1 thread", |b| {
        b.iter(|| {
            let logits = session.extend(&[next]).expect("one token").len();
            // Roll back, so every step sees the same context length.
            session.truncate(len);
            logits
        })
    });
}

criterion_group!(llm, benches);
criterion_main!(llm);
