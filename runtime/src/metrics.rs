//! Process-wide metrics for `/metrics` (OpenMetrics text, which Prometheus scrapes): sessions per
//! transport, per-stage latency histograms of every turn, turn outcomes, barge-ins, failures and
//! dropped audio. Only numbers and fixed labels: never a transcript, a name or a value a caller
//! said.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets in seconds: fine around a human turn gap (0.2-0.5 s), coarse beyond.
const LATENCY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0,
];

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum Stage {
    /// End of user speech -> final transcript.
    asr_final,
    /// End of user speech -> the LLM's first token.
    llm_first_token,
    /// End of user speech -> the first synthesized audio.
    tts_first_audio,
    /// End of user speech -> the first agent audio frame sent to the transport.
    voice_to_voice,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    websocket,
    twilio,
    webrtc,
    sip,
    local,
}

/// What a per-address rate limit refused (see [`crate::limits`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Admission {
    /// A `/ws` or `/twilio` connection.
    connection,
    /// A `POST /webrtc/offer`.
    offer,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Speculation {
    hit,
    miss,
    none,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: Stage,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    kind: Admission,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TurnLabels {
    speculative: Speculation,
    interrupted: bool,
}

type Histograms = Family<StageLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    sessions_active: Gauge,
    sessions: Family<TransportLabels, Counter>,
    sessions_rejected: Counter,
    rate_limited: Family<AdmissionLabels, Counter>,
    stage_latency: Histograms,
    turns: Family<TurnLabels, Counter>,
    reply_failures: Counter,
    audio_frames_dropped: Counter,
    sip_requests_throttled: Counter,
}

/// The latencies of one turn, in seconds from the end of the user's speech.
#[derive(Debug, Default, Clone, Copy)]
pub struct TurnLatencies {
    pub asr_final: Option<f64>,
    pub llm_first_token: Option<f64>,
    pub tts_first_audio: Option<f64>,
    pub voice_to_voice: Option<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("talkline");
        let sessions_active = Gauge::default();
        let sessions = Family::default();
        let sessions_rejected = Counter::default();
        let rate_limited = Family::default();
        let stage_latency: Histograms =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS.iter().copied()));
        let turns = Family::default();
        let reply_failures = Counter::default();
        let audio_frames_dropped = Counter::default();
        let sip_requests_throttled = Counter::default();
        registry.register(
            "sessions_active",
            "Sessions in progress, all transports",
            sessions_active.clone(),
        );
        registry.register(
            "sessions",
            "Sessions started, by transport",
            sessions.clone(),
        );
        registry.register(
            "sessions_rejected",
            "Sessions refused because the server was full",
            sessions_rejected.clone(),
        );
        registry.register(
            "rate_limited",
            "Connections and offers refused with 429 by the per-address rate limits",
            rate_limited.clone(),
        );
        registry.register_with_unit(
            "stage_latency",
            "Time from the end of the user's speech to each stage's first output, per turn",
            Unit::Seconds,
            stage_latency.clone(),
        );
        registry.register(
            "turns",
            "Agent turns finished, by speculative outcome and whether the user barged in",
            turns.clone(),
        );
        registry.register(
            "reply_failures",
            "Replies the LLM or TTS could not produce",
            reply_failures.clone(),
        );
        registry.register(
            "audio_frames_dropped",
            "Agent audio frames dropped because a transport read too slowly",
            audio_frames_dropped.clone(),
        );
        registry.register(
            "sip_requests_throttled",
            "SIP requests dropped unanswered because their source exceeded its rate",
            sip_requests_throttled.clone(),
        );
        Self {
            registry,
            sessions_active,
            sessions,
            sessions_rejected,
            rate_limited,
            stage_latency,
            turns,
            reply_failures,
            audio_frames_dropped,
            sip_requests_throttled,
        }
    }

    /// Takes a slot for a new session if fewer than `max` are active.
    pub fn try_start_session(&self, transport: Transport, max: usize) -> bool {
        let before = self.sessions_active.inc();
        if before >= max as i64 {
            self.sessions_active.dec();
            self.sessions_rejected.inc();
            return false;
        }
        self.sessions
            .get_or_create(&TransportLabels { transport })
            .inc();
        true
    }

    pub fn rate_limited(&self, kind: Admission) {
        self.rate_limited
            .get_or_create(&AdmissionLabels { kind })
            .inc();
    }

    pub fn end_session(&self) {
        self.sessions_active.dec();
    }

    pub fn sessions_active(&self) -> i64 {
        self.sessions_active.get()
    }

    pub fn observe_turn(
        &self,
        latencies: TurnLatencies,
        speculative: Speculation,
        interrupted: bool,
    ) {
        for (stage, value) in [
            (Stage::asr_final, latencies.asr_final),
            (Stage::llm_first_token, latencies.llm_first_token),
            (Stage::tts_first_audio, latencies.tts_first_audio),
            (Stage::voice_to_voice, latencies.voice_to_voice),
        ] {
            // A stage that finished before the user did (a speculative start) is a 0 s wait.
            if let Some(seconds) = value.filter(|s| s.is_finite()) {
                self.stage_latency
                    .get_or_create(&StageLabels { stage })
                    .observe(seconds.max(0.0));
            }
        }
        self.turns
            .get_or_create(&TurnLabels {
                speculative,
                interrupted,
            })
            .inc();
    }

    pub fn reply_failed(&self) {
        self.reply_failures.inc();
    }

    pub fn audio_frames_dropped(&self, frames: u64) {
        self.audio_frames_dropped.inc_by(frames);
    }

    /// SIP requests the per-source flood throttle dropped.
    pub fn sip_requests_throttled(&self, requests: u64) {
        self.sip_requests_throttled.inc_by(requests);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        text
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_fill_the_stage_histograms_and_sessions_are_limited() {
        let m = Metrics::new();
        assert!(m.try_start_session(Transport::webrtc, 1));
        assert!(!m.try_start_session(Transport::websocket, 1));
        m.rate_limited(Admission::offer);
        m.observe_turn(
            TurnLatencies {
                asr_final: Some(0.18),
                llm_first_token: Some(0.31),
                tts_first_audio: Some(0.45),
                voice_to_voice: Some(0.47),
            },
            Speculation::hit,
            false,
        );
        let text = m.encode();
        for line in [
            "talkline_sessions_active 1",
            "talkline_sessions_total{transport=\"webrtc\"} 1",
            "talkline_sessions_rejected_total 1",
            "talkline_rate_limited_total{kind=\"offer\"} 1",
            "talkline_stage_latency_seconds_count{stage=\"voice_to_voice\"} 1",
            "talkline_stage_latency_seconds_bucket{le=\"0.2\",stage=\"asr_final\"} 1",
            "talkline_stage_latency_seconds_bucket{le=\"0.15\",stage=\"asr_final\"} 0",
            "talkline_turns_total{speculative=\"hit\",interrupted=\"false\"} 1",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        m.end_session();
        assert_eq!(m.sessions_active(), 0);
    }
}
