//! `talkline serve`: a WebSocket client talks to the real server binary on 127.0.0.1:0.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use talkline_tests::{espeak_16k, pcm16, speak_in_real_time, start_server, wer, ws_hello_16k};
use tokio_tungstenite::tungstenite::Message;

#[test]
fn a_websocket_caller_gets_a_transcript_a_spoken_reply_and_latencies() {
    let server = start_server(&["--max-tokens", "24"]);
    let question = "Is my hemoglobin normal?";
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k(question));
    audio.extend(vec![0.0f32; 16_000 * 6]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut tx, mut rx) = ws_hello_16k(&server.addr).await.split();
        // The caller speaks in real time, 20 ms a frame.
        let sender = tokio::spawn(async move {
            speak_in_real_time(&mut tx, &audio).await;
            tx
        });
        let mut final_text = None;
        let mut agent_samples = 0usize;
        let mut agent_energy = 0f64;
        let mut turn = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while turn.is_none() && Instant::now() < deadline {
            let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(20), rx.next()).await
            else {
                break;
            };
            match msg {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("final") => final_text = v["text"].as_str().map(str::to_owned),
                        Some("turn") => turn = Some(v),
                        _ => {}
                    }
                }
                Message::Binary(b) => {
                    assert_eq!(b.len(), 640, "20 ms frames of 16 kHz PCM16");
                    for s in b.chunks_exact(2) {
                        let x = i16::from_le_bytes([s[0], s[1]]) as f64 / 32768.0;
                        agent_energy += x * x;
                    }
                    agent_samples += b.len() / 2;
                }
                _ => {}
            }
        }
        let _ = sender.await;
        let final_text = final_text.expect("a final transcript");
        assert!(wer(question, &final_text) <= 0.25, "{final_text:?}");
        assert!(
            agent_samples > 16_000 / 2,
            "only {agent_samples} samples of agent audio"
        );
        assert!(
            (agent_energy / agent_samples as f64).sqrt() > 0.01,
            "agent audio is silent"
        );
        let turn = turn.expect("a turn event");
        assert!(
            turn["voice_to_voice_ms"].as_f64().is_some_and(|v| v > 0.0),
            "{turn}"
        );
        assert!(!turn["agent_text"].as_str().unwrap().is_empty(), "{turn}");

        // The turn is in the per-stage histograms on /metrics.
        let metrics = http_get(&server.addr, "/metrics").await;
        for stage in [
            "asr_final",
            "llm_first_token",
            "tts_first_audio",
            "voice_to_voice",
        ] {
            let count = format!("talkline_stage_latency_seconds_count{{stage=\"{stage}\"}} 1");
            assert!(
                metrics.contains(&count),
                "{count:?} missing from\n{metrics}"
            );
        }
        assert!(
            metrics.contains("talkline_turns_total{speculative="),
            "{metrics}"
        );
    });
}

