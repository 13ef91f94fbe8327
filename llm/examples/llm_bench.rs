//! LLM stage benchmark: prompt tok/s, decode tok/s, follow-up time to first token with KV reuse,
//! and the speed-up of prompt-lookup speculative decoding. Reports p50/p95 over repetitions.
//!
//! ```sh
//! cargo run -p talkline-llm --example llm_bench -- MODEL.gguf [THREADS] [REPS]
//! ```
//! `llama_cpp_bench.py` beside this file measures the same things with llama.cpp.

use std::time::Instant;

use talkline_llm::{
    local, CancelToken, DraftSource, GenerateParams, LocalSession, Message, Sampling,
};

const SYSTEM: &str = "You are a friendly voice assistant for a small museum in Lyon. Answer in one or two short sentences, suitable for reading aloud. The museum opens Tuesday to Sunday from 10 am to 6 pm, closes on Mondays, and has free entry on the first Sunday of each month. Tickets cost 8 euros, 5 for students.";
const QUESTION: &str = "Hi! I was wondering whether the museum is open this Sunday, and how much a ticket costs for a student?";
const FOLLOW_UP: &str = "Great, and on Monday?";
const COPY: &str = "Please repeat this list back to me exactly, with nothing else: apples, pears, plums, cherries, apples, pears, plums, cherries, apples, pears, plums, cherries.";
const DECODE_TOKENS: usize = 64;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, unit: &str, v: &mut [f64]) {
    let p50 = pct(v, 0.5);
    let p95 = pct(v, 0.95);
    println!("{name:<34} p50 {p50:>8.1} {unit:<6} p95 {p95:>8.1} {unit}");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: llm_bench MODEL.gguf [THREADS] [REPS]")?;
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let model = local::load(std::path::Path::new(path), threads)?;
    println!(
        "{path}: {} weights run as Q8_0, {threads} thread(s), {reps} repetitions",
        model.llama.source_dtype()
    );
    let cancel = CancelToken::new();
    let first = [Message::system(SYSTEM), Message::user(QUESTION)];
    let prompt = model.prompt_tokens(&first)?;

    let (mut prompt_tps, mut decode_tps, mut follow_ttft) = (vec![], vec![], vec![]);
    let mut prefilled_ttft = vec![];
    // Tokens the follow-up turn had to run (the rest came from the cache).
    let mut follow_new_tokens = 0;
    let (mut plain_tps, mut lookup_tps, mut accept) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        // Prompt processing and plain decoding (stop tokens ignored: fixed length).
        let mut s = LocalSession::new(model.clone());
        let t = Instant::now();
        s.sync(&prompt, &cancel)?;
        prompt_tps.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut next = talkline_llm::sampling::argmax(s.logits());
        let t = Instant::now();
        for _ in 0..DECODE_TOKENS {
            s.extend(&[next])?;
            next = talkline_llm::sampling::argmax(s.logits());
        }
        decode_tps.push(DECODE_TOKENS as f64 / t.elapsed().as_secs_f64());

        // A follow-up turn: only its new tokens are processed.
        let mut s = LocalSession::new(model.clone());
        let greedy = GenerateParams {
            max_tokens: 48,
            sampling: Sampling::Greedy,
        };
        let reply =
            talkline_llm::ChatSession::reply(&mut s, &first, &greedy, &cancel, &mut |_| {})?;
        let second = [
            Message::system(SYSTEM),
            Message::user(QUESTION),
            Message::assistant(reply.text),
            Message::user(FOLLOW_UP),
        ];
        let one = GenerateParams {
            max_tokens: 1,
            sampling: Sampling::Greedy,
        };
        let mut s2 = LocalSession::new(model.clone());
        s2.sync(s.cached_tokens(), &cancel)?;
        let r = talkline_llm::ChatSession::reply(&mut s, &second, &one, &cancel, &mut |_| {})?;
        follow_ttft.push(r.stats.time_to_first_token.as_secs_f64() * 1000.0);
        follow_new_tokens = r.stats.prompt_tokens - r.stats.reused_tokens;
        // The voice path: the turn manager prefilled the transcript while the user spoke, so
        // at end of turn only the end-of-turn marker and the assistant header remain.
        talkline_llm::ChatSession::prefill(&mut s2, &second)?;
        let r = talkline_llm::ChatSession::reply(&mut s2, &second, &one, &cancel, &mut |_| {})?;
        prefilled_ttft.push(r.stats.time_to_first_token.as_secs_f64() * 1000.0);

        // Speculative decoding on a reply that copies the prompt.
        let copy = [Message::user(COPY)];
        let params = GenerateParams {
            max_tokens: DECODE_TOKENS,
            sampling: Sampling::Greedy,
        };
        for draft in [DraftSource::None, DraftSource::lookup()] {
            let mut s = LocalSession::new(model.clone());
            let lookup = !matches!(draft, DraftSource::None);
            s.set_draft(draft)?;
            let r = talkline_llm::ChatSession::reply(&mut s, &copy, &params, &cancel, &mut |_| {})?;
            let tps = r.stats.decode_tokens_per_s();
            if lookup {
                lookup_tps.push(tps);
                accept.push(r.stats.acceptance_rate().unwrap_or(0.0) * 100.0);
            } else {
                plain_tps.push(tps);
            }
        }
    }
    let mut speedup: Vec<f64> = lookup_tps
        .iter()
        .zip(&plain_tps)
        .map(|(l, p)| l / p)
        .collect();
    let summary = |v: &mut [f64]| serde_json::json!({"p50": pct(v, 0.5), "p95": pct(v, 0.95)});
    // One machine-readable line for benches/llm/run.sh, which sets it beside llama.cpp's.
    let json = serde_json::json!({
        "engine": "talkline",
        "threads": threads,
        "reps": reps,
        "prompt_tokens": prompt.len(),
        "prompt_tps": summary(&mut prompt_tps),
        "decode_tps": summary(&mut decode_tps),
        "follow_up_ttft_ms": summary(&mut follow_ttft),
        "follow_up_new_tokens": follow_new_tokens,
        "prefilled_ttft_ms": summary(&mut prefilled_ttft),
        "copy_plain_tps": summary(&mut plain_tps),
        "copy_lookup_tps": summary(&mut lookup_tps),
        "lookup_speedup": summary(&mut speedup),
        "lookup_acceptance_pct": summary(&mut accept),
    });
    report(
        &format!("prompt ({} tokens)", prompt.len()),
        "tok/s",
        &mut prompt_tps,
    );
    report(
        &format!("decode ({DECODE_TOKENS} tokens)"),
        "tok/s",
        &mut decode_tps,
    );
    report(
        &format!("follow-up time to first token ({follow_new_tokens} new tokens)"),
        "ms",
        &mut follow_ttft,
    );
    report("  ... transcript prefilled", "ms", &mut prefilled_ttft);
    report("copy reply, plain decode", "tok/s", &mut plain_tps);
    report("copy reply, prompt lookup", "tok/s", &mut lookup_tps);
    report("prompt lookup acceptance", "%", &mut accept);
    report("prompt lookup speed-up", "x", &mut speedup);
    println!("JSON {json}");
    Ok(())
}
