//! The direct path's throttle: token buckets for bytes and operations, shared by every `san`
//! disk of this host that talks to the same map server (the LUN is shared by the hosts, so
//! the limit is per host, not per disk).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use twinpath_core::{lock, ByteSize, WeakMap};

/// What happens to a request over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExceed {
    /// Wait until the bucket allows it, then go direct.
    Delay,
    /// Go over SMB instead, at once.
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Direct-path bytes per second (reads and writes together).
    #[serde(default)]
    pub bytes_per_sec: Option<ByteSize>,
    /// Direct-path requests per second.
    #[serde(default)]
    pub iops: Option<u64>,
    pub on_exceed: OnExceed,
}

/// How much the buckets hold beyond the steady rate: a twentieth of a second of traffic
/// (so short bursts pass and the rate over a second stays within a few percent).
const BURST: f64 = 0.05;

struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64, min_capacity: f64) -> Bucket {
        let capacity = (rate * BURST).max(min_capacity);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, elapsed: f64) {
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
    }

    /// How long until `n` tokens are there (zero if they are).
    fn wait_for(&self, n: f64) -> Duration {
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / self.rate)
        }
    }
}

struct State {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    last: Instant,
}

/// The throttles of one daemon's disks, by map server (kept in its open context).
pub(crate) type Throttles = WeakMap<String, Throttle>;

pub struct Throttle {
    config: ThrottleConfig,
    state: Mutex<State>,
}

/// The largest single request, so a bucket can always hold one.
const MAX_REQUEST: f64 = (4 << 20) as f64;

impl Throttle {
    fn new(config: ThrottleConfig) -> Throttle {
        Throttle {
            state: Mutex::new(State {
                bytes: config
                    .bytes_per_sec
                    .map(|b| Bucket::new(b.0 as f64, MAX_REQUEST)),
                ops: config.iops.map(|n| Bucket::new(n as f64, 1.0)),
                last: Instant::now(),
            }),
            config,
        }
    }

    /// The host's throttle for `map_server`, created by the first disk that names one.
    pub fn shared(
        throttles: &Throttles,
        map_server: &str,
        config: ThrottleConfig,
    ) -> Arc<Throttle> {
        let (t, made) =
            throttles.get_or_insert_with(map_server.to_owned(), || Arc::new(Throttle::new(config)));
        if !made && t.config != config {
            tracing::warn!(
                map_server,
                "disks give different throttles for one map server; the first one applies"
            );
        }
        t
    }

    /// Admits a request of `bytes` to the direct path: at once, after waiting (`delay`, when
    /// over the limit), or not at all (`network`, when over the limit).
    pub async fn admit(&self, bytes: u64) -> Admission {
        let wait = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            let now = Instant::now();
            let elapsed = now.duration_since(s.last).as_secs_f64();
            s.last = now;
            let need = [(s.bytes.as_mut(), bytes as f64), (s.ops.as_mut(), 1.0)];
            let mut wait = Duration::ZERO;
            let mut buckets = Vec::new();
            for (bucket, n) in need {
                if let Some(b) = bucket {
                    b.refill(elapsed);
                    wait = wait.max(b.wait_for(n));
                    buckets.push((b, n));
                }
            }
            if !wait.is_zero() && self.config.on_exceed == OnExceed::Network {
                return Admission::Network;
            }
            // Taken now, paid for by waiting: later requests queue behind this one.
            for (b, n) in buckets {
                b.tokens -= n;
            }
            wait
        };
        if wait.is_zero() {
            return Admission::Now;
        }
        tokio::time::sleep(wait).await;
        Admission::Delayed
    }
}

/// What the throttle made of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Now,
    Delayed,
    /// Over the limit with `on_exceed: network`.
    Network,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(on_exceed: OnExceed) -> ThrottleConfig {
        ThrottleConfig {
            bytes_per_sec: Some(ByteSize(100 << 20)),
            iops: Some(1000),
            on_exceed,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delay_holds_the_rate() {
        let t = Throttle::new(config(OnExceed::Delay));
        let start = tokio::time::Instant::now();
        for _ in 0..400 {
            assert_ne!(t.admit(1 << 20).await, Admission::Network);
        }
        // 400 MiB at 100 MiB/s, less the initial burst of 5 MiB.
        let took = start.elapsed().as_secs_f64();
        assert!((3.9..=4.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn network_sends_the_excess_away_at_once() {
        let t = Throttle::new(config(OnExceed::Network));
        let mut direct = 0;
        for _ in 0..100 {
            direct += usize::from(t.admit(1 << 20).await != Admission::Network);
        }
        // Only the burst passes when no time goes by.
        assert_eq!(direct, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn iops_limit_applies_to_small_requests() {
        let t = Throttle::new(config(OnExceed::Delay));
        let start = tokio::time::Instant::now();
        for _ in 0..2050 {
            t.admit(512).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.99..=2.01).contains(&took), "{took}");
    }
}
