//! `talkline chat`: a text conversation with the configured LLM, streaming its tokens.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use talkline_llm::local::ms;
use talkline_llm::{CancelToken, GenerateParams, Message, ReplyStats, Sampling};

use crate::agent::lab_results::fhir::{self, PatientStore};
use crate::agent::lab_results::{open_audit, LabResults, LabResultsAgent};
use crate::agent::text::{Flow, TextConversation};
use crate::config::{AgentKind, Config};
use crate::models::ModelStore;
use crate::stages::DraftChoice;

/// `talkline chat` options.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// System prompt. Default: the model's own (its chat template decides).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Speculative decoding with this draft GGUF (it must share the model's vocabulary).
    #[arg(long, value_name = "MODEL", conflicts_with = "lookup")]
    pub draft: Option<PathBuf>,
    /// Speculative decoding with prompt lookup (n-grams from the conversation).
    #[arg(long)]
    pub lookup: bool,
    /// After each reply, print prompt tok/s, decode tok/s, time to first token and the draft
    /// acceptance rate (to stderr).
    #[arg(long)]
    pub stats: bool,
    /// Sampling temperature; 0 means greedy (deterministic).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens in one reply.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Inference threads (local backend). Default: `[llm] threads` from the config.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Send this message instead of reading stdin (repeatable: one turn each).
    #[arg(long, short = 'm', value_name = "TEXT")]
    pub message: Vec<String>,
    /// The agent to talk to. `assistant`: the plain LLM chat. `lab-results`: the lab-results
    /// line (identity gate, results read by templates, guarded LLM follow-ups); a line
    /// `#dtmf 1234#` keys DTMF digits. Default: `[agent] kind` from the config.
    #[arg(long, value_enum, value_name = "AGENT")]
    pub agent: Option<AgentChoice>,
    /// lab-results: the caller is the patient of this FHIR bundle (only their date of birth and
    /// PIN verify); it is added to the patients if missing. Default: any patient may call.
    #[arg(long, value_name = "FILE")]
    pub patient: Option<PathBuf>,
    /// lab-results: the patients (a FHIR bundle or a folder of them). Default:
    /// `[agent.lab_results] patients`.
    #[arg(long, value_name = "PATH")]
    pub patients: Option<PathBuf>,
    /// lab-results: the audit log (JSON lines, appended). Default:
    /// `[agent.lab_results] audit_log`.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// lab-results: the call id in the audit log. Default: `chat-<unix milliseconds>`.
    #[arg(long, value_name = "ID")]
    pub call_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentChoice {
    Assistant,
    LabResults,
}

pub fn run(config_path: Option<&Path>, args: ChatArgs) -> anyhow::Result<()> {
    let (config, _) = Config::load(config_path)?;
    let agent = args.agent.unwrap_or(match config.agent.kind {
        AgentKind::Assistant => AgentChoice::Assistant,
        AgentKind::LabResults => AgentChoice::LabResults,
    });
    let params = generate_params(&args);
    if agent == AgentChoice::LabResults {
        return run_lab_results(&config, &args, params);
    }
    let store = ModelStore::open_default()?;
    let model = crate::stages::chat_model(&config, &store, args.threads, draft_choice(&args))?;
    eprintln!("talkline chat: {}", model.describe());
    let mut session = model.new_session()?;
    let mut messages: Vec<Message> = args.system.iter().map(Message::system).collect();
    let cancel = CancelToken::new();
    let mut turn = |line: String| -> anyhow::Result<()> {
        messages.push(Message::user(line));
        let mut stdout = std::io::stdout().lock();
        let reply = session.reply(&messages, &params, &cancel, &mut |piece| {
            // A closed stdout (`| head`) ends the conversation at the next prompt, not here.
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        let _ = writeln!(stdout);
        if args.stats {
            eprintln!("{}", format_stats(&reply.stats));
        }
        messages.push(Message::assistant(reply.text));
        Ok(())
    };
    for_each_turn(&args.message, &mut |line| {
        turn(line)?;
        Ok(Flow::Continue)
    })
}

fn draft_choice(args: &ChatArgs) -> DraftChoice {
    match (&args.draft, args.lookup) {
        (Some(draft), _) => DraftChoice::Model(draft.clone()),
        (None, true) => DraftChoice::Lookup,
        (None, false) => DraftChoice::None,
    }
}

/// Each `-m` message, or else each non-empty stdin line, until `turn` ends the conversation.
fn for_each_turn(
    messages: &[String],
    turn: &mut dyn FnMut(String) -> anyhow::Result<Flow>,
) -> anyhow::Result<()> {
    if !messages.is_empty() {
        for m in messages {
            if turn(m.clone())? == Flow::Ended {
                break;
            }
        }
        return Ok(());
    }
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        if turn(line)? == Flow::Ended {
            return Ok(());
        }
    }
}

/// `talkline chat --agent lab-results`: the lab-results agent over text. Nothing the caller
/// types is logged; the model is loaded only when a follow-up needs it.
fn run_lab_results(config: &Config, args: &ChatArgs, params: GenerateParams) -> anyhow::Result<()> {
    let settings = &config.agent.lab_results;
    let patients = args.patients.as_ref().unwrap_or(&settings.patients);
    let mut store = PatientStore::load(patients)?;
    let expected = match &args.patient {
        Some(file) => {
            store.add(file)?;
            Some(fhir::patient_id_in(file)?)
        }
        None => None,
    };
    let audit = open_audit(args.audit_log.as_ref().unwrap_or(&settings.audit_log))?;
    let shared = LabResults::new(
        store,
        audit,
        settings.pin_digits,
        settings.max_failures,
        config.agent.max_reply_tokens,
    );
    let call_id = args.call_id.clone().unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("chat-{ms}")
    });
    let agent = LabResultsAgent::new(Arc::new(shared), &call_id, expected);
    let load_model = || -> anyhow::Result<Box<dyn talkline_llm::ChatModel>> {
        let store = ModelStore::open_default()?;
        crate::stages::chat_model(config, &store, args.threads, draft_choice(args))
    };
    let mut conversation = TextConversation::new(
        Box::new(agent),
        &load_model,
        params,
        std::io::stdout().lock(),
    );
    conversation.start()?;
    for_each_turn(&args.message, &mut |line| conversation.line(&line))
}

fn generate_params(args: &ChatArgs) -> GenerateParams {
    GenerateParams {
        max_tokens: args.max_tokens,
        sampling: if args.temperature <= 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature: args.temperature,
                top_k: 40,
                top_p: 0.95,
                seed: args.seed,
            }
        },
    }
}

fn format_stats(s: &ReplyStats) -> String {
    let mut out = format!(
        "[stats] prompt {} tok ({} reused, {} new) in {:.1} ms = {:.0} tok/s | first token {:.1} ms | decode {} tok at {:.1} tok/s",
        s.prompt_tokens,
        s.reused_tokens,
        s.prompt_tokens - s.reused_tokens,
        ms(s.prefill_time),
        s.prompt_tokens_per_s(),
        ms(s.time_to_first_token),
        s.generated_tokens,
        s.decode_tokens_per_s(),
    );
    if let Some(rate) = s.acceptance_rate() {
        let per_step = if s.decode_steps > 0 {
            s.generated_tokens.saturating_sub(1) as f64 / s.decode_steps as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            " | drafts {}/{} accepted ({:.0}%), {:.2} tok/step",
            s.accepted_tokens,
            s.drafted_tokens,
            rate * 100.0,
            per_step
        ));
    }
    if s.decode_time == Duration::ZERO {
        out.push_str(" (no decode)");
    }
    out
}
