//! `talkline serve`'s OpenAI-compatible endpoint, driven over HTTP on 127.0.0.1:0 with the real
//! SmolLM2 model: talkline's own remote client against it, the response shapes, bad requests,
//! the concurrency limit, and a client hanging up mid-stream.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use talkline_llm::remote::{OpenAiConfig, OpenAiSession};
use talkline_llm::{
    CancelToken, ChatSession, GenerateParams, LoadOptions, LocalConfig, LocalModel, Message, Reply,
    Sampling, StopReason,
};
use talkline_tests::{real_model, talkline_bin};

/// The file `talkline serve` runs by default (the fetch-time Q8_0 re-quantization).
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q8_0.gguf";
const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q8_0";

/// A `talkline serve` with its log in a file; killed when dropped.
struct Served {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// `talkline serve` on 127.0.0.1:0 with `toml` as its configuration; the endpoint logs at
    /// info level so tests can see how each completion ended.
    fn start(toml: &str) -> Served {
        let dir = tempfile::tempdir().expect("a temp dir");
        let config = dir.path().join("talkline.toml");
        std::fs::write(&config, toml).expect("the config is written");
        let log = dir.path().join("serve.log");
        let mut child = Command::new(talkline_bin())
            .arg("--config")
            .arg(&config)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn,talkline_runtime::openai=info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .spawn()
            .expect("talkline serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("talkline serve prints its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| {
                panic!(
                    "no address in {line:?}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        Served {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `count` log lines contain every one of `needles`; returns the last of them.
    /// The deadline only turns a hang into a failure; no test depends on how fast this is.
    fn wait_for_log(&self, needles: &[&str], count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            if lines.len() >= count {
                return lines[count - 1].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "not {count} log lines with {needles:?} in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The log without its colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences end with a letter: `ESC [ 2 m`.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A log line's `name=value` field.
fn log_field(line: &str, name: &str) -> usize {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// The same model the server runs, loaded the same way (`[llm] threads` defaults to 1).
fn local_model() -> Arc<LocalModel> {
    static MODEL: OnceLock<Arc<LocalModel>> = OnceLock::new();
    Arc::clone(MODEL.get_or_init(|| {
        LocalModel::load(&LocalConfig {
            model: real_model("smollm2-135m", MODEL_FILE),
            tokenizer: None,
            load: LoadOptions {
                threads: 1,
                ..LoadOptions::default()
            },
        })
        .expect("the SmolLM2 GGUF loads")
    }))
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: Sampling::Greedy,
    }
}

/// The local backend's reply, computed in the test process.
fn local_reply(messages: &[Message], max_tokens: usize) -> Reply {
    local_model()
        .session()
        .reply(
            messages,
            &greedy(max_tokens),
            &CancelToken::new(),
            &mut |_| {},
        )
        .expect("the local backend answers")
}

fn wire(messages: &[Message]) -> Value {
    serde_json::to_value(messages).expect("messages serialise")
}

/// POSTs `body` to the completions route; returns the status, the content type and the body.
fn post(server: &Served, body: impl Into<reqwest::Body>) -> (u16, String, String) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let response = reqwest::Client::new()
            .post(server.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await.expect("a body");
        (status, content_type, text)
    })
}

fn get(server: &Served, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let response = reqwest::get(server.url(path))
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("a body"))
    })
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn conversation() -> Vec<Message> {
    vec![
        Message::system("You are a helpful assistant. Answer briefly."),
        Message::user("What is the capital of France?"),
        Message::assistant("The capital of France is Paris."),
        Message::user("And what is the capital of Italy?"),
    ]
}

#[test]
fn talklines_own_client_streams_the_same_greedy_text_as_the_local_backend() {
    let server = Served::start("");
    let messages = conversation();
    let expected = local_reply(&messages, 40);
    assert!(!expected.text.is_empty());

    let mut config = OpenAiConfig::new(server.url("/v1"), "any-name-the-client-likes");
    // Generous: these check behaviour, not speed, on a machine other tests also load.
    config.first_token_timeout = Duration::from_secs(120);
    config.between_tokens_timeout = Duration::from_secs(60);
    config.retries = 0;
    let mut client = OpenAiSession::new(config).expect("a client");
    let mut pieces = Vec::new();
    let reply = client
        .reply(&messages, &greedy(40), &CancelToken::new(), &mut |p| {
            pieces.push(p.to_string())
        })
        .expect("a streamed reply");
    assert_eq!(reply.text, expected.text);
    assert_eq!(reply.stop, expected.stop);
    assert_eq!(pieces.concat(), reply.text);
    assert!(
        pieces.len() > 1,
        "the reply arrived in one piece, not streamed"
    );

    // A follow-up turn on the same server: the conversation so far, then a new question.
    let mut follow_up = messages.clone();
    follow_up.push(Message::assistant(reply.text.clone()));
    follow_up.push(Message::user("Thank you. And of Spain?"));
    let expected = local_reply(&follow_up, 24);
    let reply = client
        .reply(&follow_up, &greedy(24), &CancelToken::new(), &mut |_| {})
        .expect("a second streamed reply");
    assert_eq!(reply.text, expected.text);
    // The endpoint kept the first turn's session, so only the new tokens were processed.
    let line = server.wait_for_log(&["chat completion done"], 2);
    let reused = log_field(&line, "reused_tokens");
    let prompt = local_model()
        .prompt_tokens(&messages)
        .expect("the prompt renders");
    assert!(
        reused >= prompt.len(),
        "only {reused} tokens reused of a {}-token earlier prompt: {line}",
        prompt.len()
    );
}

#[test]
fn a_non_streaming_completion_has_the_reply_and_its_token_counts() {
    let server = Served::start("");
    let messages = vec![Message::user("Tell me a short story about a cat.")];
    let expected = local_reply(&messages, 12);
    let (status, content_type, body) = post(
        &server,
        json!({
            "model": MODEL_ID,
            "messages": wire(&messages),
            "max_tokens": 12,
            "temperature": 0,
        })
        .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    assert!(v["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert!(v["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected.text.as_str());
    let finish = match expected.stop {
        StopReason::MaxTokens => "length",
        _ => "stop",
    };
    assert_eq!(choice["finish_reason"], finish);
    let prompt_tokens = local_model()
        .prompt_tokens(&messages)
        .expect("the prompt renders")
        .len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], expected.tokens.len());
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_tokens + expected.tokens.len()
    );

    let (status, models) = get(&server, "/v1/models");
    assert_eq!(status, 200, "{models}");
    let models: Value = serde_json::from_str(&models).expect("JSON");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(models["data"][0]["object"], "model");
}

#[test]
fn a_stream_is_chunks_then_a_finish_reason_then_done_and_stop_sequences_cut_it() {
    let server = Served::start("");
    let messages = vec![Message::user("Name three fruits.")];
    let expected = local_reply(&messages, 30);
    // A stop sequence from the middle of the greedy reply: the stream must end just before it.
    let words: Vec<&str> = expected.text.split_whitespace().collect();
    assert!(
        words.len() >= 4,
        "reply too short to cut: {:?}",
        expected.text
    );
    let stop = words[2].to_string();
    let cut = &expected.text[..expected.text.find(&stop).expect("the word is in the reply")];
    assert!(!cut.is_empty());

    let (status, content_type, body) = post(
        &server,
        json!({
            "messages": wire(&messages),
            "max_tokens": 30,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
            "stop": [stop],
        })
        .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("each event is JSON"))
        .collect();
    let id = &chunks[0]["id"];
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(&c["id"], id);
        assert_eq!(c["model"], MODEL_ID);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage, chunks) = chunks.split_last().expect("a usage chunk");
    assert_eq!(usage["choices"], json!([]));
    let (last, content) = chunks.split_last().expect("a final chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let text: String = content
        .iter()
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
            c["choices"][0]["delta"]["content"].as_str().unwrap_or("")
        })
        .collect();
    assert_eq!(text, cut);
    assert_eq!(
        usage["usage"]["total_tokens"],
        usage["usage"]["prompt_tokens"].as_u64().unwrap_or(0)
            + usage["usage"]["completion_tokens"].as_u64().unwrap_or(0)
    );

