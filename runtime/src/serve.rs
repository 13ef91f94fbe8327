//! `talkline serve`: HTTP with the browser demo at `/`, WebRTC signaling (`POST /webrtc/offer`,
//! `DELETE /webrtc/session/{id}`; see [`crate::webrtc`]), the WebSocket transports (`/ws`, and
//! `/twilio` for Twilio Media Streams; see [`crate::twilio`]), `/healthz`, `/metrics`, and the
//! OpenAI-compatible `/v1/chat/completions` and `/v1/models` (see [`crate::openai`]).
//!
//! WebSocket protocol: the client first sends `{"type":"hello","sample_rate":16000}` (8-48 kHz),
//! then binary frames of mono PCM16 little-endian audio at that rate, and may send keypad keys as
//! `{"type":"dtmf","digit":"5"}`. The server sends binary
//! frames of agent audio at the same rate, paced at 20 ms, and JSON events: `ready`, `partial`,
//! `final`, `turn` (texts and latencies), `clear` (drop queued audio: barge-in), `error`
//! (with `stage` and `kind` when a reply failed) and `fallback` (the fallback line starts playing).
//!
//! With `[tls]` (or `--tls-cert`/`--tls-key`) everything is served over HTTPS and WSS instead
//! (see [`crate::tls`]). New connections and offers are rate-limited per client address
//! ([`crate::limits`], 429), sessions by `--max-sessions` (503); oversize bodies get 413 and
//! oversize WebSocket messages a close with code 1009.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::ws::{
    close_code, CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade,
};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::serve::IncomingStream;
use axum::Router;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use talkline_asr::audio::To16k;
use talkline_asr::engine::AsrEngine;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LimitsConfig};
use crate::limits::RateLimiter;
use crate::metrics;
use crate::models::ModelStore;
use crate::session::{self, SessionOutput, Shared};
use crate::turn::TurnConfig;
use crate::webrtc::{OfferError, WebRtcHub};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Concurrent sessions; more are refused with 503.
    #[arg(long, default_value_t = 4)]
    pub max_sessions: usize,
    /// Most tokens in one reply. Default: `[agent] max_reply_tokens`.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// PEM certificate chain: serve HTTPS and WSS instead of HTTP and WS (with `--tls-key`).
    /// Overrides `[tls] cert`.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`. Overrides `[tls] key`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub sip: crate::sip::SipArgs,
}

/// Largest WebSocket message accepted (`/ws` and `/twilio`): 1 s of 48 kHz PCM16 is 96 kB.
/// A larger one ends the call with close code 1009 (message too big).
pub(crate) const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest WebSocket frame read. Above [`MAX_MESSAGE_BYTES`] so that a message a little over the
/// limit is read whole and refused with a clean 1009 close; a bigger frame is refused from its
/// header alone, without buffering it (the client may then see a reset rather than the close).
const MAX_FRAME_BYTES: usize = 4 * MAX_MESSAGE_BYTES;
/// Largest SDP offer read (`POST /webrtc/offer`); more gets 413. A browser's offer with every
/// ICE candidate gathered is a few kB.
pub const MAX_SDP_OFFER_BYTES: usize = 64 * 1024;
/// How long a refused socket's writer gets to send its close frame.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Audio waiting for the session, in 20 ms frames. Policy when full: drop the frame and count it.
const INPUT_QUEUE: usize = 100;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    max_sessions: usize,
    next_id: Arc<AtomicU64>,
    webrtc: Arc<WebRtcHub>,
    connection_limit: Arc<Mutex<RateLimiter>>,
    offer_limit: Arc<Mutex<RateLimiter>>,
}

