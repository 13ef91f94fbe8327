//! The OpenAI-compatible client against a small scripted SSE server: streaming, stalls, HTTP
//! errors, a dropped connection, retries and cancellation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use talkline_llm::remote::{OpenAiConfig, OpenAiSession};
use talkline_llm::{
    CancelToken, ChatSession, GenerateParams, LlmError, Message, Sampling, StopReason,
};

/// What the server does with one connection.
#[derive(Clone)]
enum Behaviour {
    /// Answers with this status and a JSON error body.
    Status(u16),
    /// Sends response headers, then nothing for a long time.
    StallBeforeFirstToken,
    /// Streams `pieces` (one SSE event each, `gap` apart), then ends as `end` says.
    Stream {
        pieces: Vec<&'static str>,
        gap: Duration,
        end: End,
    },
}

#[derive(Clone, Copy)]
enum End {
    Done,
    Drop,
    Stall,
    /// An OpenAI-style error event, then the end of the stream (as servers report a failure
    /// once the 200 status has gone out).
    Error,
}

struct Server {
    base_url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

/// Serves one behaviour per connection, in order; the last one repeats.
fn serve(script: Vec<Behaviour>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    let base_url = format!(
        "http://{}/v1",
        listener.local_addr().expect("bound address")
    );
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let n = c.fetch_add(1, Ordering::SeqCst);
            let behaviour = script[n.min(script.len() - 1)].clone();
            let r = Arc::clone(&r);
            std::thread::spawn(move || handle(stream, behaviour, &r));
        }
    });
    Server {
        base_url,
        connections,
        requests,
    }
}

fn handle(mut stream: TcpStream, behaviour: Behaviour, requests: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut content_length = 0;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    requests
        .lock()
        .expect("no test thread panics holding the lock")
        .push(format!("{head}{}", String::from_utf8_lossy(&body)));
    let stream_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let chunk = |s: &mut TcpStream, data: &str| {
        let _ = write!(s, "{:x}\r\n{data}\r\n", data.len());
        let _ = s.flush();
    };
    match behaviour {
        Behaviour::Status(code) => {
            let body = r#"{"error":{"message":"scripted failure"}}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 {code} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Behaviour::StallBeforeFirstToken => {
            let _ = stream.write_all(stream_head.as_bytes());
            std::thread::sleep(Duration::from_secs(5));
        }
        Behaviour::Stream { pieces, gap, end } => {
            let _ = stream.write_all(stream_head.as_bytes());
            // A role-only first event, as real servers send.
            chunk(
                &mut stream,
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            );
            for piece in pieces {
                std::thread::sleep(gap);
                let event = serde_json::json!({
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
                });
                chunk(&mut stream, &format!("data: {event}\n\n"));
            }
            match end {
                End::Done => {
                    chunk(
                        &mut stream,
                        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                    );
                    chunk(&mut stream, "data: [DONE]\n\n");
                    let _ = stream.write_all(b"0\r\n\r\n");
                }
                End::Drop => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
                End::Stall => std::thread::sleep(Duration::from_secs(5)),
                End::Error => {
                    chunk(
                        &mut stream,
                        "data: {\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}\n\n",
                    );
                    let _ = stream.write_all(b"0\r\n\r\n");
                }
            }
        }
    }
}

fn session(server: &Server) -> OpenAiSession {
    let mut c = OpenAiConfig::new(server.base_url.clone(), "test-model");
    c.first_token_timeout = Duration::from_millis(400);
    c.between_tokens_timeout = Duration::from_millis(400);
    c.retries = 2;
    c.retry_backoff = Duration::from_millis(10);
    OpenAiSession::new(c).expect("a client can be built")
}

fn ask(
    s: &mut OpenAiSession,
    cancel: &CancelToken,
) -> (Result<talkline_llm::Reply, LlmError>, Vec<String>) {
    let mut pieces = Vec::new();
    let r = s.reply(
        &[Message::user("Hi")],
        &GenerateParams {
            max_tokens: 16,
            sampling: Sampling::Greedy,
        },
        cancel,
        &mut |p| pieces.push(p.to_string()),
    );
    (r, pieces)
}

fn stream(pieces: Vec<&'static str>, end: End) -> Behaviour {
    Behaviour::Stream {
        pieces,
        gap: Duration::from_millis(5),
        end,
    }
}

