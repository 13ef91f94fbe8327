//! Provider faults (issue #11): the real `talkline serve` (Whisper, Silero, Piper) with its LLM
//! backend pointed at a scripted OpenAI-compatible server that fails on demand. A WebSocket
//! caller speaks real questions (espeak-ng) in real time. For each fault the configured fallback
//! line must be heard within 3 s of the fault, the error reported without the conversation in
//! it, the next turn answered normally, and the call torn down within 5 s with no thread left.

use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use talkline_tests::fault_server::{FaultServer, Mode};
use talkline_tests::{espeak_16k, pcm16, start_server, ws_hello_16k, Server};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Short, so each fault turn is quick; the default line is longer.
const LINE: &str = "Sorry, something went wrong. Please ask again.";
const QUESTION: &str = "What does my blood test say?";
const ANSWER: &str = "Your blood test is normal.";
/// The words a mid-reply fault lets through before it strikes.
const FIRST: &str = "One moment. ";
/// Words of the conversation that must never appear in an error event.
const PRIVATE: [&str; 3] = ["blood", "moment", "normal"];
/// The issue's bounds.
const FALLBACK_WITHIN: Duration = Duration::from_secs(3);
const TEARDOWN_WITHIN: Duration = Duration::from_secs(5);
/// Far beyond any turn on a loaded machine: only a hung session gets there.
const TURN_LIMIT: Duration = Duration::from_secs(40);

/// The server's config: the remote backend at `base_url` with short timeouts, so a stall is
/// given up after 1 s, and `extra` lines for `[llm]`.
fn config(dir: &std::path::Path, base_url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("talkline.toml");
    let toml = format!(
        "[agent]\nfallback_line = {LINE:?}\n\n[llm]\nbackend = \"openai\"\nbase_url = {base_url:?}\n\
         model = \"scripted\"\nconnect_timeout_s = 1.0\nfirst_token_timeout_s = 2.0\n\
         between_tokens_timeout_s = 1.0\nretries = 1\n{extra}"
    );
    std::fs::write(&path, toml).expect("the config is written");
    path
}

/// A port nobody listens on right now (the fault server and its child take it in turns).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("an address").port()
}

enum Cmd {
    Say(Vec<f32>),
    Bye,
}

enum Ev {
    Text(serde_json::Value),
    /// Sum of squares and count of one frame's samples.
    Audio(f64, usize),
    Closed,
}

/// A WebSocket caller that streams audio in real time, silence between questions.
struct Call {
    cmd: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<(Instant, Ev)>,
}

/// What the caller got in one turn, up to its `turn` event.
#[derive(Default)]
struct Turn {
    final_at: Option<Instant>,
    final_text: String,
    error: Option<serde_json::Value>,
    fallback_at: Option<Instant>,
    fallback_text: String,
    /// Agent audio before and after the `fallback` event: (sum of squares, samples).
    audio_before: (f64, usize),
    audio_after: (f64, usize),
    turn: serde_json::Value,
    /// Every event's type, for the failure message.
    seen: Vec<String>,
}

fn rms((sum, n): (f64, usize)) -> f64 {
    (sum / n.max(1) as f64).sqrt()
}

