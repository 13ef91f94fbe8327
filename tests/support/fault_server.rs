//! A scripted OpenAI-compatible LLM server that fails on demand, for the provider-fault tests.
//!
//! Plain threads and sockets on purpose: the faults are at the HTTP and TCP level (a 500, a
//! stream that stops or is cut, a port nobody listens on), which a framework would smooth over.
//! Every request is answered by the mode set at the time it arrives, so a request repeated by a
//! retry or a restarted speculative reply meets the same fault.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How each request is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A normal streamed reply: `text`, a word per event.
    Answer(String),
    /// HTTP 500 before any token.
    Status500,
    /// `first` is streamed, then nothing more until the client gives up.
    StallAfter(String),
    /// `first` is streamed, then the connection is closed without ending the stream.
    DropAfter(String),
}

/// Longest a stalled stream is held open; the client's between-token timeout is far shorter.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// Between two words of a streamed answer, like a fast server.
const WORD_GAP: Duration = Duration::from_millis(15);

#[derive(Debug)]
struct State {
    mode: Mode,
    listening: bool,
    /// When each fault was dealt (a 500 sent, the first token of a stall or drop sent).
    faults: Vec<Instant>,
    requests: usize,
    /// Every request body, in arrival order: the conversations the LLM was shown.
    bodies: Vec<String>,
    /// Printed to stdout when a stall begins: the sign a parent process waits for.
    stall_marker: Option<String>,
}

/// The server; stops accepting when dropped.
pub struct FaultServer {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultServer {
    /// Listens on 127.0.0.1:`port` (0: any free port).
    pub fn start(port: u16, mode: Mode) -> FaultServer {
        Self::start_with_marker(port, mode, None)
    }

    /// As [`FaultServer::start`]; prints `marker` on its own line when a stall begins.
    pub fn start_with_marker(port: u16, mode: Mode, marker: Option<String>) -> FaultServer {
        let listener = bind(port);
        let port = listener.local_addr().expect("a bound address").port();
        let state = Arc::new(Mutex::new(State {
            mode,
            listening: true,
            faults: Vec::new(),
            requests: 0,
            bodies: Vec::new(),
            stall_marker: marker,
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(listener, port, state, stop))
        };
        FaultServer {
            port,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/v1`, for `[llm] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        lock(&self.state).mode = mode;
    }

    /// Closes the port (`false`: connections are refused) or opens it again.
    pub fn set_listening(&self, listening: bool) {
        lock(&self.state).listening = listening;
        // The accept loop applies it within a poll; wait until it has.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Faults dealt so far.
    pub fn faults(&self) -> Vec<Instant> {
        lock(&self.state).faults.clone()
    }

    pub fn requests(&self) -> usize {
        lock(&self.state).requests
    }

    /// The bodies of the requests so far (each a chat-completions request: the whole context).
    pub fn request_bodies(&self) -> Vec<String> {
        lock(&self.state).bodies.clone()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Binds 127.0.0.1:`port`, retrying a moment: the port may have just been freed by a killed
/// process.
fn bind(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => {
                l.set_nonblocking(true).expect("a non-blocking listener");
                return l;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("fault server: binding port {port}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("fault server cannot bind port {port}: {e}"),
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut listener = Some(listener);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let listening = lock(&state).listening;
        match (&listener, listening) {
            (Some(_), false) => listener = None,
            (None, true) => listener = Some(bind(port)),
            _ => {}
        }
        let accepted = listener.as_ref().and_then(|l| l.accept().ok());
        match accepted {
            Some((stream, _)) => {
                let state = state.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, &state) {
                        eprintln!("fault server: connection ended: {e}");
                    }
                });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Reads one request (headers and a Content-Length body) and answers it by the current mode.
fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mode = {
        let mut s = lock(state);
        s.requests += 1;
        s.bodies.push(String::from_utf8_lossy(&body).into_owned());
        s.mode.clone()
    };
    let mut out = stream;
    match mode {
        Mode::Answer(text) => {
            start_stream(&mut out)?;
            for (i, word) in text.split_inclusive(' ').enumerate() {
                if i > 0 {
                    std::thread::sleep(WORD_GAP);
                }
                send_event(&mut out, &delta(word))?;
            }
            send_event(
                &mut out,
                r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            )?;
            send_event(&mut out, "[DONE]")?;
            out.write_all(b"0\r\n\r\n")?;
        }
        Mode::Status500 => {
            let body = r#"{"error":{"message":"scripted failure"}}"#;
            write!(
                out,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            lock(state).faults.push(Instant::now());
        }
        Mode::StallAfter(first) => {
            start_stream(&mut out)?;
            send_event(&mut out, &delta(&first))?;
            let marker = {
                let mut s = lock(state);
                s.faults.push(Instant::now());
                s.stall_marker.clone()
            };
            if let Some(m) = marker {
                println!("{m}");
                let _ = std::io::stdout().flush();
            }
            // Hold the connection until the client gives up on it.
            out.set_read_timeout(Some(Duration::from_millis(50)))?;
            let until = Instant::now() + STALL_LIMIT;
            let mut scratch = [0u8; 256];
            while Instant::now() < until {
                match out.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }
        Mode::DropAfter(first) => {
            start_stream(&mut out)?;
            send_event(&mut out, &delta(&first))?;
            std::thread::sleep(Duration::from_millis(30));
            lock(state).faults.push(Instant::now());
            out.shutdown(std::net::Shutdown::Both)?;
        }
    }
    Ok(())
}

fn start_stream(out: &mut TcpStream) -> std::io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
}

/// One SSE event as one HTTP chunk, flushed at once.
fn send_event(out: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let event = format!("data: {data}\n\n");
    write!(out, "{:x}\r\n{event}\r\n", event.len())?;
    out.flush()
}

fn delta(text: &str) -> String {
    serde_json::json!({"choices": [{"delta": {"content": text}, "finish_reason": null}]})
        .to_string()
}
