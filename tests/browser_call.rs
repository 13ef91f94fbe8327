//! The web demo end to end in real Chromium: a WAV is the microphone, the call goes over
//! WebRTC to the real server, and the page shows the transcript, the reply, and its latency.
//! Needs Debian's `chromium` and `npm ci --prefix tests/browser` (both done by `scripts/test`).

use std::path::PathBuf;
use std::process::Command;

use talkline_tests::{espeak_16k, start_server, wer, write_wav_16k};

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[test]
fn the_demo_page_calls_the_agent_and_shows_what_was_said_and_how_fast() {
    assert!(
        browser_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci --prefix tests/browser`"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (scripts/install-deps)"
    );
    // Artifacts (the screenshot) stay where CI and people can look at them.
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-call");
    std::fs::create_dir_all(&out).unwrap();
    let question = "What is a normal blood pressure?";
    let mut audio = vec![0.0f32; 16_000 * 2];
    audio.extend(espeak_16k(question));
    audio.extend(vec![0.0f32; 16_000 * 3]);
    let wav = out.join("question.wav");
    write_wav_16k(&wav, &audio);

    let server = start_server(&["--max-tokens", "24"]);
    let run = Command::new("node")
        .arg(browser_dir().join("call.mjs"))
        .arg(format!("http://{}/", server.addr))
        .arg(&wav)
        .arg(&out)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "call.mjs failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("call.mjs printed no JSON ({e}): {stdout}"));
    assert_eq!(seen["ok"], true, "{seen:#}");
    assert_eq!(seen["connected"], true, "the call connects: {seen:#}");
    assert!(seen["error"].is_null(), "the page shows an error: {seen:#}");

    let finals: Vec<&str> = seen["finals"]
        .as_array()
        .map(|f| f.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    assert!(
        finals.iter().any(|f| wer(question, f) <= 0.25),
        "the question is not among the final transcripts {finals:?}"
    );
    let turn = &seen["turns"][0];
    let reply = turn["agent_text"].as_str().unwrap_or("");
    assert!(!reply.trim().is_empty(), "no reply text: {turn}");
    assert!(
        seen["transcriptText"]
            .as_str()
            .unwrap_or("")
            .contains(reply.trim()),
        "the reply is not on the page: {seen:#}"
    );
    let peak = seen["agentPeak"].as_f64().unwrap_or(0.0);
    assert!(
        peak > 0.01,
        "the agent's audio in the page is silent: peak RMS {peak}"
    );
    let v2v = seen["v2vText"].as_str().unwrap_or("");
    assert!(
        v2v.trim_end_matches(" ms").parse::<f64>().is_ok(),
        "the latency readout shows no number: {v2v:?}"
    );
    assert!(out.join("call.png").is_file(), "no screenshot");
    eprintln!(
        "browser call: final {finals:?}, reply {reply:?}, v2v {v2v}, agent peak RMS {peak:.3}; screenshot {}",
        out.join("call.png").display()
    );
}
