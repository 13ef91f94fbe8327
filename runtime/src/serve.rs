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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use talkline_asr::audio::To16k;
use talkline_asr::engine::AsrEngine;
use talkline_asr::whisper::DecodeOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
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
    #[command(flatten)]
    pub sip: crate::sip::SipArgs,
}

/// Largest WebSocket message accepted: 1 s of 48 kHz PCM16 is 96 kB.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Audio waiting for the session, in 20 ms frames. Policy when full: drop the frame and count it.
const INPUT_QUEUE: usize = 100;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    max_sessions: usize,
    next_id: Arc<AtomicU64>,
    webrtc: Arc<WebRtcHub>,
}

impl App {
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
        serve(shared, webrtc, openai, args).await
    })
}

/// Loads every model a live session needs, once.
pub fn load_shared(
    config: &Config,
    store: &ModelStore,
    max_tokens: usize,
) -> anyhow::Result<Shared> {
    let whisper = crate::stages::load_whisper(config, store)?;
    let options = DecodeOptions {
        threads: config.asr.threads,
        language: config.asr.language.clone(),
        ..DecodeOptions::default()
    };
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
) -> anyhow::Result<()> {
    let app = App {
        shared,
        max_sessions: args.max_sessions,
        next_id: Arc::new(AtomicU64::new(0)),
        webrtc,
    };
    let (reserve, release) = (app.clone(), app.clone());
    let slots = crate::sip::Slots {
        reserve: Arc::new(move || reserve.reserve(metrics::Transport::sip)),
        release: Arc::new(move || release.release()),
    };
    let sip = crate::sip::start(&args.sip, app.shared.clone(), slots).await?;
    let router = Router::new()
        .route("/", get(demo_page))
        .route("/app.js", get(demo_script))
        .route("/style.css", get(demo_style))
        .route("/webrtc/offer", post(webrtc_offer))
        .route("/webrtc/session/{id}", delete(webrtc_hang_up))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_upgrade))
        .route("/twilio", get(twilio_upgrade))
        .with_state(app)
        .merge(openai.unwrap_or_default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "talkline serving on http://{addr} (open it in a browser and press Call; WebSocket: ws://{addr}/ws)"
    );
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
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
            .context("closed before hello")??;
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

    let (input_tx, input_rx) = mpsc::channel::<Vec<f32>>(INPUT_QUEUE);
    let (keys_tx, keys_rx) = mpsc::channel::<char>(KEY_QUEUE);
    let (output_tx, mut output_rx) = mpsc::channel::<SessionOutput>(session::OUTPUT_QUEUE);
    let cancel = CancellationToken::new();
    let session = tokio::spawn(session::run_with_keys(
        shared,
        rate,
        input_rx,
        Some(keys_rx),
        output_tx,
        cancel.clone(),
        format!("ws-{id}"),
    ));
    let writer = tokio::spawn(async move {
        while let Some(out) = output_rx.recv().await {
            let msg = match out {
                SessionOutput::Audio(samples) => WsMessage::Binary(
                    samples
                        .iter()
                        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                ),
                SessionOutput::Clear => {
                    WsMessage::Text(json!({"type": "clear"}).to_string().into())
                }
                SessionOutput::Event(e) => WsMessage::Text(e.to_string().into()),
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let mut resampler = To16k::new(rate)?;
    let mut dropped = 0u64;
    let mut errors = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(WsMessage::Binary(bytes)) => {
                let Some(samples) = decode_pcm16_frame(&bytes) else {
                    errors.push("an audio frame had an odd number of bytes; it was ignored");
                    continue;
                };
                let audio = resampler.push(&samples);
                if !audio.is_empty() && input_tx.try_send(audio).is_err() {
                    dropped += 1;
                }
            }
            Ok(WsMessage::Text(text)) => match parse_client_message(&text) {
                Ok(ClientMessage::Bye) => break,
                Ok(ClientMessage::Dtmf { digit }) => match parse_key(&digit) {
                    Some(key) => {
                        let _ = keys_tx.try_send(key);
                    }
                    None => errors.push("a dtmf digit must be one of 0-9, * and #"),
                },
                Ok(ClientMessage::Hello { .. }) => errors.push("hello was already received"),
                Err(_) => errors.push("a text message was not a known JSON message"),
            },
            Ok(WsMessage::Close(_)) | Err(_) => break,
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
    drop(input_tx);
    cancel.cancel();
    let result = session.await;
    writer.abort();
    match result {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("session task failed: {e}")),
    }
}
