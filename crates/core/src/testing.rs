//! Test doubles and the backend conformance suite, for the tests of every crate (feature
//! `test-util`):
//!
//! - [`MemBackend`]: a disk in memory, whose reads can be held back to finish out of order;
//! - [`MemPlugin`]: the `memory` plugin, which opens one (config and daemon tests);
//! - [`conformance`]: what every [`BlockBackend`] must do, checked on one a function opens,
//!   through the backend and through its queue path as a queue worker drives it.

use std::future::Future;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use crate::registry::{parse_options, BackendSpec, DiskContext, OptionError, Plugin};
use crate::{
    lock, BlockBackend, BlockIo, ByteSize, DiskInfo, Error, ErrorKind, GuestBuffers, OpenContext,
    QueueLink, Result,
};

/// A disk in memory. Reads can be held back ([`MemBackend::hold_reads`]) and let go later, so
/// that requests made after a read finish before it.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    info: DiskInfo,
    flushes: AtomicUsize,
    holding: AtomicBool,
    held: Mutex<Vec<Waker>>,
}

impl MemBackend {
    /// A disk of `info.capacity` zero bytes that describes itself with `info` (discard and
    /// write-zeroes work where `info` offers them).
    pub fn new(info: DiskInfo) -> MemBackend {
        MemBackend {
            data: Mutex::new(vec![0; info.capacity as usize]),
            info,
            flushes: AtomicUsize::new(0),
            holding: AtomicBool::new(false),
            held: Mutex::default(),
        }
    }

    /// The disk's bytes.
    pub fn data(&self) -> MutexGuard<'_, Vec<u8>> {
        lock(&self.data)
    }

    /// How many flushes it was asked for.
    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Reads from now on wait until [`MemBackend::release_reads`].
    pub fn hold_reads(&self) {
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Lets the held reads go on, and the later ones through at once.
    pub fn release_reads(&self) {
        self.holding.store(false, Ordering::SeqCst);
        for w in lock(&self.held).drain(..) {
            w.wake();
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<Range<usize>> {
        crate::within(self.info.capacity, offset, len, || "memory disk".into())?;
        Ok(offset as usize..(offset + len) as usize)
    }

    fn writable(&self) -> Result<()> {
        if self.info.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "memory disk"));
        }
        Ok(())
    }
}

/// Waits while the backend holds reads.
struct Gate<'a>(&'a MemBackend);

impl Future for Gate<'_> {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.holding.load(Ordering::SeqCst) {
            lock(&self.0.held).push(cx.waker().clone());
            // Released between the look and the push: not held any more.
            if self.0.holding.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }
}

impl BlockBackend for MemBackend {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }
}

#[async_trait]
impl BlockIo for MemBackend {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        Gate(self).await;
        let at = self.range(offset, bufs.len() as u64)?;
        bufs.copy_from_slice(0, &self.data()[at]);
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.writable()?;
        let at = self.range(offset, bufs.len() as u64)?;
        bufs.copy_to_slice(0, &mut self.data()[at]);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.info.discard {
            return Err(Error::new(ErrorKind::Unsupported, "discard"));
        }
        self.writable()?;
        // The contents may stay: a discarded range reads as anything.
        self.range(offset, len).map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        if !self.info.write_zeroes {
            return Err(Error::new(ErrorKind::Unsupported, "write-zeroes"));
        }
        self.writable()?;
        let at = self.range(offset, len)?;
        self.data()[at].fill(0);
        Ok(())
    }
}

/// The `memory` plugin: `backend: {type: memory, size: 64M}` opens a [`MemBackend`] of that
/// size, with discard and write-zeroes.
pub struct MemPlugin;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemOptions {
    size: ByteSize,
}

#[derive(Debug)]
struct MemSpec {
    size: u64,
    read_only: bool,
}

#[async_trait]
impl BackendSpec for MemSpec {
    fn describe(&self) -> String {
        format!("memory, {}", ByteSize(self.size))
    }