/// A plain HTTP/1.1 GET; the body with its headers.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[test]
fn bad_hello_is_an_error_and_a_full_server_answers_503() {
    let server = start_server(&["--max-sessions", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://{}/ws", server.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::Text("not json".into())).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert!(reply.to_text().unwrap().contains("\"error\""), "{reply:?}");
        ws.send(Message::Text(
            r#"{"type":"hello","sample_rate":1000000}"#.into(),
        ))
        .await
        .unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert!(reply.to_text().unwrap().contains("outside"), "{reply:?}");
        // Its slot is released when the server's handler returns, just after that reply.
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !http_get(&server.addr, "/metrics")
            .await
            .contains("talkline_sessions_active 0")
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // One session holds the only slot; the next caller is refused with 503.
        let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        first
            .send(Message::Text(
                r#"{"type":"hello","sample_rate":8000}"#.into(),
            ))
            .await
            .unwrap();
        let ready = first.next().await.unwrap().unwrap();
        assert!(ready.to_text().unwrap().contains("ready"));
        let err = tokio_tungstenite::connect_async(&url).await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        // Odd-length audio is ignored, not fatal.
        first
            .send(Message::Binary(vec![1u8, 2, 3].into()))
            .await
            .unwrap();
        first
            .send(Message::Text(r#"{"type":"bye"}"#.into()))
            .await
            .unwrap();
    });
}

/// Reads until the server's close frame: its code and reason.
async fn close_frame<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
        match msg {
            Ok(Message::Close(frame)) => {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()))
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
    None
}

#[test]
fn an_oversize_message_closes_the_call_with_1009_and_others_go_on() {
    let server = start_server(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://{}/ws", server.addr);
        let too_big = vec![0u8; 300 * 1024];
        // Before the hello, and in the middle of a call.
        let (mut early, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        early
            .send(Message::Binary(too_big.clone().into()))
            .await
            .unwrap();
        let (code, reason) = close_frame(&mut early).await.expect("a close frame");
        assert_eq!(code, 1009, "{reason}");
        assert!(
            reason.contains("too big") && reason.contains("262144"),
            "{reason}"
        );

        let (mut call, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        call.send(Message::Text(
            r#"{"type":"hello","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        let ready = call.next().await.unwrap().unwrap();
        assert!(ready.to_text().unwrap().contains("ready"));
        call.send(Message::Binary(pcm16(&[0.0; 320]).into()))
            .await
            .unwrap();
        call.send(Message::Binary(too_big.into())).await.unwrap();
        let (code, reason) = close_frame(&mut call).await.expect("a close frame");
        assert_eq!(code, 1009, "{reason}");

        // The Twilio transport has the same limit.
        let (mut twilio, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/twilio", server.addr))
                .await
                .unwrap();
        let oversize_text = format!(r#"{{"event":"media","pad":"{}"}}"#, "x".repeat(300 * 1024));
        twilio
            .send(Message::Text(oversize_text.into()))
            .await
            .unwrap();
        let (code, reason) = close_frame(&mut twilio).await.expect("a close frame");
        assert_eq!(code, 1009, "{reason}");

        // The server goes on with the next caller.
        let (mut next, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        next.send(Message::Text(
            r#"{"type":"hello","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        let ready = next.next().await.unwrap().unwrap();
        assert!(ready.to_text().unwrap().contains("ready"));
        let _ = next.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
    });
}

#[test]
fn the_agent_greets_first_and_an_idle_call_is_ended() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("talkline.toml");
    std::fs::write(
        &config,
        "[agent]\ngreeting = \"Hello, this is the clinic.\"\nidle_timeout_s = 3\n",
    )
    .unwrap();
    let server = start_server(&["--config", config.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .unwrap();
        ws.send(Message::Text(
            r#"{"type":"hello","sample_rate":16000}"#.into(),
        ))
        .await
        .unwrap();
        // One frame of silence, then the caller says nothing at all.
        ws.send(Message::Binary(pcm16(&[0.0; 320]).into()))
            .await
            .unwrap();
        let (mut energy, mut samples, mut greeting, mut bye) = (0f64, 0usize, None, None);
        let started = Instant::now();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await
        {
            match msg {
                Message::Binary(b) => {
                    for s in b.chunks_exact(2) {
                        let x = i16::from_le_bytes([s[0], s[1]]) as f64 / 32768.0;
                        energy += x * x;
                    }
                    samples += b.len() / 2;
                }
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("turn") => greeting = v["agent_text"].as_str().map(str::to_owned),
                        Some("bye") => {
                            bye = Some(started.elapsed());
                            break;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        assert!(samples > 16_000 / 2, "{samples} samples of greeting");
        assert!(
            (energy / samples as f64).sqrt() > 0.01,
            "the greeting is silent"
        );
        assert_eq!(greeting.as_deref(), Some("Hello, this is the clinic."));
        let bye = bye.expect("the idle call is ended");
        assert!(bye >= Duration::from_secs(3), "ended after {bye:?}");
    });
}
