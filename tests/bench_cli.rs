//! `talkline bench --quick`: the latency harness drives the real server and writes a report with
//! real measurements (the CI check of issue 8; the full suite is benches/run.sh).

use talkline_tests::{stderr, stdout, talkline};

#[test]
fn bench_quick_writes_a_report_with_two_measured_turns() {
    quick_bench("websocket");
}

/// The same harness with WebRTC callers (a webrtc-rs peer each, Opus over DTLS-SRTP).
#[test]
fn bench_quick_over_webrtc_measures_at_a_webrtc_client() {
    quick_bench("webrtc");
}

/// The same harness with SIP callers: a real call over UDP to `serve --sip-listen`, PCMU RTP at
/// 8 kHz both ways, BYE at the end. SIP carries no events, so voice-to-voice is all it measures
/// and the per-stage server times must be absent rather than made up.
#[test]
fn bench_quick_over_sip_measures_voice_to_voice_from_rtp_alone() {
    let report = quick_bench("sip");
    assert_eq!(report["transport"], "sip");
    for t in report["turns"].as_array().expect("turns") {
        for stage in ["asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms"] {
            assert!(t[stage].is_null(), "{stage} over SIP: {t}");
        }
    }
    assert_eq!(report["levels"][0]["session_errors"], serde_json::json!([]));
}

/// Runs `talkline bench --quick` over `transport`, checks what every transport must give, and
/// returns the report.
fn quick_bench(transport: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let run = talkline(
        &[
            "bench",
            "--quick",
            "--transport",
            transport,
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "talkline bench --quick --transport {transport} failed:\n{}\n{}",
        stdout(&run),
        stderr(&run)
    );
    for f in ["report.json", "report.md", "cdf.svg", "sweep.svg"] {
        assert!(out.join(f).is_file(), "{f} is missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let turns = report["turns"].as_array().expect("turns");
    assert_eq!(turns.len(), 2, "{report}");
    for t in turns {
        let v2v = t["v2v_ms"].as_f64().unwrap_or(0.0);
        // Above the endpoint silence it cannot beat, below the reply timeout.
        assert!(v2v > 100.0 && v2v < 15_000.0, "{t}");
        if transport != "sip" {
            assert!(t["asr_final_ms"].as_f64().is_some(), "{t}");
            assert!(t["llm_first_token_ms"].as_f64().is_some(), "{t}");
        }
    }
    assert_eq!(report["levels"][0]["turns_answered"], 2);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("voice-to-voice"), "{md}");
    assert!(std::fs::read_to_string(out.join("cdf.svg"))
        .unwrap()
        .contains("<polyline"));
    report
}