    async fn open(&self, _: &OpenContext) -> Result<Arc<dyn BlockBackend>> {
        Ok(Arc::new(MemBackend::new(DiskInfo {
            read_only: self.read_only,
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(self.size)
        })))
    }
}

impl Plugin for MemPlugin {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError> {
        let o: MemOptions = parse_options(options)?;
        Ok(Box::new(MemSpec {
            size: o.size.0,
            read_only: disk.read_only,
        }))
    }
}

/// The smallest disk the conformance suite runs on.
pub const CONFORMANCE_MIN_CAPACITY: u64 = 4 << 20;

/// How long the suite waits for one operation (or one batch of concurrent ones).
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks what every backend must do, on the writable backend `open` returns (at least
/// [`CONFORMANCE_MIN_CAPACITY`] bytes; its contents are overwritten). Panics with what broke.
///
/// Through the backend itself, and again through the I/O path it gives queue 0 (where it
/// gives one), driven as the device's queue worker drives it (reap, poll, submit, on one
/// thread, woken through the queue's eventfd): reads return what was written, on one buffer
/// and on several; flush succeeds; discard and write-zeroes work where `info` offers them
/// (write-zeroes reads back as zeros, its neighbours unchanged) and fail as unsupported
/// where it does not; a request that does not fit the disk fails and writes nothing; many
/// requests at once all land. Then the backend is released and dropped, and `open` opens
/// the store again: what was written and flushed is there.
///
/// Call it from a thread outside any tokio runtime (`open` may block on one).
pub fn conformance(open: impl Fn() -> Result<Arc<dyn BlockBackend>>) {
    let backend = open().expect("open");
    let info = backend.info();
    assert!(
        matches!(info.block_size, 512 | 4096),
        "block size {}",
        info.block_size
    );
    assert!(
        info.capacity >= CONFORMANCE_MIN_CAPACITY
            && info.capacity.is_multiple_of(u64::from(info.block_size)),
        "capacity {} (block size {})",
        info.capacity,
        info.block_size
    );
    assert!(!info.read_only, "the suite needs a writable disk");

    let whole = Driver::new(backend.clone());
    io_contract(&whole, &info, 1);

    let (efd, link) = eventfd_pair();
    let queue = backend
        .queue(QueueLink {
            index: 0,
            notify: link,
        })
        .expect("queue 0's I/O path");
    if let Some(queue) = queue {
        // The queue's path lives on its worker: made, used and finished on one thread.
        let info = info.clone();
        std::thread::spawn(move || {
            let worker = Driver::with_eventfd(queue.clone(), efd);
            io_contract(&worker, &info, 2);
            queue.finish();
        })
        .join()
        .expect("the queue path's checks");
    }

    // What the last round wrote, durable, and found again by the next open.
    let block = 64 << 10;
    let at = info.capacity / 2;
    let want = pattern(3, at, block);
    whole
        .run(backend.write(at, vec_buffers(want.clone()).0))
        .expect("write before reopening");
    whole.run(backend.flush()).expect("flush before reopening");
    whole.run(backend.release());
    drop(whole);
    drop(backend);
    let again = open().expect("open again");
    assert_eq!(
        again.info().capacity,
        info.capacity,
        "capacity after reopening"
    );
    let driver = Driver::new(again.clone());
    same(
        &read(&driver, &*again, at, block),
        &want,
        format_args!("data written and flushed before reopening"),
    );
    driver.run(again.release());
}

/// The I/O contract on one path; `seed` makes its data differ from another path's.
fn io_contract(d: &Driver, info: &DiskInfo, seed: u64) {
    let io = &*d.io;
    let cap = info.capacity;
    let bs = u64::from(info.block_size);

    // One buffer: the first block, one in the middle, the last 64 KiB.
    for (at, len) in [
        (0, bs),
        (cap / 2 + bs, 3 * bs),
        (cap - (64 << 10), 64 << 10),
    ] {
        let want = pattern(seed, at, len as usize);
        d.run(io.write(at, vec_buffers(want.clone()).0))
            .unwrap_or_else(|e| panic!("write of {len} at {at}: {e}"));
        same(
            &read(d, io, at, len as usize),
            &want,
            format_args!("{len} bytes at {at}"),
        );
    }

    // Several buffers of odd lengths, as guests hand them.
    let at = 8 * bs;
    let want = pattern(seed + 10, at, 8192);
    let (bufs, _) = segment_buffers(&want, &[4096, 512, 3584]);
    d.run(io.write(at, bufs))
        .unwrap_or_else(|e| panic!("write from three buffers: {e}"));
    let (bufs, got) = segment_buffers(&vec![0; 8192], &[512, 7168, 512]);
    d.run(io.read(at, bufs))
        .unwrap_or_else(|e| panic!("read into three buffers: {e}"));
    same(
        &lock(&got).concat(),
        &want,
        format_args!("three buffers at {at}"),
    );

    d.run(io.flush()).expect("flush");

    let at = 64 * bs;
    let r = d.run(io.discard(at, 16 * bs));
    if info.discard {
        r.unwrap_or_else(|e| panic!("discard, which the disk offers: {e}"));
    } else {
        expect_unsupported("discard", r);
    }

    let at = 128 * bs;
    let around = pattern(seed + 20, at, 16 * bs as usize);
    d.run(io.write(at, vec_buffers(around.clone()).0))
        .expect("write before write-zeroes");
    for unmap in [false, true] {
        let r = d.run(io.write_zeroes(at + 4 * bs, 4 * bs, unmap));
        if !info.write_zeroes {
            expect_unsupported("write-zeroes", r);
            continue;
        }
        r.unwrap_or_else(|e| panic!("write-zeroes (unmap {unmap}): {e}"));
        let mut want = around.clone();
        want[4 * bs as usize..8 * bs as usize].fill(0);
        same(
            &read(d, io, at, 16 * bs as usize),
            &want,
            format_args!("after write-zeroes (unmap {unmap})"),
        );
    }

    // Beyond the end: refused, and nothing written.
    let last = pattern(seed + 30, cap - bs, bs as usize);
    d.run(io.write(cap - bs, vec_buffers(last.clone()).0))
        .expect("write of the last block");
    assert!(
        d.run(io.read(cap, vec_buffers(vec![0; bs as usize]).0))
            .is_err(),
        "a read past the end succeeded"
    );
    let over = d.run(io.write(cap - bs, vec_buffers(vec![0xa5; 4 * bs as usize]).0));
    assert!(over.is_err(), "a write past the end succeeded");
    same(
        &read(d, io, cap - bs, bs as usize),
        &last,
        format_args!("the last block after a write past the end"),
    );

    // Many at once, on blocks of their own, then read back all at once.
    let blocks: Vec<u64> = (0..32).map(|i| cap / 4 + i * 2 * bs).collect();
    let writes = blocks.iter().map(|&at| {
        let data = pattern(seed + 40, at, bs as usize);
        io.write(at, vec_buffers(data).0)
    });
    for (i, r) in d
        .run(futures::future::join_all(writes))
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("concurrent write {i}: {e}"));
    }
    let reads: Vec<_> = blocks
        .iter()
        .map(|&at| {
            let (bufs, data) = vec_buffers(vec![0; bs as usize]);
            (at, data, io.read(at, bufs))
        })
        .collect();
    let (places, futures): (Vec<_>, Vec<_>) = reads
        .into_iter()
        .map(|(at, data, f)| ((at, data), f))
        .unzip();
    for ((at, data), r) in places.iter().zip(d.run(futures::future::join_all(futures))) {
        r.unwrap_or_else(|e| panic!("concurrent read at {at}: {e}"));
        same(
            &lock(data),
            &pattern(seed + 40, *at, bs as usize),
            format_args!("concurrent write at {at}"),
        );
    }
}

