//! `talkline serve` with several callers at once: no cross-talk, and nothing left behind.

use std::time::{Duration, Instant};

use std::net::IpAddr;

use futures_util::{SinkExt, StreamExt};
use talkline_tests::{espeak_16k, speak_in_real_time, start_server, wer, ws_hello_16k};
use tokio_tungstenite::tungstenite::Message;

/// One caller: says `question` in real time and returns the final transcript it got back.
async fn caller(addr: String, question: &'static str) -> Option<String> {
    let (mut tx, mut rx) = ws_hello_16k(&addr).await.split();
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k(question));
    audio.extend(vec![0.0f32; 16_000 * 4]);
    let sender = tokio::spawn(async move {
        speak_in_real_time(&mut tx, &audio).await;
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
    let body = metrics_text(addr);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {body}"))
}

/// The server's `/metrics` page.
fn metrics_text(addr: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body
    })
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

/// A WebSocket upgrade of `path` from the local address `from` (any of 127/8 reaches the
/// server on Linux): the socket when upgraded, else the refusal's status and `Retry-After`.
async fn upgrade_from(
    from: &str,
    addr: &str,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, (u16, Option<String>)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .expect("binding a loopback address");
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        )),
        Err(e) => panic!("upgrading {path}: {e}"),
    }
}

/// `POST /webrtc/offer` from the local address `from`: the status and `Retry-After`.
async fn offer_from(from: &str, addr: &str, sdp: &str) -> (u16, Option<String>) {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let response = client
        .post(format!("http://{addr}/webrtc/offer"))
        .body(sdp.to_string())
        .send()
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (response.status().as_u16(), retry_after)
}

#[test]
fn one_address_opening_calls_quickly_gets_429_and_other_addresses_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("talkline.toml");
    std::fs::write(
        &config,
        "[limits]\nconnections_per_minute_per_ip = 3\noffers_per_minute_per_ip = 2\n",
    )
    .unwrap();
    // Slots to spare, so only the rate limits refuse anything.
    let server = start_server(&["--config", config.to_str().unwrap(), "--max-sessions", "16"]);
    let addr = server.addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // /ws and /twilio share one budget: three connections, then 429 before any upgrade.
        let mut open = Vec::new();
        for path in ["/ws", "/twilio", "/ws"] {
            open.push(
                upgrade_from("127.0.0.1", &addr, path)
                    .await
                    .expect("admitted"),
            );
        }
        for path in ["/ws", "/twilio"] {
            let (status, retry_after) = upgrade_from("127.0.0.1", &addr, path)
                .await
                .expect_err("refused");
            assert_eq!(status, 429, "{path}");
            let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
            assert!((1..=20).contains(&seconds), "Retry-After {seconds}");
        }
        // Another address has a budget of its own.
        open.push(
            upgrade_from("127.0.0.2", &addr, "/ws")
                .await
                .expect("127.0.0.2 is not limited by 127.0.0.1"),
        );
        for ws in &mut open {
            let _ = ws.close(None).await;
        }

        // Offers: two per minute. A bad offer still spends the budget (it was processed).
        for _ in 0..2 {
            assert_eq!(offer_from("127.0.0.1", &addr, "v=0\r\n").await.0, 400);
        }
        let (status, retry_after) = offer_from("127.0.0.1", &addr, "v=0\r\n").await;
        assert_eq!(status, 429);
        let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!((1..=30).contains(&seconds), "Retry-After {seconds}");
        assert_eq!(offer_from("127.0.0.2", &addr, "v=0\r\n").await.0, 400);
    });
    assert_eq!(
        metric(&addr, "talkline_rate_limited_total{kind=\"connection\"}"),
        2.0
    );
    assert_eq!(
        metric(&addr, "talkline_rate_limited_total{kind=\"offer\"}"),
        1.0
    );
}

#[test]
fn a_full_server_refuses_every_transport_with_503_and_retry_after_before_upgrading() {
    let server = start_server(&["--max-sessions", "0"]);
    let addr = server.addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for path in ["/ws", "/twilio"] {
            let (status, retry_after) = upgrade_from("127.0.0.1", &addr, path)
                .await
                .expect_err("refused");
            assert_eq!(status, 503, "{path}");
            assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
        }
        // The offer is refused before it is even parsed.
        let (status, retry_after) = offer_from("127.0.0.1", &addr, "v=0\r\n").await;
        assert_eq!(status, 503);
        assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
    });
    assert_eq!(metric(&addr, "talkline_sessions_rejected_total"), 3.0);
    assert_eq!(metric(&addr, "talkline_sessions_active"), 0.0);
}

/// Sum of a labelled counter's series whose labels contain `label`.
fn metric_sum(addr: &str, name: &str, label: &str) -> f64 {
    metrics_text(addr)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// A caller who hangs up while the agent answers was still answered: the turn is reported, as
/// interrupted, with its latencies (a load test once counted 19 turns for 20 answered calls).
#[test]
fn a_reply_the_caller_hangs_up_on_is_still_reported_as_a_turn() {
    let server = start_server(&["--max-tokens", "40"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = server.addr.clone();
    let hung_up_on_audio = rt.block_on(async move {
        let (mut tx, mut rx) = ws_hello_16k(&addr).await.split();
        let mut audio = vec![0.0f32; 8_000];
        audio.extend(espeak_16k("What does a high cholesterol number mean?"));
        audio.extend(vec![0.0f32; 16_000 * 20]);
        let sender = tokio::spawn(async move {
            speak_in_real_time(&mut tx, &audio).await;
            tx
        });
        // The question's final, then the first audio of the answer: hang up there, mid-reply.
        let mut heard_final = false;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(60), rx.next()).await
        {
            match msg {
                Message::Text(t) if t.contains(r#""type":"final""#) => heard_final = true,
                Message::Binary(b) if heard_final && b.iter().any(|&x| x != 0) => {
                    sender.abort();
                    return true;
                }
                _ => {}
            }
        }
        false
    });
    assert!(hung_up_on_audio, "the agent never began to answer");
    let turns = |interrupted: &str| {
        metric_sum(
            &server.addr,
            "talkline_turns_total",
            &format!("interrupted=\"{interrupted}\""),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while turns("true") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(turns("true"), 1.0, "the reply hung up on is a turn");
    assert_eq!(turns("false"), 0.0, "and not a finished one");
    let v2v = metric(
        &server.addr,
        "talkline_stage_latency_seconds_count{stage=\"voice_to_voice\"}",
    );
    assert_eq!(v2v, 1.0, "its voice-to-voice time is recorded");
}
