//! The Whisper model that `talkline models fetch` converted from CTranslate2 loads in whisper-rs
//! and transcribes real speech.

use talkline_asr::whisper::{DecodeOptions, WhisperModel};
use talkline_tests::{espeak_16k, real_model, words};

const SENTENCE: &str = "Your blood test results are ready, please call the clinic tomorrow.";

fn transcribe_with(file: &str) -> String {
    let model = WhisperModel::load(&real_model("whisper-tiny.en", file)).expect("model loads");
    let mut session = model.session().expect("a decoding state");
    let audio = espeak_16k(SENTENCE);
    let options = DecodeOptions {
        threads: 2,
        ..DecodeOptions::default()
    };
    session.transcribe(&audio, &options).expect("transcribes")
}

fn assert_transcript(text: &str) {
    assert_eq!(
        words(text),
        words(SENTENCE),
        "transcript {text:?} differs from {SENTENCE:?}"
    );
}

#[test]
fn converted_q8_0_model_transcribes_a_spoken_sentence() {
    assert_transcript(&transcribe_with("ggml-tiny.en-q8_0.bin"));
}

#[test]
fn converted_f16_model_transcribes_a_spoken_sentence() {
    assert_transcript(&transcribe_with("ggml-tiny.en-f16.bin"));
}
