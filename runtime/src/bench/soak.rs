//! Soak mode (`talkline bench --soak-minutes M --sessions N`): N callers speak the scenario over
//! and over for M minutes. Each minute is a window: calls completed and failed, voice-to-voice
//! p50/p95 of its turns, and the server's resident memory at its end. The verdict: no failed
//! call, resident memory flat after warm-up (the last window within 5% of the end of warm-up:
//! the first tenth of the run, at least two minutes), and p95 voice-to-voice stable (the second
//! half's within 20% of the first half's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use super::analyze::{self, percentile, TurnRecord};
use super::client::{self, DriveOptions, SessionLog};
use super::scenario::TurnAudio;

/// Finished calls waiting for the collector. Policy when full: the caller waits (a soak run
/// loses no measurement; the collector only appends).
const FINISHED_QUEUE: usize = 256;
/// One window of the report.
const WINDOW: Duration = Duration::from_secs(60);
/// How often the server's resident memory is read. One reading a minute is noise: it swings by
/// a session's worth (its KV cache, Whisper state) with where the calls happen to be, so each
/// window reports the median of a dozen readings, and their range.
const RSS_SAMPLE: Duration = Duration::from_secs(5);
/// Resident memory may grow this much (last window over first) and still count as flat.
pub const RSS_GROWTH_LIMIT: f64 = 0.05;
/// The second half's p95 voice-to-voice may exceed the first half's by this much.
pub const P95_DRIFT_LIMIT: f64 = 0.20;

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub minute: usize,
    pub calls: usize,
    pub failed_calls: usize,
    pub turns_answered: usize,
    pub v2v_p50_ms: Option<f64>,
    pub v2v_p95_ms: Option<f64>,
    /// The median of the server's VmRSS readings in the window, MiB (`None` for a server not
    /// started here).
    pub server_rss_mib: Option<f64>,
    pub server_rss_min_mib: Option<f64>,
    pub server_rss_max_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Soak {
    pub sessions: usize,
    pub minutes: usize,
    pub windows: Vec<Window>,
    pub calls: usize,
    pub failed_calls: usize,
    /// Why each failed call failed.
    pub failures: Vec<String>,
    /// Windows counted as warm-up (allocator arenas, caches, the first sessions' pools).
    pub warm_up_windows: usize,
    /// Last window's RSS over the last warm-up window's, minus one.
    pub rss_growth: Option<f64>,
    pub v2v_p95_first_half_ms: Option<f64>,
    pub v2v_p95_second_half_ms: Option<f64>,
    pub passed: bool,
}

/// One finished call: its session, when it ended, what it recorded.
struct Finished {
    session: usize,
    rep: usize,
    log: SessionLog,
}

/// Runs the soak against `addr`; `server_pid` is read for resident memory.
pub async fn run(
    addr: &str,
    turns: Arc<Vec<TurnAudio>>,
    sessions: usize,
    minutes: usize,
    stagger: Duration,
    opts: &DriveOptions,
    server_pid: Option<u32>,
) -> Soak {
    let start = Instant::now();
    let end = start + WINDOW * minutes as u32;
    let (finished_tx, mut finished) = mpsc::channel::<Finished>(FINISHED_QUEUE);
    let mut callers = tokio::task::JoinSet::new();
    for session in 0..sessions {
        let (addr, turns, opts, tx) = (
            addr.to_string(),
            turns.clone(),
            opts.clone(),
            finished_tx.clone(),
        );
        callers.spawn(async move {
            tokio::time::sleep(stagger * session as u32).await;
            let mut rep = 0;
            while Instant::now() < end {
                let log = client::drive(&addr, turns.clone(), opts.clone()).await;
                if tx.send(Finished { session, rep, log }).await.is_err() {
                    return;
                }
                rep += 1;
            }
        });
    }
    drop(finished_tx);

    let mut windows = Vec::new();
    let mut failures = Vec::new();
    let mut all_v2v: Vec<(f64, f64)> = Vec::new();
    let mut current = WindowAcc::default();
    let mut window_end = start + WINDOW;
    let mut sample = tokio::time::interval(RSS_SAMPLE);
    loop {
        let got = tokio::select! {
            got = tokio::time::timeout_at(window_end.into(), finished.recv()) => got,
            _ = sample.tick() => {
                current.rss.extend(server_pid.and_then(rss_mib));
                continue;
            }
        };
        match got {
            Ok(Some(call)) => {
                let at = start.elapsed().as_secs_f64();
                let records = analyze::turns(&call.log, sessions, call.session, call.rep);
                let failure = failure(&call.log, &records);
                if let Some(why) = &failure {
                    failures.push(format!("session {} call {}: {why}", call.session, call.rep));
                }
                current.add(&records, failure.is_some());
                all_v2v.extend(records.iter().filter_map(|r| r.v2v_ms).map(|v| (at, v)));
            }
            Ok(None) => {
                windows.push(current.close(windows.len() + 1));
                break;
            }
            Err(_) => {
                windows.push(current.close(windows.len() + 1));
                current = WindowAcc::default();
                window_end += WINDOW;
                eprintln!("bench: soak {}", summary_line(windows.last()));
            }
        }
    }
    while callers.join_next().await.is_some() {}
    verdict(sessions, minutes, windows, failures, &all_v2v)
}

