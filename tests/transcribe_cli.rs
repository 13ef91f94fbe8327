//! `talkline transcribe` through the real binary: output shape and bad input.

use talkline_tests::{spoken_clip, stderr, stdout, talkline, wer, write_wav_16k};

#[test]
fn prints_one_line_per_utterance_and_json_events() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("two.wav");
    let sentences = [
        "Is my hemoglobin normal?",
        "Please call me back tomorrow morning.",
    ];
    write_wav_16k(&wav, &spoken_clip(&sentences, 1.0));
    let out = talkline(&["transcribe", wav.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<_> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, sentence) in lines.iter().zip(sentences) {
        assert!(wer(sentence, line) <= 0.25, "{line:?} vs {sentence:?}");
    }

    let out = talkline(&["transcribe", "--json", wav.to_str().unwrap()], &[]);
    assert!(out.status.success());
    let finals: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .filter(|v: &serde_json::Value| v["type"] == "final")
        .collect();
    assert_eq!(finals.len(), 2);
    for f in &finals {
        assert!(
            f["eos_to_final_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{f}"
        );
        assert!(f["words"].as_array().is_some_and(|w| !w.is_empty()));
    }
}

#[test]
fn bad_files_are_clear_errors_and_odd_audio_is_handled() {
    let dir = tempfile::tempdir().unwrap();
    let not_wav = dir.path().join("notes.wav");
    std::fs::write(&not_wav, "Patient notes, not audio").unwrap();
    let out = talkline(&["transcribe", not_wav.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("notes.wav"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    // Float WAV at 44.1 kHz stereo with NaN, infinities and clipping: transcribed, no panic.
    let odd = dir.path().join("odd.wav");
    let speech = spoken_clip(&["Is my hemoglobin normal?"], 0.5);
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(&odd, spec).unwrap();
    // Linear interpolation up to 44.1 kHz.
    let upsampled = (0..(speech.len() - 1) * 44_100 / 16_000).map(|i| {
        let x = i as f64 * 16_000.0 / 44_100.0;
        let (j, frac) = (x as usize, (x - x.floor()) as f32);
        speech[j] * (1.0 - frac) + speech[j + 1] * frac
    });
    for (i, s) in upsampled.enumerate() {
        let s = match i % 44_100 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => 7.0,
            _ => s,
        };
        w.write_sample(s).unwrap();
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
    let out = talkline(&["transcribe", odd.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Whisper tiny.en is fragile on clicks; what matters here is that the sentence comes through.
    assert!(
        stdout(&out).to_lowercase().contains("normal"),
        "{}",
        stdout(&out)
    );

    // An empty WAV is fine: no speech, no output.
    let empty = dir.path().join("empty.wav");
    write_wav_16k(&empty, &[]);
    let out = talkline(&["transcribe", empty.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}
