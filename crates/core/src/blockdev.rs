//! Block-device queries the libc crate has no wrapper for.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// <linux/fs.h> BLKGETSIZE64.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size in bytes of the block device open as `file`.
pub fn size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
