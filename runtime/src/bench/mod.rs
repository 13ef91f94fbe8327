//! `talkline bench`: the latency benchmark. Starts the real `talkline serve`, drives it over a
//! real transport (WebSocket, WebRTC or SIP) with scripted callers speaking a scenario in real
//! time (1..N at once), measures every turn from the true end of speech, compares with baselines
//! measured in the same run, and writes a report folder (JSON, Markdown, SVG plots).
//!
//! - `scenario.rs`: the TOML scenario and its audio (espeak-ng + sox, trimmed to the speech);
//! - `client.rs`: one caller, paced by the clock, reacting to the agent (waits, barges in);
//! - `link.rs`, `sip_link.rs`: the caller's connection, per transport;
//! - `analyze.rs`: a caller's log -> per-turn latencies;
//! - `baselines.rs`: faster-whisper, llama-cpp-python and piper-tts (and the Pipecat anchor);
//! - `report.rs`, `svg.rs`: the report and its plots.

mod analyze;
mod baselines;
mod client;
mod link;
mod report;
mod scenario;
mod sip_link;
mod soak;
mod svg;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use crate::config::Config;
use crate::models::ModelStore;
use analyze::TurnRecord;
use client::DriveOptions;
use scenario::{Scenario, TurnAudio};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenario file (TOML, see benches/scenarios/). Default: benches/scenarios/clinic.toml.
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Harness check for CI: a built-in two-turn scenario, one session, no warm-up, no
    /// baselines, no sweep.
    #[arg(long)]
    pub quick: bool,
    /// Report folder. Default: target/bench/<UTC date-time>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Concurrent sessions (without --sweep).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Sweep concurrent sessions 1, 2, 3, ... until p95 voice-to-voice exceeds --budget-ms or
    /// --max-sessions is reached.
    #[arg(long)]
    pub sweep: bool,
    /// The p95 voice-to-voice budget (ms) that ends the sweep.
    #[arg(long, default_value_t = 1500.0)]
    pub budget_ms: f64,
    /// Most concurrent sessions the sweep tries.
    #[arg(long, default_value_t = 6)]
    pub max_sessions: usize,
    /// Times each session speaks the whole scenario, per level.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// Delay between the starts of concurrent sessions (ms), so that callers do not speak in
    /// lockstep.
    #[arg(long, default_value_t = 700)]
    pub stagger_ms: u64,
    /// Longest wait for a reply before a caller moves on (ms).
    #[arg(long, default_value_t = 15_000)]
    pub reply_timeout_ms: u64,
    /// Also measure faster-whisper, llama-cpp-python and piper-tts on the same clips, models and
    /// threads (a Python venv is created on first use; see --venv).
    #[arg(long)]
    pub baselines: bool,
    /// Repetitions of the baseline conversation.
    #[arg(long, default_value_t = 3)]
    pub baseline_reps: usize,
    /// Python venv for the baselines, created and filled with pip when missing. Default:
    /// <model cache>/bench-venv.
    #[arg(long, value_name = "DIR")]
    pub venv: Option<PathBuf>,
    /// Also run the Pipecat anchor end to end (slow): its folder, e.g. ../shared/anchors/pipecat.
    #[arg(long, value_name = "DIR")]
    pub pipecat: Option<PathBuf>,
    /// Working folder of the Pipecat anchor (its venv and models are kept there between runs).
    #[arg(long, value_name = "DIR", default_value = "/tmp/pipecat-anchor/run")]
    pub pipecat_work: PathBuf,
    /// Measure a server already running at HOST:PORT instead of starting `talkline serve`
    /// (its configuration is then yours to match with --config). With `--transport sip` this
    /// is its SIP address (UDP, `serve --sip-listen`).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// How the callers reach the server: `websocket` (PCM16), `webrtc` (Opus over DTLS-SRTP,
    /// a webrtc-rs peer per caller) or `sip` (a SIP call over UDP per caller, PCMU RTP at
    /// 8 kHz; per-stage server times are not observable over SIP and are reported as n/a).
    #[arg(long, value_enum, default_value = "websocket")]
    pub transport: link::Transport,
    /// Soak mode: --sessions callers speak the scenario over and over for this many minutes;
    /// the report (soak.md, soak.json) has each minute's calls, failures, voice-to-voice p50/p95
    /// and the server's resident memory, and a verdict. No sweep or baselines.
    #[arg(long, value_name = "MINUTES")]
    pub soak_minutes: Option<usize>,
}

