//! The `/ws` transport's client messages: JSON text (hello, dtmf, bye) and binary PCM16 frames.
//! Round trip: a text message that parses serializes back to JSON that parses to the same
//! message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::serve::{self, ClientMessage};

fuzz_target!(|data: &[u8]| {
    if let Some(samples) = serve::decode_pcm16_frame(data) {
        assert_eq!(samples.len(), data.len() / 2);
        assert!(samples.iter().all(|s| (-1.0..=1.0).contains(s)));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(message) = serve::parse_client_message(text) else {
        return;
    };
    if let ClientMessage::Dtmf { digit } = &message {
        if let Some(key) = serve::parse_key(digit) {
            assert!(key.is_ascii_digit() || key == '*' || key == '#');
        }
    }
    let json = serde_json::to_string(&message).expect("serializes");
    let back = serve::parse_client_message(&json).expect("our JSON parses");
    assert_eq!(back, message);
});
