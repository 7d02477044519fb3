//! The engines: one way of issuing I/O each, behind one trait.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};
use twinpath_core::{Error, GuestBuffers, Permit, Result};

use crate::sys::{self, allowed, withdrawn};
use crate::target::{FileKind, Target};
use crate::transfer::{bounce, transfer_all, write_zero, write_zeros, Transfer};
use crate::uring::{QueueRing, SharedRing, WITHDRAWN};

/// Which engine a disk uses; docs/benchmarks.md has the measurements behind `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `inline` for memory-backed images (tmpfs, ramfs), else `uring` where the kernel allows
    /// it, else `threads`.
    #[default]
    Auto,
    /// Every operation runs to completion in the thread that issued it. Only right where I/O
    /// never waits for a device: each request is a memory copy, and a hand-off to another
    /// thread costs more than the copy.
    Inline,
    /// One io_uring per queue worker.
    Uring,
    /// Inline `RWF_NOWAIT` attempts, a thread pool for the rest.
    Threads,
}

/// A range operation that changes allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    /// The range's data may go (a hint: a store that cannot deallocate keeps it).
    Discard,
    /// The range reads as zeros; `unmap` lets the store deallocate it.
    Zero { unmap: bool },
}

impl RangeOp {
    /// The fallocate mode for a regular file.
    fn mode(self) -> libc::c_int {
        let mode = match self {
            RangeOp::Discard | RangeOp::Zero { unmap: true } => libc::FALLOC_FL_PUNCH_HOLE,
            RangeOp::Zero { unmap: false } => libc::FALLOC_FL_ZERO_RANGE,
        };
        mode | libc::FALLOC_FL_KEEP_SIZE
    }

    /// Carries the operation out with a blocking call.
    fn run(self, target: &Target, offset: u64, len: u64) -> io::Result<()> {
        match (target.kind(), self) {
            (FileKind::Regular, op) => sys::fallocate(target.file(), op.mode(), offset, len),
            (FileKind::BlockDevice, RangeOp::Discard) => {
                sys::discard_range(target.file(), offset, len)
            }
            (FileKind::BlockDevice, RangeOp::Zero { .. }) => {
                sys::zero_range(target.file(), offset, len)
            }
        }
    }
}

/// One way of issuing I/O on a [`Target`]. Every call takes the [`QueueRing`] of the queue
/// worker it runs on, if it runs on one (`None` elsewhere: tokio tasks, the daemon's own
/// thread): an engine with per-queue state uses it there and nowhere else.
///
/// Engines implement the few calls that differ; the trait's provided calls add what they
/// share: error context (operation, path, range), a discard that is only a hint, zeros
/// written by hand where the store cannot zero a range itself.
pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    fn target(&self) -> &Arc<Target>;

    /// This engine's context for the queue worker whose eventfd is `notify`, to hand to the
    /// calls that run on that worker; `None` where the engine keeps none.
    fn queue(&self, notify: OwnedFd) -> Option<QueueRing> {
        let _ = notify;
        None
    }

    /// Runs `f` where this engine runs blocking work: in the calling thread, or on the
    /// thread pool.
    fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> impl Future<Output = io::Result<T>> + Send;

    /// Moves `bufs` to (`write`) or from the target at `offset`. Under a `permit`, each
    /// system call that hands bytes to the device is made only while it allows it.
    fn transfer(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// fdatasync.
    fn sync(&self, queue: Option<&QueueRing>) -> impl Future<Output = io::Result<()>> + Send {
        let _ = queue;
        let target = self.target().clone();
        self.blocking("fdatasync", move || target.file().sync_data())
    }

    /// fallocate on a file, BLKDISCARD or BLKZEROOUT on a block device.
    fn range(
        &self,
        queue: Option<&QueueRing>,
        op: RangeOp,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = queue;
        let target = self.target().clone();
        self.blocking("range", move || op.run(&target, offset, len))
    }

    /// Reads into `bufs` at `offset`, under `permit` as [`Engine::transfer`].
    fn read(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Option<Arc<dyn Permit>>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let len = bufs.len() as u64;
            self.target().within("read", offset, len)?;
            self.transfer(queue, offset, bufs, false, permit)
                .await
                .map_err(|e| Error::io(self.target().context("read", offset, len), e))
        }
    }

    /// Writes `bufs` at `offset`, under `permit` as [`Engine::transfer`].
    fn write(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Option<Arc<dyn Permit>>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let len = bufs.len() as u64;
            self.target().within("write", offset, len)?;
            self.transfer(queue, offset, bufs, true, permit)
                .await
                .map_err(|e| Error::io(self.target().context("write", offset, len), e))
        }
    }

    /// Makes completed writes durable.
    fn flush(&self, queue: Option<&QueueRing>) -> impl Future<Output = Result<()>> + Send {
        async move {
            let path = self.target().path().display();
            self.sync(queue)
                .await
                .map_err(|e| Error::io(format!("fdatasync {path}"), e))
        }
    }

    fn discard(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            self.target().within("discard", offset, len)?;
            match self.range(queue, RangeOp::Discard, offset, len).await {
                // Discard is a hint; a store that cannot deallocate simply keeps the data.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r.map_err(|e| Error::io(self.target().context("discard", offset, len), e)),
            }
        }
    }

    fn write_zeroes(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            self.target().within("write-zeroes", offset, len)?;
            let result = match self
                .range(queue, RangeOp::Zero { unmap }, offset, len)
                .await
            {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    let target = self.target().clone();
                    let align = target.block_size() as usize;
                    self.blocking("write-zeroes", move || {
                        write_zeros(target.file(), offset, len, align)
                    })
                    .await
                }
                r => r,
            };
            result.map_err(|e| Error::io(self.target().context("write-zeroes", offset, len), e))
        }
    }
}

