//! Caps on connections that have not authenticated yet, in total and per source address, so
//! that peers without a key cannot take the server's memory or crowd out real hosts.
//! Authenticated connections are not counted: each costs a configured host's key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinpath_core::lock;

/// Handshakes in progress at once, from anywhere.
pub const MAX_PENDING: usize = 64;
/// Handshakes in progress at once from one address.
pub const MAX_PENDING_PER_SOURCE: usize = 8;
/// What peers without a key cause is logged at most this often (with how many there were),
/// so that they cannot fill the server's disk with log lines.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A log line that is written at most every [`LOG_EVERY`], counting what it stood for.
#[derive(Default)]
pub struct Throttled {
    skipped: u64,
    logged: Option<Instant>,
}

impl Throttled {
    /// Whether to log now, and how many events the line stands for.
    pub fn due(&mut self) -> Option<u64> {
        self.skipped += 1;
        if self.logged.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return None;
        }
        self.logged = Some(Instant::now());
        Some(std::mem::take(&mut self.skipped))
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    refused: Throttled,
}

#[derive(Default, Clone)]
pub struct Admission(Arc<Mutex<Counts>>);

/// A handshake slot; freed on drop.
pub struct Pending {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
}

impl Admission {
    /// A slot for a handshake from `source`, or `None` when the caps are reached.
    pub fn admit(&self, source: IpAddr) -> Option<Pending> {
        let mut c = lock(&self.0);
        let mine = c.by_source.get(&source).copied().unwrap_or(0);
        if c.total >= MAX_PENDING || mine >= MAX_PENDING_PER_SOURCE {
            if let Some(refused) = c.refused.due() {
                tracing::warn!(
                    %source,
                    refused,
                    "too many connections still authenticating (at most {MAX_PENDING}, \
                     {MAX_PENDING_PER_SOURCE} per address): closing new ones"
                );
            }
            return None;
        }
        c.total += 1;
        *c.by_source.entry(source).or_default() += 1;
        Some(Pending {
            counts: self.0.clone(),
            source,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total -= 1;
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_in_total_and_slots_come_back() {
        let a = Admission::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<Pending> = (0..MAX_PENDING_PER_SOURCE)
            .map(|_| a.admit(one).unwrap())
            .collect();
        assert!(a.admit(one).is_none(), "per-source cap");
        drop(held);
        assert!(a.admit(one).is_some(), "slots come back");
        let many: Vec<Pending> = (0..MAX_PENDING)
            .map(|i| {
                a.admit(IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]))
                    .unwrap()
            })
            .collect();
        assert!(a.admit("192.0.2.9".parse().unwrap()).is_none(), "total cap");
        drop(many);
        assert!(lock(&a.0).by_source.is_empty());
    }
}
