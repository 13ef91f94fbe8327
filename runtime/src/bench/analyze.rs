//! From a caller's log to per-turn latencies, all measured from the true end of speech.
//!
//! The caller's media clock is the server's: both count samples from the first frame, so the
//! server's `turn` event times (ms after *its* end of speech) are moved onto the true end of
//! speech by adding `speech_end_ms - true end`.

use serde::Serialize;

use super::client::SessionLog;

/// Silence that ends the agent's audio after a barge-in. Longer than the gaps between Piper's
/// words and clauses, so a pause in the reply is not mistaken for the stop.
const STOP_GAP_S: f64 = 0.4;
/// A server turn is matched to the user turn whose true end of speech is nearest, within this.
const MATCH_WINDOW_S: f64 = 1.5;

#[derive(Debug, Clone, Serialize)]
pub struct TurnRecord {
    /// Concurrent sessions in this measurement.
    pub level: usize,
    pub session: usize,
    pub rep: usize,
    pub turn: usize,
    pub barge_in: bool,
    /// True end of speech on the session's media clock (s).
    pub speech_end_s: f64,
    /// The server's end of speech minus the true one (its VAD's view), ms.
    pub server_speech_end_offset_ms: Option<f64>,
    /// ms after the true end of speech.
    pub asr_final_ms: Option<f64>,
    pub llm_first_token_ms: Option<f64>,
    pub tts_first_audio_ms: Option<f64>,
    /// First audible agent audio at the client, ms after the true end of speech.
    pub v2v_ms: Option<f64>,
    /// The server's own voice-to-voice (from its end of speech to its first frame out).
    pub server_v2v_ms: Option<f64>,
    /// "hit", "miss" or "none".
    pub speculative: Option<String>,
    /// Barge-in: user speech start -> last audible agent frame at the client, ms.
    pub barge_in_stop_ms: Option<f64>,
    /// Barge-in: user speech start -> the server's `clear` event at the client, ms.
    pub barge_in_clear_ms: Option<f64>,
    /// Barge-in: whether the agent was audible when the user began (else nothing to stop).
    pub agent_talking_at_barge_in: Option<bool>,
    /// Barge-in: agent audio heard before the user began, ms.
    pub barge_in_after_agent_ms: Option<f64>,
    pub user_text: Option<String>,
    pub agent_text: Option<String>,
}

pub fn turns(log: &SessionLog, level: usize, session: usize, rep: usize) -> Vec<TurnRecord> {
    let audible: Vec<f64> = log
        .audio
        .iter()
        .filter(|(_, a)| *a)
        .map(|(t, _)| *t)
        .collect();
    let mut out: Vec<TurnRecord> = Vec::new();
    for (i, t) in log.turns.iter().enumerate() {
        let next_start = log
            .turns
            .get(i + 1)
            .map_or(f64::INFINITY, |n| n.speech_start_s);
        let mut rec = TurnRecord {
            level,
            session,
            rep,
            turn: i + 1,
            barge_in: t.barge_in,
            speech_end_s: t.speech_end_s,
            server_speech_end_offset_ms: None,
            asr_final_ms: None,
            llm_first_token_ms: None,
            tts_first_audio_ms: None,
            v2v_ms: None,
            server_v2v_ms: None,
            speculative: None,
            barge_in_stop_ms: None,
            barge_in_clear_ms: None,
            agent_talking_at_barge_in: None,
            barge_in_after_agent_ms: t
                .agent_audio_began_s
                .map(|b| (t.speech_start_s - b) * 1000.0),
            user_text: None,
            agent_text: None,
        };
        // The reply to this turn cannot begin before the audio it interrupted has stopped.
        let mut not_before = t.speech_end_s;
        if t.barge_in {
            let s = t.speech_start_s;
            let talking = audible.iter().any(|&a| a > s - 0.1 && a <= s + 0.05);
            rec.agent_talking_at_barge_in = Some(talking);
            let mut last = s;
            for &a in audible.iter().filter(|&&a| a > s) {
                if a - last > STOP_GAP_S {
                    break;
                }
                last = a;
            }
            // Still audible when the user finished: the interruption was not honoured.
            if talking && last < t.speech_end_s {
                rec.barge_in_stop_ms = Some((last - s) * 1000.0);
            }
            not_before = not_before.max(last);
            rec.barge_in_clear_ms = log
                .events
                .iter()
                .find(|(at, e)| *at > s && e["type"] == "clear")
                .map(|(at, _)| (at - s) * 1000.0);
        }
        rec.v2v_ms = audible
            .iter()
            .find(|&&a| a > not_before && a < next_start)
            .map(|a| (a - t.speech_end_s) * 1000.0);
        out.push(rec);
    }
    // The server's turn events, each matched to the nearest true end of speech.
    for (_, e) in &log.events {
        if e["type"] != "turn" || e["user_text"].as_str().is_none_or(|s| s.trim().is_empty()) {
            continue;
        }
        let Some(server_end) = e["speech_end_ms"].as_f64().map(|ms| ms / 1000.0) else {
            continue;
        };
        let Some(rec) = out
            .iter_mut()
            .filter(|r| (r.speech_end_s - server_end).abs() < MATCH_WINDOW_S)
            .min_by(|a, b| {
                let da = (a.speech_end_s - server_end).abs();
                let db = (b.speech_end_s - server_end).abs();
                da.total_cmp(&db)
            })
        else {
            continue;
        };
        if rec.server_speech_end_offset_ms.is_some() {
            continue; // the first reply to a turn is the one measured
        }
        let shift = (server_end - rec.speech_end_s) * 1000.0;
        let moved = |key: &str| e[key].as_f64().map(|ms| ms + shift);
        rec.server_speech_end_offset_ms = Some(shift);
        rec.asr_final_ms = moved("asr_final_ms");
        rec.llm_first_token_ms = moved("llm_first_token_ms");
        rec.tts_first_audio_ms = moved("tts_first_audio_ms");
        rec.server_v2v_ms = e["voice_to_voice_ms"].as_f64();
        rec.speculative = e["speculative"].as_str().map(str::to_owned);
        rec.user_text = e["user_text"].as_str().map(str::to_owned);
        rec.agent_text = e["agent_text"].as_str().map(str::to_owned);
    }
    out
}

