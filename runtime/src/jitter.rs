//! A receive jitter buffer for RTP audio, sans-I/O: it is told the time and never reads a clock.
//!
//! Packets come in with their 16-bit sequence number, in any order; they go out in order, once
//! each. A gap is waited for at most `max_delay` (measured from when the packet after it arrived),
//! then reported as [`Playout::Lost`] so the decoder can conceal it (Opus PLC, or silence for
//! G.711). Duplicates and packets arriving after their slot was played or given up are dropped
//! and counted; a jump far outside the window (a new stream, a sender restart) resynchronises.
//!
//! Written here rather than taken from a crate: webrtc-rs hands out RTP packets as they arrive
//! (its `SampleBuilder` reorders but neither conceals nor times out), and the SIP transport needs
//! the same logic on plain UDP.

use std::collections::BTreeMap;

/// How far (in packets) a sequence number may jump before the buffer resynchronises on it.
const RESYNC_DISTANCE: i64 = 500;
/// Consecutive losses reported at most for one gap; a longer gap is skipped, not concealed,
/// because minutes of PLC would only drift the media clock.
const MAX_CONCEALED: u64 = 10;
/// Packets held at most. Policy when full: the oldest gap is given up on.
const CAPACITY: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum Playout<T> {
    Packet(T),
    /// The packet in this slot never came in time.
    Lost,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    pub received: u64,
    pub duplicates: u64,
    pub late: u64,
    pub lost: u64,
    pub resyncs: u64,
}

pub struct JitterBuffer<T> {
    max_delay: f64,
    /// Extended (unwrapped) sequence number of the next packet to play.
    next: Option<i64>,
    /// The highest extended sequence number seen: the reference for unwrapping.
    highest: Option<i64>,
    /// Packets waiting, by extended sequence number, with their arrival time.
    waiting: BTreeMap<i64, (T, f64)>,
    stats: JitterStats,
}

