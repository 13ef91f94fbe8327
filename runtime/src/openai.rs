//! `talkline serve`'s OpenAI-compatible endpoint over the configured local model:
//! `POST /v1/chat/completions` (server-sent `chat.completion.chunk` events with `stream: true`,
//! one `chat.completion` otherwise) and `GET /v1/models`.
//!
//! The model is the one the voice sessions use, loaded once per process. Each completion runs
//! on the blocking pool (the forward pass is blocking compute) and streams its text back through
//! a bounded channel; a client that goes away cancels it within one token. At most
//! `[openai] max_concurrent` completions run at once: more are refused with 503 and
//! `Retry-After` instead of queueing. **Wire types live here only, and prompts and replies never
//! reach the logs** (they may be a patient's words): only ids, counts and timings do.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use talkline_llm::{
    CancelToken, ChatModel, ChatSession, GenerateParams, LlmError, Message, Sampling, StopReason,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, LlmConfig, OpenAiEndpointConfig};
use crate::models::ModelStore;

/// Largest request body read. A conversation that fits the model's context is far smaller; the
/// limit keeps one request from holding unbounded memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Text pieces of one completion waiting for its client. Policy when full: generation blocks
/// until the client reads (backpressure); a client that is gone cancels it instead.
const PIECE_QUEUE: usize = 64;
/// OpenAI's own limit on `stop`.
const MAX_STOP_SEQUENCES: usize = 4;
/// Seconds a refused client is asked to wait: about one short reply.
const RETRY_AFTER_S: &str = "1";

/// The generating thread ended without a word (it panicked).
const ENDED_WITHOUT_RESULT: &str = "the completion ended without a result";

/// The endpoint's shared state.
pub struct Endpoint {
    chat: Arc<dyn ChatModel>,
    /// What `/v1/models` lists and every response names.
    model_id: String,
    /// When the server started: the model's `created` in `/v1/models`.
    created: u64,
    max_tokens: usize,
    slots: Arc<Semaphore>,
    max_idle: usize,
    /// Sessions between completions, most recently used last. A client sends the whole
    /// conversation each turn, so the session that answered the previous turn already holds
    /// most of it in its KV cache; taking the last one back makes a follow-up prefill only its
    /// new tokens. Any session is correct for any request (the cache is synced by common
    /// prefix), so this only affects speed. At most `max_concurrent` are kept.
    idle: Mutex<Vec<Box<dyn ChatSession>>>,
}

impl Endpoint {
    pub fn new(config: &OpenAiEndpointConfig, chat: Arc<dyn ChatModel>, model_id: String) -> Self {
        let max_concurrent = config.max_concurrent.max(1);
        Endpoint {
            chat,
            model_id,
            created: unix_now(),
            max_tokens: config.max_tokens.max(1),
            slots: Arc::new(Semaphore::new(max_concurrent)),
            max_idle: max_concurrent,
            idle: Mutex::new(Vec::with_capacity(max_concurrent)),
        }
    }

    fn take_session(&self) -> talkline_llm::Result<Box<dyn ChatSession>> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle {
            Some(s) => Ok(s),
            None => self.chat.new_session(),
        }
    }

    fn put_session(&self, session: Box<dyn ChatSession>) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.max_idle {
            idle.push(session);
        }
    }
}

/// The endpoint's routes when `[openai] enabled` and the LLM is local; `None` otherwise.
/// `chat` is the process's loaded model (shared with the voice sessions).
pub fn router(
    config: &Config,
    store: &ModelStore,
    chat: Arc<dyn ChatModel>,
) -> anyhow::Result<Option<Router>> {
    if !config.openai.enabled {
        return Ok(None);
    }
    if !matches!(config.llm, LlmConfig::Local { .. }) {
        // Re-serving a remote server would only add a hop (or loop back to ourselves).
        tracing::info!("[openai] endpoint not served: [llm] backend is not local");
        return Ok(None);
    }
    let path = crate::stages::required_file(config, store, "LLM model")?.path;
    let model_id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    let endpoint = Arc::new(Endpoint::new(&config.openai, chat, model_id));
    Ok(Some(
        Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/models", get(models))
            .with_state(endpoint),
    ))
}