/// The server under test; killed when dropped.
struct ServerProcess {
    child: Child,
    addr: String,
    /// Its SIP listener (UDP), when started for SIP callers.
    sip: Option<String>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(
    config: Option<&Path>,
    max_sessions: usize,
    sip: bool,
    log: &Path,
) -> anyhow::Result<ServerProcess> {
    let exe = std::env::current_exe().context("finding the talkline binary")?;
    let mut cmd = Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--max-sessions"])
        .arg(max_sessions.to_string());
    let sip = if sip {
        // The server does not print its SIP port: take one that was free a moment ago. The SIP
        // socket is bound before the HTTP line below is printed, so a lost race fails the start.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .context("finding a free UDP port for SIP")?
            .port();
        let listen = format!("127.0.0.1:{port}");
        cmd.args(["--sip-listen", &listen]);
        Some(listen)
    } else {
        None
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting talkline serve")?;
    let Some(stdout) = child.stdout.take() else {
        bail!("talkline serve has no stdout");
    };
    let mut line = String::new();
    // The server prints its address once every model is loaded; EOF means it failed.
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| c == '/' || c.is_whitespace()).next())
        .filter(|a| !a.is_empty())
        .map(str::to_owned);
    let mut server = ServerProcess {
        child,
        addr: String::new(),
        sip,
    };
    match addr {
        Some(a) => server.addr = a,
        None => {
            let err = std::fs::read_to_string(log).unwrap_or_default();
            bail!("talkline serve did not start: {}", err.trim());
        }
    }
    Ok(server)
}

/// Runs `sessions` callers at once, each `reps` times; returns their turns, worst send lag and
/// errors.
async fn run_level(
    addr: &str,
    turns: Arc<Vec<TurnAudio>>,
    sessions: usize,
    reps: usize,
    stagger: Duration,
    opts: &DriveOptions,
) -> (Vec<TurnRecord>, f64, Vec<String>) {
    let mut set = tokio::task::JoinSet::new();
    for session in 0..sessions {
        let (addr, turns, opts) = (addr.to_string(), turns.clone(), opts.clone());
        set.spawn(async move {
            tokio::time::sleep(stagger * session as u32).await;
            let mut logs = Vec::new();
            for rep in 0..reps {
                logs.push((rep, client::drive(&addr, turns.clone(), opts.clone()).await));
            }
            (session, logs)
        });
    }
    let (mut records, mut lag, mut errors) = (Vec::new(), 0f64, Vec::new());
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => errors.push(format!("a caller task failed: {e}")),
        }
    }
    results.sort_by_key(|(s, _)| *s);
    for (session, logs) in results {
        for (rep, log) in logs {
            lag = lag.max(log.max_send_lag_ms);
            if let Some(e) = &log.error {
                errors.push(format!("session {session} rep {rep}: {e}"));
            }
            records.extend(analyze::turns(&log, sessions, session, rep));
        }
    }
    (records, lag, errors)
}