fn transfer_of(target: &Target, write: bool, permit: Option<Arc<dyn Permit>>) -> Transfer {
    Transfer {
        direct: target.direct(),
        align: target.block_size() as usize,
        write,
        permit,
    }
}

/// Runs `f` on the runtime's blocking pool.
async fn on_pool<T: Send + 'static>(
    pool: &tokio::runtime::Handle,
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    pool.spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("{what} thread failed: {e}")))?
}

/// Every operation in the calling thread, with blocking system calls.
pub struct Inline {
    target: Arc<Target>,
}

impl Inline {
    pub fn new(target: Arc<Target>) -> Inline {
        Inline { target }
    }
}

impl Engine for Inline {
    fn name(&self) -> &'static str {
        "inline"
    }

    fn target(&self) -> &Arc<Target> {
        &self.target
    }

    async fn blocking<T: Send + 'static>(
        &self,
        _what: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        f()
    }

    async fn transfer(
        &self,
        _queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<()> {
        let how = transfer_of(&self.target, write, permit);
        transfer_all(self.target.file(), &bufs, offset, 0, &how)
    }
}

/// A non-blocking attempt (`RWF_NOWAIT`) in the calling thread, the thread pool for what
/// would block.
pub struct Threads {
    target: Arc<Target>,
    pool: tokio::runtime::Handle,
    // Set once the filesystem refuses RWF_NOWAIT, so we stop trying.
    no_nowait_reads: AtomicBool,
    no_nowait_writes: AtomicBool,
}

impl Threads {
    pub fn new(target: Arc<Target>, pool: tokio::runtime::Handle) -> Threads {
        // O_DIRECT reads and writes block on the device whatever the flag says.
        let direct = target.direct();
        Threads {
            target,
            pool,
            no_nowait_reads: AtomicBool::new(direct),
            no_nowait_writes: AtomicBool::new(direct),
        }
    }
}

impl Engine for Threads {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn target(&self) -> &Arc<Target> {
        &self.target
    }

    fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> impl Future<Output = io::Result<T>> + Send {
        on_pool(&self.pool, what, f)
    }

