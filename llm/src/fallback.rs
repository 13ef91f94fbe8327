//! A chain of two models: the second answers when the first fails before its first word.
//!
//! Typically a remote server first and the local model behind it. Once the first model has
//! produced text the caller may already be hearing it, so a later failure is returned as is:
//! starting over on the other model would repeat or contradict what was said.

use crate::chat::{CancelToken, ChatModel, ChatSession, GenerateParams, Reply};
use crate::error::Result;
use crate::template::Message;

/// [`ChatModel`] that tries `primary`, then `fallback`.
pub struct FallbackChatModel {
    pub primary: Box<dyn ChatModel>,
    pub fallback: Box<dyn ChatModel>,
}

impl ChatModel for FallbackChatModel {
    fn describe(&self) -> String {
        format!(
            "{}, falling back to {}",
            self.primary.describe(),
            self.fallback.describe()
        )
    }

    fn new_session(&self) -> Result<Box<dyn ChatSession>> {
        Ok(Box::new(FallbackSession {
            primary: self.primary.new_session()?,
            fallback: self.fallback.new_session()?,
        }))
    }
}

struct FallbackSession {
    primary: Box<dyn ChatSession>,
    fallback: Box<dyn ChatSession>,
}

impl ChatSession for FallbackSession {
    fn reply(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let mut started = false;
        let first = self.primary.reply(messages, params, cancel, &mut |piece| {
            started = true;
            on_text(piece)
        });
        match first {
            Err(e) if !started && !cancel.is_cancelled() => {
                tracing::warn!(
                    kind = e.kind(),
                    error = %e.redacted(),
                    "the primary LLM failed before its first token; the fallback model answers"
                );
                self.fallback.reply(messages, params, cancel, on_text)
            }
            other => other,
        }
    }

    /// Only the primary is warmed: prefilling both would double the work on every partial
    /// transcript for a model that rarely answers.
    fn prefill(&mut self, messages: &[Message]) -> Result<()> {
        self.primary.prefill(messages)
    }

    fn end_of_turn_probability(&mut self, messages: &[Message]) -> Result<Option<f32>> {
        self.primary.end_of_turn_probability(messages)
    }

    fn reset(&mut self) {
        self.primary.reset();
        self.fallback.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ReplyStats, StopReason};
    use crate::error::LlmError;

    /// Says `text` piece by piece, then fails with `fail` if set.
    struct Scripted {
        pieces: Vec<&'static str>,
        fail: bool,
    }

    impl ChatSession for Scripted {
        fn reply(
            &mut self,
            _: &[Message],
            _: &GenerateParams,
            _: &CancelToken,
            on_text: &mut dyn FnMut(&str),
        ) -> Result<Reply> {
            for p in &self.pieces {
                on_text(p);
            }
            if self.fail {
                return Err(LlmError::Stream {
                    url: "http://test".into(),
                    reason: "dropped".into(),
                });
            }
            Ok(Reply {
                text: self.pieces.concat(),
                tokens: Vec::new(),
                stop: StopReason::EndOfTurn,
                stats: ReplyStats::default(),
            })
        }
        fn prefill(&mut self, _: &[Message]) -> Result<()> {
            Ok(())
        }
        fn end_of_turn_probability(&mut self, _: &[Message]) -> Result<Option<f32>> {
            Ok(None)
        }
        fn reset(&mut self) {}
    }

    fn chain(primary: Scripted) -> (FallbackSession, String, Result<Reply>) {
        let mut s = FallbackSession {
            primary: Box::new(primary),
            fallback: Box::new(Scripted {
                pieces: vec!["local"],
                fail: false,
            }),
        };
        let mut heard = String::new();
        let r = s.reply(
            &[Message::user("hi")],
            &GenerateParams::default(),
            &CancelToken::new(),
            &mut |p| heard.push_str(p),
        );
        (s, heard, r)
    }

    #[test]
    fn the_fallback_answers_only_a_failure_before_the_first_word() {
        let (_, heard, r) = chain(Scripted {
            pieces: vec![],
            fail: true,
        });
        assert_eq!(heard, "local");
        assert_eq!(r.expect("the fallback answered").text, "local");

        let (_, heard, r) = chain(Scripted {
            pieces: vec!["Your ", "result"],
            fail: true,
        });
        assert_eq!(
            heard, "Your result",
            "no second answer after words were given"
        );
        assert_eq!(r.expect_err("the failure is reported").kind(), "stream");
    }
}
