//! Chat templates: the model's own `tokenizer.chat_template` (Jinja), rendered with minijinja.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{LlmError, Result};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// ChatML, used when a GGUF carries no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn template_err(e: Error) -> LlmError {
    LlmError::Template {
        reason: format!("{e:#}"),
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Hugging Face templates signal bad input this way.
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(template_err)?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(template_err)
    }

    /// The text of the conversation up to the end of the last message's content, without
    /// whatever the template writes after it (the end-of-turn marker). Used to ask the model how
    /// likely the end-of-turn marker is next.
    pub fn render_open_last(&self, messages: &[Message]) -> Result<(String, String)> {
        const SENTINEL: &str = "\u{E000}talkline-open-turn\u{E000}";
        let Some(last) = messages.last() else {
            return Err(LlmError::InvalidArgument {
                reason: "no messages".into(),
            });
        };
        let mut with_sentinel = messages.to_vec();
        // Trailing whitespace goes: templates that `trim` would drop it in the closed rendering
        // but keep it before the sentinel, and the two must share their prefix.
        let content = format!("{}{SENTINEL}", last.content.trim_end());
        with_sentinel
            .last_mut()
            .expect("invariant: checked non-empty above")
            .content = content;
        let text = self.render(&with_sentinel, false)?;
        let at = text.rfind(SENTINEL).ok_or_else(|| LlmError::Template {
            reason: "the template does not write the message content verbatim".into(),
        })?;
        Ok((
            text[..at].to_string(),
            text[at + SENTINEL.len()..].to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").expect("ChatML compiles");
        let text = t
            .render(&[Message::system("Be brief."), Message::user("Hi")], true)
            .expect("renders");
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let (open, rest) = t
            .render_open_last(&[Message::user("so I was")])
            .expect("renders");
        assert_eq!(open, "<|im_start|>user\nso I was");
        assert_eq!(rest, "<|im_end|>\n");
    }

    #[test]
    fn llama3_style_template_with_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'].strip() }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").expect("compiles");
        let text = t.render(&[Message::user(" Hi ")], true).expect("renders");
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }
}