/// The TCP peer's address, for the per-address limits. Set by the listener, never from a
/// header: `X-Forwarded-For` is whatever the client wants it to be.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl App {
    /// Takes one admission of `kind` for `peer`; the 429 that refuses it when over the limit.
    fn refuse_over_limit(&self, kind: metrics::Admission, peer: Peer) -> Option<Response> {
        let limiter = match kind {
            metrics::Admission::connection => &self.connection_limit,
            metrics::Admission::offer => &self.offer_limit,
        };
        // A panic elsewhere cannot leave a bucket half-updated: `check` only assigns numbers.
        let checked = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(peer.0.ip(), Instant::now());
        checked.err().map(|wait| {
            self.shared.metrics.rate_limited(kind);
            tracing::debug!(peer = %peer.0.ip(), ?kind, "rate-limited");
            let seconds = crate::limits::retry_after_seconds(wait);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, seconds.to_string())],
                format!("too many new calls from your address; retry in {seconds} s\n"),
            )
                .into_response()
        })
    }

    /// Takes a session slot and numbers the session; `None` when the server is full.
    fn reserve(&self, transport: metrics::Transport) -> Option<u64> {
        if !self
            .shared
            .metrics
            .try_start_session(transport, self.max_sessions)
        {
            return None;
        }
        Some(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn release(&self) {
        self.shared.metrics.end_session();
    }
}

fn server_full() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        "too many sessions; retry later\n",
    )
        .into_response()
}

pub fn run(args: ServeArgs, config_path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (config, _) = Config::load(config_path)?;
    // Before the models load: a bad certificate should fail at once.
    let tls = crate::tls::configured(
        args.tls_cert.as_deref().or(config.tls.cert.as_deref()),
        args.tls_key.as_deref().or(config.tls.key.as_deref()),
    )?;
    let limits = config.limits.clone();
    let store = ModelStore::open_default()?;
    let max_tokens = args.max_tokens.unwrap_or(config.agent.max_reply_tokens);
    let shared = Arc::new(load_shared(&config, &store, max_tokens)?);
    let openai = crate::openai::router(&config, &store, shared.chat.clone())?;
    let webrtc = config.webrtc.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let webrtc = Arc::new(WebRtcHub::new(&webrtc)?);
        serve(shared, webrtc, openai, args, tls, &limits).await
    })
}

/// Loads every model a live session needs, once.
pub fn load_shared(
    config: &Config,
    store: &ModelStore,
    max_tokens: usize,
) -> anyhow::Result<Shared> {
    let whisper = crate::stages::load_whisper(config, store)?;
    let options = config.asr.decode_options();
    let asr = AsrEngine::new(whisper, options, config.asr.max_concurrent_decodes);
    // Probe once so a missing VAD model is reported at start, not per call.
    drop(crate::stages::load_vad(config, store));
    let vad_config = config.clone();
    let vad_store = store.clone();
    let voice = Arc::new(Mutex::new(crate::stages::load_voice(config, store)?));
    let fallback = session::FallbackLine::synthesize(&voice, &config.agent.fallback_line)?;
    Ok(Shared {
        asr,
        streaming: config.streaming(),
        vad: Box::new(move || crate::stages::load_vad(&vad_config, &vad_store)),
        chat: crate::stages::load_chat_model(config, store)?,
        voice,
        metrics: Arc::new(metrics::Metrics::new()),
        echo_cancellation: config.audio.echo_cancellation,
        agents: crate::agent::AgentFactory::from_config(config)?,
        idle_timeout: std::time::Duration::from_secs_f64(config.agent.idle_timeout_s.max(1.0)),
        max_tokens,
        turn: TurnConfig {
            vad_threshold: config.vad.threshold,
            ..config.turn.clone()
        },
        fallback,
        chunker: config.tts.chunker(),
    })
}