async fn models(State(ep): State<Arc<Endpoint>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": ep.model_id,
            "object": "model",
            "created": ep.created,
            "owned_by": "talkline",
        }],
    }))
    .into_response()
}

/// An OpenAI-style error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_S),
            );
        }
        response
    }
}

impl From<LlmError> for ApiError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::ContextFull { .. } => ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(e.to_string(), Some("messages"))
            },
            LlmError::InvalidArgument { .. } | LlmError::Template { .. } => {
                ApiError::invalid(e.to_string(), Some("messages"))
            }
            _ => ApiError::internal(e.to_string()),
        }
    }
}

/// The top level of a request. Fields OpenAI has and this server ignores (`user`, `logprobs`,
/// penalties, ...) are accepted and ignored, as other compatible servers do; the ones that
/// would change the answer's meaning are checked.
#[derive(Debug, Deserialize)]
struct RawRequest {
    /// Accepted but not matched: one model is served, and clients often send a placeholder.
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    messages: Option<Vec<Value>>,
    #[serde(default)]
    stream: Option<bool>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<i64>,
    stream_options: Option<StreamOptions>,
    tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
struct Request {
    messages: Vec<Message>,
    stream: bool,
    include_usage: bool,
    params: GenerateParams,
    stop: Vec<String>,
}

fn parse_request(body: &[u8], max_tokens_cap: usize) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    let raw: RawRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("the request is malformed: {e}"), None))?;
    let Some(wire) = raw.messages else {
        return Err(ApiError::invalid(
            "`messages` is required: a list of {role, content} objects",
            Some("messages"),
        ));
    };
    if wire.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    let messages = wire
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    if raw.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid(
            "`tools` is not supported by this server",
            Some("tools"),
        ));
    }
    if let Some(n) = raw.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("`n` must be 1 (one choice per request); got {n}"),
                Some("n"),
            ));
        }
    }
    let (max_tokens, param) = match (raw.max_completion_tokens, raw.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        None => max_tokens_cap,
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                format!("`{param}` must be at least 1; got {n}"),
                Some(param),
            ))
        }
        // Capped, not refused: the reply ends with finish_reason "length" as OpenAI's does
        // at the model's limit.
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(max_tokens_cap),
    };
    let temperature = raw.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("`temperature` must be between 0 and 2; got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = raw.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("`top_p` must be in (0, 1]; got {top_p}"),
            Some("top_p"),
        ));
    }
    let sampling = if temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample {
            temperature: temperature as f32,
            // OpenAI has no top-k: the whole vocabulary stays in play.
            top_k: 0,
            top_p: top_p as f32,
            // Without a seed each request draws differently, as OpenAI's do.
            seed: raw.seed.map_or_else(random_u64, |s| s as u64),
        }
    };
    let stop = parse_stop(raw.stop)?;
    Ok(Request {
        messages,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw.stream_options.is_some_and(|o| o.include_usage),
        params: GenerateParams {
            max_tokens,
            sampling,
        },
        stop,
    })
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::invalid(
            format!("messages[{i}] must be an object with `role` and `content`"),
            Some("messages"),
        ));
    };
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => talkline_llm::Role::System,
        Some("user") => talkline_llm::Role::User,
        Some("assistant") => talkline_llm::Role::Assistant,
        Some(other) => {
            // Echo enough to recognise the value, not a megabyte of it.
            let other: String = other.chars().take(32).collect();
            return Err(ApiError::invalid(
                format!(
                    "messages[{i}].role {other:?} is not supported: use system, user or assistant"
                ),
                Some("messages"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role is missing or not a string"),
                Some("messages"),
            ))
        }
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => s.clone(),
        // The content-parts form: text parts are joined; anything else (images, audio) cannot
        // be given to a text model.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].content[{j}] is not a text part: only \
                                 {{\"type\": \"text\", \"text\": ...}} parts are supported"
                            ),
                            Some("messages"),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                format!("messages[{i}].content must be a string or a list of text parts"),
                Some("messages"),
            ))
        }
    };
    Ok(Message { role, content })
}

