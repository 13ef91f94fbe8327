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

#[test]
fn an_abort_flag_left_unset_changes_nothing_and_a_set_one_stops_the_decode() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use talkline_asr::AsrError;

    let model = WhisperModel::load(&real_model("whisper-tiny.en", "ggml-tiny.en-q8_0.bin"))
        .expect("model loads");
    let mut session = model.session().expect("a decoding state");
    let audio = espeak_16k(SENTENCE);
    let abort = Arc::new(AtomicBool::new(false));
    let options = DecodeOptions {
        threads: 2,
        abort: Some(abort.clone()),
        ..DecodeOptions::default()
    };
    // Several times: a callback that misread its flag would abort some of them at random.
    for _ in 0..3 {
        assert_transcript(&session.transcribe(&audio, &options).expect("transcribes"));
    }
    // Set while whisper.cpp runs: its abort callback must stop the decode.
    let long = audio.repeat(3);
    let setter = {
        let abort = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            abort.store(true, Ordering::Relaxed);
        })
    };
    let result = session.transcribe(&long, &options);
    setter.join().expect("the setter thread");
    assert!(matches!(result, Err(AsrError::Aborted)), "{result:?}");
    // A later decode with a fresh flag is unaffected.
    let options = DecodeOptions {
        abort: Some(Arc::new(AtomicBool::new(false))),
        ..options
    };
    assert_transcript(&session.transcribe(&audio, &options).expect("transcribes"));
}