async fn serve(
    shared: Arc<Shared>,
    webrtc: Arc<WebRtcHub>,
    openai: Option<Router>,
    args: ServeArgs,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: &LimitsConfig,
) -> anyhow::Result<()> {
    let app = App {
        shared,
        max_sessions: args.max_sessions,
        next_id: Arc::new(AtomicU64::new(0)),
        webrtc,
        connection_limit: Arc::new(Mutex::new(RateLimiter::new(
            limits.connections_per_minute_per_ip,
        ))),
        offer_limit: Arc::new(Mutex::new(RateLimiter::new(
            limits.offers_per_minute_per_ip,
        ))),
    };
    let (reserve, release) = (app.clone(), app.clone());
    let slots = crate::sip::Slots {
        reserve: Arc::new(move || reserve.reserve(metrics::Transport::sip)),
        release: Arc::new(move || release.release()),
    };
    let sip = crate::sip::start(&args.sip, app.shared.clone(), slots).await?;
    // The limits run as middleware, so a refused client costs neither an upgrade nor a read of
    // its offer.
    let limit_connections = from_fn_with_state(app.clone(), limit_connections);
    let limit_offers = from_fn_with_state(app.clone(), limit_offers);
    let router = Router::new()
        .route("/", get(demo_page))
        .route("/app.js", get(demo_script))
        .route("/style.css", get(demo_style))
        .route(
            "/webrtc/offer",
            post(webrtc_offer)
                .layer(DefaultBodyLimit::max(MAX_SDP_OFFER_BYTES))
                .layer(limit_offers),
        )
        .route("/webrtc/session/{id}", delete(webrtc_hang_up))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_upgrade).layer(limit_connections.clone()))
        .route("/twilio", get(twilio_upgrade).layer(limit_connections))
        .with_state(app)
        .merge(openai.unwrap_or_default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (http, ws) = if tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    println!(
        "talkline serving on {http}://{addr} (open it in a browser and press Call; WebSocket: {ws}://{addr}/ws)"
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let served = match tls {
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Peer>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        None => {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Peer>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
    }
    .context("serving");
    if let Some(sip) = sip {
        sip.stop().await;
    }
    served
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        app.shared.metrics.encode(),
    )
}

async fn limit_connections(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    match app.refuse_over_limit(metrics::Admission::connection, peer) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

async fn limit_offers(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    match app.refuse_over_limit(metrics::Admission::offer, peer) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

async fn ws_upgrade(State(app): State<App>, ws: WebSocketUpgrade) -> Response {
    upgrade(app, ws, Transport::Pcm)
}

async fn twilio_upgrade(State(app): State<App>, ws: WebSocketUpgrade) -> Response {
    upgrade(app, ws, Transport::Twilio)
}

#[derive(Clone, Copy)]
enum Transport {
    Pcm,
    Twilio,
}

// The demo is compiled in, so `talkline serve` works offline and from any directory.
async fn demo_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../web-demo/index.html"),
    )
}

async fn demo_script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../web-demo/app.js"),
    )
}

async fn demo_style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../web-demo/style.css"),
    )
}

/// WHIP-style: the body is the SDP offer; the answer comes back as `application/sdp` with the
/// call's URL in `Location`.
async fn webrtc_offer(State(app): State<App>, offer: String) -> Response {
    let Some(id) = app.reserve(metrics::Transport::webrtc) else {
        return server_full();
    };
    let release = app.clone();
    let answered = app
        .webrtc
        .answer(offer, app.shared.clone(), id, move || release.release())
        .await;
    match answered {
        Ok(answer) => (
            StatusCode::CREATED,
            [
                (header::CONTENT_TYPE, "application/sdp".to_string()),
                (header::LOCATION, format!("/webrtc/session/{id}")),
            ],
            answer,
        )
            .into_response(),
        Err(e) => {
            app.release();
            let status = match e {
                OfferError::BadOffer(_) => StatusCode::BAD_REQUEST,
                OfferError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::info!("WebRTC offer refused: {e:#}");
            (status, format!("{e}\n")).into_response()
        }
    }
}

async fn webrtc_hang_up(State(app): State<App>, Path(id): Path<u64>) -> StatusCode {
    if app.webrtc.hang_up(id) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

fn upgrade(app: App, ws: WebSocketUpgrade, transport: Transport) -> Response {
    // Reserve a slot before upgrading, so a full server answers 503 rather than a dead socket.
    let kind = match transport {
        Transport::Pcm => metrics::Transport::websocket,
        Transport::Twilio => metrics::Transport::twilio,
    };
    let Some(id) = app.reserve(kind) else {
        return server_full();
    };
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let shared = app.shared.clone();
            let result = match transport {
                Transport::Pcm => handle_socket(socket, shared, id).await,
                Transport::Twilio => crate::twilio::handle_socket(socket, shared, id).await,
            };
            if let Err(e) = result {
                tracing::info!("session {id} ended: {e:#}");
            }
            app.release();
        })
}

/// A text message from a `/ws` client. Public (hidden) only for the fuzz target `ws_control`,
/// which checks that what parses serializes back to the same message.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello {
        sample_rate: u32,
    },
    /// A keypad key (`0`-`9`, `*`, `#`), for the agent: a PIN, a menu choice.
    Dtmf {
        digit: String,
    },
    Bye,
}

/// The one parser of client text messages.
#[doc(hidden)]
pub fn parse_client_message(text: &str) -> Result<ClientMessage, serde_json::Error> {
    serde_json::from_str(text)
}