/// Panics naming `what` and the first byte that differs, if `got` is not `want`.
fn same(got: &[u8], want: &[u8], what: std::fmt::Arguments<'_>) {
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: byte {i} of {} is {:#04x}, {:#04x} was written",
            want.len(),
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

fn expect_unsupported(what: &str, r: Result<()>) {
    match r {
        Err(e) if e.kind() == ErrorKind::Unsupported => {}
        Err(e) => panic!("{what}, which the disk does not offer, failed otherwise: {e}"),
        Ok(()) => panic!("{what} succeeded where the disk does not offer it"),
    }
}

/// Bytes that differ with `seed` and with every position on the disk.
fn pattern(seed: u64, at: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (at + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d);
            (x >> 29) as u8
        })
        .collect()
}

fn vec_buffers(data: Vec<u8>) -> (GuestBuffers, Arc<Mutex<Vec<u8>>>) {
    GuestBuffers::from_vec(data)
}

/// `data` in buffers of `lens` bytes each, every one its own allocation.
fn segment_buffers(data: &[u8], lens: &[usize]) -> (GuestBuffers, Arc<Mutex<Vec<Vec<u8>>>>) {
    assert_eq!(lens.iter().sum::<usize>(), data.len());
    let mut at = 0;
    let parts: Vec<Vec<u8>> = lens
        .iter()
        .map(|&n| {
            at += n;
            data[at - n..at].to_vec()
        })
        .collect();
    let shared = Arc::new(Mutex::new(parts));
    let segments: Vec<(*mut u8, usize)> = lock(&shared)
        .iter_mut()
        .map(|p| (p.as_mut_ptr(), p.len()))
        .collect();
    // SAFETY: the parts are never resized while `shared` lives, and `shared` is the keepalive.
    let bufs = unsafe { GuestBuffers::from_raw_parts(segments, shared.clone()) };
    (bufs, shared)
}

