//! Keeps `xfs_fsr` away from leased files. The defragmenter moves a file's extents to new
//! blocks (XFS_IOC_SWAPEXT) without any event a userspace server could act on in time, and a
//! host holding a map would go on writing the old blocks. XFS's per-inode "no defrag" flag
//! (FS_XFLAG_NODEFRAG), which `xfs_fsr` honours, is set on a file while any lease on it lives
//! and put back as it was when the last one is gone.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use linux_raw_sys::general::{fsxattr, FS_XFLAG_NODEFRAG};
use linux_raw_sys::ioctl::{FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR};

use crate::export::Inode;

/// Sets or clears the flag on `file`; returns whether it was set before.
fn set(file: &File, on: bool) -> std::io::Result<bool> {
    // SAFETY: fsxattr is plain old data; all zeros is a valid value.
    let mut attr: fsxattr = unsafe { std::mem::zeroed() };
    // SAFETY: FS_IOC_FSGETXATTR fills the fsxattr we pass, on a descriptor we hold.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = attr.fsx_xflags & FS_XFLAG_NODEFRAG != 0;
    if was != on {
        attr.fsx_xflags ^= FS_XFLAG_NODEFRAG;
        // SAFETY: FS_IOC_FSSETXATTR reads the fsxattr we pass, on a descriptor we hold.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSSETXATTR as _, &attr) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(was)
}

/// The files flagged here, with whether they had the flag before.
#[derive(Default)]
pub struct NoDefrag {
    pinned: HashMap<Inode, (Arc<File>, bool)>,
}

impl NoDefrag {
    /// Flags leased file `file` (`path` for the log), once per inode.
    pub fn pin(&mut self, inode: Inode, file: &Arc<File>, path: &str) {
        if self.pinned.contains_key(&inode) {
            return;
        }
        match set(file, true) {
            Ok(had) => {
                self.pinned.insert(inode, (file.clone(), had));
            }
            Err(e) => tracing::warn!(
                path,
                "cannot set the no-defrag flag (xfs_fsr may move the leased file's blocks): {e}"
            ),
        }
    }

    /// Puts the flag of `inode` back as it was, once no lease refers to it.
    pub fn unpin(&mut self, inode: Inode) {
        if let Some((file, had)) = self.pinned.remove(&inode) {
            if !had {
                if let Err(e) = set(&file, false) {
                    tracing::warn!(?inode, "cannot clear the no-defrag flag: {e}");
                }
            }
        }
    }
}
