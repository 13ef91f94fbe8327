//! The free conversation: the configured system prompt, the dialogue so far (as heard), and the
//! LLM's answer to each turn. What every session did before agents existed.

use talkline_llm::Message;

use super::{Agent, AgentAction, LlmRequest, ReplyVerdict};
use crate::config::AgentConfig;

#[derive(Debug, Clone)]
pub struct AssistantConfig {
    pub system_prompt: String,
    pub greeting: Option<String>,
    pub max_reply_tokens: usize,
}

impl From<&AgentConfig> for AssistantConfig {
    fn from(c: &AgentConfig) -> Self {
        AssistantConfig {
            system_prompt: c.system_prompt.clone(),
            greeting: c.greeting.clone(),
            max_reply_tokens: c.max_reply_tokens,
        }
    }
}

#[derive(Debug)]
pub struct Assistant {
    config: AssistantConfig,
    history: Vec<Message>,
}

impl Assistant {
    pub fn new(config: AssistantConfig) -> Self {
        let history = vec![Message::system(config.system_prompt.clone())];
        Assistant { config, history }
    }
}

impl Agent for Assistant {
    fn greeting(&mut self) -> Option<String> {
        self.config.greeting.clone()
    }

    fn on_dtmf(&mut self, _key: char) -> Option<AgentAction> {
        None
    }

    fn on_user_turn(&mut self, text: &str) -> AgentAction {
        self.history.push(Message::user(text));
        AgentAction::AskLlm(LlmRequest {
            messages: self.history.clone(),
            max_tokens: self.config.max_reply_tokens,
        })
    }

    fn check_reply(&mut self, _text_so_far: &str) -> ReplyVerdict {
        ReplyVerdict::Speak
    }

    fn speculate(&self, text: &str) -> Option<LlmRequest> {
        let mut messages = self.history.clone();
        messages.push(Message::user(text));
        Some(LlmRequest {
            messages,
            max_tokens: self.config.max_reply_tokens,
        })
    }

    fn checks_replies(&self) -> bool {
        false
    }

    /// The history keeps only what was heard, so a barge-in does not leave unheard words in it.
    fn on_reply_spoken(&mut self, heard_text: &str) {
        if !heard_text.trim().is_empty() {
            self.history.push(Message::assistant(heard_text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_turn_asks_the_llm_with_the_heard_history() {
        let mut agent = Assistant::new(AssistantConfig {
            system_prompt: "Be brief.".into(),
            greeting: Some("Hi!".into()),
            max_reply_tokens: 40,
        });
        let greeting = agent.greeting().expect("configured greeting");
        agent.on_reply_spoken(&greeting);
        agent.on_user_turn("Hello");
        agent.on_reply_spoken("Hi th");
        let AgentAction::AskLlm(request) = agent.on_user_turn("What?") else {
            panic!("the assistant always asks the LLM");
        };
        let contents: Vec<&str> = request
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(contents, ["Be brief.", "Hi!", "Hello", "Hi th", "What?"]);
        assert_eq!(request.max_tokens, 40);
    }
}
