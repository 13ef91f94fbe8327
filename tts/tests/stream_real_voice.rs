//! Streaming with the real voice: chunks in order, first chunk a short clause, cancellation
//! reports a spoken prefix, and bad input never panics.
//! Needs the espeak-ng phonemizer (the default feature).
#![cfg(feature = "espeak")]

mod common;

use std::sync::{Arc, Mutex};

use talkline_tts::normalize::SkipReason;
use talkline_tts::stream::{self, AudioChunk, StreamConfig};
use talkline_tts::TtsError;

const TEXT: &str = "Your results are back, and they look good. Your hemoglobin is 13.2 g/dL, \
                    which is normal. Your LDL is a little high at 131 mg/dL. Let's talk about diet.";

fn tokens(text: &str) -> Vec<String> {
    // LLM-like deltas: each word with its leading space.
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c == ' ' && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

fn shared_voice() -> Arc<Mutex<talkline_tts::PiperVoice>> {
    Arc::new(Mutex::new(common::joe()))
}

/// The next text chunk whole: its pieces received and joined.
fn next_chunk(output: &mut stream::AudioOutput) -> Option<AudioChunk> {
    let mut whole: Option<AudioChunk> = None;
    while let Some(piece) = output.recv() {
        let piece = piece.expect("chunk synthesizes");
        let ends = piece.ends_chunk;
        match whole.as_mut() {
            None => whole = Some(piece),
            Some(w) => join(w, piece),
        }
        if ends {
            break;
        }
    }
    whole
}

/// Appends `piece` to the chunk it belongs to.
fn join(chunk: &mut AudioChunk, piece: AudioChunk) {
    assert_eq!(
        chunk.index, piece.index,
        "pieces of one chunk come together"
    );
    let shift = chunk.samples.len() as u64;
    let offset = match (chunk.text.is_empty(), piece.text.is_empty()) {
        (false, false) => chunk.text.len() + 1,
        _ => 0,
    };
    if !piece.text.is_empty() {
        chunk.text = format!("{} {}", chunk.text, piece.text).trim().to_string();
    }
    chunk.word_ends.extend(
        piece
            .word_ends
            .iter()
            .map(|&(e, t)| (offset + e, shift + t)),
    );
    chunk.samples.extend_from_slice(&piece.samples);
    chunk.skipped.extend(piece.skipped);
    chunk.ends_chunk = piece.ends_chunk;
}

#[test]
fn chunks_arrive_in_order_and_everything_is_heard_at_the_end() {
    let config = StreamConfig {
        output_rate: Some(48_000),
        ..StreamConfig::default()
    };
    let (mut input, mut output) = stream::start(shared_voice(), config).expect("stream starts");
    let producer = std::thread::spawn(move || {
        for t in tokens(TEXT) {
            input.push(&t).expect("push");
        }
        input.finish().expect("finish");
    });
    let mut pieces: Vec<AudioChunk> = Vec::new();
    while let Some(piece) = output.recv() {
        pieces.push(piece.expect("chunk synthesizes"));
    }
    producer.join().expect("producer thread");

    // The first chunk comes in pieces, the first of them its first window of latent frames
    // (24 frames of 256 samples at 22,050 Hz, 0.28 s); so does the second, whose first sentence
    // is also decoded in windows; later chunks come whole.
    let first_chunk: Vec<&AudioChunk> = pieces.iter().filter(|p| p.index == 0).collect();
    assert!(first_chunk.len() > 1, "{} piece(s)", first_chunk.len());
    let window_at_48k = stream::FIRST_WINDOW_FRAMES as f64 * 256.0 * 48_000.0 / 22_050.0;
    assert!(
        (first_chunk[0].samples.len() as f64) < window_at_48k,
        "first piece: {} samples",
        first_chunk[0].samples.len()
    );
    assert!(pieces.iter().filter(|p| p.index > 1).all(|p| p.ends_chunk));
    for p in &pieces {
        // Word times stay inside their piece.
        assert!(
            p.word_ends
                .iter()
                .all(|&(e, t)| e <= p.text.len() && t <= p.samples.len() as u64),
            "{p:?}"
        );
    }
    // Joined, the pieces are the chunks.
    let mut chunks: Vec<AudioChunk> = Vec::new();
    for p in pieces {
        match chunks.last_mut() {
            Some(c) if c.index == p.index => join(c, p),
            _ => chunks.push(p),
        }
    }

    let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "Your results are back,",
            "and they look good.",
            "Your hemoglobin is 13.2 g/dL, which is normal.",
            "Your LDL is a little high at 131 mg/dL.",
            "Let's talk about diet.",
        ]
    );
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.index, i);
        assert_eq!(c.sample_rate, 48_000);
        assert!(
            c.samples.len() > 48_000 / 2,
            "chunk {i}: {} samples",
            c.samples.len()
        );
        assert!(!c.timed_by_model, "joe-medium has no duration output");
        // Word times rise through the chunk and stay inside it.
        let times: Vec<u64> = c.word_ends.iter().map(|w| w.1).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "chunk {i}: {times:?}"
        );
        assert!(*times.last().unwrap() <= c.samples.len() as u64);
    }
    let total: u64 = chunks.iter().map(|c| c.samples.len() as u64).sum();
    let heard = output.heard(total);
    assert_eq!(
        heard.text,
        TEXT.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert!(heard.all_received);
}

