//! Per-source flood throttling for SIP, sans-I/O: a token bucket per source address, told the
//! time. A source over its rate has its requests dropped unanswered; answering a flood would
//! only amplify it (issue 11: a flood of OPTIONS from one address must not keep a call from
//! another address from completing).
//!
//! The table of sources is bounded, so a flood from spoofed addresses cannot grow memory: when
//! it is full, sources whose bucket has refilled (idle: nothing to remember) are swept out,
//! and failing that the source that came first is forgotten. A forgotten flooder starts again
//! with a full burst, which costs at most one burst per eviction. IPv6 sources are metered per
//! /64, the block one subscriber usually holds: per address, a single host could spread a
//! flood over 2^64 buckets.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Requests per second a source may keep up, outside calls in progress: far above what a
/// phone or a PBX trunk opens (calls, OPTIONS pings, registrations), far below a flood.
pub const RATE_PER_S: f64 = 20.0;
/// Requests a source may send at once before the rate applies: a PBX's burst after a restart.
pub const BURST: f64 = 40.0;
/// Sources remembered at most. Policy when full: sweep out the idle ones (at most once per
/// [`SWEEP_INTERVAL`]), else forget the one remembered longest.
pub const MAX_SOURCES: usize = 4_096;
/// How often a full table may be swept for idle sources; between sweeps, evictions take the
/// oldest source in constant time, so a spoofed flood costs no more than a normal one.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the warning about dropped requests may be logged.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Tokens after refilling at `rate` up to `burst` since the last update.
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

/// Token buckets per source; see the module documentation.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
    /// The remembered sources, oldest first (the same set as `buckets`' keys).
    order: VecDeque<IpAddr>,
    last_sweep: Option<Instant>,
    last_warn: Option<Instant>,
    /// Dropped since the last warning.
    unreported: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(RATE_PER_S, BURST, MAX_SOURCES)
    }
}

impl Throttle {
    pub fn new(rate: f64, burst: f64, max_sources: usize) -> Self {
        Self {
            rate,
            burst,
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            order: VecDeque::new(),
            last_sweep: None,
            last_warn: None,
            unreported: 0,
        }
    }

    /// Whether a request from `source` at `now` is within its rate; takes a token if so.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let key = metered(source);
        if !self.buckets.contains_key(&key) {
            self.make_room(now);
            self.order.push_back(key);
        }
        let full = Bucket {
            tokens: self.burst,
            updated: now,
        };
        let bucket = self.buckets.entry(key).or_insert(full);
        let tokens = bucket.refilled(now, self.rate, self.burst);
        bucket.updated = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            return true;
        }
        bucket.tokens = tokens;
        self.warn(now, source);
        false
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    fn make_room(&mut self, now: Instant) {
        if self.buckets.len() < self.max_sources {
            return;
        }
        if self
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_INTERVAL)
        {
            self.last_sweep = Some(now);
            let (rate, burst) = (self.rate, self.burst);
            self.buckets
                .retain(|_, b| b.refilled(now, rate, burst) < burst);
            let buckets = &self.buckets;
            self.order.retain(|ip| buckets.contains_key(ip));
        }
        while self.buckets.len() >= self.max_sources {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.buckets.remove(&oldest);
        }
    }

    /// A warning at most every [`WARN_INTERVAL`], with the source and how many were dropped;
    /// never the messages themselves (they may carry callers' numbers).
    fn warn(&mut self, now: Instant, source: IpAddr) {
        self.unreported += 1;
        if self
            .last_warn
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            %source,
            dropped = self.unreported,
            "SIP requests over the per-source rate limit dropped unanswered"
        );
        self.last_warn = Some(now);
        self.unreported = 0;
    }
}

/// The address a source is metered by: itself for IPv4, its /64 for IPv6.
fn metered(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("literal")
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies_on_a_virtual_clock() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let flooder = ip("192.0.2.1");
        let passed = (0..200).filter(|_| t.allow(t0, flooder)).count();
        assert_eq!(passed, BURST as usize);
        // One second later, one second's worth of tokens.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..200).filter(|_| t.allow(t1, flooder)).count();
        assert_eq!(passed, RATE_PER_S as usize);
        // 200 requests a second for three seconds: the burst and the rate, nothing more.
        let mut passed = 0;
        for i in 0..600u64 {
            let at = t1 + Duration::from_millis(5 * (i + 1));
            passed += usize::from(t.allow(at, flooder));
        }
        assert!(
            (59..=61).contains(&passed),
            "{passed} of 600 over 3 s at {RATE_PER_S}/s"
        );
    }

    #[test]
    fn another_source_is_not_held_back_by_a_flooder() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        for _ in 0..1_000 {
            t.allow(t0, ip("192.0.2.1"));
        }
        assert!(!t.allow(t0, ip("192.0.2.1")));
        assert!(t.allow(t0, ip("192.0.2.2")));
    }

    #[test]
    fn ipv6_sources_are_metered_per_64() {
        let mut t = Throttle::new(1.0, 2.0, 16);
        let t0 = Instant::now();
        assert!(t.allow(t0, ip("2001:db8::1")));
        assert!(t.allow(t0, ip("2001:db8::ffff:2")));
        assert!(!t.allow(t0, ip("2001:db8::3")), "the same /64");
        assert!(t.allow(t0, ip("2001:db8:0:1::1")), "another /64");
    }

    #[test]
    fn a_spoofed_flood_keeps_the_table_bounded() {
        let mut t = Throttle::new(RATE_PER_S, BURST, 64);
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            let source = IpAddr::V4(i.to_be_bytes().into());
            let at = t0 + Duration::from_micros(u64::from(i));
            assert!(t.allow(at, source), "a new source has its burst");
            assert!(t.sources() <= 64);
            assert_eq!(t.order.len(), t.sources());
        }
    }

    #[test]
    fn a_full_table_forgets_idle_sources_before_busy_ones() {
        let mut t = Throttle::new(1.0, 2.0, 3);
        let t0 = Instant::now();
        // A is idle (one request, refilled after a second); B and C flood on.
        t.allow(t0, ip("192.0.2.1"));
        let later = t0 + Duration::from_secs(2);
        for source in ["192.0.2.2", "192.0.2.3"] {
            for _ in 0..10 {
                t.allow(later, ip(source));
            }
        }
        assert!(t.allow(later, ip("192.0.2.4")));
        assert_eq!(t.sources(), 3);
        // B was not forgotten: still out of tokens.
        assert!(!t.allow(later, ip("192.0.2.2")));
    }
}
