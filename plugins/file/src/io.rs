//! The file I/O engine: inline non-blocking attempts first, a thread pool for the rest.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use twinpath_core::{Error, ErrorKind, GuestBuffers, Permit, Result};

use crate::uring::{QueueRing, SharedRing, WITHDRAWN};

// <linux/fs.h> ioctls the libc crate does not define.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Largest chunk written when zeros have to be written out by hand.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Regular,
    BlockDevice,
}

pub(crate) fn block_device_sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u32)
}

/// The file offset alignment O_DIRECT needs (statx DIOALIGN), if the kernel reports one.
pub(crate) fn direct_io_alignment(file: &File) -> Option<u32> {
    // SAFETY: statx fills the zeroed struct we pass; an empty path with AT_EMPTY_PATH refers
    // to the fd itself.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        );
        (r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0)
            .then_some(stx.stx_dio_offset_align)
    }
}

/// How I/O is issued; see the crate docs and docs/benchmarks.md for the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `inline` for memory-backed images (tmpfs, ramfs), else `uring` where the kernel allows
    /// it, else `threads`.
    #[default]
    Auto,
    /// Every operation runs to completion in the queue thread that issued it. Only right where
    /// I/O never waits for a device: each request is a memory copy, and a hand-off to another
    /// thread costs more than the copy.
    Inline,
    /// One io_uring per queue thread.
    Uring,
    /// Inline `RWF_NOWAIT` attempts, a thread pool for the rest.
    Threads,
}

enum Submit {
    Inline,
    Uring(Box<SharedRing>),
    Threads {
        // Set once the filesystem refuses RWF_NOWAIT, so we stop trying.
        no_nowait_reads: AtomicBool,
        no_nowait_writes: AtomicBool,
    },
}

pub(crate) struct Engine {
    file: Arc<File>,
    kind: FileKind,
    direct: bool,
    path: Arc<PathBuf>,
    block_size: u32,
    submit: Submit,
    pool: tokio::runtime::Handle,
}

