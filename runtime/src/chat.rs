//! `talkline chat`: a text conversation with the configured LLM, streaming its tokens.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use talkline_llm::local::ms;
use talkline_llm::{CancelToken, GenerateParams, Message, ReplyStats, Sampling};

use crate::config::Config;
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
}

pub fn run(config_path: Option<&Path>, args: ChatArgs) -> anyhow::Result<()> {
    let (config, _) = Config::load(config_path)?;
    let store = ModelStore::open_default()?;
    let draft = match (&args.draft, args.lookup) {
        (Some(draft), _) => DraftChoice::Model(draft.clone()),
        (None, true) => DraftChoice::Lookup,
        (None, false) => DraftChoice::None,
    };
    let model = crate::stages::chat_model(&config, &store, args.threads, draft)?;
    eprintln!("talkline chat: {}", model.describe());
    let mut session = model.new_session()?;
    let mut messages: Vec<Message> = args.system.iter().map(Message::system).collect();
    let params = GenerateParams {
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
    };
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
    if !args.message.is_empty() {
        for m in args.message.clone() {
            turn(m)?;
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
        turn(line)?;
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
