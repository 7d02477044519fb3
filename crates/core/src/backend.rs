//! The contract between the vhost-user-blk device and a storage backend.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use async_trait::async_trait;

use crate::buffers::GuestBuffers;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::PathStats;

/// Whether an operation may still go to the device: a shared LUN's grant, which a recall, a
/// lapsed lease or a lost connection withdraws. Asked by whoever hands the operation to the
/// device, as late as it can: a path that holds operations in this process before they leave
/// (an iSCSI session's queue) asks again before every byte it sends, so a host frozen in
/// between sends nothing after it resumes.
pub trait Permit: Send + Sync {
    fn allows(&self) -> bool;
}

/// Static facts about an open backend, read once when the device starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes; the device exposes `capacity / 512` sectors.
    pub capacity: u64,
    /// Logical block size in bytes (512 or 4096); the guest never issues smaller I/O.
    pub block_size: u32,
    /// Whether the backend can only be read.
    pub read_only: bool,
    /// Whether writes may sit in a volatile cache until `flush`: decides the FLUSH and
    /// CONFIG_WCE features, and whether a writethrough disk flushes after every write.
    pub volatile_cache: bool,
    /// Whether `discard` does something useful.
    pub discard: bool,
    /// Whether `write_zeroes` is implemented natively (otherwise the device does not offer it).
    pub write_zeroes: bool,
    /// A stable identifier for GET_ID when the config gives none.
    pub serial: Option<String>,
}

impl DiskInfo {
    pub fn new(capacity: u64) -> Self {
        DiskInfo {
            capacity,
            block_size: 512,
            read_only: false,
            volatile_cache: true,
            discard: false,
            write_zeroes: false,
            serial: None,
        }
    }
}

/// What a queue's worker hands its backend when the queue starts: the queue's index and the
/// eventfd its worker sleeps on. A backend whose I/O completes through the kernel (io_uring)
/// has the kernel signal this eventfd, and the worker reaps those completions itself.
#[derive(Debug)]
pub struct QueueLink {
    pub index: usize,
    /// The worker's wake-up eventfd (a duplicate the backend may keep).
    pub notify: OwnedFd,
}

/// The I/O operations of a block backend. Calls may run concurrently from several queues and
/// complete in any order; implementations must not serialise them behind one lock.
///
/// Offsets and lengths are in bytes and have been checked against `info().capacity` and the
/// block size by the device.
#[async_trait]
pub trait BlockIo: Send + Sync + 'static {
    /// Reads `bufs.len()` bytes at `offset` into the buffers.
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()>;

    /// Writes the buffers' contents at `offset`.
    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Declares `[offset, offset + len)` unused; later reads may return anything.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::new(ErrorKind::Unsupported, "discard"))
    }

    /// Makes `[offset, offset + len)` read as zeros; `unmap` allows deallocating it.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = (offset, len, unmap);
        Err(Error::new(ErrorKind::Unsupported, "write-zeroes"))
    }

    /// Takes the operations finished since the last call off this queue's engine and wakes
    /// their futures. The worker calls it when its eventfd fires and while it polls.
    fn reap(&self) {}

    /// Hands the operations queued while the worker polled its requests to the kernel, in
    /// one call. The worker calls it after every polling pass.
    fn submit(&self) {}

    /// Operations submitted on this queue's engine and not yet reaped: completions the worker
    /// will find itself if it keeps looking (see the device's `poll_us`).
    fn in_flight(&self) -> usize {
        0
    }

    /// The queue's worker is about to end and will poll nothing more: waits, on the worker
    /// thread, for the operations this queue's engine has in flight and takes them off, so
    /// that what they hold (guest buffers) is let go. An io_uring that only its worker may
    /// wait on could not be emptied from any other thread.
    fn finish(&self) {}
}

/// A block backend: its I/O from any thread (itself a [`BlockIo`]), and what the device asks
/// of it besides.
#[async_trait]
pub trait BlockBackend: BlockIo {
    fn info(&self) -> DiskInfo;

    /// The I/O path of one queue, asked once per queue when a frontend connects and held by
    /// the device for as long as the connection lasts; its requests run on the queue's worker
    /// thread. `None` (the default): the queue uses the backend itself.
    fn queue(&self, link: QueueLink) -> Result<Option<Arc<dyn BlockIo>>> {
        let _ = link;
        Ok(None)
    }

    /// The paths this backend's I/O takes (`network`, `direct`) with their counters, for
    /// metrics. A backend with one local path has none to report.
    fn paths(&self) -> Vec<(&'static str, Arc<PathStats>)> {
        Vec::new()
    }

    /// The disk has stopped serving and will issue no more I/O: lets go of what others may
    /// wait for (image locks, an open handle on a server) now, not when the last reference
    /// to the backend is gone.
    async fn release(&self) {}
}
