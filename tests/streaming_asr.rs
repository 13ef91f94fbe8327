//! The streaming recognizer with the real Whisper tiny.en and the real Silero VAD.

use talkline_asr::offline::{transcribe_stream, TimedEvent};
use talkline_asr::streaming::{AsrEvent, StreamingConfig, StreamingRecognizer};
use talkline_asr::vad::{EnergyVad, SileroVad, SpeechProbability};
use talkline_asr::whisper::{DecodeOptions, WhisperModel};
use talkline_tests::{onnx_environment, real_model, spoken_clip, wer};

fn whisper() -> WhisperModel {
    WhisperModel::load(&real_model("whisper-tiny.en", "ggml-tiny.en-q8_0.bin")).expect("loads")
}

fn silero() -> Box<dyn SpeechProbability> {
    let path = real_model("silero-vad", "silero_vad.onnx");
    Box::new(SileroVad::load(&onnx_environment(), &path).expect("Silero loads"))
}

fn options() -> DecodeOptions {
    DecodeOptions {
        threads: 2,
        ..DecodeOptions::default()
    }
}

fn run(config: StreamingConfig, audio: &[f32]) -> Vec<TimedEvent> {
    let model = whisper();
    let mut session = model.session().unwrap();
    let mut recognizer = StreamingRecognizer::new(config, silero());
    transcribe_stream(&mut recognizer, &mut session, &options(), audio).unwrap()
}