pub fn run(args: BenchArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let (config, config_source) = Config::load(config_path)?;
    let store = ModelStore::open_default()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench").join(utc_stamp()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (scenario, base) = if args.quick {
        (Scenario::quick(), PathBuf::from("."))
    } else {
        let path = args
            .scenario
            .clone()
            .unwrap_or_else(|| PathBuf::from("benches/scenarios/clinic.toml"));
        let base = path.parent().map_or(PathBuf::from("."), Path::to_path_buf);
        (Scenario::load(&path)?, base)
    };
    let turns = Arc::new(scenario.render(&base, &out.join("audio"))?);
    eprintln!(
        "bench: scenario {:?}, {} turns, over {}; report in {}",
        scenario.name,
        turns.len(),
        args.transport.name(),
        out.display()
    );
    let levels: Vec<usize> = if args.quick {
        vec![1]
    } else if args.sweep {
        (1..=args.max_sessions.max(1)).collect()
    } else {
        vec![args.sessions.max(1)]
    };
    let top = levels.iter().copied().max().unwrap_or(1);
    let opts = DriveOptions {
        reply_timeout_s: args.reply_timeout_ms as f64 / 1000.0,
        tail_s: 0.5,
        transport: args.transport,
    };
    let load_before = loadavg();
    let server = match &args.server {
        Some(_) => None,
        None => Some(start_server(
            config_path,
            top + 1,
            args.transport == link::Transport::Sip,
            &out.join("server.log"),
        )?),
    };
    let addr = match (&args.server, &server) {
        (Some(a), _) => a.clone(),
        (None, Some(ServerProcess { sip: Some(sip), .. })) => sip.clone(),
        (None, Some(s)) => s.addr.clone(),
        (None, None) => bail!("no server to measure"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stagger = Duration::from_millis(args.stagger_ms);
    if let Some(minutes) = args.soak_minutes.filter(|m| *m > 0) {
        let server_pid = server.as_ref().map(|s| s.child.id());
        let sessions = args.sessions.max(1);
        eprintln!("bench: soak, {sessions} session(s) for {minutes} minute(s)");
        let result = rt.block_on(soak::run(
            &addr, turns, sessions, minutes, stagger, &opts, server_pid,
        ));
        drop(server);
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let machine = format!(
            "{} cores, {}; load average {load_before} before, {} after; config: {config_source}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model(),
            loadavg()
        );
        let title = format!(
            "talkline soak: scenario \"{}\" over {}, {}",
            scenario.name,
            args.transport.name(),
            utc_stamp()
        );
        let md = soak::markdown(&result, &title, &command, &machine);
        std::fs::write(out.join("soak.md"), &md)?;
        std::fs::write(
            out.join("soak.json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        println!("{md}");
        println!("report: {}", out.display());
        anyhow::ensure!(
            result.passed,
            "the soak failed; see {}",
            out.join("soak.md").display()
        );
        return Ok(());
    }
    let (mut all_turns, mut done_levels) = (Vec::new(), Vec::new());
    rt.block_on(async {
        if !args.quick {
            // A deployed server is warm: one unrecorded caller speaks the first turn.
            let warm = Arc::new(turns.iter().take(1).cloned().collect::<Vec<_>>());
            let log = client::drive(&addr, warm, opts.clone()).await;
            if let Some(e) = log.error {
                eprintln!("bench: warm-up session: {e}");
            }
        }
        for &n in &levels {
            eprintln!("bench: {n} concurrent session(s)");
            let (turns_n, lag, errors) =
                run_level(&addr, turns.clone(), n, args.reps.max(1), stagger, &opts).await;
            let level = report::level(n, &turns_n, args.budget_ms, lag, errors);
            let v = &level.stages["v2v_ms"];
            eprintln!(
                "bench: {n} session(s): {}/{} turns answered, v2v p50 {:?} ms, p95 {:?} ms",
                level.turns_answered,
                level.turns_spoken,
                v.p50.map(f64::round),
                v.p95.map(f64::round)
            );
            let over = level.over_budget;
            all_turns.extend(turns_n);
            done_levels.push(level);
            if args.sweep && over {
                break;
            }
        }
    });
    drop(server);
    let load_after = loadavg();

    let mut baseline_error = None;
    let baselines = if args.baselines && !args.quick {
        let venv = args
            .venv
            .clone()
            .unwrap_or_else(|| store.root().join("bench-venv"));
        let python = baselines::ensure_venv(&venv)?;
        let clips: Vec<PathBuf> = turns
            .iter()
            .map(|t| std::fs::canonicalize(&t.path))
            .collect::<Result<_, _>>()?;
        eprintln!("bench: baselines (faster-whisper, llama-cpp-python, piper-tts)");
        // A failed baseline must not lose the measurement already made: the report says so.
        match baselines::run_stages(
            &python,
            &config,
            &store,
            &clips,
            args.baseline_reps.max(1),
            &out,
        ) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("bench: baselines failed: {e:#}");
                baseline_error = Some(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    let pipecat = match (&args.pipecat, args.quick) {
        (Some(anchor), false) => {
            eprintln!("bench: Pipecat anchor (slow)");
            match baselines::run_pipecat(
                anchor,
                &args.pipecat_work,
                args.reps.max(1),
                &out.join("pipecat.log"),
            ) {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("bench: Pipecat anchor failed: {e:#}");
                    baseline_error = Some(format!("Pipecat anchor: {e:#}"));
                    None
                }
            }
        }
        _ => None,
    };

    let command: Vec<String> = std::env::args().collect();
    let machine = format!(
        "{} cores, {}; load average {} before, {} after; config: {config_source}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        load_before,
        load_after
    );
    let ctx = report::Context {
        title: format!(
            "talkline bench: scenario \"{}\" over {}, {}",
            scenario.name,
            args.transport.name(),
            utc_stamp()
        ),
        events: args.transport.has_events(),
        command: command.join(" "),
        machine: machine.clone(),
        budget_ms: args.budget_ms,
        levels: &done_levels,
        turns: &all_turns,
        baselines: baselines.as_ref(),
        pipecat_v2v: pipecat.as_deref(),
    };
    let mut md = report::markdown(&ctx);
    if let Some(e) = &baseline_error {
        md.push_str(&format!("\n**Baselines failed:** {e}\n"));
    }
    std::fs::write(out.join("report.md"), &md)?;
    report::write_plots(&out, &ctx)?;
    let json = json!({
        "scenario": {
            "name": scenario.name,
            "description": scenario.description,
            "voice": scenario.voice,
            "turns": turns.iter().map(|t| json!({
                "label": t.label,
                "clip": t.path,
                "speech_s": (t.speech_end - t.speech_start) as f64 / scenario::RATE as f64,
                "pause_before_ms": t.pause_before_ms,
                "barge_in_after_ms": t.barge_in_after_ms,
            })).collect::<Vec<_>>(),
        },
        "transport": args.transport.name(),
        "command": command,
        "machine": machine,
        "budget_ms": args.budget_ms,
        "levels": done_levels,
        "turns": all_turns,
        "baselines": baselines,
        "baseline_error": baseline_error,
        "pipecat_v2v_ms": pipecat,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("{md}");
    println!("report: {}", out.display());
    // The report is written either way; the exit status says whether it measured anything (and,
    // for the CI check, whether every turn was answered).
    let answered = done_levels.iter().map(|l| l.turns_answered).sum::<usize>();
    let incomplete = done_levels
        .first()
        .is_some_and(|l| l.turns_answered < turns.len() || !l.session_errors.is_empty());
    if answered == 0 || (args.quick && incomplete) {
        bail!(
            "the harness did not measure every turn; see {}",
            out.join("report.md").display()
        );
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// YYYYmmdd-HHMMSS in UTC, without a date library (days-to-civil from Howard Hinnant).
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
