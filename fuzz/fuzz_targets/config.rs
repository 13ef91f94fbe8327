//! `talkline.toml` into the configuration, and the settings derived from it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        let streaming = config.streaming();
        assert!(streaming.hop_s.is_nan() || (0.05..=5.0).contains(&streaming.hop_s));
    }
});