impl Engine {
    pub(crate) fn new(
        file: Arc<File>,
        kind: FileKind,
        direct: bool,
        path: PathBuf,
        block_size: u32,
        engine: EngineKind,
    ) -> Result<Self> {
        let pool = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::with_source(ErrorKind::Io, "the file backend needs a tokio runtime", e)
        })?;
        let threads = || Submit::Threads {
            no_nowait_reads: AtomicBool::new(direct),
            no_nowait_writes: AtomicBool::new(direct),
        };
        let submit = match engine {
            EngineKind::Inline => Submit::Inline,
            // A device node sits on devtmpfs, which says nothing about the device behind it.
            EngineKind::Auto if kind == FileKind::Regular && is_memory_backed(&file) => {
                Submit::Inline
            }
            EngineKind::Threads => threads(),
            EngineKind::Uring => Submit::Uring(Box::new(
                SharedRing::new(&pool)
                    .map_err(|e| Error::io("engine: uring: cannot set up io_uring", e))?,
            )),
            EngineKind::Auto => match SharedRing::new(&pool) {
                Ok(rings) => Submit::Uring(Box::new(rings)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "io_uring unavailable ({e}); using the thread pool");
                    threads()
                }
            },
        };
        Ok(Engine {
            file,
            kind,
            direct,
            path: Arc::new(path),
            block_size,
            submit,
            pool,
        })
    }

    pub(crate) fn engine_name(&self) -> &'static str {
        match self.submit {
            Submit::Inline => "inline",
            Submit::Uring(_) => "uring",
            Submit::Threads { .. } => "threads",
        }
    }

    fn context(&self, op: &str, offset: u64, len: u64) -> String {
        format!(
            "{op} {} at offset {offset} length {len}",
            self.path.display()
        )
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        self.pool
            .spawn_blocking(f)
            .await
            .map_err(|e| io::Error::other(format!("{op} thread failed: {e}")))?
    }

    /// The queue ring a worker should hand to the calls it makes, where the engine has one.
    pub(crate) fn queue(&self, notify: std::os::fd::OwnedFd) -> Option<QueueRing> {
        matches!(self.submit, Submit::Uring(_)).then(|| QueueRing::new(notify))
    }

    /// Reads into `bufs` at `offset`; under a `permit`, each system call that moves bytes is
    /// made only while it allows it (see [`Permit`]). `queue`: the ring of the queue worker
    /// this runs on, if it does.
    pub(crate) async fn read(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Option<Arc<dyn Permit>>,
    ) -> Result<()> {
        let len = bufs.len() as u64;
        self.transfer(queue, offset, bufs, false, permit)
            .await
            .map_err(|e| Error::io(self.context("read", offset, len), e))
    }

    /// Writes `bufs` at `offset`, under `permit` as [`Engine::read`].
    pub(crate) async fn write(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Option<Arc<dyn Permit>>,
    ) -> Result<()> {
        let len = bufs.len() as u64;
        self.transfer(queue, offset, bufs, true, permit)
            .await
            .map_err(|e| Error::io(self.context("write", offset, len), e))
    }

    async fn transfer(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<()> {
        let (direct, align) = (self.direct, self.block_size as usize);
        let mut done = 0;
        let how = Transfer {
            direct,
            align,
            write,
            permit,
        };
        match &self.submit {
            Submit::Inline => transfer_all(&self.file, &bufs, offset, 0, &how),
            Submit::Uring(rings) => {
                let mut bufs = bufs;
                let fd = types::Fd(self.file.as_raw_fd());
                while done < bufs.len() {
                    // The buffers' own iovec list serves the usual whole-request submission;
                    // only a resumed or over-long transfer needs a list of its own.
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
                    // SAFETY: the entry points at heap iovecs owned by `bufs` or `tail` and at
                    // the guest memory `bufs` holds; both travel with the operation until the
                    // kernel is done, and moving them does not move their heap data.
                    let keep = (bufs, tail);
                    let permit = how.permit.clone();
                    let ((b, _tail), res) =
                        unsafe { rings.submit(queue, entry, keep, permit) }?.await;
                    bufs = b;
                    match res {
                        n if n > 0 => done += n as usize,
                        0 if write => {
                            return Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "device accepted no bytes",
                            ))
                        }
                        0 => {
                            bufs.fill_zero(done, bufs.len() - done);
                            return Ok(());
                        }
                        e if direct && -e == libc::EINVAL => {
                            // O_DIRECT needs aligned memory; a guest may hand us unaligned buffers.
                            let (file, how) = (self.file.clone(), how.clone());
                            return self
                                .blocking("bounce", move || {
                                    bounce(&file, &bufs, offset, done, &how)
                                })
                                .await;
                        }
                        WITHDRAWN => return Err(withdrawn()),
                        e => return Err(io::Error::from_raw_os_error(-e)),
                    }
                }
                Ok(())
            }
            Submit::Threads {
                no_nowait_reads,
                no_nowait_writes,
            } => {
                let unsupported = if write {
                    no_nowait_writes
                } else {
                    no_nowait_reads
                };
                if !unsupported.load(Ordering::Relaxed) {
                    allowed(how.permit.as_deref())?;
                    match rw_nowait(&self.file, &bufs, offset, write) {
                        Ok(n) if n == bufs.len() => return Ok(()),
                        Ok(n) => done = n,
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            unsupported.store(true, Ordering::Relaxed)
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                        Err(e) => return Err(e),
                    }
                }
                let (file, how) = (self.file.clone(), how.clone());
                self.blocking("transfer", move || {
                    transfer_all(&file, &bufs, offset, done, &how)
                })
                .await
            }
        }
    }

    /// Runs one non-transfer operation: on the ring when it has an opcode for it, else on
    /// the pool.
    async fn run(
        &self,
        queue: Option<&QueueRing>,
        entry: Option<squeue::Entry>,
        blocking: impl FnOnce(&File) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        if let Submit::Inline = self.submit {
            return blocking(&self.file);
        }
        if let (Submit::Uring(rings), Some(entry)) = (&self.submit, entry) {
            // SAFETY: the entry carries no pointers.
            let ((), res) = unsafe { rings.submit(queue, entry, (), None) }?.await;
            return if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(())
            };
        }
        let file = self.file.clone();
        self.blocking("sync", move || blocking(&file)).await
    }

    pub(crate) async fn flush(&self, queue: Option<&QueueRing>) -> Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.run(queue, Some(entry), |f| f.sync_data())
            .await
            .map_err(|e| Error::io(format!("fdatasync {}", self.path.display()), e))
    }

    fn fallocate_entry(&self, mode: libc::c_int, offset: u64, len: u64) -> Option<squeue::Entry> {
        (self.kind == FileKind::Regular).then(|| {
            opcode::Fallocate::new(types::Fd(self.file.as_raw_fd()), len)
                .offset(offset)
                .mode(mode)
                .build()
        })
    }

    pub(crate) async fn discard(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let kind = self.kind;
        let r = self
            .run(
                queue,
                self.fallocate_entry(mode, offset, len),
                move |f| match kind {
                    FileKind::Regular => fallocate(f, mode, offset, len),
                    FileKind::BlockDevice => range_ioctl(f, BLKDISCARD, offset, len),
                },
            )
            .await;
        match r {
            // Discard is a hint; a store that cannot deallocate simply keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r.map_err(|e| Error::io(self.context("discard", offset, len), e)),
        }
    }

    pub(crate) async fn write_zeroes(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        } | libc::FALLOC_FL_KEEP_SIZE;
        let kind = self.kind;
        let native = self
            .run(
                queue,
                self.fallocate_entry(mode, offset, len),
                move |f| match kind {
                    FileKind::Regular => fallocate(f, mode, offset, len),
                    FileKind::BlockDevice => range_ioctl(f, BLKZEROOUT, offset, len),
                },
            )
            .await;
        let result = match native {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let align = self.block_size as usize;
                let file = self.file.clone();
                self.blocking("write-zeroes", move || {
                    write_zeros(&file, offset, len, align)
                })
                .await
            }
            r => r,
        };
        result.map_err(|e| Error::io(self.context("write-zeroes", offset, len), e))
    }
}

/// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs), so that I/O never waits.
fn is_memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: fstatfs fills the zeroed struct we pass.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(file.as_raw_fd(), &mut st) != 0 {
            return false;
        }
        st.f_type as i64
    };
    matches!(fs_type, TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC)
}

/// One `preadv2`/`pwritev2` with RWF_NOWAIT: returns what completed without blocking.
fn rw_nowait(file: &File, bufs: &GuestBuffers, offset: u64, write: bool) -> io::Result<usize> {
    let iov = bufs.iovecs();
    let iovcnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: the iovecs describe live guest memory (GuestBuffers contract) and the kernel
    // accesses at most `iovcnt` of them.
    let n = unsafe {
        if write {
            libc::pwritev2(
                file.as_raw_fd(),
                iov.as_ptr(),
                iovcnt,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        } else {
            libc::preadv2(
                file.as_raw_fd(),
                iov.as_ptr(),
                iovcnt,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn rw_blocking(
    file: &File,
    iov: &[libc::iovec],
    offset: u64,
    write: bool,
    permit: Option<&dyn Permit>,
) -> io::Result<usize> {
    let iovcnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    loop {
        allowed(permit)?;
        // SAFETY: as in `rw_nowait`.
        let n = unsafe {
            if write {
                libc::pwritev(
                    file.as_raw_fd(),
                    iov.as_ptr(),
                    iovcnt,
                    offset as libc::off_t,
                )
            } else {
                libc::preadv(
                    file.as_raw_fd(),
                    iov.as_ptr(),
                    iovcnt,
                    offset as libc::off_t,
                )
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How a transfer moves its bytes.
#[derive(Clone)]
struct Transfer {
    direct: bool,
    align: usize,
    write: bool,
    /// Asked before every system call that moves bytes.
    permit: Option<Arc<dyn Permit>>,
}

fn allowed(permit: Option<&dyn Permit>) -> io::Result<()> {
    match permit {
        Some(p) if !p.allows() => Err(withdrawn()),
        _ => Ok(()),
    }
}

fn withdrawn() -> io::Error {
    io::Error::other("its permit was withdrawn before it reached the device")
}

/// Transfers the rest of `bufs` from byte `done` on. A read past the end of the file reads
/// zeros (the image shrank under us, or its size is not a multiple of the block size).
fn transfer_all(
    file: &File,
    bufs: &GuestBuffers,
    offset: u64,
    mut done: usize,
    how: &Transfer,
) -> io::Result<()> {
    let len = bufs.len();
    let write = how.write;
    while done < len {
        let iov = bufs.iovecs_range(done, len - done);
        let n = match rw_blocking(
            file,
            &iov,
            offset + done as u64,
            write,
            how.permit.as_deref(),
        ) {
            // O_DIRECT needs aligned memory; a guest may hand us unaligned buffers.
            Err(e) if how.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return bounce(file, bufs, offset, done, how);
            }
            r => r?,
        };
        if n == 0 && write {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "device accepted no bytes",
            ));
        }
        if n == 0 {
            bufs.fill_zero(done, len - done);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(align), align.max(4096))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    fn iovec(&mut self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: len.min(self.layout.size()),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The most a bounce moves at a time: its buffer is at most this large, whatever the
/// request's size (a guest's 1 GiB request must not cost the daemon 1 GiB).
const BOUNCE_CHUNK: usize = 1 << 20;

/// `transfer_all` through an aligned bounce buffer, for O_DIRECT with unaligned guest memory,
/// in pieces of at most [`BOUNCE_CHUNK`].
fn bounce(
    file: &File,
    bufs: &GuestBuffers,
    offset: u64,
    done: usize,
    how: &Transfer,
) -> io::Result<()> {
    let (align, write) = (how.align, how.write);
    let len = bufs.len() - done;
    tracing::debug!(
        offset,
        len,
        write,
        "O_DIRECT refused the guest buffers; using a bounce buffer"
    );
    let mut buf = AlignedBuf::zeroed(len.min(BOUNCE_CHUNK), align)?;
    let mut at = done;
    while at < bufs.len() {
        let piece = (bufs.len() - at).min(BOUNCE_CHUNK);
        if write {
            bufs.copy_to_slice(at, &mut buf.as_mut_slice()[..piece]);
        }
        let mut moved = 0;
        while moved < piece {
            let mut iov = buf.iovec(piece);
            // SAFETY: `moved < piece <= layout.size()`, so the pointer stays in the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(moved) }.cast();
            iov.iov_len = piece - moved;
            let to = offset + (at + moved) as u64;
            match rw_blocking(file, &[iov], to, write, how.permit.as_deref())? {
                0 if write => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device accepted no bytes",
                    ))
                }
                // Past the end of the file: the rest reads as zeros.
                0 => {
                    buf.as_mut_slice()[moved..piece].fill(0);
                    bufs.copy_from_slice(at, &buf.as_mut_slice()[..piece]);
                    bufs.fill_zero(at + piece, bufs.len() - at - piece);
                    return Ok(());
                }
                n => moved += n,
            }
        }
        if !write {
            bufs.copy_from_slice(at, &buf.as_mut_slice()[..piece]);
        }
        at += piece;
    }
    Ok(())
}

fn write_zeros(file: &File, offset: u64, len: u64, align: usize) -> io::Result<()> {
    let chunk = (len as usize).min(ZERO_CHUNK);
    let mut buf = AlignedBuf::zeroed(chunk, align)?;
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(chunk);
        let written = rw_blocking(file, &[buf.iovec(n)], offset + done, true, None)?;
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "device accepted no bytes",
            ));
        }
        done += written as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn range_ioctl(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the pointer, which points at `range`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::pin::pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll, Waker};

    use super::*;

    struct Flag(AtomicBool);

    impl Permit for Flag {
        fn allows(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A write under a permit, queued on a worker's ring (polled once, as a queue worker
    /// polls a request), then the worker's flush after `between` ran: what the file holds.
    fn write_on_a_worker(between: impl FnOnce(&Flag)) -> (Result<()>, Vec<u8>) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _guard = runtime.enter();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        std::fs::write(&path, vec![1u8; 65536]).unwrap();
        let file = Arc::new(File::options().read(true).write(true).open(&path).unwrap());
        let engine = Engine::new(
            file,
            FileKind::Regular,
            false,
            path.clone(),
            512,
            EngineKind::Uring,
        )
        .unwrap();
        // SAFETY: eventfd returns a new descriptor, owned here.
        let notify = unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        let queue = engine
            .queue(notify)
            .expect("a uring engine has queue rings");
        let permit = Arc::new(Flag(AtomicBool::new(true)));
        let (bufs, _data) = GuestBuffers::from_vec(vec![2u8; 4096]);
        let mut write = pin!(engine.write(Some(&queue), 0, bufs, Some(permit.clone())));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(write.as_mut().poll(&mut cx).is_pending());
        between(&permit);
        queue.submit();
        let result = loop {
            queue.reap();
            if let Poll::Ready(r) = write.as_mut().poll(&mut cx) {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        (result, std::fs::read(&path).unwrap()[..4096].to_vec())
    }

    #[test]
    fn a_worker_stopped_between_queueing_and_flushing_submits_nothing_whose_permit_went() {
        let (result, on_disk) = write_on_a_worker(|p| p.0.store(false, Ordering::SeqCst));
        let e = result.unwrap_err().to_string();
        assert!(e.contains("permit was withdrawn"), "{e}");
        assert_eq!(on_disk, vec![1u8; 4096], "the write reached the file");
    }

    #[test]
    fn a_worker_flush_submits_what_its_permits_still_allow() {
        let (result, on_disk) = write_on_a_worker(|_| {});
        result.unwrap();
        assert_eq!(on_disk, vec![2u8; 4096]);
    }
}