    // The same cut without streaming.
    let (status, _, body) = post(
        &server,
        json!({"messages": wire(&messages), "max_tokens": 30, "temperature": 0, "stop": stop})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["choices"][0]["message"]["content"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn malformed_requests_get_400_with_a_reason_and_the_server_keeps_serving() {
    let server = Served::start("");
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"messages": [{"role": "user", "#.into(),
            "not valid JSON",
        ),
        ("{}".into(), "`messages` is required"),
        (r#"{"messages": []}"#.into(), "at least one message"),
        (
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#.into(),
            "messages[0].role \"tool\" is not supported",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#.into(),
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 9}"#.into(),
            "`temperature` must be between 0 and 2",
        ),
    ];
    for (body, reason) in cases {
        let (status, content_type, text) = post(&server, body);
        assert_eq!(status, 400, "{text}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let v: Value = serde_json::from_str(&text).expect("an error JSON");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{message:?} lacks {reason:?}");
    }
    // Too large: announced by Content-Length (refused before the body is read), or sent
    // chunked (refused once the limit is crossed).
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let big = 2 * 1024 * 1024;
    for (head, body) in [
        (format!("content-length: {big}\r\n"), Vec::new()),
        (
            "transfer-encoding: chunked\r\n".to_string(),
            // No chunk terminator: the server reads every byte sent, so its close is clean.
            format!("{:x}\r\n{}", 1024 * 1024 + 16, "a".repeat(1024 * 1024 + 16)).into_bytes(),
        ),
    ] {
        let (status, text) = rt.block_on(raw_exchange(&server.addr, &head, &body));
        assert_eq!(status, 413, "{text}");
        let v: Value = serde_json::from_str(&text).expect("an error JSON");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("larger than 1048576 bytes"), "{message:?}");
    }

    let (status, _, body) = post(
        &server,
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
}

/// A POST to the completions route over a raw socket with `head` as extra headers and `body` as
/// the bytes sent (which may be fewer than announced); returns the status and the body.
async fn raw_exchange(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\n{head}\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("head sent");
    socket.write_all(body).await.expect("body sent");
    let mut response = Vec::new();
    // The server may reset the connection once it has answered without reading everything.
    let _ = socket.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends a streaming request over a raw socket and returns the socket once the first content
/// chunk has arrived.
async fn start_stream(addr: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The role chunk carries `"content":""` too: wait for a second one, the first real text.
    while String::from_utf8_lossy(&seen)
        .matches("\"content\":\"")
        .count()
        < 2
    {
        let n = socket.read(&mut buf).await.expect("reads");
        assert!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    socket
}

#[test]
fn beyond_max_concurrent_completions_get_503_and_a_hang_up_cancels_generation() {
    let server = Served::start("[openai]\nmax_concurrent = 1\nmax_tokens = 400\n");
    // Greedy SmolLM2 counts on without an end-of-turn token, so this runs all 400 tokens unless
    // it is cancelled.
    let long = json!({
        "messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let socket = rt.block_on(start_stream(&server.addr, &long));

    let (status, _, body) = post(
        &server,
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).to_string(),
    );
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("an error JSON");
    assert!(v["error"]["message"].as_str().is_some(), "{v}");
    let retry_after = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/chat/completions"))
            .body(json!({"messages": [{"role": "user", "content": "Hi"}]}).to_string())
            .send()
            .await
            .expect("the server answers")
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    assert_eq!(retry_after.as_deref(), Some("1"));

    // Hang up: the generation stops long before its 400 tokens, and frees its slot.
    drop(socket);
    let line = server.wait_for_log(&["chat completion cancelled: the client went away"], 1);
    let generated = log_field(&line, "completion_tokens");
    assert!(generated < 400, "{line}");
    let hi =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
            .to_string();
    let (status, _, body) = post(&server, hi.clone());
    assert_eq!(status, 200, "{body}");

    // Without streaming there is nothing to write until the end: a hang-up is noticed on the
    // connection itself.
    let long = long.replace("\"stream\":true", "\"stream\":false");
    let socket = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut socket = tokio::net::TcpStream::connect(&server.addr)
            .await
            .expect("connects");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: {}\r\n\r\n{long}",
            long.len()
        );
        socket
            .write_all(request.as_bytes())
            .await
            .expect("request sent");
        socket
    });
    // The long stream, the short one, then this one.
    server.wait_for_log(&["chat completion started"], 3);
    drop(socket);
    let line = server.wait_for_log(&["chat completion cancelled: the client went away"], 2);
    assert!(log_field(&line, "completion_tokens") < 400, "{line}");
    let (status, _, body) = post(&server, hi);
    assert_eq!(status, 200, "{body}");
}
