//! The report folder: `report.json` (every turn and every summary), `report.md` (the tables),
//! `cdf.svg` (latency CDF per stage) and `sweep.svg` (p50/p95 against concurrent sessions).

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::analyze::{percentile, TurnRecord};
use super::svg::{cdf_points, line_chart, Series, XAxis};

/// The stages in report order: (key in [`TurnRecord`] / baselines, label).
pub const STAGES: &[(&str, &str)] = &[
    ("asr_final_ms", "end of speech -> ASR final"),
    ("llm_first_token_ms", "-> LLM first token"),
    ("tts_first_audio_ms", "-> TTS first audio"),
    ("v2v_ms", "-> first audio at the client (voice-to-voice)"),
];

#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub max: Option<f64>,
}

impl Dist {
    pub fn of(values: &[f64]) -> Self {
        Dist {
            n: values.len(),
            p50: percentile(values, 50.0),
            p95: percentile(values, 95.0),
            max: values.iter().copied().reduce(f64::max),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub sessions: usize,
    pub turns_spoken: usize,
    pub turns_answered: usize,
    pub stages: std::collections::BTreeMap<String, Dist>,
    pub server_v2v_ms: Dist,
    pub barge_in_stop_ms: Dist,
    pub barge_in_clear_ms: Dist,
    pub speculative_hit: usize,
    pub speculative_miss: usize,
    pub speculative_none: usize,
    /// p95 voice-to-voice counting an unanswered turn as infinitely late: what the budget is
    /// checked against.
    pub v2v_p95_for_budget_ms: Option<f64>,
    pub over_budget: bool,
    pub max_send_lag_ms: f64,
    pub session_errors: Vec<String>,
}

pub fn values(turns: &[TurnRecord], key: &str) -> Vec<f64> {
    turns
        .iter()
        .filter_map(|t| match key {
            "asr_final_ms" => t.asr_final_ms,
            "llm_first_token_ms" => t.llm_first_token_ms,
            "tts_first_audio_ms" => t.tts_first_audio_ms,
            "v2v_ms" => t.v2v_ms,
            "server_v2v_ms" => t.server_v2v_ms,
            "barge_in_stop_ms" => t.barge_in_stop_ms,
            "barge_in_clear_ms" => t.barge_in_clear_ms,
            _ => None,
        })
        .collect()
}

pub fn level(
    sessions: usize,
    turns: &[TurnRecord],
    budget_ms: f64,
    max_send_lag_ms: f64,
    session_errors: Vec<String>,
) -> Level {
    let count = |s: &str| {
        turns
            .iter()
            .filter(|t| t.speculative.as_deref() == Some(s))
            .count()
    };
    let mut for_budget: Vec<f64> = turns
        .iter()
        .map(|t| t.v2v_ms.unwrap_or(f64::INFINITY))
        .collect();
    for_budget.sort_by(f64::total_cmp);
    let p95 = if for_budget.is_empty() {
        None
    } else {
        // Nearest rank, so that an unanswered turn (infinite) can push it over.
        let k = ((for_budget.len() as f64 * 0.95).ceil() as usize).clamp(1, for_budget.len());
        Some(for_budget[k - 1])
    };
    Level {
        sessions,
        turns_spoken: turns.len(),
        turns_answered: turns.iter().filter(|t| t.v2v_ms.is_some()).count(),
        stages: STAGES
            .iter()
            .map(|(k, _)| (k.to_string(), Dist::of(&values(turns, k))))
            .collect(),
        server_v2v_ms: Dist::of(&values(turns, "server_v2v_ms")),
        barge_in_stop_ms: Dist::of(&values(turns, "barge_in_stop_ms")),
        barge_in_clear_ms: Dist::of(&values(turns, "barge_in_clear_ms")),
        speculative_hit: count("hit"),
        speculative_miss: count("miss"),
        speculative_none: count("none"),
        v2v_p95_for_budget_ms: p95.filter(|v| v.is_finite()),
        over_budget: p95.is_none_or(|v| v > budget_ms) || !session_errors.is_empty(),
        max_send_lag_ms,
        session_errors,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.0}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

pub struct Context<'a> {
    pub title: String,
    /// Whether the transport carried the server's events; over SIP only audio arrives.
    pub events: bool,
    pub command: String,
    pub machine: String,
    pub budget_ms: f64,
    pub levels: &'a [Level],
    pub turns: &'a [TurnRecord],
    pub baselines: Option<&'a serde_json::Value>,
    pub pipecat_v2v: Option<&'a [f64]>,
}

/// Baseline values of one stage (all turns and repetitions).
fn baseline_values(b: &serde_json::Value, key: &str) -> Vec<f64> {
    b["turns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t[key].as_f64())
        .collect()
}

pub fn markdown(c: &Context) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}\n", c.title);
    let _ = writeln!(s, "Command: `{}`  \nMachine: {}\n", c.command, c.machine);
    let _ = writeln!(
        s,
        "All times in ms after the user's **true** end of speech (the last sample above 0.1% of \
         full scale in the clip sent). Stage times come from the server's `turn` events, moved \
         onto the true end of speech; voice-to-voice is measured at the client: the arrival of the \
         first agent frame with a sample above 1% of full scale.\n"
    );
    if !c.events {
        let _ = writeln!(
            s,
            "This transport carries audio only (SIP: G.711 RTP at 8 kHz, no event channel): the \
             per-stage server times, speculative hits, the server's own voice-to-voice and the \
             `clear` time are not observable per turn and are n/a, not estimated. Voice-to-voice \
             and barge-in stop come from the agent's RTP alone.\n"
        );
    }
    let Some(first) = c.levels.first() else {
        s.push_str("No measurement.\n");
        return s;
    };
    let _ = writeln!(
        s,
        "## {} concurrent session(s): {} turns spoken, {} answered\n",
        first.sessions, first.turns_spoken, first.turns_answered
    );
    let with_base = c.baselines.is_some();
    if with_base {
        s.push_str("| stage | n | p50 | p95 | max | baseline p50 | baseline p95 | ratio p50 | ratio p95 |\n|---|---|---|---|---|---|---|---|---|\n");
    } else {
        s.push_str("| stage | n | p50 | p95 | max |\n|---|---|---|---|---|\n");
    }
    for (key, label) in STAGES {
        let d = &first.stages[*key];
        let _ = write!(
            s,
            "| {label} | {} | {} | {} | {} |",
            d.n,
            ms(d.p50),
            ms(d.p95),
            ms(d.max)
        );
        if let Some(b) = c.baselines {
            // The in-process cascade has no transport: its voice-to-voice is its first audio.
            let bkey = if *key == "v2v_ms" {
                "tts_first_audio_ms"
            } else {
                key
            };
            let bd = Dist::of(&baseline_values(b, bkey));
            let _ = write!(
                s,
                " {} | {} | {} | {} |",
                ms(bd.p50),
                ms(bd.p95),
                ratio(d.p50, bd.p50),
                ratio(d.p95, bd.p95)
            );
        }
        s.push('\n');
    }
    if with_base {
        s.push_str("\nRatios are talkline / baseline (below 1: talkline is faster). The baseline's voice-to-voice row is its in-process first audio, with no transport: a lower bound for that pipeline.\n");
    }
    let sv = &first.server_v2v_ms;
    let _ = writeln!(
        s,
        "\nServer-side voice-to-voice (its VAD end of speech -> its first frame out): p50 {} / p95 {} ms (n {}).",
        ms(sv.p50), ms(sv.p95), sv.n
    );
    let spec_total = first.speculative_hit + first.speculative_miss + first.speculative_none;
    let _ = writeln!(
        s,
        "Speculative replies: {} hit, {} miss, {} not speculative; hit rate {} of {} replies.",
        first.speculative_hit,
        first.speculative_miss,
        first.speculative_none,
        if spec_total > 0 {
            format!(
                "{:.0}%",
                100.0 * first.speculative_hit as f64 / spec_total as f64
            )
        } else {
            "n/a".into()
        },
        spec_total
    );
    let (b, cl) = (&first.barge_in_stop_ms, &first.barge_in_clear_ms);
    if b.n > 0 || cl.n > 0 {
        let _ = writeln!(
            s,
            "Barge-in stop (user speech start -> last audible agent frame at the client): p50 {} / p95 {} / max {} ms (n {}); -> `clear` event: p50 {} / p95 {} ms. This includes the turn manager's minimum speech duration.",
            ms(b.p50), ms(b.p95), ms(b.max), b.n, ms(cl.p50), ms(cl.p95)
        );
    }
    let _ = writeln!(
        s,
        "Harness: worst frame sent {:.1} ms late.",
        first.max_send_lag_ms
    );
    if !first.session_errors.is_empty() {
        let _ = writeln!(
            s,
            "\n**Session errors:** {}",
            first.session_errors.join("; ")
        );
    }
    if let Some(pc) = c.pipecat_v2v {
        let d = Dist::of(pc);
        let v = &first.stages["v2v_ms"];
        let _ = writeln!(
            s,
            "\n**Pipecat anchor** (pipecat-ai 1.14 defaults: faster-whisper tiny.en, SmolLM2-135M Q4_1 behind llama-cpp-python's server, Piper joe; its own 3-question espeak-ng audio; measured in this run, after talkline's server was stopped): voice-to-voice p50 {} / p95 {} ms (n {}); talkline / Pipecat: p50 {}, p95 {}.",
            ms(d.p50), ms(d.p95), d.n, ratio(v.p50, d.p50), ratio(v.p95, d.p95)
        );
    }
    {
        let _ = writeln!(
            s,
            "\n## Concurrent sessions (budget: p95 voice-to-voice <= {:.0} ms)\n",
            c.budget_ms
        );
        s.push_str("| sessions | turns answered | v2v p50 | v2v p95 | ASR p95 | LLM 1st tok p95 | TTS 1st audio p95 | spec. hit rate | within budget |\n|---|---|---|---|---|---|---|---|---|\n");
        for l in c.levels {
            let st = |k: &str| &l.stages[k];
            let total = l.speculative_hit + l.speculative_miss + l.speculative_none;
            let _ = writeln!(
                s,
                "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
                l.sessions,
                l.turns_answered,
                l.turns_spoken,
                ms(st("v2v_ms").p50),
                ms(st("v2v_ms").p95),
                ms(st("asr_final_ms").p95),
                ms(st("llm_first_token_ms").p95),
                ms(st("tts_first_audio_ms").p95),
                if total > 0 {
                    format!("{:.0}%", 100.0 * l.speculative_hit as f64 / total as f64)
                } else {
                    "n/a".into()
                },
                if l.over_budget { "no" } else { "yes" }
            );
        }
        for l in c
            .levels
            .iter()
            .skip(1)
            .filter(|l| !l.session_errors.is_empty())
        {
            let _ = writeln!(
                s,
                "\n{} sessions: errors: {}",
                l.sessions,
                l.session_errors.join("; ")
            );
        }
    }
    if let Some(b) = c.baselines {
        let _ = writeln!(
            s,
            "\n## Baselines (measured in this run, after the server was stopped)\n\n{}\n\nVersions: {}\n\n| baseline stage (compute only) | p50 | p95 |\n|---|---|---|",
            b["method"].as_str().unwrap_or(""),
            b["versions"]
        );
        for (k, label) in [
            ("asr_decode_ms", "faster-whisper decode of the utterance"),
            ("llm_ttft_ms", "llama.cpp time to first token"),
            (
                "llm_first_clause_ms",
                "llama.cpp time to the end of the first clause",
            ),
            (
                "tts_first_audio_compute_ms",
                "piper-tts first audio of the first clause",
            ),
        ] {
            let d = Dist::of(&baseline_values(b, k));
            let _ = writeln!(s, "| {label} | {} | {} |", ms(d.p50), ms(d.p95));
        }
    }
    s.push_str("\n## Turns\n\n| sessions | session | rep | turn | barge-in | ASR final | LLM 1st tok | TTS 1st audio | v2v | spec. | stop | user text (as heard) | agent |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for t in c.turns {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.level,
            t.session,
            t.rep,
            t.turn,
            if t.barge_in { "yes" } else { "" },
            ms(t.asr_final_ms),
            ms(t.llm_first_token_ms),
            ms(t.tts_first_audio_ms),
            ms(t.v2v_ms),
            t.speculative.as_deref().unwrap_or("n/a"),
            ms(t.barge_in_stop_ms),
            table_cell(t.user_text.as_deref().unwrap_or("")),
            table_cell(t.agent_text.as_deref().unwrap_or(""))
                .chars()
                .take(80)
                .collect::<String>()
        );
    }
    s
}