fn parse_stop(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid(
                    "`stop` must be a string or a list of strings",
                    Some("stop"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "`stop` must be a string or a list of strings",
                Some("stop"),
            ))
        }
    };
    if list.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            format!("`stop` holds at most {MAX_STOP_SEQUENCES} sequences"),
            Some("stop"),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "`stop` sequences must not be empty",
            Some("stop"),
        ));
    }
    Ok(list)
}

/// Cuts a stream of text pieces at the first stop sequence. Text that might be the start of a
/// stop sequence is held back until the next piece decides, so nothing past a stop sequence
/// ever reaches the client.
#[derive(Debug, Default)]
struct StopCutter {
    stops: Vec<String>,
    held: String,
}

impl StopCutter {
    fn new(stops: Vec<String>) -> Self {
        StopCutter {
            stops,
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that may be sent now, and whether a stop sequence ended
    /// the reply (the returned text is then everything before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold the longest tail that a stop sequence starts with.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// What is still held when the reply ends without a stop sequence.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What the generating thread sends to the request handler.
#[derive(Debug)]
enum Event {
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// Cancels the completion when the request handler or its response stream is dropped: that is
/// how a client that hangs up stops the generation (hyper drops both when the connection ends).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn completions(
    State(ep): State<Arc<Endpoint>>,
    headers: header::HeaderMap,
    body: Body,
) -> Response {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let request = match parse_request(&body, ep.max_tokens) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Ok(permit) = Arc::clone(&ep.slots).try_acquire_owned() else {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is generating as many completions as it allows; retry later"
                .into(),
            kind: "server_error",
            param: None,
            code: Some("server_busy"),
        }
        .into_response();
    };
    let id = format!("chatcmpl-{:016x}", random_u64());
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    let (tx, mut rx) = mpsc::channel(PIECE_QUEUE);
    let worker_ep = Arc::clone(&ep);
    let worker_id = id.clone();
    let Request {
        messages,
        stream,
        include_usage,
        params,
        stop,
    } = request;
    let worker = tokio::task::spawn_blocking(move || {
        generate(
            &worker_ep, &worker_id, permit, &messages, &params, stop, &cancel, &tx,
        )
    });
    let watched_id = id.clone();
    tokio::spawn(async move {
        // The client sees the stream end early; the log says why.
        if let Err(e) = worker.await {
            tracing::error!(id = watched_id, "chat completion thread failed: {e}");
        }
    });

    // The first event decides the status: an error before any text (a conversation longer
    // than the context, say) is still a proper HTTP error, even when streaming.
    let first = match rx.recv().await {
        Some(Event::Failed(e)) => return e.into_response(),
        Some(e) => e,
        None => return ApiError::internal(ENDED_WITHOUT_RESULT).into_response(),
    };
    let meta = Arc::new(ChunkMeta {
        id,
        created: unix_now(),
        model: ep.model_id.clone(),
        include_usage,
    });
    if stream {
        let events = futures_util::stream::once(async { first })
            .chain(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let role = futures_util::stream::once({
            let meta = Arc::clone(&meta);
            async move { Ok::<_, Infallible>(meta.role_chunk()) }
        });
        let body = role.chain(events.map(move |event| {
            // The guard lives as long as the body: a client that hangs up drops it.
            let _alive = &guard;
            Ok::<_, Infallible>(meta.sse(event))
        }));
        return (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response();
    }
    let mut text = String::new();
    let mut event = Some(first);
    while let Some(e) = event {
        match e {
            Event::Text(piece) => text.push_str(&piece),
            Event::Failed(e) => return e.into_response(),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                drop(guard);
                return Json(json!({
                    "id": meta.id,
                    "object": "chat.completion",
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_reason,
                    }],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response();
            }
        }
        event = rx.recv().await;
    }
    ApiError::internal(ENDED_WITHOUT_RESULT).into_response()
}

/// Reads the body up to [`MAX_BODY_BYTES`], refusing more without reading it all.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("cannot read the body: {e}"), None))?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}

fn too_large() -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        ..ApiError::invalid(
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            None,
        )
    }
}

/// One completion, on a blocking thread. Holds its concurrency slot while the model works,
/// and frees it before logging or sending the completion's end: a client that sends its next
/// request the moment this one ends must find the slot free.
#[allow(clippy::too_many_arguments)]
fn generate(
    ep: &Endpoint,
    id: &str,
    slot: OwnedSemaphorePermit,
    messages: &[Message],
    params: &GenerateParams,
    stop: Vec<String>,
    cancel: &CancelToken,
    tx: &mpsc::Sender<Event>,
) {
    tracing::info!(
        id,
        messages = messages.len(),
        max_tokens = params.max_tokens,
        "chat completion started"
    );
    let mut session = match ep.take_session() {
        Ok(s) => s,
        Err(e) => {
            drop(slot);
            let _ = tx.blocking_send(Event::Failed(e.into()));
            return;
        }
    };
    let mut cutter = StopCutter::new(stop);
    let mut stopped_by_sequence = false;
    let result = session.reply(messages, params, cancel, &mut |piece| {
        if stopped_by_sequence {
            return;
        }
        let (text, stopped) = cutter.push(piece);
        // A closed channel means the client is gone.
        if !text.is_empty() && tx.blocking_send(Event::Text(text)).is_err() {
            cancel.cancel();
        }
        if stopped {
            stopped_by_sequence = true;
            cancel.cancel();
        }
    });
    ep.put_session(session);
    drop(slot);
    let reply = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(id, error = %e, "chat completion failed");
            let _ = tx.blocking_send(Event::Failed(e.into()));
            return;
        }
    };
    let stats = &reply.stats;
    let finish_reason = match (stopped_by_sequence, reply.stop) {
        (true, _) | (false, StopReason::EndOfTurn) => "stop",
        (false, StopReason::MaxTokens) => "length",
        (false, StopReason::Cancelled) => {
            tracing::info!(
                id,
                prompt_tokens = stats.prompt_tokens,
                completion_tokens = stats.generated_tokens,
                "chat completion cancelled: the client went away"
            );
            return;
        }
    };
    let tail = cutter.finish();
    if !tail.is_empty() && tx.blocking_send(Event::Text(tail)).is_err() {
        return;
    }
    tracing::info!(
        id,
        finish_reason,
        prompt_tokens = stats.prompt_tokens,
        reused_tokens = stats.reused_tokens,
        completion_tokens = stats.generated_tokens,
        ttft_ms = stats.time_to_first_token.as_secs_f64() * 1000.0,
        "chat completion done"
    );
    let _ = tx.blocking_send(Event::Done {
        finish_reason,
        prompt_tokens: stats.prompt_tokens,
        completion_tokens: stats.generated_tokens,
    });
}

