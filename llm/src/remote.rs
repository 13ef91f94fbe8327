//! The remote backend: any OpenAI-compatible `/v1/chat/completions` server, streamed over SSE.
//!
//! Timeouts for connecting, for the first token and between tokens; retries only before the
//! first token (after it, a retry would repeat text the caller already has); cancellation
//! checked while waiting, so a barge-in never waits for the network.

use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::chat::{
    CancelToken, ChatModel, ChatSession, GenerateParams, Reply, ReplyStats, Sampling, StopReason,
};
use crate::error::{LlmError, Result};
use crate::template::Message;

/// How often a wait on the network checks the cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(10);
/// Longest error body kept in an error message.
const MAX_ERROR_BODY: usize = 512;

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    /// From sending the request to the first content token.
    pub first_token_timeout: Duration,
    /// Longest silence between two stream events once the reply has started.
    pub between_tokens_timeout: Duration,
    /// Extra attempts when the request fails before the first token (connect error, HTTP 429 or
    /// 5xx, timeout, stream ended before any token).
    pub retries: u32,
    pub retry_backoff: Duration,
}

impl OpenAiConfig {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(3),
            first_token_timeout: Duration::from_secs(10),
            between_tokens_timeout: Duration::from_secs(5),
            retries: 2,
            retry_backoff: Duration::from_millis(200),
        }
    }

    fn url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

/// A [`ChatModel`] backed by a remote server.
#[derive(Debug, Clone)]
pub struct OpenAiChatModel {
    config: OpenAiConfig,
}

impl OpenAiChatModel {
    pub fn new(config: OpenAiConfig) -> Self {
        OpenAiChatModel { config }
    }
}

impl ChatModel for OpenAiChatModel {
    fn describe(&self) -> String {
        format!(
            "{} at {} (OpenAI-compatible)",
            self.config.model, self.config.base_url
        )
    }

    fn new_session(&self) -> Result<Box<dyn ChatSession>> {
        Ok(Box::new(OpenAiSession::new(self.config.clone())?))
    }
}

/// One conversation with the server. Owns a single-threaded tokio runtime, so `reply` can be
/// called from a plain inference thread like the local backend's.
pub struct OpenAiSession {
    config: OpenAiConfig,
    client: reqwest::Client,
    rt: OwnRuntime,
}

/// The session's runtime, shut down in the background when dropped: a session may be dropped
/// from inside an async task (a call's end), where dropping a runtime outright would panic.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for OwnRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("the runtime is only taken out when the session is dropped")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for OpenAiSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiSession")
            .field("base_url", &self.config.base_url)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: &'a [Message],
    stream: bool,
    max_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
}

/// What one attempt ended with.
enum Attempt {
    Done(Reply),
    /// Failed before any token: may be retried.
    Retryable(LlmError),
}