    async fn transfer(
        &self,
        _queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<()> {
        let how = transfer_of(&self.target, write, permit);
        let unsupported = if write {
            &self.no_nowait_writes
        } else {
            &self.no_nowait_reads
        };
        let mut done = 0;
        if !unsupported.load(Ordering::Relaxed) {
            allowed(how.permit.as_deref())?;
            match sys::rw_nowait(self.target.file(), &bufs, offset, write) {
                Ok(n) if n == bufs.len() => return Ok(()),
                Ok(n) => done = n,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    unsupported.store(true, Ordering::Relaxed)
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        let target = self.target.clone();
        self.blocking("transfer", move || {
            transfer_all(target.file(), &bufs, offset, done, &how)
        })
        .await
    }
}

/// io_uring: a queue worker's own ring on the worker, a shared ring reaped by a task on the
/// runtime elsewhere; the thread pool for bounces and fallbacks.
pub struct Uring {
    target: Arc<Target>,
    shared: SharedRing,
    pool: tokio::runtime::Handle,
}

impl Uring {
    /// Fails where io_uring is unavailable (old kernel, seccomp, container policy).
    pub fn new(target: Arc<Target>, pool: tokio::runtime::Handle) -> io::Result<Uring> {
        Ok(Uring {
            target,
            shared: SharedRing::new(&pool)?,
            pool,
        })
    }

    /// Submits one entry that points at no memory and resolves to its result.
    async fn plain(
        &self,
        queue: Option<&QueueRing>,
        entry: io_uring::squeue::Entry,
    ) -> io::Result<()> {
        // SAFETY: the entry carries no pointers.
        let ((), res) = unsafe { self.shared.submit(queue, entry, (), None) }?.await;
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        }
    }
}

impl Engine for Uring {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn target(&self) -> &Arc<Target> {
        &self.target
    }

    fn queue(&self, notify: OwnedFd) -> Option<QueueRing> {
        Some(QueueRing::new(notify))
    }

    fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> impl Future<Output = io::Result<T>> + Send {
        on_pool(&self.pool, what, f)
    }

    async fn transfer(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<()> {
        let how = transfer_of(&self.target, write, permit);
        let mut bufs = bufs;
        let mut done = 0;
        let fd = types::Fd(self.target.file().as_raw_fd());
        while done < bufs.len() {
            // The buffers' own iovec list serves the usual whole-request submission; only a
            // resumed or over-long transfer needs a list of its own.
            let max = libc::UIO_MAXIOV as usize;
            let tail = (done > 0 || bufs.iovecs().len() > max).then(|| {
                let mut iov = bufs.iovecs_range(done, bufs.len() - done);
                iov.truncate(max);
                iov
            });
            let iov: &[libc::iovec] = tail.as_deref().unwrap_or(bufs.iovecs());
            let (ptr, count) = (iov.as_ptr(), iov.len() as u32);
            let at = offset + done as u64;
            let entry = if write {
                opcode::Writev::new(fd, ptr, count).offset(at).build()
            } else {
                opcode::Readv::new(fd, ptr, count).offset(at).build()
            };
            let keep = (bufs, tail);
            let permit = how.permit.clone();
            // SAFETY: the entry points at heap iovecs owned by `bufs` or `tail` and at the
            // guest memory `bufs` holds; both travel with the operation (in `keep`) until the
            // kernel is done, and moving them does not move their heap data.
            let op = unsafe { self.shared.submit(queue, entry, keep, permit) }?;
            let ((b, _tail), res) = op.await;
            bufs = b;
            match res {
                n if n > 0 => done += n as usize,
                0 if write => return Err(write_zero()),
                0 => {
                    bufs.fill_zero(done, bufs.len() - done);
                    return Ok(());
                }
                e if how.direct && -e == libc::EINVAL => {
                    // O_DIRECT needs aligned memory; a guest may hand us unaligned buffers.
                    let target = self.target.clone();
                    return self
                        .blocking("bounce", move || {
                            bounce(target.file(), &bufs, offset, done, &how)
                        })
                        .await;
                }
                WITHDRAWN => return Err(withdrawn()),
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
        Ok(())
    }

    async fn sync(&self, queue: Option<&QueueRing>) -> io::Result<()> {
        let fd = types::Fd(self.target.file().as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.plain(queue, entry).await
    }

    async fn range(
        &self,
        queue: Option<&QueueRing>,
        op: RangeOp,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.target.kind() == FileKind::Regular {
            let entry = opcode::Fallocate::new(types::Fd(self.target.file().as_raw_fd()), len)
                .offset(offset)
                .mode(op.mode())
                .build();
            return self.plain(queue, entry).await;
        }
        let target = self.target.clone();
        self.blocking("range", move || op.run(&target, offset, len))
            .await
    }
}

/// The engine an [`EngineKind`] picks for a target.
pub enum AnyEngine {
    Inline(Inline),
    Uring(Uring),
    Threads(Threads),
}

impl AnyEngine {
    /// `auto` takes `inline` for a memory-backed file, else `uring` where the kernel allows
    /// it, else `threads`; blocking work goes to `pool`.
    pub fn new(
        kind: EngineKind,
        target: Arc<Target>,
        pool: &tokio::runtime::Handle,
    ) -> Result<AnyEngine> {
        let pool = pool.clone();
        Ok(match kind {
            EngineKind::Inline => AnyEngine::Inline(Inline::new(target)),
            EngineKind::Auto if target.is_memory_backed() => AnyEngine::Inline(Inline::new(target)),
            EngineKind::Threads => AnyEngine::Threads(Threads::new(target, pool)),
            EngineKind::Uring => AnyEngine::Uring(
                Uring::new(target, pool)
                    .map_err(|e| Error::io("engine: uring: cannot set up io_uring", e))?,
            ),
            EngineKind::Auto => match Uring::new(target.clone(), pool.clone()) {
                Ok(uring) => AnyEngine::Uring(uring),
                Err(e) => {
                    tracing::warn!(path = %target.path().display(), "io_uring unavailable ({e}); using the thread pool");
                    AnyEngine::Threads(Threads::new(target, pool))
                }
            },
        })
    }
}

/// Calls the same method on whichever engine this is.
macro_rules! each {
    ($self:ident, $e:ident => $call:expr) => {
        match $self {
            AnyEngine::Inline($e) => $call,
            AnyEngine::Uring($e) => $call,
            AnyEngine::Threads($e) => $call,
        }
    };
}

impl Engine for AnyEngine {
    fn name(&self) -> &'static str {
        each!(self, e => e.name())
    }

    fn target(&self) -> &Arc<Target> {
        each!(self, e => e.target())
    }

    fn queue(&self, notify: OwnedFd) -> Option<QueueRing> {
        each!(self, e => e.queue(notify))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        each!(self, e => e.blocking(what, f).await)
    }

    async fn transfer(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<()> {
        each!(self, e => e.transfer(queue, offset, bufs, write, permit).await)
    }

    async fn sync(&self, queue: Option<&QueueRing>) -> io::Result<()> {
        each!(self, e => e.sync(queue).await)
    }

    async fn range(
        &self,
        queue: Option<&QueueRing>,
        op: RangeOp,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        each!(self, e => e.range(queue, op, offset, len).await)
    }
}
