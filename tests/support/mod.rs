//! Helpers shared by the integration tests: find the real `talkline` binary, run it, find the
//! real models, and make real speech with espeak-ng.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod fault_server;
pub mod sip;
pub mod sip_caller;

/// The `talkline` binary under test: `$TALKLINE_BIN`, else the one cargo built beside the tests.
pub fn talkline_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TALKLINE_BIN") {
        return PathBuf::from(bin);
    }
    // Test executables live in target/<profile>/deps/; the binary in target/<profile>/.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = profile_dir.join("talkline");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --bin talkline` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `talkline ARGS` with extra environment variables; returns its output.
pub fn talkline(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(talkline_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("talkline runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The shared model cache, as `talkline models dir` reports it. Tests that need real models use
/// it; `scripts/test` runs `talkline models fetch` first.
pub fn models_dir() -> PathBuf {
    let out = talkline(&["models", "dir"], &[]);
    assert!(
        out.status.success(),
        "talkline models dir: {}",
        stderr(&out)
    );
    PathBuf::from(stdout(&out).trim())
}

/// A real model file from the cache, or a failure that says how to fetch it.
pub fn real_model(model: &str, file: &str) -> PathBuf {
    let path = models_dir().join(model).join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `talkline models fetch --only {model}`",
        path.display()
    );
    path
}

/// Speaks `text` with espeak-ng (voice en-us) and returns 16 kHz mono f32 samples.
pub fn espeak_16k(text: &str) -> Vec<f32> {
    let dir = tempfile::tempdir().expect("temp dir");
    let raw = dir.path().join("raw.wav");
    let wav = dir.path().join("16k.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .expect("espeak-ng is installed (apt-get install espeak-ng; scripts/test does)");
    assert!(status.success());
    let status = Command::new("sox")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&wav)
        .status()
        .expect("sox is installed (apt-get install sox; scripts/test does)");
    assert!(status.success());
    read_wav_f32(&wav)
}

/// Speaks each sentence with espeak-ng and joins them with `gap_s` of silence, plus `gap_s` before
/// and after; 16 kHz mono.
pub fn spoken_clip(sentences: &[&str], gap_s: f32) -> Vec<f32> {
    let gap = vec![0.0f32; (gap_s * 16_000.0) as usize];
    let mut clip = gap.clone();
    for s in sentences {
        clip.extend(espeak_16k(s));
        clip.extend(&gap);
    }
    clip
}

/// Word error rate of `hypothesis` against `reference`, on [`words`].
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let (r, h) = (words(reference), words(hypothesis));
    let mut row: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut prev_diag = row[0];
        row[0] = i + 1;
        for (j, hw) in h.iter().enumerate() {
            let substitution = prev_diag + usize::from(rw != hw);
            prev_diag = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[h.len()] as f64 / r.len().max(1) as f64
}

/// The process-wide ONNX Runtime environment on the cached library (one per process).
pub fn onnx_environment() -> ort::environment::Environment {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let lib = real_model("onnxruntime", "libonnxruntime.so.1.32.0");
        ort::init_from(&lib)
            .expect("ONNX Runtime loads")
            .build()
            .expect("one environment")
    })
    .clone()
}

/// Writes 16 kHz mono f32 samples as a 16-bit WAV.
pub fn write_wav_16k(path: &Path, samples: &[f32]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
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

/// f32 samples as little-endian PCM16 bytes (the WebSocket transport's format).
pub fn pcm16(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
        .collect()
}

/// A `/ws` session on the server at `addr` (host:port), its hello for 16 kHz audio sent.
pub async fn ws_hello_16k(addr: &str) -> WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connects");
    ws.send(Message::Text(
        r#"{"type":"hello","sample_rate":16000}"#.into(),
    ))
    .await
    .expect("hello sent");
    ws
}

/// The sending half of a [`ws_hello_16k`] session.
pub type WsSink = futures_util::stream::SplitSink<
    WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// Speaks `audio` (16 kHz) into a `/ws` session as a caller would: 20 ms PCM16 frames in real
/// time. Stops early if the server closes the session.
pub async fn speak_in_real_time(tx: &mut WsSink, audio: &[f32]) {
    let start = std::time::Instant::now();
    for (i, frame) in audio.chunks(320).enumerate() {
        let due = start + std::time::Duration::from_millis(20 * i as u64);
        tokio::time::sleep_until(due.into()).await;
        if tx.send(Message::Binary(pcm16(frame).into())).await.is_err() {
            break;
        }
    }
}

/// Reads a 16-bit PCM WAV as f32 in [-1, 1].
pub fn read_wav_f32(path: &Path) -> Vec<f32> {
    let mut reader = hound::WavReader::open(path).expect("a readable WAV");
    reader
        .samples::<i16>()
        .map(|s| s.expect("valid sample") as f32 / 32768.0)
        .collect()
}

/// Lower-case words without punctuation, for comparing transcripts.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The server process; killed when dropped.
pub struct Server {
    child: std::process::Child,
    /// host:port the server listens on.
    pub addr: String,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGINT (Ctrl-C) and waits up to `timeout` for the server to exit: its exit status,
    /// or `None` if it is still running.
    pub fn interrupt(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -INT failed");
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("the server can be waited for") {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// As [`start_server`], with the server's log (stderr) written to `log` and `RUST_LOG` set to
/// `filter`: for tests that read what the server logged.
pub fn start_server_logging(extra: &[&str], log: &Path, filter: &str) -> Server {
    let log = std::fs::File::create(log).expect("the log file is created");
    let child = Command::new(talkline_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", filter)
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("talkline serve starts");
    serving(child)
}

/// The server once it printed the address it serves on.
fn serving(mut child: std::process::Child) -> Server {
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("the address line");
    let addr = line
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Server { child, addr }
}

/// Starts `talkline serve` on 127.0.0.1:0 and waits for its address (served over HTTP, or
/// HTTPS when `extra` configures TLS).
pub fn start_server(extra: &[&str]) -> Server {
    let child = Command::new(talkline_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("talkline serve starts");
    serving(child)
}

/// A `talkline.toml` in `dir` selecting the lab-results agent over `examples/patients`, with the
/// audit log in `dir`. Returns the config's path and the audit log's.
pub fn lab_results_config(dir: &Path) -> (PathBuf, PathBuf) {
    let patients = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/patients");
    let audit = dir.join("audit.jsonl");
    let config = dir.join("talkline.toml");
    let toml = format!(
        "[agent]\nkind = \"lab-results\"\n[agent.lab_results]\npatients = {:?}\naudit_log = {:?}\n",
        patients.display().to_string(),
        audit.display().to_string()
    );
    std::fs::write(&config, toml).expect("the config is written");
    (config, audit)
}

/// G.711 μ-law, written out here independently of the server's codec, for the telephony tests.
pub fn mulaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(32_635) + 0x84;
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) | mantissa) as u8
}

pub fn unmulaw(byte: u8) -> i16 {
    let u = !byte;
    let magnitude = ((((u & 0x0F) as i32) << 3) + 0x84) << ((u >> 4) & 0x07);
    let v = magnitude - 0x84;
    (if u & 0x80 != 0 { -v } else { v }) as i16
}
