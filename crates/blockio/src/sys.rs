//! The system calls the engines make, and block-device queries the libc crate has no
//! wrapper for.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use twinpath_core::{GuestBuffers, Permit};

/// <linux/fs.h> BLKGETSIZE64.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
// <linux/fs.h> ioctls the libc crate does not define.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The size in bytes of the block device open as `file`.
pub fn device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The logical sector size of the block device open as `file`.
pub fn sector_size(file: &File) -> io::Result<u32> {
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

/// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs), so that I/O never waits.
pub(crate) fn is_memory_backed(file: &File) -> bool {
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
pub(crate) fn rw_nowait(
    file: &File,
    bufs: &GuestBuffers,
    offset: u64,
    write: bool,
) -> io::Result<usize> {
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

/// One `preadv`/`pwritev`, retried on EINTR, made only while `permit` allows it.
pub(crate) fn rw_blocking(
    file: &File,
    iov: &[libc::iovec],
    offset: u64,
    write: bool,
    permit: Option<&dyn Permit>,
) -> io::Result<usize> {
    let iovcnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    loop {
        allowed(permit)?;
        // SAFETY: the iovecs describe memory valid for the call (guest buffers or an
        // AlignedBuf, both kept by the caller), and the kernel accesses at most `iovcnt`.
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

/// Fails when `permit` no longer allows the operation.
pub(crate) fn allowed(permit: Option<&dyn Permit>) -> io::Result<()> {
    match permit {
        Some(p) if !p.allows() => Err(withdrawn()),
        _ => Ok(()),
    }
}

pub(crate) fn withdrawn() -> io::Error {
    io::Error::other("its permit was withdrawn before it reached the device")
}

pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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

pub(crate) fn discard_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKDISCARD, offset, len)
}

pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKZEROOUT, offset, len)
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