/// What every chunk of one streamed completion repeats.
struct ChunkMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkMeta {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    }

    fn role_chunk(&self) -> Bytes {
        sse_data(&self.chunk(json!({"role": "assistant", "content": ""}), None))
    }

    fn sse(&self, event: Event) -> Bytes {
        match event {
            Event::Text(piece) => sse_data(&self.chunk(json!({"content": piece}), None)),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut out = sse_data(&self.chunk(json!({}), Some(finish_reason))).to_vec();
                if self.include_usage {
                    let usage = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens),
                    });
                    out.extend_from_slice(&sse_data(&usage));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                out.into()
            }
            // After text has gone out the status is sent: report in the stream, as OpenAI
            // does, and end it without [DONE].
            Event::Failed(e) => sse_data(&e.body()),
        }
    }
}

fn sse_data(v: &Value) -> Bytes {
    format!("data: {v}\n\n").into()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random number from the standard library's per-process random keys (ids and unseeded
/// sampling need no cryptographic quality).
fn random_u64() -> u64 {
    RandomState::new().hash_one(unix_now_nanos())
}

fn unix_now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut c = StopCutter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = c.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&c.finish());
        (out, false)
    }

    #[test]
    fn a_stop_sequence_split_across_pieces_cuts_the_text_before_it() {
        assert_eq!(
            cut(&["END"], &["Hello E", "N", "D world"]),
            ("Hello ".into(), true)
        );
        assert_eq!(cut(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        // The earliest of several sequences wins.
        assert_eq!(cut(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_released_in_order() {
        assert_eq!(cut(&["END"], &["EN", "x", "EN"]), ("ENxEN".into(), false));
        let mut c = StopCutter::new(vec!["éé".into()]);
        assert_eq!(c.push("aé"), ("a".into(), false));
        assert_eq!(c.push("b"), ("éb".into(), false));
        assert_eq!(cut(&[], &["any", "thing"]), ("anything".into(), false));
    }

    fn parse(body: &str) -> Result<Request, ApiError> {
        parse_request(body.as_bytes(), 100)
    }

    fn error_of(body: &str) -> String {
        let e = parse(body).expect_err("the request is refused");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        e.message
    }

    #[test]
    fn a_request_maps_to_messages_and_generation_parameters() {
        let r = parse(
            r#"{"model":"x","stream":true,"max_tokens":500,"temperature":0,"stop":"\n",
                "messages":[{"role":"developer","content":"Be brief."},
                            {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]},
                            {"role":"assistant","content":"Hello."},
                            {"role":"user","content":"Bye"}],
                "user":"ignored","frequency_penalty":0}"#,
        )
        .expect("a valid request");
        assert!(r.stream);
        assert_eq!(r.params.max_tokens, 100, "capped by the configuration");
        assert_eq!(r.params.sampling, Sampling::Greedy);
        assert_eq!(r.stop, ["\n"]);
        assert_eq!(
            r.messages,
            [
                Message::system("Be brief."),
                Message::user("Hi!"),
                Message::assistant("Hello."),
                Message::user("Bye"),
            ]
        );
        let r = parse(r#"{"messages":[{"role":"user","content":"x"}],"temperature":0.5,"top_p":0.9,"seed":7}"#)
            .expect("a valid request");
        assert_eq!(
            r.params.sampling,
            Sampling::Sample {
                temperature: 0.5,
                top_k: 0,
                top_p: 0.9,
                seed: 7
            }
        );
        assert!(!r.stream);
        assert_eq!(r.params.max_tokens, 100, "the cap is the default");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(error_of("{\"messages\": [").contains("not valid JSON"));
        assert!(error_of("[1]").contains("JSON object"));
        assert!(error_of("{}").contains("`messages` is required"));
        assert!(error_of(r#"{"messages":[]}"#).contains("at least one"));
        assert!(error_of(r#"{"messages":"hi"}"#).contains("malformed"));
        let e = error_of(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"tool","content":"b"}]}"#,
        );
        assert!(e.contains("messages[1].role \"tool\""), "{e}");
        assert!(error_of(r#"{"messages":[{"role":"user"}]}"#).contains("messages[0].content"));
        let ok = r#""messages":[{"role":"user","content":"a"}]"#;
        assert!(error_of(&format!("{{{ok},\"temperature\":3}}")).contains("temperature"));
        assert!(error_of(&format!("{{{ok},\"top_p\":0}}")).contains("top_p"));
        assert!(error_of(&format!("{{{ok},\"max_tokens\":0}}")).contains("max_tokens"));
        assert!(error_of(&format!("{{{ok},\"n\":2}}")).contains("`n`"));
        assert!(error_of(&format!(
            "{{{ok},\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}}"
        ))
        .contains("at most 4"));
        assert!(error_of(&format!("{{{ok},\"stop\":\"\"}}")).contains("empty"));
    }
}