impl<T> JitterBuffer<T> {
    /// `max_delay`: seconds a gap is waited for before the packets behind it play.
    pub fn new(max_delay: f64) -> Self {
        Self {
            max_delay,
            next: None,
            highest: None,
            waiting: BTreeMap::new(),
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Takes in one packet that arrived at `now`.
    pub fn push(&mut self, now: f64, sequence: u16, packet: T) {
        self.stats.received += 1;
        let extended = self.extend(sequence);
        let Some(next) = self.next else {
            self.next = Some(extended);
            self.highest = Some(extended);
            self.waiting.insert(extended, (packet, now));
            return;
        };
        if (extended - next).abs() > RESYNC_DISTANCE {
            self.stats.resyncs += 1;
            self.waiting.clear();
            self.next = Some(extended);
            self.highest = Some(extended);
            self.waiting.insert(extended, (packet, now));
            return;
        }
        if extended < next {
            self.stats.late += 1;
            return;
        }
        if self.waiting.contains_key(&extended) {
            self.stats.duplicates += 1;
            return;
        }
        self.highest = Some(self.highest.map_or(extended, |h| h.max(extended)));
        self.waiting.insert(extended, (packet, now));
        if self.waiting.len() > CAPACITY {
            self.give_up_gap();
        }
    }

    /// The next packet or loss to play at `now`, if any is due.
    pub fn pop(&mut self, now: f64) -> Option<Playout<T>> {
        let next = self.next?;
        if let Some((packet, _)) = self.waiting.remove(&next) {
            self.next = Some(next + 1);
            return Some(Playout::Packet(packet));
        }
        let (&first, &(_, arrived)) = self.waiting.iter().next()?;
        if now - arrived < self.max_delay {
            return None;
        }
        if first - next > MAX_CONCEALED as i64 {
            self.stats.lost += (first - next) as u64;
            self.next = Some(first);
            return self.pop(now);
        }
        self.stats.lost += 1;
        self.next = Some(next + 1);
        Some(Playout::Lost)
    }

    /// When `pop` may next return something though no packet arrives: the end of the wait for
    /// the current gap.
    pub fn poll_timeout(&self) -> Option<f64> {
        let next = self.next?;
        if self.waiting.contains_key(&next) {
            return None;
        }
        self.waiting
            .values()
            .next()
            .map(|(_, arrived)| arrived + self.max_delay)
    }

    fn give_up_gap(&mut self) {
        if let Some(&first) = self.waiting.keys().next() {
            if let Some(next) = self.next {
                self.stats.lost += (first - next).max(0) as u64;
            }
            self.next = Some(first);
        }
    }

    /// Unwraps a 16-bit sequence number to the one nearest the highest seen.
    fn extend(&self, sequence: u16) -> i64 {
        let Some(highest) = self.highest else {
            return sequence as i64;
        };
        let delta = sequence.wrapping_sub(highest as u16) as i16 as i64;
        highest + delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(buffer: &mut JitterBuffer<u16>, now: f64) -> Vec<Option<u16>> {
        std::iter::from_fn(|| buffer.pop(now))
            .map(|p| match p {
                Playout::Packet(p) => Some(p),
                Playout::Lost => None,
            })
            .collect()
    }

    #[test]
    fn in_order_packets_play_at_once() {
        let mut b = JitterBuffer::new(0.06);
        for s in 0..3 {
            b.push(0.0, s, s);
        }
        assert_eq!(drain(&mut b, 0.0), [Some(0), Some(1), Some(2)]);
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn a_reordered_packet_is_waited_for_and_played_in_order() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.00, 10, 10);
        b.push(0.02, 12, 12);
        assert_eq!(drain(&mut b, 0.02), [Some(10)]);
        assert_eq!(b.poll_timeout(), Some(0.08));
        b.push(0.03, 11, 11);
        assert_eq!(drain(&mut b, 0.03), [Some(11), Some(12)]);
        assert_eq!(b.stats().lost, 0);
    }

    #[test]
    fn a_lost_packet_is_concealed_after_the_delay_and_a_late_one_dropped() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.00, 1, 1);
        b.push(0.04, 3, 3);
        assert_eq!(drain(&mut b, 0.05), [Some(1)]);
        assert_eq!(drain(&mut b, 0.10), [None, Some(3)]);
        b.push(0.11, 2, 2);
        assert_eq!(drain(&mut b, 0.11), []);
        let stats = b.stats();
        assert_eq!((stats.lost, stats.late), (1, 1));
    }

    #[test]
    fn duplicates_play_once() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.0, 5, 5);
        b.push(0.0, 6, 6);
        b.push(0.0, 6, 6);
        assert_eq!(drain(&mut b, 0.0), [Some(5), Some(6)]);
        b.push(0.0, 6, 6);
        assert_eq!(drain(&mut b, 0.0), []);
        assert_eq!(b.stats().duplicates + b.stats().late, 2);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.0, 65_534, 65_534);
        b.push(0.0, 0, 0);
        b.push(0.0, 65_535, 65_535);
        b.push(0.0, 1, 1);
        assert_eq!(
            drain(&mut b, 0.0),
            [Some(65_534), Some(65_535), Some(0), Some(1)]
        );
    }

    #[test]
    fn a_far_jump_resynchronises() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.0, 100, 100);
        assert_eq!(drain(&mut b, 0.0), [Some(100)]);
        b.push(0.02, 30_000, 30_000);
        b.push(0.04, 30_001, 30_001);
        assert_eq!(drain(&mut b, 0.04), [Some(30_000), Some(30_001)]);
        assert_eq!(b.stats().resyncs, 1);
    }

    #[test]
    fn a_long_gap_is_skipped_not_concealed_packet_by_packet() {
        let mut b = JitterBuffer::new(0.06);
        b.push(0.0, 0, 0);
        b.push(0.0, 200, 200);
        assert_eq!(drain(&mut b, 1.0), [Some(0), Some(200)]);
        assert_eq!(b.stats().lost, 199);
    }
}
