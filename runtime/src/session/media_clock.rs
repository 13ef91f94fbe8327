//! The session's media clock: how far the caller's audio stream has come, in media seconds.
//!
//! Transports send a frame every 20 ms, so the clock is the audio received. When the stream
//! goes quiet (a half-duplex client, a phone that stops sending in silence), it moves on with
//! wall time, so that the VAD's and the turn manager's timers still fire: missing audio counts
//! as silence. Only a quiet the control loop has *watched* counts, though. On a starved machine
//! the loop (and the transport's reader, on the same runtime) may not run for a few hundred
//! milliseconds while the caller's frames wait in a socket or a channel; counting that stall as
//! silence would end the caller's turn in the middle of a word (seen under twenty concurrent
//! calls on two cores: "Is my | hemoglobin normal?" split into two utterances, and the call left
//! unanswered). Sans-I/O: every method takes `now`.

use std::time::{Duration, Instant};

/// The rate of the audio the clock counts.
const RATE: f64 = 16_000.0;
/// A watched gap without frames longer than this is the stream going quiet, not jitter.
const QUIET_AFTER: Duration = Duration::from_millis(100);
/// A loop tick later than this was not running on time: the time it was late was not watched.
const LATE_TICK: Duration = Duration::from_millis(20);

pub(super) struct MediaClock {
    samples: u64,
    /// The start of the quiet the loop has watched: the last audio, moved on past every stretch
    /// in which the loop itself was not running.
    quiet_since: Instant,
}

impl MediaClock {
    pub(super) fn new(now: Instant) -> Self {
        MediaClock {
            samples: 0,
            quiet_since: now,
        }
    }

    /// `samples` of 16 kHz audio arrived.
    pub(super) fn on_audio(&mut self, samples: usize, now: Instant) {
        self.samples += samples as u64;
        self.quiet_since = now;
    }

    /// The loop's periodic tick ran `late` after it was due.
    pub(super) fn on_tick(&mut self, late: Duration, now: Instant) {
        if late > LATE_TICK {
            self.quiet_since = (self.quiet_since + late).min(now);
        }
    }

    /// Media time now: the audio received, plus the watched quiet once the stream has gone quiet.
    pub(super) fn now(&self, now: Instant) -> f64 {
        let received = self.samples as f64 / RATE;
        let quiet = now.saturating_duration_since(self.quiet_since);
        if quiet > QUIET_AFTER {
            received + quiet.as_secs_f64()
        } else {
            received
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: usize = 320;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_clock_is_the_audio_received_while_frames_keep_coming() {
        let t0 = Instant::now();
        let mut clock = MediaClock::new(t0);
        for i in 0..50 {
            clock.on_audio(FRAME, t0 + ms(20 * i + 5));
        }
        assert!((clock.now(t0 + ms(1_010)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_quiet_stream_moves_the_clock_on_with_wall_time() {
        let t0 = Instant::now();
        let mut clock = MediaClock::new(t0);
        clock.on_audio(16_000, t0 + ms(1_000));
        // Jitter: no silence is assumed yet.
        assert_eq!(clock.now(t0 + ms(1_080)), 1.0);
        for tick in 1..=15 {
            clock.on_tick(ms(1), t0 + ms(1_000 + 20 * tick));
        }
        assert!((clock.now(t0 + ms(1_300)) - 1.3).abs() < 1e-9);
    }

    #[test]
    fn a_stall_of_the_loop_itself_is_not_taken_for_silence() {
        let t0 = Instant::now();
        let mut clock = MediaClock::new(t0);
        clock.on_audio(16_000, t0 + ms(1_000));
        // The loop did not run for 400 ms; its tick comes that late, and the caller's frames
        // are still on their way.
        clock.on_tick(ms(400), t0 + ms(1_420));
        assert_eq!(clock.now(t0 + ms(1_420)), 1.0);
        // Then the stream really is quiet: only what the loop watched counts.
        for tick in 1..=10 {
            clock.on_tick(ms(2), t0 + ms(1_420 + 20 * tick));
        }
        // 20 ms before the stall and 200 ms after it.
        let watched = clock.now(t0 + ms(1_620));
        assert!((watched - 1.22).abs() < 1e-9, "{watched}");
    }
}
