//! Helpers for the SIP tests that drive outside SIP software (baresip, sipp, kamailio) against
//! `talkline serve --sip-listen`: free ports, readiness, `/metrics`, caller audio files, and
//! child processes that are killed however the test ends.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{espeak_16k, mulaw};

/// A port that was free a moment ago for UDP and for TCP alike: a SIP listener binds both, and a
/// port the kernel handed out for UDP may be in use by a TCP connection (CI once saw `binding SIP
/// on tcp ...: Address already in use`).
pub fn free_udp_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("a free UDP port");
        let port = udp.local_addr().expect("bound").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP in 100 tries");
}

/// Waits until `sip` (host:port) answers OPTIONS 200: the SIP listener starts beside HTTP, and
/// a proxy only once it has loaded its modules.
pub fn wait_for_sip(sip: &str, within: Duration) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a client socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout set");
    let local = socket.local_addr().expect("bound");
    let deadline = Instant::now() + within;
    let mut attempt = 0;
    while Instant::now() < deadline {
        attempt += 1;
        let options = format!(
            "OPTIONS sip:{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-ready{attempt}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:probe@{local}>;tag=ready\r\nTo: <sip:{sip}>\r\n\
             Call-ID: ready-{attempt}@{local}\r\nCSeq: {attempt} OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        let _ = socket.send_to(options.as_bytes(), sip);
        let mut buf = [0u8; 4096];
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            if buf[..n].starts_with(b"SIP/2.0 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{sip} never answered OPTIONS with 200");
}

/// `GET path` on the HTTP server at `addr`; the whole response, headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("HTTP connects");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sent");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body
}

/// The value of the sample `series` (name and labels exactly as exposed) in `/metrics` text;
/// 0 when the series does not exist yet (a counter nothing has touched).
pub fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Calls an instance took: its count of SIP sessions started.
pub const SIP_CALLS: &str = "talkline_sessions_total{transport=\"sip\"}";
/// Sessions in progress, all transports.
pub const SESSIONS_ACTIVE: &str = "talkline_sessions_active";

/// Polls `/metrics` of the server at `http` until `series` equals `value`; returns the last
/// text seen, for the failure message.
pub fn wait_for_metric(http: &str, series: &str, value: f64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = http_get(http, "/metrics");
        if metric(&text, series) == value || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process, and every process it forks, stopped when dropped, so a failing test
/// leaves nothing behind. It runs in a process group of its own: kamailio's workers outlive a
/// main process that is killed outright, so the whole group is asked to stop (SIGTERM, which
/// kamailio turns into an orderly shutdown), then killed.
pub struct Guard {
    child: Option<Child>,
    what: &'static str,
}

/// How long a stopped group may take to exit after SIGTERM before it is killed.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);

impl Guard {
    pub fn spawn(mut command: Command, what: &'static str) -> Guard {
        use std::os::unix::process::CommandExt;
        let child = command.process_group(0).spawn().unwrap_or_else(|e| {
            panic!("{what} does not start ({e}): scripts/install-deps installs it")
        });
        Guard {
            child: Some(child),
            what,
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; stops it if it does not.
    /// Returns its exit status, or `None` when it had to be stopped.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not finish within {timeout:?}: stopped", self.what);
        self.stop();
        None
    }

    /// SIGTERM to the group, then SIGKILL to what is left of it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let signal = |name: &str| {
            let _ = Command::new("kill")
                .args([name, "--", &group])
                .stderr(std::process::Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + TERMINATE_GRACE;
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal("-KILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `text` spoken by espeak-ng at 8 kHz, the telephone rate, with `lead_s` of silence before
/// and `tail_s` after. Pairs of 16 kHz samples are averaged: espeak has little energy above
/// 4 kHz.
pub fn speech_8k(text: &str, lead_s: f32, tail_s: f32) -> Vec<f32> {
    let mut audio = vec![0.0f32; (lead_s * 8_000.0) as usize];
    audio.extend(
        espeak_16k(text)
            .chunks(2)
            .map(|pair| pair.iter().sum::<f32>() / pair.len() as f32),
    );
    audio.extend(vec![0.0f32; (tail_s * 8_000.0) as usize]);
    audio
}

/// Writes 8 kHz mono samples as a 16-bit WAV (what baresip's aufile source plays into a PCMU
/// call).
pub fn write_wav_8k(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("WAV created");
    for s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16)
            .expect("sample written");
    }
    w.finalize().expect("WAV finalized");
}

/// Writes 8 kHz samples as raw G.711 μ-law (what sipp's `rtp_stream` sends as PCMU, 160 bytes
/// a packet).
pub fn write_ulaw(path: &Path, samples: &[f32]) {
    let bytes: Vec<u8> = samples
        .iter()
        .map(|s| mulaw((s.clamp(-1.0, 1.0) * 32767.0) as i16))
        .collect();
    std::fs::write(path, bytes).expect("the μ-law file is written");
}

/// A `talkline.toml` in `dir` whose LLM is the scripted OpenAI-compatible server at `base_url`
/// (fast canned replies, for the load tests where the local model would only measure the CPU).
pub fn scripted_llm_config(dir: &Path, base_url: &str) -> std::path::PathBuf {
    let path = dir.join("talkline.toml");
    let toml = format!(
        "[llm]\nbackend = \"openai\"\nbase_url = {base_url:?}\nmodel = \"scripted\"\n\
         connect_timeout_s = 2.0\nfirst_token_timeout_s = 10.0\nbetween_tokens_timeout_s = 5.0\n"
    );
    std::fs::write(&path, toml).expect("the config is written");
    path
}
