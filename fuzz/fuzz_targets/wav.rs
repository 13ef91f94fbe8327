//! WAV files into the reader every audio file goes through (`talkline transcribe`, bench
//! scenarios): header parsing, sample formats, downmix and resampling to 16 kHz.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(samples) = talkline_asr::audio::decode_wav_16k(data, Path::new("fuzz.wav")) {
        assert!(samples
            .iter()
            .all(|s| s.is_finite() && (-1.0..=1.0).contains(s)));
    }
});
