//! Isolation and leaks on the real server (issue #11): what one caller says never reaches
//! another session's LLM context, events or the logs; fifty sessions leave the process's
//! threads, file descriptors and sockets as they found them; a SIP peer that vanishes without
//! BYE is hung up after the media timeout.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use talkline_tests::fault_server::{FaultServer, Mode};
use talkline_tests::sip_caller::{free_udp_port, header, status, Caller};
use talkline_tests::{espeak_16k, pcm16, start_server, start_server_logging, ws_hello_16k, Server};
use tokio_tungstenite::tungstenite::Message;

/// The server's config: the LLM is the scripted server at `base_url`, which records every
/// context it is shown.
fn config(dir: &std::path::Path, base_url: &str) -> std::path::PathBuf {
    let path = dir.join("talkline.toml");
    let toml = format!(
        "[llm]\nbackend = \"openai\"\nbase_url = {base_url:?}\nmodel = \"scripted\"\n\
         connect_timeout_s = 2.0\nfirst_token_timeout_s = 5.0\nbetween_tokens_timeout_s = 2.0\n"
    );
    std::fs::write(&path, toml).expect("the config is written");
    path
}

/// One WebSocket caller: says `text` in real time, then collects every event (as JSON text)
/// until the turn ends, and hangs up.
async fn call_saying(addr: &str, text: &str) -> Vec<String> {
    let ws = ws_hello_16k(addr).await;
    let mut audio = vec![0.0f32; 8_000];
    audio.extend(espeak_16k(text));
    audio.extend(vec![0.0f32; 16_000 * 12]);
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        let start = Instant::now();
        for (i, frame) in audio.chunks(320).enumerate() {
            tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
            if tx.send(Message::Binary(pcm16(frame).into())).await.is_err() {
                break;
            }
        }
        tx
    });
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), rx.next()).await
        else {
            break;
        };
        if let Message::Text(t) = msg {
            let done = t.contains(r#""type":"turn""#);
            events.push(t.to_string());
            if done {
                break;
            }
        }
    }
    sender.abort();
    events
}

#[test]
fn canaries_spoken_in_one_session_never_reach_another() {
    let llm = FaultServer::start(0, Mode::Answer("Thank you, I have noted that.".into()));
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = config(dir.path(), &llm.base_url());
    let log = dir.path().join("server.log");
    // Debug level: the most the server ever logs by default configuration.
    let server = start_server_logging(
        &["--config", config.to_str().expect("utf-8 path")],
        &log,
        "debug",
    );
    let canaries = ["pineapple", "volcano"];
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let (a, b) = rt.block_on(async {
        tokio::join!(
            call_saying(&server.addr, "My code word is pineapple."),
            call_saying(&server.addr, "My code word is volcano."),
        )
    });
    drop(server);

    for (events, (own, other)) in [
        (&a, (canaries[0], canaries[1])),
        (&b, (canaries[1], canaries[0])),
    ] {
        let text = events.join("\n").to_lowercase();
        // The canary made it through speech recognition, or this test would prove nothing.
        assert!(text.contains(own), "{own} was not heard: {events:?}");
        assert!(
            !text.contains(other),
            "{other} leaked into this session: {events:?}"
        );
    }
    let contexts = llm.request_bodies();
    for canary in canaries {
        assert!(
            contexts.iter().any(|c| c.to_lowercase().contains(canary)),
            "no LLM context held {canary}: {contexts:?}"
        );
    }
    for context in &contexts {
        let context = context.to_lowercase();
        assert!(
            !(context.contains(canaries[0]) && context.contains(canaries[1])),
            "one LLM context held both callers' words: {context}"
        );
    }
    let logged = std::fs::read_to_string(&log)
        .expect("the log")
        .to_lowercase();
    assert!(
        !logged.is_empty(),
        "the server logged nothing at debug level"
    );
    for canary in canaries {
        let lines: Vec<&str> = logged.lines().filter(|l| l.contains(canary)).collect();
        assert!(
            lines.is_empty(),
            "the log holds a caller's word: {lines:#?}"
        );
    }
}

/// Threads, open file descriptors, and sockets among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    threads: usize,
    fds: usize,
    sockets: usize,
}

fn footprint(pid: u32) -> Footprint {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0);
    Footprint {
        threads: count(format!("/proc/{pid}/task")),
        fds: count(format!("/proc/{pid}/fd")),
        sockets,
    }
}

