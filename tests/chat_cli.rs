//! `talkline chat` through the real binary and the real SmolLM2 model.

use talkline_tests::{real_model, stderr, stdout, talkline};

/// The "N reused" figure of each `[stats]` line.
fn reused_per_turn(stats: &str) -> Vec<usize> {
    stats
        .lines()
        .filter(|l| l.starts_with("[stats]"))
        .map(|l| {
            let before = &l[..l.find(" reused").expect("stats name the reused tokens")];
            let n = before.rsplit('(').next().expect("a '(' precedes the count");
            n.trim().parse().expect("a token count")
        })
        .collect()
}

#[test]
fn two_turns_stream_answers_and_reuse_the_cache() {
    real_model("smollm2-135m", "SmolLM2-135M-Instruct.Q8_0.gguf");
    let out = talkline(
        &[
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--stats",
            "-m",
            // A prompt whose greedy answer is the same on every kernel (see llm's real_model.rs).
            "Name the capital city of France.",
            "-m",
            "And of Germany?",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Paris"), "{text}");
    assert!(text.contains("Berlin"), "{text}");
    let reused = reused_per_turn(&stderr(&out));
    assert_eq!(reused.len(), 2, "{}", stderr(&out));
    assert_eq!(reused[0], 0);
    // The second turn keeps the first turn's prompt and reply in the KV cache.
    assert!(reused[1] > 30, "{reused:?}");
}

#[test]
fn lookup_decoding_prints_the_same_greedy_answer_and_its_acceptance() {
    real_model("smollm2-135m", "SmolLM2-135M-Instruct.Q8_0.gguf");
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--stats",
            "-m",
            "Repeat exactly: red, green, blue, red, green, blue.",
        ];
        args.extend_from_slice(extra);
        let out = talkline(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    let plain = ask(&[]);
    let lookup = ask(&["--lookup"]);
    assert_eq!(stdout(&plain), stdout(&lookup));
    assert!(stderr(&lookup).contains("accepted"), "{}", stderr(&lookup));
}
