//! An agent over text instead of audio (`talkline chat --agent ...`): each input line is a
//! confirmed user turn, a line `#dtmf 1234#` keys DTMF digits, and every utterance the agent
//! would speak is printed on a line of its own. A transfer prints `[transfer: <reason>]`, a
//! hang-up `[hangup]`, and the conversation ends there.
//!
//! LLM answers go through the same contract as in a live call: cut into clauses by the TTS
//! chunker, each checked with [`Agent::check_reply`] before it is printed.

use std::io::Write;

use talkline_llm::{CancelToken, ChatModel, ChatSession, GenerateParams};
use talkline_tts::chunker::ClauseChunker;

use super::{Agent, AgentAction, LlmRequest, ReplyVerdict};

/// Input lines starting with this key DTMF digits: `#dtmf 1234#`.
pub const DTMF_PREFIX: &str = "#dtmf";

/// Whether the conversation goes on after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Ended,
}

/// Runs an agent over text lines, loading the LLM session only when the agent first asks.
pub struct TextConversation<'a, W: Write> {
    agent: Box<dyn Agent>,
    model: &'a dyn Fn() -> anyhow::Result<Box<dyn ChatModel>>,
    session: Option<(Box<dyn ChatModel>, Box<dyn ChatSession>)>,
    params: GenerateParams,
    out: W,
}

impl<'a, W: Write> TextConversation<'a, W> {
    /// `model` loads the chat model on first use; `params.max_tokens` caps every request.
    pub fn new(
        agent: Box<dyn Agent>,
        model: &'a dyn Fn() -> anyhow::Result<Box<dyn ChatModel>>,
        params: GenerateParams,
        out: W,
    ) -> Self {
        TextConversation {
            agent,
            model,
            session: None,
            params,
            out,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Some(greeting) = self.agent.greeting() {
            self.say(&greeting)?;
        }
        Ok(())
    }

    /// One input line: DTMF keys or a user turn.
    pub fn line(&mut self, line: &str) -> anyhow::Result<Flow> {
        if let Some(keys) = line.strip_prefix(DTMF_PREFIX) {
            for key in keys.chars().filter(|c| !c.is_whitespace()) {
                if let Some(action) = self.agent.on_dtmf(key) {
                    if self.act(action)? == Flow::Ended {
                        return Ok(Flow::Ended);
                    }
                }
            }
            return Ok(Flow::Continue);
        }
        let action = self.agent.on_user_turn(line);
        self.act(action)
    }

    fn say(&mut self, text: &str) -> anyhow::Result<()> {
        writeln!(self.out, "{text}")?;
        self.out.flush()?;
        self.agent.on_reply_spoken(text);
        Ok(())
    }

    fn act(&mut self, action: AgentAction) -> anyhow::Result<Flow> {
        match action {
            AgentAction::Say(text) => self.say(&text)?,
            AgentAction::AskLlm(request) => self.ask_llm(&request)?,
            AgentAction::Transfer { reason, say } => {
                self.say(&say)?;
                writeln!(self.out, "[transfer: {reason}]")?;
                return Ok(Flow::Ended);
            }
            AgentAction::Hangup { say } => {
                self.say(&say)?;
                writeln!(self.out, "[hangup]")?;
                return Ok(Flow::Ended);
            }
        }
        Ok(Flow::Continue)
    }

    fn ask_llm(&mut self, request: &LlmRequest) -> anyhow::Result<()> {
        if self.session.is_none() {
            let model = (self.model)()?;
            let session = model.new_session()?;
            self.session = Some((model, session));
        }
        let Some((_, session)) = self.session.as_mut() else {
            anyhow::bail!("the chat session was just created");
        };
        let params = GenerateParams {
            max_tokens: request.max_tokens.min(self.params.max_tokens),
            ..self.params.clone()
        };
        let cancel = CancelToken::new();
        let mut speaker = GuardedSpeaker::default();
        let agent = self.agent.as_mut();
        let out = &mut self.out;
        session.reply(&request.messages, &params, &cancel, &mut |piece| {
            for clause in speaker.chunker.push(piece) {
                speaker.clause(agent, &clause.text, &cancel, out);
            }
        })?;
        if let Some(last) = speaker.chunker.finish() {
            speaker.clause(agent, &last.text, &cancel, out);
        }
        writeln!(out)?;
        out.flush()?;
        agent.on_reply_spoken(&speaker.spoken);
        Ok(())
    }
}

/// Checks each clause before it is "spoken" (printed); after a replacement nothing more is.
#[derive(Default)]
struct GuardedSpeaker {
    chunker: ClauseChunker,
    spoken: String,
    replaced: bool,
}

impl GuardedSpeaker {
    fn clause(
        &mut self,
        agent: &mut dyn Agent,
        clause: &str,
        cancel: &CancelToken,
        out: &mut impl Write,
    ) {
        if self.replaced || clause.trim().is_empty() {
            return;
        }
        let candidate = join(&self.spoken, clause);
        let text = match agent.check_reply(&candidate) {
            ReplyVerdict::Speak => clause.trim().to_string(),
            ReplyVerdict::Replace(safe) => {
                self.replaced = true;
                cancel.cancel();
                safe
            }
        };
        self.spoken = join(&self.spoken, &text);
        // A closed stdout ends the conversation at the next line, not in the middle of a reply.
        let _ = write!(
            out,
            "{}{text}",
            if self.spoken.len() > text.len() {
                " "
            } else {
                ""
            }
        );
        let _ = out.flush();
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.trim()) {
        (true, b) => b.to_string(),
        (false, b) => format!("{a} {b}"),
    }
}