/// Why a call counts as failed: the caller's error, or a turn (not a barge-in) never answered.
fn failure(log: &SessionLog, records: &[TurnRecord]) -> Option<String> {
    if let Some(e) = &log.error {
        return Some(e.clone());
    }
    let unanswered = records
        .iter()
        .filter(|r| !r.barge_in && r.v2v_ms.is_none())
        .count();
    (unanswered > 0).then(|| format!("{unanswered} turn(s) unanswered"))
}

#[derive(Default)]
struct WindowAcc {
    calls: usize,
    failed: usize,
    answered: usize,
    v2v: Vec<f64>,
    rss: Vec<f64>,
}

impl WindowAcc {
    fn add(&mut self, records: &[TurnRecord], failed: bool) {
        self.calls += 1;
        self.failed += usize::from(failed);
        let v2v: Vec<f64> = records.iter().filter_map(|r| r.v2v_ms).collect();
        self.answered += v2v.len();
        self.v2v.extend(v2v);
    }

    fn close(&self, minute: usize) -> Window {
        Window {
            minute,
            calls: self.calls,
            failed_calls: self.failed,
            turns_answered: self.answered,
            v2v_p50_ms: percentile(&self.v2v, 50.0),
            v2v_p95_ms: percentile(&self.v2v, 95.0),
            server_rss_mib: percentile(&self.rss, 50.0),
            server_rss_min_mib: self.rss.iter().copied().reduce(f64::min),
            server_rss_max_mib: self.rss.iter().copied().reduce(f64::max),
        }
    }
}

fn summary_line(w: Option<&Window>) -> String {
    let Some(w) = w else {
        return String::new();
    };
    format!(
        "minute {}: {} calls, {} failed, v2v p50 {:?} p95 {:?} ms, RSS median {:?} MiB",
        w.minute,
        w.calls,
        w.failed_calls,
        w.v2v_p50_ms.map(f64::round),
        w.v2v_p95_ms.map(f64::round),
        w.server_rss_mib.map(f64::round)
    )
}

/// VmRSS of a process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn verdict(
    sessions: usize,
    minutes: usize,
    windows: Vec<Window>,
    failures: Vec<String>,
    v2v: &[(f64, f64)],
) -> Soak {
    // Growth is measured from the end of warm-up; a run too short to have both is not judged.
    let warm_up_windows = (minutes / 10).max(2);
    let rss: Vec<f64> = windows.iter().filter_map(|w| w.server_rss_mib).collect();
    let rss_growth = match (rss.get(warm_up_windows - 1), rss.last()) {
        (Some(warm), Some(last)) if rss.len() > warm_up_windows && *warm > 0.0 => {
            Some(last / warm - 1.0)
        }
        _ => None,
    };
    let half = minutes as f64 * WINDOW.as_secs_f64() / 2.0;
    let first: Vec<f64> = v2v
        .iter()
        .filter(|(t, _)| *t < half)
        .map(|(_, v)| *v)
        .collect();
    let second: Vec<f64> = v2v
        .iter()
        .filter(|(t, _)| *t >= half)
        .map(|(_, v)| *v)
        .collect();
    let (p95_first, p95_second) = (percentile(&first, 95.0), percentile(&second, 95.0));
    let calls = windows.iter().map(|w| w.calls).sum();
    let failed_calls = windows.iter().map(|w| w.failed_calls).sum();
    let rss_flat = rss_growth.is_some_and(|g| g <= RSS_GROWTH_LIMIT);
    let p95_stable = match (p95_first, p95_second) {
        (Some(a), Some(b)) => b <= a * (1.0 + P95_DRIFT_LIMIT),
        _ => false,
    };
    Soak {
        sessions,
        minutes,
        windows,
        calls,
        failed_calls,
        failures,
        warm_up_windows,
        rss_growth,
        v2v_p95_first_half_ms: p95_first,
        v2v_p95_second_half_ms: p95_second,
        passed: failed_calls == 0 && calls > 0 && rss_flat && p95_stable,
    }
}

