//! Per-client-IP admission limits for `talkline serve`: a token bucket per address, sans-I/O
//! (told the time), in a table of bounded size.
//!
//! A session slot costs a Whisper stream, an LLM context and a voice, so a single address that
//! opens calls in a loop would otherwise take every slot (and every `503`) for itself. The
//! buckets stop that early, before the WebSocket upgrade or the SDP offer is processed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// `[limits] connections_per_minute_per_ip` unless configured.
pub const DEFAULT_CONNECTIONS_PER_MINUTE_PER_IP: u32 = 60;
/// `[limits] offers_per_minute_per_ip` unless configured.
pub const DEFAULT_OFFERS_PER_MINUTE_PER_IP: u32 = 60;
/// Addresses tracked per limiter. When the table is full, buckets that have refilled are
/// forgotten first (a full bucket is the same as no bucket), then the address seen least
/// recently, so a flood of distinct addresses costs bounded memory; an evicted address only
/// gets a fresh (full) bucket back.
pub const MAX_TRACKED_ADDRESSES: usize = 4096;

/// What an address is counted as. IPv6 hosts usually hold a whole /64, so the /64 is the
/// client; IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(prefix.into()))
            }
            v4 => ClientKey(v4),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// `per_minute` admissions per client, in a burst of up to `per_minute` and then one every
/// `60 / per_minute` seconds. 0 admits everything.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    max_tracked: usize,
    buckets: HashMap<ClientKey, Bucket>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, MAX_TRACKED_ADDRESSES)
    }

    pub fn with_capacity(per_minute: u32, max_tracked: usize) -> Self {
        RateLimiter {
            per_minute,
            max_tracked: max_tracked.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one admission for `ip` at `now`; `Err` holds how long until one is free.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let key = ClientKey::from(ip);
        let burst = f64::from(self.per_minute);
        let per_second = burst / 60.0;
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_tracked {
            self.evict(now);
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        // `saturating_duration_since`: a caller's clock never runs the bucket backwards.
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.updated = bucket.updated.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn evict(&mut self, now: Instant) {
        let refill = Duration::from_secs(60);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.updated) < refill);
        if self.buckets.len() < self.max_tracked {
            return;
        }
        if let Some(oldest) = self
            .buckets
            .iter()
            .min_by_key(|(_, b)| b.updated)
            .map(|(k, _)| *k)
        {
            self.buckets.remove(&oldest);
        }
    }
}

/// A refusal's `Retry-After` in whole seconds, at least 1 (the header has no fractions, and 0
/// would invite an immediate retry that fails again).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_is_admitted_then_refused_until_a_token_refills() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(3);
        for _ in 0..3 {
            assert_eq!(limiter.check(ip("10.0.0.1"), t0), Ok(()));
        }
        let wait = limiter.check(ip("10.0.0.1"), t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20), "3 a minute: one every 20 s");
        assert_eq!(retry_after_seconds(wait), 20);
        // Not yet: 19 s refills 0.95 of a token.
        let wait = limiter
            .check(ip("10.0.0.1"), t0 + Duration::from_secs(19))
            .unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(retry_after_seconds(wait), 1);
        assert_eq!(
            limiter.check(ip("10.0.0.1"), t0 + Duration::from_secs(20)),
            Ok(())
        );
        assert!(limiter
            .check(ip("10.0.0.1"), t0 + Duration::from_secs(20))
            .is_err());
        // A minute idle refills the whole burst, and no more.
        let later = t0 + Duration::from_secs(600);
        for _ in 0..3 {
            assert_eq!(limiter.check(ip("10.0.0.1"), later), Ok(()));
        }
        assert!(limiter.check(ip("10.0.0.1"), later).is_err());
    }

    #[test]
    fn each_address_has_its_own_bucket_and_zero_means_no_limit() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(1);
        assert_eq!(limiter.check(ip("127.0.0.1"), t0), Ok(()));
        assert!(limiter.check(ip("127.0.0.1"), t0).is_err());
        assert_eq!(limiter.check(ip("127.0.0.2"), t0), Ok(()));

        let mut unlimited = RateLimiter::new(0);
        for _ in 0..10_000 {
            assert_eq!(unlimited.check(ip("127.0.0.1"), t0), Ok(()));
        }
        assert_eq!(unlimited.tracked(), 0);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(1);
        assert_eq!(limiter.check(ip("2001:db8:1:2::1"), t0), Ok(()));
        assert!(limiter.check(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        assert_eq!(limiter.check(ip("2001:db8:1:3::1"), t0), Ok(()));
        assert_eq!(limiter.check(ip("192.0.2.7"), t0), Ok(()));
        assert!(limiter.check(ip("::ffff:192.0.2.7"), t0).is_err());
    }

    #[test]
    fn many_addresses_cannot_grow_the_table_past_its_bound() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::with_capacity(2, 8);
        // A limited address, then a flood of new ones.
        assert_eq!(limiter.check(ip("10.9.9.9"), t0), Ok(()));
        assert_eq!(limiter.check(ip("10.9.9.9"), t0), Ok(()));
        assert!(limiter.check(ip("10.9.9.9"), t0).is_err());
        for i in 0..1000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            let now = t0 + Duration::from_millis(u64::from(i));
            assert_eq!(limiter.check(addr, now), Ok(()));
            assert!(limiter.tracked() <= 8, "{} tracked", limiter.tracked());
        }
        // Refilled buckets go first: after a minute, the table empties out for new clients.
        let later = t0 + Duration::from_secs(120);
        assert_eq!(limiter.check(ip("10.1.1.1"), later), Ok(()));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn a_full_table_of_recent_clients_keeps_the_recent_ones() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::with_capacity(1, 2);
        assert_eq!(limiter.check(ip("10.0.0.1"), t0), Ok(()));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check(ip("10.0.0.2"), t1), Ok(()));
        let t2 = t0 + Duration::from_secs(2);
        // 10.0.0.1 was seen least recently: it is the one forgotten.
        assert_eq!(limiter.check(ip("10.0.0.3"), t2), Ok(()));
        assert!(limiter.check(ip("10.0.0.2"), t2).is_err());
        assert!(limiter.check(ip("10.0.0.3"), t2).is_err());
    }
}