pub fn write_plots(dir: &Path, c: &Context) -> anyhow::Result<()> {
    let Some(first) = c.levels.first() else {
        return Ok(());
    };
    let turns: Vec<TurnRecord> = c
        .turns
        .iter()
        .filter(|t| t.level == first.sessions)
        .cloned()
        .collect();
    let mut series: Vec<Series> = STAGES
        .iter()
        .map(|(k, label)| Series {
            name: label.trim_start_matches("-> ").chars().take(24).collect(),
            points: cdf_points(&values(&turns, k)),
            dashed: false,
        })
        .collect();
    if let Some(b) = c.baselines {
        series.push(Series {
            name: "baseline 1st audio".into(),
            points: cdf_points(&baseline_values(b, "tts_first_audio_ms")),
            dashed: true,
        });
    }
    std::fs::write(
        dir.join("cdf.svg"),
        line_chart(
            &format!("Latency CDF per stage, {} session(s)", first.sessions),
            "ms after the true end of speech",
            "fraction of turns",
            &series,
            true,
            XAxis::Round,
            Some(1.0),
        ),
    )?;
    let pts = |f: &dyn Fn(&Level) -> Option<f64>| -> Vec<(f64, f64)> {
        c.levels
            .iter()
            .filter_map(|l| f(l).map(|v| (l.sessions as f64, v)))
            .collect()
    };
    let mut sweep = vec![
        Series {
            name: "v2v p50".into(),
            points: pts(&|l| l.stages["v2v_ms"].p50),
            dashed: false,
        },
        Series {
            name: "v2v p95".into(),
            points: pts(&|l| l.stages["v2v_ms"].p95),
            dashed: false,
        },
        Series {
            name: "ASR final p95".into(),
            points: pts(&|l| l.stages["asr_final_ms"].p95),
            dashed: true,
        },
        Series {
            name: "LLM 1st token p95".into(),
            points: pts(&|l| l.stages["llm_first_token_ms"].p95),
            dashed: true,
        },
    ];
    let max_sessions = c.levels.iter().map(|l| l.sessions).max().unwrap_or(1) as f64;
    sweep.push(Series {
        name: format!("budget {:.0} ms", c.budget_ms),
        points: vec![(0.0, c.budget_ms), (max_sessions, c.budget_ms)],
        dashed: true,
    });
    std::fs::write(
        dir.join("sweep.svg"),
        line_chart(
            "Voice-to-voice against concurrent sessions",
            "concurrent sessions",
            "ms after the true end of speech",
            &sweep,
            false,
            XAxis::Integer,
            None,
        ),
    )?;
    Ok(())
}

/// Text fit for one Markdown table cell: no pipes, no line breaks (LLM answers have both).
fn table_cell(text: &str) -> String {
    text.replace('|', "/")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