impl Call {
    async fn connect(addr: &str) -> Call {
        let ws = ws_hello_16k(addr).await;
        let (mut tx, mut rx) = ws.split();
        let (cmd, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut pending: VecDeque<f32> = VecDeque::new();
            let start = Instant::now();
            for i in 0u64.. {
                tokio::time::sleep_until((start + Duration::from_millis(20 * i)).into()).await;
                while let Ok(c) = cmd_rx.try_recv() {
                    match c {
                        Cmd::Say(audio) => pending.extend(audio),
                        Cmd::Bye => {
                            let _ = tx.send(Message::Text(r#"{"type":"bye"}"#.into())).await;
                            return;
                        }
                    }
                }
                let mut frame: Vec<f32> = pending.drain(..pending.len().min(320)).collect();
                frame.resize(320, 0.0);
                if tx
                    .send(Message::Binary(pcm16(&frame).into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let ev = match msg {
                    Message::Text(t) => match serde_json::from_str(&t) {
                        Ok(v) => Ev::Text(v),
                        Err(e) => panic!("a server event is not JSON ({e}): {t}"),
                    },
                    Message::Binary(b) => {
                        let sum = b
                            .chunks_exact(2)
                            .map(|s| (i16::from_le_bytes([s[0], s[1]]) as f64 / 32768.0).powi(2))
                            .sum();
                        Ev::Audio(sum, b.len() / 2)
                    }
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ev_tx.send((Instant::now(), ev)).is_err() {
                    return;
                }
            }
            let _ = ev_tx.send((Instant::now(), Ev::Closed));
        });
        Call { cmd, events }
    }

    /// Asks the question and collects everything up to the turn's end.
    async fn ask(&mut self) -> Turn {
        let mut audio = espeak_16k(QUESTION);
        audio.extend(vec![0.0f32; 8_000]);
        self.cmd.send(Cmd::Say(audio)).expect("the sender runs");
        let mut t = Turn::default();
        let deadline = Instant::now() + TURN_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((at, ev))) = tokio::time::timeout(left, self.events.recv()).await else {
                panic!(
                    "no turn event within {TURN_LIMIT:?} (final {:?}, error {:?}, audio {} samples, \
                     events {:?})",
                    t.final_text,
                    t.error,
                    t.audio_before.1 + t.audio_after.1,
                    t.seen
                );
            };
            match ev {
                Ev::Audio(sum, n) => {
                    let acc = if t.fallback_at.is_some() {
                        &mut t.audio_after
                    } else {
                        &mut t.audio_before
                    };
                    acc.0 += sum;
                    acc.1 += n;
                }
                Ev::Closed => panic!("the server closed the call mid-turn"),
                Ev::Text(v) => {
                    let kind = v["type"].as_str().unwrap_or("?").to_string();
                    t.seen.push(kind.clone());
                    match kind.as_str() {
                        "final" => {
                            t.final_at = Some(at);
                            t.final_text = v["text"].as_str().unwrap_or_default().to_string();
                        }
                        "error" => t.error = Some(v),
                        "fallback" => {
                            t.fallback_at = Some(at);
                            t.fallback_text = v["text"].as_str().unwrap_or_default().to_string();
                        }
                        "turn" => {
                            t.turn = v;
                            return t;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Hangs up; returns when the server has closed the socket.
    async fn bye(&mut self) {
        let _ = self.cmd.send(Cmd::Bye);
        loop {
            match tokio::time::timeout(TEARDOWN_WITHIN, self.events.recv()).await {
                Ok(Some((_, Ev::Closed))) | Ok(None) => return,
                Ok(Some(_)) => {}
                Err(_) => panic!("the server kept the call open {TEARDOWN_WITHIN:?} after bye"),
            }
        }
    }
}

/// A normal answer: the scripted words, heard, and no error.
fn assert_answered(name: &str, t: &Turn) {
    assert!(t.error.is_none(), "{name}: {:?}", t.error);
    assert!(t.fallback_at.is_none(), "{name}: the fallback line played");
    assert_eq!(t.turn["agent_text"], ANSWER, "{name}: {}", t.turn);
    assert!(t.audio_before.1 > 16_000 / 2, "{name}: too little audio");
    assert!(rms(t.audio_before) > 0.01, "{name}: the answer is silent");
    println!("{name}: answered normally ({:?})", t.final_text);
}

/// The fallback line was heard after `fault_at` (or after the caller's turn ended, whichever is
/// later: nothing is said over the caller), and the history keeps what was heard.
fn assert_fell_back(
    name: &str,
    t: &Turn,
    stage: &str,
    fault_at: Option<Instant>,
    heard_before: &str,
) {
    let error = t
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: no error event"));
    assert_eq!(error["stage"], stage, "{name}: {error}");
    let error_text = error.to_string().to_lowercase();
    for word in PRIVATE {
        assert!(
            !error_text.contains(word),
            "{name}: the error event carries conversation text: {error}"
        );
    }
    let heard_at = t
        .fallback_at
        .unwrap_or_else(|| panic!("{name}: the fallback line never played ({error})"));
    assert_eq!(t.fallback_text, LINE, "{name}");
    let (_, samples) = t.audio_after;
    assert!(
        samples > 16_000,
        "{name}: only {samples} samples of the fallback line"
    );
    assert!(
        rms(t.audio_after) > 0.01,
        "{name}: the fallback line is silent"
    );
    let agent_text = t.turn["agent_text"].as_str().unwrap_or_default();
    let expected = format!("{} {LINE}", heard_before.trim());
    assert_eq!(agent_text, expected.trim(), "{name}: {}", t.turn);
    if !heard_before.is_empty() {
        assert!(
            rms(t.audio_before) > 0.01,
            "{name}: the first words are silent"
        );
    }
    let final_at = t
        .final_at
        .unwrap_or_else(|| panic!("{name}: no final transcript"));
    let from = fault_at.map_or(final_at, |f| f.max(final_at));
    let latency = heard_at.saturating_duration_since(from);
    println!(
        "{name}: fallback line heard {:.0} ms after the fault ({error})",
        latency.as_secs_f64() * 1000.0
    );
    assert!(
        latency <= FALLBACK_WITHIN,
        "{name}: the fallback line came {latency:?} after the fault"
    );
}

fn serving(llm: &Option<FaultServer>) -> &FaultServer {
    llm.as_ref().expect("the in-process fault server is up")
}

/// The first fault the server dealt after `since`.
fn fault_since(server: &FaultServer, since: Instant) -> Option<Instant> {
    server.faults().into_iter().find(|f| *f >= since)
}

/// The session's own threads still alive in the server process.
fn session_threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| {
            [
                "reply-",
                "speech-",
                "tts-synth",
                "asr-ws",
                "echo",
                "prefill",
                "end-of-utter",
            ]
            .iter()
            .any(|p| n.starts_with(p))
        })
        .collect()
}

async fn sessions_active(addr: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("talkline_sessions_active "))
        .and_then(|v| v.trim().parse().ok())
}

async fn metric(addr: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("metrics request");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Hangs up and checks that the session is gone within 5 s: socket closed, slot released, and
/// none of its threads left in the server process.
async fn hang_up(name: &str, call: &mut Call, server: &Server) {
    let start = Instant::now();
    call.bye().await;
    loop {
        let threads = session_threads(server.pid());
        let active = sessions_active(&server.addr).await;
        if threads.is_empty() && active == Some(0.0) {
            break;
        }
        assert!(
            start.elapsed() <= TEARDOWN_WITHIN,
            "{name}: after {:?}, sessions active {active:?}, threads {threads:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{name}: torn down in {:.0} ms, no session thread left",
        start.elapsed().as_secs_f64() * 1000.0
    );
}

#[test]
fn failures_before_the_first_word_play_the_fallback_line_and_the_next_turn_works() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let llm = FaultServer::start(0, Mode::Answer(ANSWER.into()));
    let server = start_server(&[
        "--config",
        config(dir.path(), &llm.base_url(), "").to_str().unwrap(),
    ]);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let mut call = Call::connect(&server.addr).await;

        llm.set_listening(false);
        let t = call.ask().await;
        assert_fell_back("connection refused", &t, "llm", None, "");
        llm.set_listening(true);
        llm.set_mode(Mode::Answer(ANSWER.into()));
        assert_answered("after connection refused", &call.ask().await);

        llm.set_mode(Mode::Status500);
        let since = Instant::now();
        let t = call.ask().await;
        assert_fell_back("HTTP 500", &t, "llm", fault_since(&llm, since), "");
        llm.set_mode(Mode::Answer(ANSWER.into()));
        assert_answered("after HTTP 500", &call.ask().await);

        // The voice yields nothing for a reply of emoji: a real TTS returning zero audio.
        llm.set_mode(Mode::Answer("\u{1F642}\u{1F642}".into()));
        let t = call.ask().await;
        assert_fell_back("zero audio from the voice", &t, "tts", None, "");
        llm.set_mode(Mode::Answer(ANSWER.into()));
        assert_answered("after zero audio", &call.ask().await);

        let failures = metric(&server.addr, "talkline_reply_failures_total").await;
        assert!(failures >= 3.0, "{failures} reply failures counted");
        hang_up("before the first word", &mut call, &server).await;
    });
}

/// The child process the SIGKILL fault kills: a fault server that stalls after the first word
/// and says so on stdout. Run only by `failures_mid_reply_...`.
#[test]
#[ignore = "a child process of failures_mid_reply_keep_what_was_heard_and_the_fallback_line_follows"]
fn fault_server_child() {
    let Some(port) = std::env::var("TALKLINE_FAULT_CHILD_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    else {
        return;
    };
    let _server = FaultServer::start_with_marker(
        port,
        Mode::StallAfter(FIRST.into()),
        Some(STALL_MARKER.into()),
    );
    println!("{READY_MARKER}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

const READY_MARKER: &str = "FAULT-SERVER-READY";
const STALL_MARKER: &str = "FAULT-SERVER-STALLED";

/// Starts [`fault_server_child`] on `port`; returns it with its stdout lines.
fn spawn_child(port: u16) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().expect("the test's own path"))
        .args([
            "fault_server_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env("TALKLINE_FAULT_CHILD_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the fault server child starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(READY_MARKER) => return (child, rx),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the fault server child never became ready: {e}");
            }
        }
    }
}

#[test]
fn failures_mid_reply_keep_what_was_heard_and_the_fallback_line_follows() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let port = free_port();
    let mut llm = Some(FaultServer::start(port, Mode::Answer(ANSWER.into())));
    let base_url = format!("http://127.0.0.1:{port}/v1");
    let server = start_server(&[
        "--config",
        config(dir.path(), &base_url, "").to_str().unwrap(),
    ]);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let mut call = Call::connect(&server.addr).await;

        serving(&llm).set_mode(Mode::StallAfter(FIRST.into()));
        let since = Instant::now();
        let t = call.ask().await;
        // The stall is noticed when the between-token timeout runs out.
        let stall = fault_since(serving(&llm), since);
        assert_fell_back("stall after the first word", &t, "llm", stall, FIRST);
        serving(&llm).set_mode(Mode::Answer(ANSWER.into()));
        assert_answered("after the stall", &call.ask().await);

        serving(&llm).set_mode(Mode::DropAfter(FIRST.into()));
        let since = Instant::now();
        let t = call.ask().await;
        let drop_at = fault_since(serving(&llm), since);
        assert_fell_back("dropped mid-stream", &t, "llm", drop_at, FIRST);
        serving(&llm).set_mode(Mode::Answer(ANSWER.into()));
        assert_answered("after the drop", &call.ask().await);

        // The provider is a process of its own, killed with SIGKILL once it has said its first
        // word; then a healthy one comes back on the same port.
        drop(llm.take());
        let (mut child, lines) = spawn_child(port);
        let killer = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + TURN_LIMIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(left) {
                    Ok(l) if l.contains(STALL_MARKER) => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            child.kill().expect("SIGKILL delivered");
            let _ = child.wait();
            let killed_at = Instant::now();
            // A reply restarted within this turn meets the same fault, not a healthy server.
            let back = FaultServer::start(port, Mode::StallAfter(FIRST.into()));
            (killed_at, back)
        });
        let t = call.ask().await;
        let (killed_at, back) = killer.await.expect("the killer ran");
        assert_fell_back("killed mid-turn", &t, "llm", Some(killed_at), FIRST);
        back.set_mode(Mode::Answer(ANSWER.into()));
        llm = Some(back);
        assert_answered("after the kill", &call.ask().await);

        // Hanging up while a reply waits on a stalled stream leaves nothing behind either.
        serving(&llm).set_mode(Mode::StallAfter(FIRST.into()));
        let since = Instant::now();
        let mut audio = espeak_16k(QUESTION);
        audio.extend(vec![0.0f32; 8_000]);
        call.cmd.send(Cmd::Say(audio)).expect("the sender runs");
        while fault_since(serving(&llm), since).is_none() {
            assert!(
                since.elapsed() < TURN_LIMIT,
                "the reply never reached the server"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hang_up("hung up during a stall", &mut call, &server).await;
    });
}

#[test]
fn the_local_model_answers_when_the_server_fails_before_its_first_word() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let llm = FaultServer::start(0, Mode::Answer(ANSWER.into()));
    let config = config(dir.path(), &llm.base_url(), "fallback = \"local\"\n");
    let server = start_server(&["--config", config.to_str().unwrap(), "--max-tokens", "12"]);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let mut call = Call::connect(&server.addr).await;

        llm.set_listening(false);
        let t = call.ask().await;
        assert!(t.error.is_none(), "{:?}", t.error);
        assert!(t.fallback_at.is_none(), "the fallback line played");
        let said = t.turn["agent_text"].as_str().unwrap_or_default();
        assert!(!said.trim().is_empty(), "{}", t.turn);
        assert!(rms(t.audio_before) > 0.01, "the local answer is silent");
        println!("server down: the local model said {said:?}");

        // After the first word the chain does not start over: the fallback line follows.
        llm.set_listening(true);
        llm.set_mode(Mode::DropAfter(FIRST.into()));
        let since = Instant::now();
        let t = call.ask().await;
        assert_fell_back(
            "chain, dropped mid-stream",
            &t,
            "llm",
            fault_since(&llm, since),
            FIRST,
        );
        hang_up("chain", &mut call, &server).await;
    });
}