fn within(now: Footprint, baseline: Footprint) -> bool {
    now.threads <= baseline.threads && now.fds <= baseline.fds && now.sockets <= baseline.sockets
}

/// A short WebSocket session: hello, half a second of silence, bye, and the server's close.
async fn short_ws_session(addr: &str) {
    let mut ws = ws_hello_16k(addr).await;
    for _ in 0..25 {
        ws.send(Message::Binary(pcm16(&[0.0; 320]).into()))
            .await
            .expect("audio sent");
    }
    ws.send(Message::Text(r#"{"type":"bye"}"#.into()))
        .await
        .expect("bye sent");
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }
}

/// A short SIP call: INVITE, ACK, a few RTP packets of silence, BYE.
fn short_sip_call(sip: &str, n: usize) {
    let caller = Caller::new(sip);
    let uri = format!("sip:agent@{sip}");
    let call_id = format!("leak-{n}");
    caller.invite(&uri, &call_id, 1, None);
    let answered = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer");
    assert_eq!(status(&answered), 200, "{answered}");
    caller.ack(&uri, &call_id, 1, &answered, false);
    let media_port: u16 = answered
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("a media port");
    let rtp = std::net::UdpSocket::bind("127.0.0.1:0").expect("an RTP socket");
    for i in 0..10u16 {
        let mut packet = vec![0x80, 0];
        packet.extend_from_slice(&i.to_be_bytes());
        packet.extend_from_slice(&(160 * u32::from(i)).to_be_bytes());
        packet.extend_from_slice(&7u32.to_be_bytes());
        packet.extend(std::iter::repeat_n(0xFFu8, 160));
        let _ = rtp.send_to(&packet, ("127.0.0.1", media_port));
    }
    let to = header(&answered, "To").expect("a To").to_string();
    caller.bye(&uri, &call_id, 2, &to);
    let bye = caller
        .final_response(Duration::from_secs(5))
        .expect("a BYE answer");
    assert_eq!(status(&bye), 200, "{bye}");
}

/// Polls `/metrics` for the number of sessions open.
fn sessions_active(server: &Server) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&server.addr).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("talkline_sessions_active "))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

#[test]
fn fifty_sessions_leave_threads_fds_and_sockets_as_they_found_them() {
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let server = start_server(&["--sip-listen", &sip]);
    let pid = server.pid();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    // Warm-up: the first sessions start pools that stay (the ASR decode workers, tokio's).
    rt.block_on(short_ws_session(&server.addr));
    short_sip_call(&sip, 0);
    assert!(wait_until(Duration::from_secs(10), || sessions_active(
        &server
    ) == Some(0.0)));
    // tokio's blocking threads idle out after 10 s; a baseline taken before that would be high.
    std::thread::sleep(Duration::from_secs(11));
    let baseline = footprint(pid);

    for n in 1..=25 {
        rt.block_on(short_ws_session(&server.addr));
        short_sip_call(&sip, n);
    }
    let mut last = footprint(pid);
    let settled = wait_until(Duration::from_secs(30), || {
        last = footprint(pid);
        within(last, baseline) && sessions_active(&server) == Some(0.0)
    });
    assert!(
        settled,
        "after 50 sessions: {last:?}, baseline {baseline:?}, sessions {:?}",
        sessions_active(&server)
    );
}

#[test]
fn a_sip_peer_that_vanishes_without_bye_is_hung_up_at_the_media_timeout() {
    let sip = format!("127.0.0.1:{}", free_udp_port());
    let server = start_server(&["--sip-listen", &sip, "--sip-media-timeout", "2"]);
    let caller = Caller::new(&sip);
    let uri = format!("sip:agent@{sip}");
    caller.invite(&uri, "vanish-1", 1, None);
    let answered = caller
        .final_response(Duration::from_secs(20))
        .expect("an answer");
    assert_eq!(status(&answered), 200, "{answered}");
    caller.ack(&uri, "vanish-1", 1, &answered, false);
    assert_eq!(sessions_active(&server), Some(1.0));
    // The peer sends no RTP and no BYE: gone, as a phone that lost its network.
    let bye = caller
        .answer_next_request(Duration::from_secs(20))
        .expect("the server hangs up");
    assert!(bye.starts_with("BYE "), "{bye}");
    assert!(
        wait_until(Duration::from_secs(10), || sessions_active(&server)
            == Some(0.0)),
        "the session outlived its call"
    );
}
