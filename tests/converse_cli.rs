//! `talkline converse`: the whole pipeline (Silero VAD, Whisper, turn manager, SmolLM2, Piper)
//! over recorded user audio, through the real binary.

use std::path::Path;

use talkline_tests::{espeak_16k, stderr, talkline, wer, write_wav_16k};

fn turn_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("events written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect()
}

/// (left = user, right = agent) channels of the stereo output.
fn channels(path: &Path) -> (Vec<f32>, Vec<f32>) {
    let mut reader = hound::WavReader::open(path).expect("output WAV");
    assert_eq!(reader.spec().channels, 2);
    let samples: Vec<f32> = reader
        .samples::<i16>()
        .map(|s| s.expect("sample") as f32 / 32768.0)
        .collect();
    samples.chunks_exact(2).map(|f| (f[0], f[1])).unzip()
}

fn rms(samples: &[f32]) -> f32 {
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len().max(1) as f32).sqrt()
}

fn converse(input: &[f32], dir: &Path, extra: &[&str]) -> (Vec<serde_json::Value>, Vec<f32>) {
    let (wav, out, events) = (
        dir.join("in.wav"),
        dir.join("out.wav"),
        dir.join("events.jsonl"),
    );
    write_wav_16k(&wav, input);
    // `converse` charges each decode's measured time to its simulated clock, and this file's
    // tests run three processes at once on CI's two cores: two-thread Whisper decodes (and LLM
    // passes) in all three would stretch past the pauses the tests script. One thread each, as
    // in a busy server.
    let config = dir.join("talkline.toml");
    std::fs::write(
        &config,
        "[asr]\nfinal_threads = 1\n[llm]\nbackend = \"local\"\nsolo_threads = 1\n",
    )
    .unwrap();
    let mut args = vec![
        "converse",
        "--config",
        config.to_str().unwrap(),
        "--input",
        wav.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = talkline(&args, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let (_, agent) = channels(&out);
    (turn_events(&events), agent)
}

#[test]
fn three_questions_get_three_spoken_replies_with_metrics() {
    let questions = [
        "What does a high cholesterol number mean?",
        "Is my hemoglobin normal?",
        "When should I repeat the blood test?",
    ];
    // Long gaps so that short replies finish before the next question.
    let mut input = vec![0.0f32; 16_000];
    let mut ends = Vec::new();
    for q in questions {
        input.extend(espeak_16k(q));
        ends.push(input.len());
        input.extend(vec![0.0; 16_000 * 7]);
    }
    let dir = tempfile::tempdir().unwrap();
    let (events, agent) = converse(&input, dir.path(), &["--max-tokens", "24"]);
    assert_eq!(events.len(), 3, "{events:#?}");
    for ((e, q), end) in events.iter().zip(questions).zip(&ends) {
        let user = e["user_text"].as_str().unwrap();
        assert!(wer(q, user) <= 0.35, "{user:?} vs {q:?}");
        assert!(!e["agent_text"].as_str().unwrap().is_empty(), "{e}");
        for key in [
            "asr_final_ms",
            "llm_first_token_ms",
            "tts_first_audio_ms",
            "voice_to_voice_ms",
        ] {
            assert!(e[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {e}");
        }
        assert!(["hit", "miss", "none"].contains(&e["speculative"].as_str().unwrap()));
        // The agent speaks after the question, in the gap before the next one.
        let start = (e["first_audio_out_ms"].as_f64().unwrap() * 16.0) as usize;
        assert!(
            start > *end,
            "the agent spoke before the user finished: {e}"
        );
        let first_second = &agent[start..(start + 16_000).min(agent.len())];
        assert!(rms(first_second) > 0.01, "agent audio is silent: {e}");
    }
    // Before the first reply, the agent track is silent.
    assert!(rms(&agent[..ends[0]]) < 1e-4);
}

#[test]
fn barge_in_stops_the_agent_within_a_frame_and_keeps_only_heard_words() {
    // A question, then the user talks over the (long) reply about two seconds in.
    let mut input = vec![0.0f32; 16_000];
    input.extend(espeak_16k(
        "Can you explain what cholesterol is and why it matters?",
    ));
    input.extend(vec![0.0; 16_000 * 3]);
    input.extend(espeak_16k("Sorry, stop, I have another question."));
    input.extend(vec![0.0; 16_000 * 8]);
    let dir = tempfile::tempdir().unwrap();
    let (events, agent) = converse(&input, dir.path(), &["--max-tokens", "120"]);
    let first = &events[0];
    assert_eq!(first["interrupted"], true, "{first}");
    let stopped = first["stopped_at_ms"].as_f64().expect("a barge-in time");
    // From the next 20 ms frame on, the agent track is silent until the next reply.
    let from = ((stopped + 20.0) * 16.0) as usize;
    let next_reply = events
        .get(1)
        .and_then(|e| e["first_audio_out_ms"].as_f64())
        .map_or(agent.len(), |ms| (ms * 16.0) as usize);
    assert!(from < next_reply);
    assert!(
        agent[from..next_reply].iter().all(|s| s.abs() < 1e-4),
        "agent audio continued after the barge-in"
    );
    // The history keeps only what was heard: a strict prefix of what the LLM wrote.
    let heard = first["agent_text"].as_str().unwrap();
    let generated = first["agent_generated_text"].as_str().unwrap();
    assert!(heard.len() < generated.len(), "{heard:?} / {generated:?}");
    let heard_words: Vec<&str> = heard.split_whitespace().collect();
    let generated_words: Vec<&str> = generated.split_whitespace().collect();
    assert_eq!(heard_words[..], generated_words[..heard_words.len()]);
}

#[test]
fn realtime_mode_runs_the_live_session_path() {
    let mut input = vec![0.0f32; 8_000];
    input.extend(espeak_16k("Is my hemoglobin normal?"));
    let question_end = input.len();
    input.extend(vec![0.0; 16_000]);
    let dir = tempfile::tempdir().unwrap();
    let (events, agent) = converse(&input, dir.path(), &["--realtime", "--max-tokens", "16"]);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(
        wer(
            "Is my hemoglobin normal?",
            events[0]["user_text"].as_str().unwrap()
        ) <= 0.25
    );
    assert!(
        rms(&agent[..question_end]) < 1e-4,
        "the agent spoke over the question"
    );
    assert!(rms(&agent[question_end..]) > 0.01, "no audible reply");
}
