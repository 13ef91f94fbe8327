//! `talkline say` through the real binary, the real Piper voice and ONNX Runtime; the speech is
//! checked by the real Whisper model.

use std::io::Write;
use std::process::{Command, Stdio};

use talkline_asr::whisper::{DecodeOptions, WhisperModel};
use talkline_tests::{read_wav_f32, real_model, stderr, stdout, talkline, talkline_bin, words};

fn models_present() {
    real_model("piper-joe", "en_US-joe-medium.onnx");
    real_model("onnxruntime", "libonnxruntime.so.1.32.0");
    real_model("piper-espeak-data", "espeak-ng-data/phontab");
}

#[test]
fn say_writes_a_16k_wav_that_whisper_understands() {
    models_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("out.wav");
    let text = "Your test results are back, and everything looks normal.";
    let out = talkline(
        &[
            "say",
            text,
            "--output",
            wav.to_str().unwrap(),
            "--rate",
            "16000",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("16000 Hz"), "{}", stdout(&out));
    let spec = hound::WavReader::open(&wav).unwrap().spec();
    assert_eq!(
        (spec.sample_rate, spec.channels, spec.bits_per_sample),
        (16_000, 1, 16)
    );

    let pcm = read_wav_f32(&wav);
    let whisper =
        WhisperModel::load(&real_model("whisper-tiny.en", "ggml-tiny.en-q8_0.bin")).unwrap();
    let heard = whisper
        .session()
        .unwrap()
        .transcribe(
            &pcm,
            &DecodeOptions {
                fit_audio_ctx: false,
                ..DecodeOptions::default()
            },
        )
        .unwrap();
    let expected = words(text);
    let got = words(&heard);
    let missing = expected.iter().filter(|w| !got.contains(w)).count();
    assert!(missing <= 2, "said {text:?}, Whisper heard {heard:?}");
}

#[test]
fn say_reads_stdin_at_8k() {
    models_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("out.wav");
    let mut child = Command::new(talkline_bin())
        .args([
            "say",
            "-",
            "--output",
            wav.to_str().unwrap(),
            "--rate",
            "8000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Blood pressure was 120/80 mmHg.")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let reader = hound::WavReader::open(&wav).unwrap();
    assert_eq!(reader.spec().sample_rate, 8_000);
    // "blood pressure was one hundred twenty over eighty millimeters of mercury" takes seconds.
    assert!(
        reader.duration() > 8_000 * 2,
        "{} samples",
        reader.duration()
    );
}

#[test]
fn say_rejects_empty_and_unspeakable_text_with_a_clear_message() {
    models_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("out.wav");
    let out = talkline(&["say", "  ", "--output", wav.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to say: the text is empty"),
        "{}",
        stderr(&out)
    );

    let out = talkline(&["say", "👍🎉", "--output", wav.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("(emoji)") && err.contains("nothing to say"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!wav.exists());
}