#[test]
fn cancel_mid_chunk_reports_the_spoken_prefix() {
    let (mut input, mut output) =
        stream::start(shared_voice(), StreamConfig::default()).expect("stream starts");
    for t in tokens(TEXT) {
        input.push(&t).expect("push");
    }
    let first = next_chunk(&mut output).expect("a first chunk");
    let second = next_chunk(&mut output).expect("a second chunk");
    // The listener heard all of the first chunk and most of the second.
    let played = first.samples.len() as u64 + second.samples.len() as u64 * 3 / 4;
    let heard = output.cancel(played);

    assert!(
        heard.text.starts_with("Your results are back, and"),
        "{heard:?}"
    );
    assert!(
        heard.text.len() < "Your results are back, and they look good.".len(),
        "{heard:?}"
    );
    assert!(TEXT.starts_with(&heard.text), "{heard:?} is not a prefix");
    assert!(!heard.all_received);
    // The text side learns of the cancellation.
    assert!(matches!(input.push(" more"), Err(TtsError::Cancelled)));
}

/// A cancelled stream must not leave the shared voice unable to speak: the abort applies to that
/// stream's model runs only.
#[test]
fn a_new_stream_on_the_same_voice_works_after_a_cancel() {
    let voice = shared_voice();
    for round in 0..3 {
        let (mut input, mut output) =
            stream::start(Arc::clone(&voice), StreamConfig::default()).expect("stream starts");
        input
            .push("Your results are back, and they look good.")
            .expect("push");
        // Cancel while the second chunk may be in the model.
        let first = next_chunk(&mut output).expect("a chunk");
        assert!(!first.samples.is_empty(), "round {round}");
        let heard = output.cancel(first.samples.len() as u64);
        assert_eq!(heard.text, "Your results are back,", "round {round}");
    }
}

/// Nothing outlives a stream: once its audio side is dropped (mid-synthesis, text still
/// queued), the worker thread has ended and released its handle on the voice.
#[test]
fn dropping_a_stream_ends_its_worker() {
    let voice = shared_voice();
    let (mut input, mut output) =
        stream::start(Arc::clone(&voice), StreamConfig::default()).expect("stream starts");
    input.push(TEXT).expect("push");
    output.recv().expect("a chunk").expect("synthesizes");
    assert_eq!(Arc::strong_count(&voice), 2, "the worker holds the voice");
    drop(output);
    assert_eq!(Arc::strong_count(&voice), 1, "the worker is gone");
    assert!(matches!(input.push(" more."), Err(TtsError::Cancelled)));
}

#[test]
fn ten_kilobytes_stream_and_cancel_right_after_the_first_chunk() {
    let long = "The value is within the normal range. ".repeat(270);
    assert!(long.len() > 10_000);
    let (mut input, mut output) =
        stream::start(shared_voice(), StreamConfig::default()).expect("stream starts");
    // Push from a thread: the text queue blocks once the worker falls behind.
    let producer = std::thread::spawn(move || {
        let result = input.push(&long);
        let _ = input.finish();
        result
    });
    let first = next_chunk(&mut output).expect("a first chunk");
    assert_eq!(first.text, "The value is within the normal range.");
    let heard = output.cancel(0);
    assert_eq!(heard.text, "");
    // The producer was released by the cancellation, with a clear error or having queued all.
    match producer.join().expect("producer thread") {
        Ok(()) | Err(TtsError::Cancelled) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn emoji_unknown_scripts_and_empty_text_do_not_panic() {
    let (mut input, mut output) =
        stream::start(shared_voice(), StreamConfig::default()).expect("stream starts");
    input
        .push("Good news 🎉 about 你好 the test. 👍👍 ")
        .expect("push");
    input.push("").expect("empty push");
    input.finish().expect("finish");
    let mut chunks = Vec::new();
    while let Some(chunk) = next_chunk(&mut output) {
        chunks.push(chunk);
    }
    assert_eq!(chunks.len(), 2);
    assert!(chunks[0].samples.len() > 10_000);
    let reasons: Vec<SkipReason> = chunks[0].skipped.iter().map(|s| s.reason).collect();
    assert_eq!(reasons, [SkipReason::Emoji, SkipReason::UnknownScript]);
    // Only emoji: nothing to say, and the chunk says why.
    assert!(chunks[1].samples.is_empty());
    assert_eq!(chunks[1].skipped[0].text, "👍👍");

    // Empty text straight to the voice.
    let mut voice = common::joe();
    assert!(voice.speak("").expect("empty text is fine").is_empty());
    assert!(voice.speak("   ").expect("blank text is fine").is_empty());
}