fn read(d: &Driver, io: &dyn BlockIo, at: u64, len: usize) -> Vec<u8> {
    let (bufs, data) = vec_buffers(vec![0; len]);
    d.run(io.read(at, bufs))
        .unwrap_or_else(|e| panic!("read of {len} at {at}: {e}"));
    let out = lock(&data).clone();
    out
}

/// Runs futures as a queue worker does: poll, submit what the polling queued, sleep on the
/// eventfd until a completion or a wake, reap, poll again.
struct Driver {
    io: Arc<dyn BlockIo>,
    efd: Arc<EventFd>,
}

struct EventFd(OwnedFd);

impl Wake for EventFd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// An eventfd, and a second descriptor of it for a [`QueueLink`].
fn eventfd_pair() -> (OwnedFd, OwnedFd) {
    // SAFETY: eventfd returns a new descriptor or -1, checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just made and is owned by nobody else.
    let efd = unsafe { OwnedFd::from_raw_fd(fd) };
    let link = efd.try_clone().expect("dup of the eventfd");
    (efd, link)
}

impl Driver {
    fn new(io: Arc<dyn BlockIo>) -> Driver {
        Driver::with_eventfd(io, eventfd_pair().0)
    }

    fn with_eventfd(io: Arc<dyn BlockIo>, efd: OwnedFd) -> Driver {
        Driver {
            io,
            efd: Arc::new(EventFd(efd)),
        }
    }

    fn run<T>(&self, fut: impl Future<Output = T>) -> T {
        let mut fut = pin!(fut);
        let waker = Waker::from(self.efd.clone());
        let mut cx = Context::from_waker(&waker);
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            let polled = fut.as_mut().poll(&mut cx);
            self.io.submit();
            if let Poll::Ready(v) = polled {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "an operation did not finish in {OP_TIMEOUT:?}"
            );
            let mut pfd = libc::pollfd {
                fd: self.efd.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, ours; then an 8-byte read of our eventfd.
            unsafe {
                libc::poll(&mut pfd, 1, 100);
                let mut buf = [0u8; 8];
                libc::read(self.efd.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
            }
            self.io.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_backend_keeps_the_contract() {
        let disk = Arc::new(MemBackend::new(DiskInfo {
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(CONFORMANCE_MIN_CAPACITY)
        }));
        conformance(|| Ok(disk.clone() as Arc<dyn BlockBackend>));
    }
}