/// A binary `/ws` audio frame (16-bit little-endian PCM) as samples; `None` for an odd length.
#[doc(hidden)]
pub fn decode_pcm16_frame(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let mut samples: Vec<f32> = bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
        .collect();
    talkline_asr::audio::sanitize(&mut samples);
    Some(samples)
}

/// Keys waiting for the session. Policy when full: the key is dropped (a caller cannot outtype
/// a session that reads them as they come).
pub(crate) const KEY_QUEUE: usize = 32;

/// A keypad key from a wire message: exactly one of `0`-`9`, `*`, `#`.
pub fn parse_key(digit: &str) -> Option<char> {
    let mut chars = digit.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_digit() || c == '*' || c == '#' => Some(c),
        _ => None,
    }
}

/// The close frame for a read error that broke the size limits: 1009, message too big, with
/// the limit in the reason. `None` for any other error.
pub(crate) fn oversize_close(error: &axum::Error) -> Option<CloseFrame> {
    use std::error::Error as _;
    match error.source()?.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some(CloseFrame {
            code: close_code::SIZE,
            reason: format!("message too big: the limit is {MAX_MESSAGE_BYTES} bytes").into(),
        }),
        _ => None,
    }
}

/// Ends a socket that has not been split yet after a read error, with a 1009 close when the
/// error was an oversize message; returns the error for the caller to report.
pub(crate) async fn end_after_read_error(
    socket: &mut WebSocket,
    error: axum::Error,
) -> anyhow::Error {
    if let Some(frame) = oversize_close(&error) {
        let _ = socket.send(WsMessage::Close(Some(frame))).await;
    }
    anyhow::Error::new(error).context("reading the WebSocket")
}

/// A session behind a WebSocket (`/ws`, `/twilio`): its task, the queues into it, and the task
/// that writes its output to the socket.
pub(crate) struct SocketSession {
    pub(crate) input_tx: mpsc::Sender<Vec<f32>>,
    pub(crate) keys_tx: mpsc::Sender<char>,
    close_tx: mpsc::Sender<CloseFrame>,
    cancel: CancellationToken,
    session: tokio::task::JoinHandle<anyhow::Result<()>>,
    writer: tokio::task::JoinHandle<()>,
}

