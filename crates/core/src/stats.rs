//! I/O counters for metrics, per disk and per path. Many queue threads update them at once,
//! so they are relaxed atomics without locks; a scrape reads a [`IoSnapshot`] of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Latency buckets: the upper bound of bucket `i` is 2^(i+4) microseconds, from 16 us to
/// about 34 s; slower requests fall into the last, unbounded one.
pub const LATENCY_BUCKETS: usize = 22;

/// The upper bound of latency bucket `i`, in microseconds.
pub fn bucket_bound_us(i: usize) -> u64 {
    1 << (i + 4)
}

fn bucket_of(us: u64) -> usize {
    // ceil(log2(us)) - 4, clamped: bucket i holds (2^(i+3), 2^(i+4)].
    let log = 64 - us.saturating_sub(1).leading_zeros() as usize;
    log.saturating_sub(4).min(LATENCY_BUCKETS)
}

/// What a request did, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Flush, discard, write-zeroes, get-id: counted, but no data bytes.
    Other,
}

/// Requests, bytes, errors, in-flight and a latency histogram for one disk or one path.
#[derive(Debug, Default)]
pub struct IoStats {
    reads: AtomicU64,
    writes: AtomicU64,
    others: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    latency_sum_us: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS + 1],
}

impl IoStats {
    /// A request starts: it counts as in flight until its [`Timer`] ends or is dropped (a
    /// request abandoned half-way is then not counted at all).
    pub fn begin(&self) -> Timer<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Timer {
            stats: self,
            started: Instant::now(),
        }
    }

    /// Counts a request begun at `started` that is done, without the in-flight gauge: for a
    /// caller that counts its requests in flight anyway (the device, for draining).
    pub fn record(&self, op: Op, bytes: u64, started: Instant, ok: bool) {
        let us = started.elapsed().as_micros() as u64;
        self.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let (count, data) = match op {
            Op::Read => (&self.reads, Some(&self.read_bytes)),
            Op::Write => (&self.writes, Some(&self.written_bytes)),
            Op::Other => (&self.others, None),
        };
        count.fetch_add(1, Ordering::Relaxed);
        match (ok, data) {
            (true, Some(d)) => {
                d.fetch_add(bytes, Ordering::Relaxed);
            }
            (true, None) => {}
            (false, _) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            others: get(&self.others),
            read_bytes: get(&self.read_bytes),
            written_bytes: get(&self.written_bytes),
            errors: get(&self.errors),
            in_flight: get(&self.in_flight),
            latency_sum_us: get(&self.latency_sum_us),
            latency: self.latency.iter().map(get).collect(),
        }
    }
}

/// One request in flight; [`Timer::end`] counts it.
#[must_use]
pub struct Timer<'a> {
    stats: &'a IoStats,
    started: Instant,
}

impl Timer<'_> {
    /// The request is done; `bytes` count only when it succeeded.
    pub fn end(self, op: Op, bytes: u64, ok: bool) {
        self.stats.record(op, bytes, self.started, ok);
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The counters of an [`IoStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub others: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub latency_sum_us: u64,
    /// Requests per latency bucket (not cumulative); the last one is unbounded.
    pub latency: Vec<u64>,
}

impl IoSnapshot {
    pub fn requests(&self) -> u64 {
        self.reads + self.writes + self.others
    }

    /// The upper bound of the bucket holding the `q` quantile (0..=1), in microseconds;
    /// `None` without requests or when it lies in the unbounded bucket.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return (i < LATENCY_BUCKETS).then(|| bucket_bound_us(i));
            }
        }
        None
    }
}

/// A counter a path keeps beside its I/O: the name it is known by in metrics
/// (`twinpath_path_<name>`) and what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub name: &'static str,
    pub help: &'static str,
}

/// One path of a backend (`network`, `direct`): its I/O, and the event counters the path
/// registered when it was made (none, for most).
#[derive(Debug, Default)]
pub struct PathStats {
    pub io: IoStats,
    events: Vec<(Event, AtomicU64)>,
}

impl PathStats {
    /// A path that also counts `events`.
    pub fn with_events(events: &[Event]) -> PathStats {
        PathStats {
            io: IoStats::default(),
            events: events.iter().map(|e| (*e, AtomicU64::new(0))).collect(),
        }
    }

    /// Counts one `event`, which the path registered.
    pub fn count(&self, event: Event) {
        match self.events.iter().find(|(e, _)| *e == event) {
            Some((_, n)) => {
                n.fetch_add(1, Ordering::Relaxed);
            }
            None => debug_assert!(false, "event `{}` was not registered", event.name),
        }
    }

    /// How many times `event` happened (0 for one the path does not count).
    pub fn get(&self, event: Event) -> u64 {
        self.events
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(0, |(_, n)| n.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> PathSnapshot {
        PathSnapshot {
            io: self.io.snapshot(),
            events: self
                .events
                .iter()
                .map(|(e, n)| EventCount {
                    name: e.name.to_owned(),
                    help: e.help.to_owned(),
                    count: n.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// An event counter at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCount {
    pub name: String,
    pub help: String,
    pub count: u64,
}

/// The counters of a [`PathStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathSnapshot {
    pub io: IoSnapshot,
    #[serde(default)]
    pub events: Vec<EventCount>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_hold_their_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(16), 0);
        assert_eq!(bucket_of(17), 1);
        assert_eq!(bucket_of(32), 1);
        assert_eq!(bucket_of(1000), 6); // (512, 1024]
        assert_eq!(bucket_bound_us(6), 1024);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn counts_requests_bytes_errors_and_quantiles() {
        let s = IoStats::default();
        let t = s.begin();
        assert_eq!(s.snapshot().in_flight, 1);
        t.end(Op::Read, 4096, true);
        s.begin().end(Op::Write, 512, false);
        let mut slow = s.begin();
        slow.started -= Duration::from_millis(3);
        slow.end(Op::Other, 0, true);
        drop(s.begin());
        let snap = s.snapshot();
        assert_eq!(
            (snap.reads, snap.writes, snap.others, snap.requests()),
            (1, 1, 1, 3)
        );
        assert_eq!(
            (snap.read_bytes, snap.written_bytes, snap.errors),
            (4096, 0, 1)
        );
        assert_eq!(snap.in_flight, 0);
        assert!(snap.latency_sum_us >= 3000);
        assert_eq!(snap.quantile_us(1.0), Some(4096)); // 3 ms lies in (2048, 4096]
        assert!(snap.quantile_us(0.3).unwrap() < 2048);
        assert_eq!(IoSnapshot::default().quantile_us(0.5), None);
    }

    #[test]
    fn a_path_counts_the_events_it_registered() {
        const A: Event = Event {
            name: "a",
            help: "first",
        };
        const B: Event = Event {
            name: "b",
            help: "second",
        };
        let p = PathStats::with_events(&[A, B]);
        p.count(B);
        p.count(B);
        assert_eq!((p.get(A), p.get(B)), (0, 2));
        let snap = p.snapshot();
        let names: Vec<_> = snap
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.count))
            .collect();
        assert_eq!(names, [("a", 0), ("b", 2)]);
        assert!(PathStats::default().snapshot().events.is_empty());
    }
}