/// p-th percentile (0-100), linear between closest ranks; `None` for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let k = (v.len() - 1) as f64 * p / 100.0;
    let (lo, hi) = (k.floor() as usize, (k.ceil() as usize).min(v.len() - 1));
    Some(v[lo] + (v[hi] - v[lo]) * (k - lo as f64))
}

#[cfg(test)]
mod tests {
    use super::super::client::SpokenTurn;
    use super::*;

    #[test]
    fn percentiles_interpolate_and_skip_nothing_measured() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[0.0, 10.0], 95.0), Some(9.5));
    }

    #[test]
    fn v2v_barge_in_stop_and_server_stages_come_from_the_log() {
        let mut log = SessionLog {
            turns: vec![
                SpokenTurn {
                    speech_start_s: 1.0,
                    speech_end_s: 2.0,
                    barge_in: false,
                    agent_audio_began_s: None,
                },
                SpokenTurn {
                    speech_start_s: 3.0,
                    speech_end_s: 4.0,
                    barge_in: true,
                    agent_audio_began_s: Some(2.6),
                },
            ],
            ..SessionLog::default()
        };
        // Reply 1 is audible from 2.6 s until 3.2 s; reply 2 starts at 4.9 s.
        let mut t = 2.6;
        while t < 3.21 {
            log.audio.push((t, true));
            t += 0.02;
        }
        log.audio.push((3.22, false));
        log.audio.push((4.9, true));
        log.events
            .push((3.15, serde_json::json!({"type": "clear"})));
        log.events.push((
            3.3,
            serde_json::json!({"type": "turn", "user_text": "hi", "speech_end_ms": 2100.0,
                "asr_final_ms": 250.0, "llm_first_token_ms": 400.0, "tts_first_audio_ms": 500.0,
                "voice_to_voice_ms": 560.0, "speculative": "hit"}),
        ));
        let r = turns(&log, 1, 0, 0);
        assert!((r[0].v2v_ms.unwrap() - 600.0).abs() < 1e-6);
        // Server stages move onto the true end of speech (its VAD ended 100 ms late).
        assert!((r[0].asr_final_ms.unwrap() - 350.0).abs() < 1e-6);
        assert_eq!(r[0].speculative.as_deref(), Some("hit"));
        assert!((r[1].barge_in_stop_ms.unwrap() - 200.0).abs() < 1.0);
        assert!((r[1].barge_in_clear_ms.unwrap() - 150.0).abs() < 1e-6);
        assert!((r[1].v2v_ms.unwrap() - 900.0).abs() < 1e-6);
        assert_eq!(r[1].asr_final_ms, None);
    }
}
