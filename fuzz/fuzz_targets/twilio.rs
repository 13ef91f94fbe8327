//! Twilio Media Streams messages: JSON events and their base64 μ-law payloads. Round trips: a
//! message that parses serializes back to the same message, and a payload that decodes encodes
//! back to the same base64 text.
#![no_main]
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use talkline_runtime::twilio::{self, Inbound};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(message) = twilio::parse_inbound(text) else {
        return;
    };
    match &message {
        Inbound::Media { media } => {
            if let Ok(samples) = twilio::decode_media_payload(&media.payload) {
                let bytes: Vec<u8> = samples
                    .iter()
                    .map(|&s| twilio::mulaw_encode((s * 32768.0) as i16))
                    .collect();
                let b64 = base64::engine::general_purpose::STANDARD;
                let again = twilio::decode_media_payload(&b64.encode(&bytes)).expect("decodes");
                assert_eq!(again, samples);
            }
        }
        Inbound::Dtmf { dtmf } => {
            let _ = talkline_runtime::serve::parse_key(&dtmf.digit);
        }
        _ => {}
    }
    let json = serde_json::to_string(&message).expect("serializes");
    let back = twilio::parse_inbound(&json).expect("our JSON parses");
    assert_eq!(back, message);
});