impl SocketSession {
    /// Starts a session at `rate`, and a writer that sends each of its outputs to `sink` as
    /// `encode` makes it (`None`: nothing to send).
    pub(crate) fn start(
        shared: Arc<Shared>,
        rate: u32,
        input_queue: usize,
        name: String,
        mut sink: SplitSink<WebSocket, WsMessage>,
        mut encode: impl FnMut(SessionOutput) -> Option<WsMessage> + Send + 'static,
    ) -> SocketSession {
        let (input_tx, input_rx) = mpsc::channel::<Vec<f32>>(input_queue);
        let (keys_tx, keys_rx) = mpsc::channel::<char>(KEY_QUEUE);
        let (output_tx, mut output_rx) = mpsc::channel::<SessionOutput>(session::OUTPUT_QUEUE);
        // At most one close frame, ahead of any queued output.
        let (close_tx, mut close_rx) = mpsc::channel::<CloseFrame>(1);
        let cancel = CancellationToken::new();
        let session = tokio::spawn(session::run_with_keys(
            shared,
            rate,
            input_rx,
            Some(keys_rx),
            output_tx,
            cancel.clone(),
            name,
        ));
        let writer = tokio::spawn(async move {
            loop {
                let out = tokio::select! {
                    biased;
                    Some(frame) = close_rx.recv() => {
                        let _ = sink.send(WsMessage::Close(Some(frame))).await;
                        return;
                    }
                    out = output_rx.recv() => match out {
                        Some(out) => out,
                        None => break,
                    },
                };
                let Some(msg) = encode(out) else {
                    continue;
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        SocketSession {
            input_tx,
            keys_tx,
            close_tx,
            cancel,
            session,
            writer,
        }
    }

    /// Ends the session once the socket is read to its end; `close` goes out ahead of any
    /// output still queued, and the writer gets [`CLOSE_GRACE`] to send it.
    pub(crate) async fn finish(mut self, close: Option<CloseFrame>) -> anyhow::Result<()> {
        let closing = close.is_some();
        if let Some(frame) = close {
            let _ = self.close_tx.try_send(frame);
        }
        drop(self.input_tx);
        self.cancel.cancel();
        let result = self.session.await;
        if closing {
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut self.writer).await;
        }
        self.writer.abort();
        result.map_err(|e| anyhow::anyhow!("session task failed: {e}"))?
    }
}

fn error_event(message: &str) -> WsMessage {
    WsMessage::Text(
        json!({"type": "error", "message": message})
            .to_string()
            .into(),
    )
}

async fn handle_socket(mut socket: WebSocket, shared: Arc<Shared>, id: u64) -> anyhow::Result<()> {
    // The hello fixes the audio rate both ways.
    let rate = loop {
        let msg = tokio::time::timeout(HELLO_TIMEOUT, socket.recv())
            .await
            .context("no hello within 5 s")?
            .context("closed before hello")?;
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => return Err(end_after_read_error(&mut socket, e).await),
        };
        match msg {
            WsMessage::Text(text) => match parse_client_message(&text) {
                Ok(ClientMessage::Hello { sample_rate })
                    if (8_000..=48_000).contains(&sample_rate) =>
                {
                    break sample_rate
                }
                Ok(ClientMessage::Hello { sample_rate }) => {
                    socket
                        .send(error_event(&format!(
                            "sample_rate {sample_rate} is outside 8000-48000"
                        )))
                        .await?;
                    return Ok(());
                }
                Ok(ClientMessage::Bye) => return Ok(()),
                Ok(ClientMessage::Dtmf { .. }) => {
                    socket
                        .send(error_event("send a hello message first"))
                        .await?
                }
                Err(e) => {
                    socket
                        .send(error_event(&format!("expected a hello message: {e}")))
                        .await?
                }
            },
            WsMessage::Close(_) => return Ok(()),
            _ => {
                socket
                    .send(error_event("send a hello message first"))
                    .await?
            }
        }
    };
    let (mut sink, mut stream) = socket.split();
    sink.send(WsMessage::Text(
        json!({"type": "ready", "sample_rate": rate})
            .to_string()
            .into(),
    ))
    .await?;

    let encode = |out| {
        Some(match out {
            SessionOutput::Audio(samples) => WsMessage::Binary(
                samples
                    .iter()
                    .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            SessionOutput::Clear => WsMessage::Text(json!({"type": "clear"}).to_string().into()),
            SessionOutput::Event(e) => WsMessage::Text(e.to_string().into()),
        })
    };
    let name = format!("ws-{id}");
    let session = SocketSession::start(shared, rate, INPUT_QUEUE, name, sink, encode);

    let mut resampler = To16k::new(rate)?;
    let mut dropped = 0u64;
    let mut errors = Vec::new();
    let mut close = None;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(WsMessage::Binary(bytes)) => {
                let Some(samples) = decode_pcm16_frame(&bytes) else {
                    errors.push("an audio frame had an odd number of bytes; it was ignored");
                    continue;
                };
                let audio = resampler.push(&samples);
                if !audio.is_empty() && session.input_tx.try_send(audio).is_err() {
                    dropped += 1;
                }
            }
            Ok(WsMessage::Text(text)) => match parse_client_message(&text) {
                Ok(ClientMessage::Bye) => break,
                Ok(ClientMessage::Dtmf { digit }) => match parse_key(&digit) {
                    Some(key) => {
                        let _ = session.keys_tx.try_send(key);
                    }
                    None => errors.push("a dtmf digit must be one of 0-9, * and #"),
                },
                Ok(ClientMessage::Hello { .. }) => errors.push("hello was already received"),
                Err(_) => errors.push("a text message was not a known JSON message"),
            },
            Ok(WsMessage::Close(_)) => break,
            Err(e) => {
                close = oversize_close(&e);
                break;
            }
            Ok(_) => {}
        }
        for e in errors.drain(..) {
            tracing::info!(session = id, "bad client message: {e}");
        }
    }
    if dropped > 0 {
        tracing::warn!(
            session = id,
            dropped,
            "input frames dropped: the session fell behind"
        );
    }
    if close.is_some() {
        tracing::info!(
            session = id,
            "a message over {MAX_MESSAGE_BYTES} bytes; closing with 1009"
        );
    }
    session.finish(close).await
}