impl OpenAiSession {
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| LlmError::Connect {
                url: config.base_url.clone(),
                reason: e.to_string(),
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LlmError::Io {
                path: "tokio runtime".into(),
                source: e,
            })?;
        Ok(OpenAiSession {
            config,
            client,
            rt: OwnRuntime(Some(rt)),
        })
    }

    /// One request. Only the network waits run inside the runtime: `on_text` is called outside
    /// it, so it may block (a full queue downstream) like the local backend's callback.
    fn attempt(
        &self,
        body: &str,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Attempt> {
        let url = self.config.url();
        let start = Instant::now();
        let mut req = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(body.to_string());
        if let Some(key) = &self.config.api_key {
            req = req.bearer_auth(key);
        }
        let first_deadline = start + self.config.first_token_timeout;
        let sent = self
            .rt
            .block_on(async { wait(req.send(), first_deadline, cancel).await });
        let response = match sent {
            Waited::Ready(Ok(r)) => r,
            Waited::Ready(Err(e)) => {
                return Ok(Attempt::Retryable(LlmError::Connect {
                    url,
                    reason: error_chain(&e),
                }))
            }
            Waited::TimedOut => {
                return Ok(Attempt::Retryable(LlmError::Timeout {
                    url,
                    phase: "waiting for the response headers",
                    timeout_ms: self.config.first_token_timeout.as_millis() as u64,
                }))
            }
            Waited::Cancelled => return Ok(Attempt::Done(cancelled(start))),
        };
        let status = response.status();
        if !status.is_success() {
            let text = self
                .rt
                .block_on(async { wait(response.text(), first_deadline, cancel).await });
            let body = match text {
                Waited::Ready(Ok(t)) => t.chars().take(MAX_ERROR_BODY).collect(),
                _ => String::new(),
            };
            let err = LlmError::HttpStatus {
                url,
                status: status.as_u16(),
                body,
            };
            // 4xx other than 429 means the request itself is wrong: retrying cannot help.
            return if status.is_server_error() || status.as_u16() == 429 {
                Ok(Attempt::Retryable(err))
            } else {
                Err(err)
            };
        }
        let mut stream = response.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut text = String::new();
        let mut stats = ReplyStats::default();
        let mut first_at: Option<Instant> = None;
        let mut pieces = 0usize;
        let mut stop: Option<StopReason> = None;
        while stop.is_none() {
            let deadline = match first_at {
                None => first_deadline,
                Some(_) => Instant::now() + self.config.between_tokens_timeout,
            };
            let chunk = match self.rt.block_on(wait(stream.next(), deadline, cancel)) {
                Waited::Ready(Some(Ok(c))) => c,
                Waited::Ready(Some(Err(e))) => {
                    let err = LlmError::Stream {
                        url,
                        reason: error_chain(&e),
                    };
                    return if first_at.is_none() {
                        Ok(Attempt::Retryable(err))
                    } else {
                        Err(err)
                    };
                }
                Waited::Ready(None) => {
                    let err = LlmError::Stream {
                        url,
                        reason: "the server closed the stream before the end of the reply".into(),
                    };
                    return if first_at.is_none() {
                        Ok(Attempt::Retryable(err))
                    } else {
                        Err(err)
                    };
                }
                Waited::TimedOut => {
                    let (phase, timeout) = match first_at {
                        None => (
                            "waiting for the first token",
                            self.config.first_token_timeout,
                        ),
                        Some(_) => ("between tokens", self.config.between_tokens_timeout),
                    };
                    let err = LlmError::Timeout {
                        url,
                        phase,
                        timeout_ms: timeout.as_millis() as u64,
                    };
                    return if first_at.is_none() {
                        Ok(Attempt::Retryable(err))
                    } else {
                        Err(err)
                    };
                }
                Waited::Cancelled => {
                    stop = Some(StopReason::Cancelled);
                    break;
                }
            };
            buf.extend_from_slice(&chunk);
            // SSE events end with a blank line; handle every complete line.
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim_start();
                if data == "[DONE]" {
                    stop.get_or_insert(StopReason::EndOfTurn);
                    break;
                }
                let event: serde_json::Value =
                    serde_json::from_str(data).map_err(|e| LlmError::Protocol {
                        reason: format!("bad SSE data {data:?}: {e}"),
                    })?;
                if let Some(err) = event.get("error") {
                    return Err(LlmError::Protocol {
                        reason: format!("the server reported an error mid-stream: {err}"),
                    });
                }
                let choice = event.get("choices").and_then(|c| c.get(0));
                if let Some(piece) = choice
                    .and_then(|c| c.get("delta"))
                    .and_then(|d| d.get("content"))
                    .and_then(|c| c.as_str())
                {
                    if !piece.is_empty() {
                        if cancel.is_cancelled() {
                            stop = Some(StopReason::Cancelled);
                            break;
                        }
                        if first_at.is_none() {
                            first_at = Some(Instant::now());
                        }
                        pieces += 1;
                        text.push_str(piece);
                        on_text(piece);
                    }
                }
                match choice
                    .and_then(|c| c.get("finish_reason"))
                    .and_then(|f| f.as_str())
                {
                    Some("length") => stop = Some(StopReason::MaxTokens),
                    Some(_) => stop = Some(StopReason::EndOfTurn),
                    None => {}
                }
            }
        }
        let first = first_at.unwrap_or_else(Instant::now);
        stats.time_to_first_token = first.duration_since(start);
        stats.decode_time = first.elapsed();
        stats.generated_tokens = pieces;
        Ok(Attempt::Done(Reply {
            text,
            tokens: Vec::new(),
            stop: stop.unwrap_or(StopReason::EndOfTurn),
            stats,
        }))
    }
}

fn cancelled(start: Instant) -> Reply {
    Reply {
        text: String::new(),
        tokens: Vec::new(),
        stop: StopReason::Cancelled,
        stats: ReplyStats {
            time_to_first_token: start.elapsed(),
            ..ReplyStats::default()
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

enum Waited<T> {
    Ready(T),
    TimedOut,
    Cancelled,
}

/// Awaits `fut` until `deadline`, checking `cancel` every [`CANCEL_POLL`].
async fn wait<F: std::future::Future>(
    fut: F,
    deadline: Instant,
    cancel: &CancelToken,
) -> Waited<F::Output> {
    tokio::pin!(fut);
    loop {
        if cancel.is_cancelled() {
            return Waited::Cancelled;
        }
        let now = Instant::now();
        if now >= deadline {
            return Waited::TimedOut;
        }
        let slice = (deadline - now).min(CANCEL_POLL);
        if let Ok(v) = tokio::time::timeout(slice, &mut fut).await {
            return Waited::Ready(v);
        }
    }
}

impl ChatSession for OpenAiSession {
    fn reply(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Reply> {
        let (temperature, top_p, seed) = match params.sampling {
            Sampling::Greedy => (Some(0.0), None, None),
            Sampling::Sample {
                temperature,
                top_p,
                seed,
                ..
            } => (Some(temperature), Some(top_p), Some(seed)),
        };
        let body = serde_json::to_string(&Request {
            model: &self.config.model,
            messages,
            stream: true,
            max_tokens: params.max_tokens,
            temperature,
            top_p,
            seed,
        })
        .map_err(|e| LlmError::InvalidArgument {
            reason: format!("cannot encode the request: {e}"),
        })?;
        let mut attempt = 0;
        loop {
            let result = self.attempt(&body, cancel, &mut *on_text)?;
            match result {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Retryable(err) if attempt < self.config.retries => {
                    attempt += 1;
                    tracing::warn!(attempt, error = %err.redacted(), "retrying the LLM request");
                    let backoff = self.config.retry_backoff * attempt;
                    let deadline = Instant::now() + backoff;
                    // The sleep must be created inside the runtime (it registers a timer).
                    let slept = self.rt.block_on(async {
                        wait(tokio::time::sleep(backoff), deadline + CANCEL_POLL, cancel).await
                    });
                    if matches!(slept, Waited::Cancelled) {
                        return Ok(cancelled(Instant::now()));
                    }
                }
                Attempt::Retryable(err) => return Err(err),
            }
        }
    }

    fn prefill(&mut self, _messages: &[Message]) -> Result<()> {
        Ok(())
    }

    fn end_of_turn_probability(&mut self, _messages: &[Message]) -> Result<Option<f32>> {
        Ok(None)
    }

    fn reset(&mut self) {}
}
