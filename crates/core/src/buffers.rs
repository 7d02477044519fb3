//! Scatter-gather views of guest memory handed to backends.
//!
//! The device translates a request's data descriptors into host addresses once; backends then
//! do zero-copy I/O (`preadv`/`pwritev`) on them or copy through the helpers here. Guest memory
//! is shared with a running guest, so it is only ever touched through raw pointers and
//! `ptr::copy`, never through Rust references.

use std::any::Any;
use std::sync::Arc;

/// Host mappings of one request's data buffers, kept alive for as long as this value lives.
pub struct GuestBuffers {
    iovecs: Vec<libc::iovec>,
    len: usize,
    // Holds the guest memory mapping (or test buffer) the iovecs point into.
    _keepalive: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the iovecs point into memory owned by `_keepalive`, which is Send + Sync; the memory
// is designed to be accessed concurrently (it is DMA-like guest memory), and every access goes
// through raw-pointer copies or syscalls.
unsafe impl Send for GuestBuffers {}
// SAFETY: as above; shared access only reads the iovec list.
unsafe impl Sync for GuestBuffers {}

impl GuestBuffers {
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes of `len` bytes for as long as
    /// `keepalive` is alive.
    pub unsafe fn from_raw_parts(
        segments: impl IntoIterator<Item = (*mut u8, usize)>,
        keepalive: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        let iovecs: Vec<libc::iovec> = segments
            .into_iter()
            .filter(|(_, len)| *len > 0)
            .map(|(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        let len = iovecs.iter().map(|v| v.iov_len).sum();
        GuestBuffers {
            iovecs,
            len,
            _keepalive: keepalive,
        }
    }

    /// Buffers over an owned byte vector; for tests and for backends that stage data.
    pub fn from_vec(data: Vec<u8>) -> (Self, Arc<std::sync::Mutex<Vec<u8>>>) {
        let shared = Arc::new(std::sync::Mutex::new(data));
        let (ptr, len) = {
            let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
            (guard.as_mut_ptr(), guard.len())
        };
        // SAFETY: the Vec is never resized while `shared` lives, and `shared` is the keepalive.
        let bufs = unsafe { Self::from_raw_parts([(ptr, len)], shared.clone()) };
        (bufs, shared)
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole list, for vectored syscalls.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// The iovecs covering `[offset, offset + len)` of the buffer, for split or resumed I/O.
    pub fn iovecs_range(&self, offset: usize, len: usize) -> IoVecs {
        let mut out = Vec::with_capacity(self.iovecs.len());
        let mut skip = offset;
        let mut want = len.min(self.len.saturating_sub(offset));
        for v in &self.iovecs {
            if want == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let take = (v.iov_len - skip).min(want);
            out.push(libc::iovec {
                // SAFETY: `skip < iov_len`, so the pointer stays inside this segment.
                iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: take,
            });
            want -= take;
            skip = 0;
        }
        IoVecs(out)
    }

    /// A view of `[offset, offset + len)` of these buffers (clipped to their end) that keeps
    /// the same memory alive: for handing parts of one request to different places.
    pub fn slice(&self, offset: usize, len: usize) -> GuestBuffers {
        let IoVecs(iovecs) = self.iovecs_range(offset, len);
        let len = iovecs.iter().map(|v| v.iov_len).sum();
        GuestBuffers {
            iovecs,
            len,
            _keepalive: self._keepalive.clone(),
        }
    }

    /// Copies `src` into the buffers starting at byte `offset` (bounded by the buffer end).
    /// Returns the number of bytes copied.
    pub fn copy_from_slice(&self, offset: usize, src: &[u8]) -> usize {
        let mut done = 0;
        for v in self.iovecs_range(offset, src.len()).iter() {
            // SAFETY: `v` lies inside a segment valid for writes (constructor contract); `src`
            // is a separate host allocation, so the ranges cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src[done..].as_ptr(), v.iov_base.cast(), v.iov_len)
            };
            done += v.iov_len;
        }
        done
    }

    /// Copies from the buffers starting at byte `offset` into `dst`. Returns bytes copied.
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for v in self.iovecs_range(offset, dst.len()).iter() {
            // SAFETY: `v` lies inside a segment valid for reads; `dst` is host memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    dst[done..].as_mut_ptr(),
                    v.iov_len,
                )
            };
            done += v.iov_len;
        }
        done
    }

    /// Zero-fills `[offset, offset + len)`, e.g. for reads past the end of a short file.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        for v in self.iovecs_range(offset, len).iter() {
            // SAFETY: `v` lies inside a segment valid for writes.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }
}

/// A list of iovecs into the memory of a [`GuestBuffers`]; valid while that lives.
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses into memory that is itself Send + Sync (see
// GuestBuffers); moving the list between threads does not touch that memory.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Keeps at most `n` entries (e.g. UIO_MAXIOV); the caller resumes after a short transfer.
    pub fn truncate(&mut self, n: usize) {
        self.0.truncate(n);
    }
}

impl std::ops::Deref for IoVecs {
    type Target = [libc::iovec];

    fn deref(&self) -> &[libc::iovec] {
        &self.0
    }
}

impl std::fmt::Debug for GuestBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuffers")
            .field("segments", &self.iovecs.len())
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_segments() -> (GuestBuffers, Arc<std::sync::Mutex<Vec<u8>>>) {
        let shared = Arc::new(std::sync::Mutex::new(vec![0u8; 10]));
        let base = shared.lock().unwrap().as_mut_ptr();
        // SAFETY: both segments lie inside the 10-byte vector kept alive by `shared`.
        let bufs =
            unsafe { GuestBuffers::from_raw_parts([(base, 4), (base.add(4), 6)], shared.clone()) };
        (bufs, shared)
    }

    #[test]
    fn ranges_cross_segment_boundaries() {
        let (bufs, shared) = two_segments();
        assert_eq!(bufs.len(), 10);
        let r = bufs.iovecs_range(3, 4);
        assert_eq!(r.iter().map(|v| v.iov_len).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(bufs.copy_from_slice(2, &[1, 2, 3, 4, 5]), 5);
        assert_eq!(&shared.lock().unwrap()[..], &[0, 0, 1, 2, 3, 4, 5, 0, 0, 0]);
        let mut out = [0u8; 4];
        assert_eq!(bufs.copy_to_slice(8, &mut out), 2);
        bufs.fill_zero(3, 2);
        assert_eq!(&shared.lock().unwrap()[..], &[0, 0, 1, 0, 0, 4, 5, 0, 0, 0]);
    }

    #[test]
    fn range_past_end_is_clamped() {
        let (bufs, _) = two_segments();
        assert!(bufs.iovecs_range(10, 5).is_empty());
        assert_eq!(
            bufs.iovecs_range(8, 5)
                .iter()
                .map(|v| v.iov_len)
                .sum::<usize>(),
            2
        );
    }

    #[test]
    fn slices_write_through_to_the_same_memory() {
        let (bufs, shared) = two_segments();
        let part = bufs.slice(3, 4);
        assert_eq!(part.len(), 4);
        assert_eq!(part.iovecs().len(), 2);
        part.copy_from_slice(0, &[9, 8, 7, 6]);
        assert_eq!(&shared.lock().unwrap()[..], &[0, 0, 0, 9, 8, 7, 6, 0, 0, 0]);
        assert_eq!(bufs.slice(8, 10).len(), 2);
    }
}