#[test]
fn streams_pieces_and_sends_an_openai_request() {
    let server = serve(vec![stream(vec!["Hel", "lo", " there"], End::Done)]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    let reply = reply.expect("a complete reply");
    assert_eq!(pieces, ["Hel", "lo", " there"]);
    assert_eq!(reply.text, "Hello there");
    assert_eq!(reply.stop, StopReason::EndOfTurn);
    let requests = server.requests.lock().expect("lock");
    let req = &requests[0];
    assert!(
        req.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "{req}"
    );
    let body = &req[req.find("\r\n\r\n").expect("a body") + 4..];
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(json["model"], "test-model");
    assert_eq!(json["stream"], true);
    assert_eq!(json["messages"][0]["role"], "user");
    assert_eq!(json["messages"][0]["content"], "Hi");
}

#[test]
fn http_500_is_retried_before_the_first_token() {
    let server = serve(vec![Behaviour::Status(500), stream(vec!["ok"], End::Done)]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    assert_eq!(reply.expect("the retry succeeds").text, "ok");
    assert_eq!(pieces, ["ok"]);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn persistent_http_500_fails_with_the_status_after_the_retries() {
    let server = serve(vec![Behaviour::Status(500)]);
    let (reply, _) = ask(&mut session(&server), &CancelToken::new());
    match reply {
        Err(LlmError::HttpStatus { status, body, .. }) => {
            assert_eq!(status, 500);
            assert!(body.contains("scripted failure"), "{body}");
        }
        other => panic!("expected an HTTP 500 error, got {other:?}"),
    }
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        3,
        "1 try + 2 retries"
    );
}

#[test]
fn client_errors_are_not_retried() {
    let server = serve(vec![Behaviour::Status(400)]);
    let (reply, _) = ask(&mut session(&server), &CancelToken::new());
    assert!(
        matches!(reply, Err(LlmError::HttpStatus { status: 400, .. })),
        "{reply:?}"
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_stall_before_the_first_token_times_out_and_is_retried() {
    let server = serve(vec![Behaviour::StallBeforeFirstToken]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    assert!(pieces.is_empty());
    match reply {
        Err(LlmError::Timeout { phase, .. }) => assert_eq!(phase, "waiting for the first token"),
        other => panic!("expected a first-token timeout, got {other:?}"),
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 3);
}

#[test]
fn a_stall_between_tokens_times_out_without_retrying() {
    let server = serve(vec![stream(vec!["par", "tial"], End::Stall)]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    assert_eq!(pieces, ["par", "tial"]);
    match reply {
        Err(LlmError::Timeout { phase, .. }) => assert_eq!(phase, "between tokens"),
        other => panic!("expected a between-tokens timeout, got {other:?}"),
    }
    // Text already went to the caller: a retry would repeat it.
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_dropped_connection_mid_stream_is_an_error_not_a_short_reply() {
    let server = serve(vec![stream(vec!["half", " a"], End::Drop)]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    assert_eq!(pieces, ["half", " a"]);
    assert!(matches!(reply, Err(LlmError::Stream { .. })), "{reply:?}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn an_error_event_mid_stream_is_an_error_naming_it() {
    let server = serve(vec![stream(vec!["so far"], End::Error)]);
    let (reply, pieces) = ask(&mut session(&server), &CancelToken::new());
    assert_eq!(pieces, ["so far"]);
    match reply {
        Err(LlmError::Protocol { reason }) => assert!(reason.contains("out of memory"), "{reason}"),
        other => panic!("expected the server's error, got {other:?}"),
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn http_429_is_retried_like_a_busy_server() {
    let server = serve(vec![Behaviour::Status(429), stream(vec!["ok"], End::Done)]);
    let (reply, _) = ask(&mut session(&server), &CancelToken::new());
    assert_eq!(reply.expect("the retry succeeds").text, "ok");
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn cancellation_stops_the_stream_within_one_piece() {
    let server = serve(vec![Behaviour::Stream {
        pieces: vec!["one", " two", " three", " four", " five"],
        gap: Duration::from_millis(50),
        end: End::Done,
    }]);
    let cancel = CancelToken::new();
    let mut s = session(&server);
    let mut pieces = Vec::new();
    let reply = s
        .reply(
            &[Message::user("Count")],
            &GenerateParams::default(),
            &cancel,
            &mut |p| {
                pieces.push(p.to_string());
                cancel.cancel();
            },
        )
        .expect("a cancelled reply is not an error");
    assert_eq!(reply.stop, StopReason::Cancelled);
    assert_eq!(pieces, ["one"]);
    assert_eq!(reply.text, "one");
}

#[test]
fn an_unreachable_server_is_a_connect_error() {
    // Bind then drop: nothing listens on this port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let mut c = OpenAiConfig::new(format!("http://127.0.0.1:{port}/v1"), "m");
    c.retries = 1;
    c.retry_backoff = Duration::from_millis(1);
    let mut s = OpenAiSession::new(c).expect("client");
    let (reply, _) = ask(&mut s, &CancelToken::new());
    assert!(matches!(reply, Err(LlmError::Connect { .. })), "{reply:?}");
}

/// A voice agent's callback blocks on a full queue (tokio's `blocking_send`), as it may with the
/// local backend; and a call ends by dropping its session inside an async task (issue #11).
#[test]
fn the_callback_may_block_and_the_session_may_be_dropped_in_an_async_task() {
    let server = serve(vec![stream(vec!["Hel", "lo"], End::Done)]);
    let mut s = session(&server);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    let reply = s
        .reply(
            &[Message::user("Hi")],
            &GenerateParams::default(),
            &CancelToken::new(),
            &mut |p| {
                tx.blocking_send(p.to_string())
                    .expect("the receiver is open")
            },
        )
        .expect("a complete reply");
    assert_eq!(reply.text, "Hello");
    drop(tx);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let pieces = rt.block_on(async move {
        drop(s);
        let mut pieces = Vec::new();
        while let Some(p) = rx.recv().await {
            pieces.push(p);
        }
        pieces
    });
    assert_eq!(pieces, ["Hel", "lo"]);
}

/// A reply's child token stops the stream when the reply as a whole is cancelled, even while the
/// server is silent between tokens.
#[test]
fn cancelling_the_parent_token_stops_a_stalled_stream() {
    let server = serve(vec![stream(vec!["Hel"], End::Stall)]);
    let mut c = OpenAiConfig::new(server.base_url.clone(), "m");
    c.between_tokens_timeout = Duration::from_secs(30);
    let mut s = OpenAiSession::new(c).expect("client");
    let parent = CancelToken::new();
    let child = parent.child();
    let canceller = {
        let parent = parent.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            parent.cancel();
        })
    };
    let started = std::time::Instant::now();
    let (reply, pieces) = ask(&mut s, &child);
    canceller.join().expect("the canceller ran");
    assert_eq!(
        reply.expect("cancelled, not failed").stop,
        StopReason::Cancelled
    );
    assert_eq!(pieces, ["Hel"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
