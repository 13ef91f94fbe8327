//! The baselines, measured in the same run: faster-whisper, llama-cpp-python and piper-tts on the
//! same clips, models and threads (`benches/baselines/stages.py`, embedded here so `talkline
//! bench` runs from any folder), and optionally the Pipecat anchor end to end.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::json;

use crate::config::{Config, LlmConfig};
use crate::models::ModelStore;

const STAGES_PY: &str = include_str!("../../../benches/baselines/stages.py");
/// Pinned so that a report names exactly what it was compared with. llama-cpp-python has no
/// binary wheel: pip builds it from source the first time (minutes), then from its wheel cache.
const PACKAGES: &[&str] = &[
    "faster-whisper==1.2.1",
    "llama-cpp-python==0.3.36",
    "piper-tts==1.8.0",
    "numpy",
];

/// Creates the venv when missing and installs the baseline packages into it.
pub fn ensure_venv(venv: &Path) -> anyhow::Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.is_file() {
        eprintln!("bench: creating the baseline venv {}", venv.display());
        status(Command::new("python3").args(["-m", "venv"]).arg(venv))
            .context("python3 -m venv (apt-get install python3-venv)")?;
    }
    let ready = Command::new(&python)
        .args(["-c", "import faster_whisper, llama_cpp, piper"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        eprintln!(
            "bench: pip install {} (first time only)",
            PACKAGES.join(" ")
        );
        status(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(PACKAGES),
        )
        .context("installing the baseline packages")?;
    }
    Ok(python)
}

/// Runs the per-stage baselines over `clips`; returns stages.py's JSON.
pub fn run_stages(
    python: &Path,
    config: &Config,
    store: &ModelStore,
    clips: &[PathBuf],
    reps: usize,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let model = |what: &str| {
        config
            .required_models(store)
            .into_iter()
            .find(|m| m.what == what)
            .map(|m| m.path)
            .with_context(|| format!("the configuration has no {what}"))
    };
    let llm_threads = match &config.llm {
        LlmConfig::Local { threads, .. } => *threads,
        LlmConfig::Openai { .. } => bail!("the LLM baseline needs [llm] backend = \"local\""),
    };
    let spec = json!({
        "clips": clips,
        "whisper_ct2": store.root().join("whisper-tiny.en/ct2"),
        "gguf": model("LLM model")?,
        "piper_onnx": model("TTS voice")?,
        "threads": {"asr": config.asr.threads.max(1), "llm": llm_threads.max(1), "tts": 1},
        "system_prompt": config.agent.system_prompt,
        "max_tokens": config.agent.max_reply_tokens,
        "endpoint_ms": config.vad.min_silence_s * 1000.0,
        "reps": reps,
    });
    let script = dir.join("stages.py");
    let spec_path = dir.join("baseline-spec.json");
    let out = dir.join("baselines.json");
    std::fs::write(&script, STAGES_PY)?;
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec)?)?;
    status(Command::new(python).arg(&script).arg(&spec_path).arg(&out))
        .context("the per-stage baselines failed")?;
    let text = std::fs::read_to_string(&out)?;
    serde_json::from_str(&text).context("baselines.json is not JSON")
}

/// Runs the Pipecat anchor (`run.sh` in `anchor`, default configuration) and returns its
/// voice-to-voice values in ms, from its own results file.
pub fn run_pipecat(
    anchor: &Path,
    work: &Path,
    reps: usize,
    log: &Path,
) -> anyhow::Result<Vec<f64>> {
    std::fs::create_dir_all(work)?;
    let before: Vec<PathBuf> = results_files(work);
    let log_file = std::fs::File::create(log)?;
    status(
        Command::new("bash")
            .arg(anchor.join("run.sh"))
            .env("WORK", work)
            .env("REPS", reps.to_string())
            .env("CONFIGS", "default")
            .stdout(log_file.try_clone()?)
            .stderr(log_file),
    )
    .with_context(|| format!("the Pipecat anchor failed; see {}", log.display()))?;
    let Some(newest) = results_files(work)
        .into_iter()
        .find(|p| !before.contains(p))
    else {
        bail!(
            "the Pipecat anchor wrote no results file in {}",
            work.display()
        );
    };
    let mut v2v = Vec::new();
    for line in std::fs::read_to_string(&newest)?.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for t in row["turns"].as_array().into_iter().flatten() {
            if let Some(ms) = t["v2v_ms"].as_f64() {
                v2v.push(ms);
            }
        }
    }
    Ok(v2v)
}

fn results_files(work: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(work)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("results-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    files.reverse();
    files
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let s = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !s.success() {
        bail!("{:?} exited with {s}", cmd.get_program());
    }
    Ok(())
}
