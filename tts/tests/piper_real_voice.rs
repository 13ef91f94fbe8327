//! The real Piper voice (en_US-joe-medium) through the real ONNX Runtime and espeak-ng with
//! Piper's data: phoneme ids equal Piper's, and the speech is intelligible to Whisper.
//! Needs the espeak-ng phonemizer (the default feature).
#![cfg(feature = "espeak")]

mod common;

use serde::Deserialize;
use talkline_asr::whisper::{DecodeOptions, WhisperModel};
use talkline_tts::normalize::normalize;
use talkline_tts::resample::resample;

#[derive(Deserialize)]
struct Reference {
    text: String,
    phonemes: Vec<String>,
    ids: Vec<Vec<i64>>,
}

/// `fixtures/piper_ids.json` was written by piper-tts 1.8.0 itself (`fixtures/make_piper_ids.py`).
#[test]
fn phoneme_ids_equal_pipers_for_reference_sentences() {
    let references: Vec<Reference> =
        serde_json::from_str(include_str!("fixtures/piper_ids.json")).expect("valid fixture");
    let mut voice = common::joe();
    for r in &references {
        let phonemes: Vec<String> = voice
            .phonemes(&r.text)
            .expect("phonemizes")
            .iter()
            .map(|p| p.concat())
            .collect();
        assert_eq!(phonemes, r.phonemes, "phonemes of {:?}", r.text);
        assert_eq!(
            voice.phoneme_ids(&r.text).unwrap(),
            r.ids,
            "ids of {:?}",
            r.text
        );
    }
}

/// Speaks `text` (normalised, as the stream does), resamples to 16 kHz and transcribes it.
fn round_trip(voice: &mut talkline_tts::PiperVoice, whisper: &WhisperModel, text: &str) -> String {
    let audio = voice.speak(&normalize(text).spoken).expect("synthesizes");
    let seconds = audio.len() as f32 / voice.sample_rate() as f32;
    assert!(
        (1.0..15.0).contains(&seconds),
        "{seconds} s of audio for {text:?}"
    );
    let pcm16k = resample(&audio, voice.sample_rate(), 16_000).expect("resamples");
    whisper
        .session()
        .expect("session")
        // The full 30 s window: a window fitted to short audio makes tiny.en repeat itself.
        .transcribe(
            &pcm16k,
            &DecodeOptions {
                fit_audio_ctx: false,
                ..DecodeOptions::default()
            },
        )
        .expect("transcribes")
}

fn whisper() -> WhisperModel {
    WhisperModel::load(&common::real_model(
        "whisper-tiny.en",
        "ggml-tiny.en-q8_0.bin",
    ))
    .expect("Whisper loads")
}

#[test]
fn synthesized_sentence_is_transcribed_back_by_whisper() {
    let text = "The quick brown fox jumps over the lazy dog, and then it goes home to sleep.";
    let heard = round_trip(&mut common::joe(), &whisper(), text);
    let wer = common::wer(text, &heard);
    eprintln!("WER {wer:.2}; Whisper heard {heard:?}");
    assert!(
        wer <= 0.2,
        "WER {wer:.2}: said {text:?}, Whisper heard {heard:?}"
    );
}

/// Numbers and units are spoken right: every measurement must come back word for word. Whisper
/// writes digits back ("13.2 grams"), so both sides are compared after normalisation. The rest of
/// the sentence only has to be intelligible: tiny.en sometimes mishears a rare word like
/// "hemoglobin" in Piper's (randomly noised) speech, which says nothing about the numbers.
#[test]
fn lab_results_are_spoken_intelligibly() {
    let (mut voice, whisper) = (common::joe(), whisper());
    for (text, measurements) in [
        (
            "Your hemoglobin is 13.2 g/dL, which is normal.",
            &["13.2 g/dL"][..],
        ),
        ("Your blood pressure was 120/80 today.", &["120/80"]),
        (
            "Your glucose is 95 mg/dL and your potassium is 4.1 mmol/L.",
            &["95 mg/dL", "4.1 mmol/L"],
        ),
    ] {
        let heard = round_trip(&mut voice, &whisper, text);
        let heard_words = common::words(&normalize(&heard).spoken);
        for measurement in measurements {
            let expected = common::words(&normalize(measurement).spoken);
            assert!(
                heard_words.windows(expected.len()).any(|w| w == expected),
                "{measurement:?} (spoken {expected:?}) not heard back: said {text:?}, Whisper heard {heard:?}"
            );
        }
        let wer = common::wer(&normalize(text).spoken, &normalize(&heard).spoken);
        eprintln!("WER {wer:.2}; said {text:?}, Whisper heard {heard:?}");
        assert!(
            wer <= 0.4,
            "WER {wer:.2}: said {text:?}, Whisper heard {heard:?}"
        );
    }
}

#[test]
fn multi_sentence_text_gives_one_audio_part_per_sentence() {
    let mut voice = common::joe();
    let parts = voice
        .synthesize("First sentence. Second one!")
        .expect("synthesizes");
    assert_eq!(parts.len(), 2);
    for p in &parts {
        assert!(p.samples.len() > 2_000, "{} samples", p.samples.len());
        let peak = p.samples.iter().fold(0f32, |m, s| m.max(s.abs()));
        assert!((0.99..=1.0).contains(&peak), "peak {peak}");
    }
    assert_eq!(
        &"First sentence. Second one!"[parts[1].text.clone()].trim(),
        &"Second one!"
    );
}

/// The voice's graph is cut at the decoder (`vits_split`), so a sentence can be decoded window
/// by window; windows with their context frames must give the samples a whole decode gives.
#[test]
fn a_sentence_decoded_in_windows_equals_its_whole_decode() {
    let mut voice = common::joe();
    assert!(
        voice.can_stream(),
        "joe-medium splits into encoder and decoder"
    );
    let run = ort::session::RunOptions::new().expect("run options");
    let ids = voice
        .phoneme_ids("Your hemoglobin is normal, and your LDL is a little high.")
        .expect("phonemizes")
        .remove(0);
    let sentence = voice.encode(&ids, &run).expect("encodes");
    let frames = sentence.frames();
    assert!(frames > 100, "{frames} frames");
    assert_eq!(sentence.samples(), frames * 256);

    let whole = voice.decode(&sentence, 0..frames, &run).expect("decodes");
    assert_eq!(whole.len(), sentence.samples());
    let mut windowed = Vec::new();
    for window in [0..24, 24..72, 72..73, 73..frames] {
        windowed.extend(
            voice
                .decode(&sentence, window, &run)
                .expect("decodes a window"),
        );
    }
    assert_eq!(windowed.len(), whole.len());
    let max_diff = windowed
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "largest difference {max_diff}");
    let peak = whole.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!((0.2..=1.0).contains(&peak), "streamed level: peak {peak}");
    // Beyond the end is empty, not an error.
    assert!(voice
        .decode(&sentence, frames..frames + 10, &run)
        .expect("an empty window")
        .is_empty());
}