/// The soak report in Markdown.
pub fn markdown(soak: &Soak, title: &str, command: &str, machine: &str) -> String {
    let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0}"));
    let mut md = format!(
        "# {title}\n\n`{command}`\n\n{machine}\n\n\
         {} concurrent session(s) for {} minute(s): **{} calls, {} failed**; \
         server RSS growth after {} minute(s) of warm-up {}; p95 voice-to-voice {} ms in the first half, \
         {} ms in the second. Verdict: **{}** (no failed call, RSS within {:.0}%, p95 within \
         {:.0}%).\n\n| minute | calls | failed | turns answered | v2v p50 | v2v p95 | server RSS MiB, \
         median (min-max) |\n|---|---|---|---|---|---|---|\n",
        soak.sessions,
        soak.minutes,
        soak.calls,
        soak.failed_calls,
        soak.warm_up_windows,
        soak.rss_growth
            .map_or("n/a".into(), |g| format!("{:+.1}%", g * 100.0)),
        ms(soak.v2v_p95_first_half_ms),
        ms(soak.v2v_p95_second_half_ms),
        if soak.passed { "pass" } else { "fail" },
        RSS_GROWTH_LIMIT * 100.0,
        P95_DRIFT_LIMIT * 100.0,
    );
    for w in &soak.windows {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            w.minute,
            w.calls,
            w.failed_calls,
            w.turns_answered,
            ms(w.v2v_p50_ms),
            ms(w.v2v_p95_ms),
            match (w.server_rss_mib, w.server_rss_min_mib, w.server_rss_max_mib) {
                (Some(m), Some(lo), Some(hi)) => format!("{m:.0} ({lo:.0}-{hi:.0})"),
                _ => "n/a".into(),
            }
        );
    }
    if !soak.failures.is_empty() {
        md += "\n## Failed calls\n\n";
        for f in &soak.failures {
            md += &format!("- {f}\n");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(minute: usize, rss: f64, failed: usize) -> Window {
        Window {
            minute,
            calls: 3,
            failed_calls: failed,
            turns_answered: 9,
            v2v_p50_ms: Some(800.0),
            v2v_p95_ms: Some(900.0),
            server_rss_mib: Some(rss),
            server_rss_min_mib: Some(rss - 20.0),
            server_rss_max_mib: Some(rss + 20.0),
        }
    }

    fn steady(minutes: usize) -> Vec<(f64, f64)> {
        (0..minutes * 6).map(|i| (i as f64 * 10.0, 850.0)).collect()
    }

    #[test]
    fn a_flat_soak_with_no_failures_passes() {
        let soak = verdict(
            2,
            3,
            vec![
                window(1, 380.0, 0),
                window(2, 400.0, 0),
                window(3, 410.0, 0),
            ],
            vec![],
            &steady(3),
        );
        assert!(soak.passed, "{soak:?}");
        assert_eq!(soak.calls, 9);
        // From the end of warm-up (minute 2), not from the first minute.
        assert!((soak.rss_growth.unwrap() - 0.025).abs() < 1e-9);
    }

    #[test]
    fn growing_memory_a_failed_call_or_a_drifting_p95_fail_it() {
        let grew = verdict(
            2,
            3,
            vec![
                window(1, 400.0, 0),
                window(2, 400.0, 0),
                window(3, 440.0, 0),
            ],
            vec![],
            &steady(3),
        );
        assert!(!grew.passed);
        let failed = verdict(
            2,
            3,
            vec![
                window(1, 400.0, 0),
                window(2, 400.0, 1),
                window(3, 400.0, 0),
            ],
            vec!["x".into()],
            &steady(3),
        );
        assert!(!failed.passed);
        let mut drift = steady(3);
        for (t, v) in &mut drift {
            if *t >= 90.0 {
                *v = 1200.0;
            }
        }
        let drifted = verdict(
            2,
            3,
            vec![
                window(1, 400.0, 0),
                window(2, 400.0, 0),
                window(3, 400.0, 0),
            ],
            vec![],
            &drift,
        );
        assert!(!drifted.passed);
    }
}
