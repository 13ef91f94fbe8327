//! `talkline serve` with several callers at once: no cross-talk, and nothing left behind.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use talkline_tests::{espeak_16k, pcm16, start_server, wer};
use tokio_tungstenite::tungstenite::Message;

/// One caller: says `question` in real time and returns the final transcript it got back.
async fn caller(addr: String, question: &'static str) -> Option<String> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .ok()?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(
        r#"{"type":"hello","sample_rate":16000}"#.into(),
    ))
    .await
    .ok()?;
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k(question));
    audio.extend(vec![0.0f32; 16_000 * 4]);
    let sender = tokio::spawn(async move {
        let start = Instant::now();
        for (i, frame) in audio.chunks(320).enumerate() {
            tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
            if tx.send(Message::Binary(pcm16(frame).into())).await.is_err() {
                break;
            }
        }
        let _ = tx.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
    });
    let mut final_text = None;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            if v["type"] == "final" {
                final_text = v["text"].as_str().map(str::to_owned);
            }
        }
    }
    let _ = sender.await;
    final_text
}

fn metric(addr: &str, name: &str) -> f64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    });
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {body}"))
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

#[test]
fn four_concurrent_callers_each_hear_their_own_transcript_and_nothing_outlives_them() {
    let server = start_server(&["--max-tokens", "16"]);
    let pid = server.pid();
    let idle_threads = threads_of(pid);
    let questions = [
        "Is my hemoglobin normal?",
        "Please call me back tomorrow morning.",
        "When should I repeat the blood test?",
        "What does a high cholesterol number mean?",
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let finals: Vec<Option<String>> = rt.block_on(async {
        let calls: Vec<_> = questions
            .iter()
            .map(|q| tokio::spawn(caller(server.addr.clone(), q)))
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.ok().flatten());
        }
        out
    });
    for (q, f) in questions.iter().zip(&finals) {
        let f = f.as_deref().unwrap_or_else(|| panic!("no final for {q:?}"));
        assert!(wer(q, f) <= 0.35, "{q:?} heard as {f:?}");
    }
    assert_eq!(
        metric(
            &server.addr,
            "talkline_sessions_total{transport=\"websocket\"}"
        ),
        4.0
    );
    // Teardown: sessions end with their sockets, and their threads with them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server.addr, "talkline_sessions_active") > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(&server.addr, "talkline_sessions_active"), 0.0);
    while threads_of(pid) > idle_threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        threads_of(pid) <= idle_threads,
        "{} threads now, {idle_threads} before the calls",
        threads_of(pid)
    );
}
