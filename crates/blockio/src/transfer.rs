//! Whole transfers with blocking system calls: resumed after short ones, through a bounded
//! bounce buffer where O_DIRECT refuses the guest's memory, zeros past the end of a file.

use std::fs::File;
use std::io;
use std::sync::Arc;

use twinpath_core::{GuestBuffers, Permit};

use crate::buf::AlignedBuf;
use crate::sys::rw_blocking;

/// The most a bounce moves at a time: its buffer is at most this large, whatever the
/// request's size (a guest's 1 GiB request must not cost the daemon 1 GiB).
pub(crate) const BOUNCE_CHUNK: usize = 1 << 20;

/// Largest chunk written when zeros have to be written out by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// How a transfer moves its bytes.
#[derive(Clone)]
pub(crate) struct Transfer {
    pub(crate) direct: bool,
    pub(crate) align: usize,
    pub(crate) write: bool,
    /// Asked before every system call that moves bytes.
    pub(crate) permit: Option<Arc<dyn Permit>>,
}

pub(crate) fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes")
}

/// Transfers the rest of `bufs` from byte `done` on. A read past the end of the file reads
/// zeros (the image shrank under us, or its size is not a multiple of the block size).
pub(crate) fn transfer_all(
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
            return Err(write_zero());
        }
        if n == 0 {
            bufs.fill_zero(done, len - done);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// `transfer_all` through an aligned bounce buffer, for O_DIRECT with unaligned guest memory,
/// in pieces of at most [`BOUNCE_CHUNK`].
pub(crate) fn bounce(
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
            // SAFETY: `moved < piece <= buf.len()`, so the pointer stays in the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(moved) }.cast();
            iov.iov_len = piece - moved;
            let to = offset + (at + moved) as u64;
            match rw_blocking(file, &[iov], to, write, how.permit.as_deref())? {
                0 if write => return Err(write_zero()),
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

/// Writes `len` zero bytes at `offset` from one buffer of at most [`ZERO_CHUNK`].
pub(crate) fn write_zeros(file: &File, offset: u64, len: u64, align: usize) -> io::Result<()> {
    let chunk = (len as usize).min(ZERO_CHUNK);
    let mut buf = AlignedBuf::zeroed(chunk, align)?;
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(chunk);
        let written = rw_blocking(file, &[buf.iovec(n)], offset + done, true, None)?;
        if written == 0 {
            return Err(write_zero());
        }
        done += written as u64;
    }
    Ok(())
}
