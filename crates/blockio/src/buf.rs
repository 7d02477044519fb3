//! Heap buffers aligned for O_DIRECT.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;

/// A zeroed heap buffer whose address and length are multiples of its alignment (at least
/// 4096 bytes), as O_DIRECT asks of memory.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation exclusively; nothing else holds the pointer.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `len` bytes (at least one alignment unit), aligned to `align`
    /// rounded up to 4096.
    pub fn zeroed(len: usize, align: usize) -> io::Result<Self> {
        let align = align.max(4096);
        let size = len.max(1).div_ceil(align) * align;
        let layout = Layout::from_size_align(size, align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised (zeroed) bytes, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// An iovec over the first `len` bytes (at most the whole buffer), for vectored calls.
    pub fn iovec(&mut self, len: usize) -> libc::iovec {
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

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn buffers_are_aligned_whole_units() {
        for (len, align, size) in [(0, 512, 4096), (5000, 512, 8192), (4096, 65536, 65536)] {
            let mut b = AlignedBuf::zeroed(len, align).unwrap();
            assert_eq!(b.len(), size, "{len} {align}");
            assert_eq!(b.as_slice().as_ptr() as usize % align.max(4096), 0);
            assert!(b.as_mut_slice().iter().all(|&x| x == 0));
            assert_eq!(b.iovec(size * 2).iov_len, size);
        }
    }
}
