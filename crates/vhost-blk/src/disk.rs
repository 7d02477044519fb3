//! A disk as the device sees it: an open backend plus the settings from its config. It outlives
//! frontend connections; each connection gets a fresh [`crate::device::BlkDevice`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use twinpath_core::stats::{IoSnapshot, IoStats};
use twinpath_core::{BlockBackend, CacheMode, DiskInfo};

use crate::request::{Limits, ID_LEN, SECTOR_SIZE};

/// Largest discard or write-zeroes segment we accept, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Per-disk settings the device needs, besides the backend.
#[derive(Debug, Clone)]
pub struct DiskSettings {
    pub name: String,
    pub num_queues: u16,
    pub read_only: bool,
    pub serial: Option<String>,
    pub cache: CacheMode,
    /// How long a queue worker with requests in flight polls before it sleeps (0: never).
    pub poll_us: u32,
    /// Bytes of guest data in flight at most, over all queues and connections.
    pub max_inflight_bytes: u32,
}

pub struct Disk {
    pub(crate) settings: DiskSettings,
    pub(crate) backend: Arc<dyn BlockBackend>,
    pub(crate) info: DiskInfo,
    pub(crate) serial: [u8; ID_LEN],
    inflight: AtomicUsize,
    /// Requests whose guest buffers a backend still holds: with the request itself, or
    /// after it was abandoned (a bounce or a submitted operation that goes on when its
    /// connection ends).
    working: AtomicUsize,
    pub(crate) draining: AtomicBool,
    rejected: AtomicU64,
    failed: AtomicU64,
    /// What the guests asked of this disk, across connections.
    pub(crate) io: IoStats,
    /// Bytes of guest data the requests in flight may still take: what the backend holds
    /// for them (bounce buffers, network frames) grows with their size, so a guest sending
    /// many huge requests waits instead of taking the daemon's memory.
    pub(crate) budget: tokio::sync::Semaphore,
}

impl Disk {
    pub fn new(settings: DiskSettings, backend: Arc<dyn BlockBackend>) -> Self {
        let info = backend.info();
        let id = settings
            .serial
            .clone()
            .or_else(|| info.serial.clone())
            .unwrap_or_else(|| settings.name.clone());
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Disk {
            backend,
            info,
            serial,
            inflight: AtomicUsize::new(0),
            working: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            io: IoStats::default(),
            budget: tokio::sync::Semaphore::new(settings.max_inflight_bytes as usize),
            settings,
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    pub fn read_only(&self) -> bool {
        self.settings.read_only || self.info.read_only
    }

    pub fn limits(&self) -> Limits {
        let ro = self.read_only();
        Limits {
            capacity_sectors: self.info.capacity / SECTOR_SIZE,
            block_size: self.info.block_size,
            read_only: ro,
            flush: self.info.volatile_cache,
            discard: self.info.discard && !ro,
            write_zeroes: self.info.write_zeroes && !ro,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            // Set per connection, from what its driver accepted.
            size_max: None,
            seg_max: None,
        }
    }

    /// Requests accepted from a guest and not yet completed, across all connections.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Requests whose guest buffers a backend still holds, abandoned ones among them.
    pub fn working(&self) -> usize {
        self.working.load(Ordering::Acquire)
    }

    /// Waits until no backend holds guest buffers of this disk any more, or `timeout`;
    /// returns how many still do. Until then the image may still be written for a request
    /// of a frontend that is gone.
    pub fn wait_for_work(&self, timeout: Duration) -> usize {
        twinpath_core::wait_until(timeout, || self.working() == 0);
        self.working()
    }

    /// Stop taking new requests from the queues; in-flight ones still complete.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a refused chain; logs the first one and then every power of two, so a hostile
    /// guest cannot flood the log.
    pub(crate) fn note_rejected(&self, reason: impl std::fmt::Display) {
        let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(disk = %self.name(), rejected = n, "refused a malformed request: {reason}");
        } else {
            tracing::debug!(disk = %self.name(), "refused a malformed request: {reason}");
        }
    }

    pub(crate) fn note_failed(&self, what: &str, err: &twinpath_core::Error) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(disk = %self.name(), failed = n, "{what} failed: {err}");
        } else {
            tracing::debug!(disk = %self.name(), "{what} failed: {err}");
        }
    }

    /// The guest-facing counters: every accepted request, from acceptance to completion.
    /// In flight is the count draining waits on, not kept twice.
    pub fn io_stats(&self) -> IoSnapshot {
        IoSnapshot {
            in_flight: self.inflight() as u64,
            ..self.io.snapshot()
        }
    }

    pub fn rejected_count(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// Counts one accepted request for as long as it lives, and gives the request its disk.
pub(crate) struct InflightGuard(Arc<Disk>);

impl InflightGuard {
    pub(crate) fn new(disk: Arc<Disk>) -> Self {
        disk.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(disk)
    }

    pub(crate) fn disk(&self) -> &Arc<Disk> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held with a request's guest buffers (their keep-alive): counts the request in
/// [`Disk::working`] until the last copy of its buffers is gone, which may be after the
/// request itself was dropped.
pub(crate) struct WorkGuard(Arc<Disk>);

impl WorkGuard {
    pub(crate) fn new(disk: Arc<Disk>) -> Self {
        disk.working.fetch_add(1, Ordering::AcqRel);
        WorkGuard(disk)
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::AcqRel);
    }
}
