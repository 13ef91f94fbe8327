//! Agents: what the caller talks to. The session owns the audio, the turn-taking and the LLM
//! thread; an [`Agent`] decides, per confirmed user turn, what is said next: a fixed sentence, an
//! LLM answer over the context it hands out, a transfer to a human, or the end of the call.
//!
//! - [`assistant::Assistant`]: the free conversation (system prompt from the config).
//! - [`lab_results::LabResultsAgent`]: the lab-results line (identity gate, templates, guard).
//!
//! **Agents are sans-I/O apart from their audit log: they never run a model, play audio or
//! read a clock for decisions. The session runs what they ask for.**

pub mod assistant;
pub mod lab_results;
pub mod text;

use std::sync::Arc;

use talkline_llm::Message;

use crate::config::{AgentKind, Config};

/// What the session does after a user turn (or a key).
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAction {
    /// Speak this text as it is; no LLM involved.
    Say(String),
    /// Ask the LLM with exactly these messages (the whole context it may use), streaming its
    /// answer through [`Agent::check_reply`] clause by clause before speaking it.
    AskLlm(LlmRequest),
    /// Speak `say`, then hand the call to a human (SIP REFER, or a transfer event on other
    /// transports). `reason` is a category such as `"clinical-question"`, never caller words.
    Transfer { reason: String, say: String },
    /// Speak `say`, then end the call.
    Hangup { say: String },
}

/// An LLM request: the full conversation to answer and a reply length.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
}

/// The guard's verdict on an LLM answer so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyVerdict {
    /// The text so far may be spoken.
    Speak,
    /// Do not speak the clause just checked: cancel the LLM and say this instead.
    Replace(String),
}

/// One call's agent. The session calls, in order:
/// 1. [`greeting`](Agent::greeting) once when the call connects;
/// 2. per confirmed user turn, [`on_user_turn`](Agent::on_user_turn); per DTMF key,
///    [`on_dtmf`](Agent::on_dtmf);
/// 3. for an [`AgentAction::AskLlm`], [`check_reply`](Agent::check_reply) with the whole
///    answer so far each time a clause is complete, before that clause is spoken (not for
///    `Say`, `Transfer` or `Hangup` text, which is the agent's own);
/// 4. after every utterance of the agent (greeting, `Say`, LLM answer, the `say` of a transfer
///    or hang-up), [`on_reply_spoken`](Agent::on_reply_spoken) with the words the caller heard
///    (cut at a barge-in; the safe line included after a `Replace`).
pub trait Agent: Send {
    /// Said when the call connects; `None` waits for the caller.
    fn greeting(&mut self) -> Option<String>;
    /// A DTMF key (`0`-`9`, `*`, `#`); `None` while the agent waits for more keys.
    fn on_dtmf(&mut self, key: char) -> Option<AgentAction>;
    /// A confirmed user turn (the final transcript).
    fn on_user_turn(&mut self, text: &str) -> AgentAction;
    /// Checks an LLM answer before its last clause is spoken.
    fn check_reply(&mut self, text_so_far: &str) -> ReplyVerdict;
    /// What the caller heard of the agent's last utterance.
    fn on_reply_spoken(&mut self, heard_text: &str);
    /// The LLM request [`on_user_turn`](Agent::on_user_turn) would make for `text`, without
    /// changing any state, so that the session may start the LLM before the turn is confirmed
    /// (speculation). `None`: never start early (an agent whose turns change state, like an
    /// identity gate, must see only confirmed turns). The session keeps the early answer only
    /// if the confirmed turn asks for exactly the same request.
    fn speculate(&self, _text: &str) -> Option<LlmRequest> {
        None
    }
    /// Whether LLM answers must pass [`check_reply`](Agent::check_reply) clause by clause
    /// before being spoken; when false, words go to the voice as they come.
    fn checks_replies(&self) -> bool {
        true
    }
}

/// Makes the configured agent for each call. Built once per process: the lab-results agent
/// loads its patients and opens its audit log here, so a broken bundle fails at start-up.
pub enum AgentFactory {
    Assistant(assistant::AssistantConfig),
    LabResults(Arc<lab_results::LabResults>),
}

impl AgentFactory {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        Ok(match config.agent.kind {
            AgentKind::Assistant => {
                AgentFactory::Assistant(assistant::AssistantConfig::from(&config.agent))
            }
            AgentKind::LabResults => AgentFactory::LabResults(Arc::new(
                lab_results::LabResults::from_config(&config.agent)?,
            )),
        })
    }

    /// A fresh agent for one call. The lab-results agent identifies the caller among all
    /// patients by date of birth and PIN; see [`lab_results::LabResultsAgent::new`] to expect one.
    pub fn new_agent(&self, call_id: &str) -> Box<dyn Agent> {
        match self {
            AgentFactory::Assistant(config) => Box::new(assistant::Assistant::new(config.clone())),
            AgentFactory::LabResults(shared) => Box::new(lab_results::LabResultsAgent::new(
                shared.clone(),
                call_id,
                None,
            )),
        }
    }
}