fn finals(events: &[TimedEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            AsrEvent::Final { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

const SENTENCES: [&str; 3] = [
    "Is my hemoglobin normal?",
    "Please call me back tomorrow morning.",
    "When should I repeat the blood test?",
];

#[test]
fn three_sentences_transcribe_with_low_wer_and_one_final_each() {
    let audio = spoken_clip(&SENTENCES, 1.0);
    let events = run(StreamingConfig::default(), &audio);
    let finals = finals(&events);
    let reference = SENTENCES.join(" ");
    let hypothesis = finals.join(" ");
    let error = wer(&reference, &hypothesis);
    assert!(error <= 0.15, "WER {error:.2}: {hypothesis:?}\n{events:#?}");

    // Speech followed by silence: one SpeechEnded and exactly one Final per utterance, in order.
    // (With slow decodes, the next utterance may start before the previous Final is out.)
    let (mut started, mut ended, mut utterances) = (0, 0, 0);
    for e in &events {
        match e.event {
            AsrEvent::SpeechStarted { .. } => {
                assert_eq!(started, ended, "speech started twice: {events:#?}");
                started += 1;
            }
            AsrEvent::SpeechEnded { .. } => ended += 1,
            AsrEvent::Final { .. } => {
                utterances += 1;
                assert!(utterances <= ended, "a Final before its utterance ended");
            }
            AsrEvent::Partial { .. } | AsrEvent::Paused { .. } | AsrEvent::Resumed { .. } => {}
        }
    }
    assert_eq!((started, ended), (3, 3));
    assert_eq!(utterances, 3, "{finals:?}");
}

#[test]
fn a_committed_prefix_never_changes() {
    let audio = spoken_clip(
        &["My doctor said that my cholesterol number was a little high last month"],
        0.5,
    );
    // Decodes run inline here (media time stands still during each), so the number of partials
    // does not depend on how loaded the machine is.
    let model = whisper();
    let mut session = model.session().unwrap();
    let mut recognizer = StreamingRecognizer::new(StreamingConfig::default(), silero());
    let mut events = Vec::new();
    for (j, frame) in audio.chunks(320).enumerate() {
        recognizer.push_audio(j as f64 * 0.02, frame).unwrap();
        decode_inline(&mut recognizer, &mut session);
        events.extend(std::iter::from_fn(|| recognizer.poll_event()));
    }
    recognizer.handle_timeout(audio.len() as f64 / 16_000.0 + 1.0);
    decode_inline(&mut recognizer, &mut session);
    events.extend(std::iter::from_fn(|| recognizer.poll_event()));
    let mut committed_so_far = String::new();
    let mut partials = 0;
    for e in &events {
        match e {
            AsrEvent::SpeechStarted { .. } => committed_so_far.clear(),
            AsrEvent::Partial { committed, .. } => {
                partials += 1;
                assert!(
                    committed.starts_with(&committed_so_far),
                    "{committed_so_far:?} was committed, then {committed:?}"
                );
                committed_so_far = committed.clone();
            }
            _ => {}
        }
    }
    assert!(partials >= 5, "only {partials} partials");
    assert!(!committed_so_far.is_empty(), "nothing was ever committed");
}

#[test]
fn silence_and_noise_produce_no_text() {
    // 5 s of digital silence, then 5 s of faint noise.
    let mut audio = vec![0.0f32; 80_000];
    let mut seed = 12345u32;
    audio.extend((0..80_000).map(|_| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 * 0.004 - 0.002
    }));
    let events = run(StreamingConfig::default(), &audio);
    assert!(events.is_empty(), "{events:#?}");
}

#[test]
fn memory_stays_bounded_on_a_ten_minute_stream() {
    // Ten minutes: mostly silence, with one long stretch of continuous speech that outgrows the
    // window and must be trimmed.
    let long_speech = spoken_clip(
        &[
            "Your results came back from the laboratory this morning and most of the numbers are \
           inside the normal range, your hemoglobin is normal, your white cell count is normal, \
           your platelets are normal, your sodium and potassium are normal, and your kidney \
           function is normal as well, but your cholesterol is a little higher than we would \
           like and the doctor wants to talk about it with you at the next visit",
        ],
        0.0,
    );
    assert!(
        long_speech.len() > 16_000 * 18,
        "the speech must outlast the 15 s window"
    );
    let mut audio = vec![0.0f32; 16_000 * 60];
    audio.extend(&long_speech);
    audio.resize(16_000 * 600, 0.0);

    let config = StreamingConfig {
        hop_s: 2.0, // fewer decodes: this test is about memory, not latency
        ..StreamingConfig::default()
    };
    let bound = ((config.max_window_s + 1.0) * 16_000.0) as usize;
    let model = whisper();
    let mut session = model.session().unwrap();
    let mut recognizer = StreamingRecognizer::new(config, silero());
    let mut max_buffered = 0;
    let mut finals = Vec::new();
    for (i, chunk) in audio.chunks(16_000).enumerate() {
        let events = transcribe_stream_chunk(&mut recognizer, &mut session, i as f64, chunk);
        max_buffered = max_buffered.max(recognizer.buffered_samples());
        finals.extend(events);
    }
    assert!(
        max_buffered <= bound,
        "{max_buffered} samples buffered (bound {bound})"
    );
    let text = finals.join(" ");
    assert!(text.to_lowercase().contains("cholesterol"), "{text:?}");
}

fn decode_inline(
    recognizer: &mut StreamingRecognizer,
    session: &mut talkline_asr::whisper::WhisperSession,
) {
    while let Some(request) = recognizer.poll_decode() {
        let opts = DecodeOptions {
            prompt: Some(request.prompt.clone()),
            ..options()
        };
        let result = session.decode(&request.audio, &opts);
        recognizer.on_decode_result(request.id, result, 0.0);
    }
}

/// Feeds one chunk and runs the decodes it asks for inline.
fn transcribe_stream_chunk(
    recognizer: &mut StreamingRecognizer,
    session: &mut talkline_asr::whisper::WhisperSession,
    start: f64,
    chunk: &[f32],
) -> Vec<String> {
    let mut finals = Vec::new();
    for (j, frame) in chunk.chunks(320).enumerate() {
        recognizer
            .push_audio(start + j as f64 * 0.02, frame)
            .unwrap();
        while let Some(request) = recognizer.poll_decode() {
            let opts = DecodeOptions {
                prompt: Some(request.prompt.clone()),
                ..options()
            };
            let result = session.decode(&request.audio, &opts);
            recognizer.on_decode_result(request.id, result, 0.0);
        }
        while let Some(event) = recognizer.poll_event() {
            if let AsrEvent::Final { text, .. } = event {
                finals.push(text);
            }
        }
    }
    finals
}

#[test]
fn the_energy_fallback_still_endpoints_speech() {
    let audio = spoken_clip(&["Is my hemoglobin normal?"], 1.0);
    let model = whisper();
    let mut session = model.session().unwrap();
    let mut recognizer =
        StreamingRecognizer::new(StreamingConfig::default(), Box::new(EnergyVad::default()));
    let events = transcribe_stream(&mut recognizer, &mut session, &options(), &audio).unwrap();
    let finals = finals(&events);
    // The energy VAD is coarse (it may clip the onset), so only endpointing is asserted strictly.
    assert_eq!(finals.len(), 1, "{finals:?}");
    let text = finals[0].to_lowercase();
    assert!(
        text.starts_with("is my") && text.contains("normal"),
        "{finals:?}"
    );
}

#[test]
fn two_live_streams_share_one_model_without_crosstalk() {
    use std::sync::mpsc;
    use talkline_asr::engine::AsrEngine;

    let engine = AsrEngine::new(whisper(), options(), 1);
    let sentences = [
        "Is my hemoglobin normal?",
        "Please call me back tomorrow morning.",
    ];
    let mut streams = Vec::new();
    for (i, sentence) in sentences.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let stream = engine
            .open_stream(
                &format!("test-{i}"),
                StreamingConfig::default(),
                silero(),
                move |e| {
                    let _ = tx.send(e);
                },
            )
            .unwrap();
        streams.push((stream, rx, spoken_clip(&[sentence], 0.5)));
    }
    // Interleave 20 ms frames of both callers, as two live sessions would.
    let longest = streams.iter().map(|s| s.2.len()).max().unwrap();
    for offset in (0..longest).step_by(320) {
        for (stream, _, audio) in &streams {
            if offset < audio.len() {
                let end = (offset + 320).min(audio.len());
                stream.push(offset as f64 / 16_000.0, &audio[offset..end]);
            }
        }
    }
    for (stream, _, audio) in &streams {
        // The transports go quiet; media time still advances.
        stream.tick(audio.len() as f64 / 16_000.0 + 1.0);
    }
    for ((stream, rx, _), sentence) in streams.into_iter().zip(sentences) {
        let text = loop {
            match rx.recv_timeout(std::time::Duration::from_secs(120)) {
                Ok(AsrEvent::Final { text, .. }) => break text,
                Ok(_) => continue,
                Err(e) => panic!("no Final for {sentence:?}: {e}"),
            }
        };
        assert!(wer(sentence, &text) <= 0.25, "{text:?} vs {sentence:?}");
        assert_eq!(stream.dropped_samples(), 0);
        stream.close();
    }
}

#[test]
fn a_live_stream_says_how_far_it_has_heard_only_after_handing_out_what_it_heard() {
    use std::sync::mpsc;
    use talkline_asr::engine::AsrEngine;

    let engine = AsrEngine::new(whisper(), options(), 1);
    let (tx, rx) = mpsc::channel();
    let stream = engine
        .open_stream("heard", StreamingConfig::default(), silero(), move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
    // Speech, then a second of silence: the endpoint lies well inside the pushed audio.
    let audio = spoken_clip(&["Is my hemoglobin normal?"], 1.0);
    let end = audio.len() as f64 / 16_000.0;
    for (i, frame) in audio.chunks(320).enumerate() {
        stream.push(i as f64 * 0.02, frame);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let heard = loop {
        let heard = stream.heard_until();
        assert!(heard <= end + 1e-6, "heard {heard} s of {end} s pushed");
        if heard >= end - 1e-6 {
            break heard;
        }
        assert!(std::time::Instant::now() < deadline, "stuck at {heard} s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // Everything the VAD saw up to `heard` was handed out before `heard` got there.
    let events: Vec<AsrEvent> = rx.try_iter().collect();
    let ended = events
        .iter()
        .find_map(|e| match e {
            AsrEvent::SpeechEnded { at } => Some(*at),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no end of speech by {heard} s: {events:?}"));
    assert!(ended < end - 0.5, "speech ended at {ended} s");
    assert!(events
        .iter()
        .any(|e| matches!(e, AsrEvent::SpeechStarted { .. })));
    stream.close();
}
