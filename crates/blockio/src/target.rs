//! The file or block device an engine reads and writes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use twinpath_core::{Error, ErrorKind, Result};

use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
}

/// An open image file or block device, with what I/O on it must respect.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    kind: FileKind,
    direct: bool,
    capacity: u64,
    block_size: u32,
}

impl Target {
    /// Opens `path` for reading, and writing unless `read_only`; with O_DIRECT if `direct`.
    /// The capacity is the file's or device's size rounded down to the block size: the
    /// device's logical sector size, or the O_DIRECT alignment of a file, else 512.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Target> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let flags = if direct { libc::O_DIRECT } else { 0 };
        // Without O_NOATIME every read updates the inode's access time (for a LUN, a locked
        // update of the device inode per request). Only the owner or CAP_FOWNER may ask.
        let file = match opts
            .clone()
            .custom_flags(flags | libc::O_NOATIME)
            .open(path)
        {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => opts.custom_flags(flags).open(path),
            opened => opened,
        }
        .map_err(|e| Error::io(ctx("open"), e))?;
        let meta = file.metadata().map_err(|e| Error::io(ctx("stat"), e))?;
        let (kind, size, block_size) = if meta.file_type().is_block_device() {
            let size = sys::device_size(&file).map_err(|e| Error::io(ctx("BLKGETSIZE64"), e))?;
            let bs = if direct {
                sys::sector_size(&file).map_err(|e| Error::io(ctx("BLKSSZGET"), e))?
            } else {
                512
            };
            (FileKind::BlockDevice, size, bs)
        } else if meta.is_file() {
            let bs = if direct {
                sys::direct_io_alignment(&file).unwrap_or(4096).max(512)
            } else {
                512
            };
            (FileKind::Regular, meta.len(), bs)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let capacity = size - size % u64::from(block_size);
        if capacity == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Target {
            file,
            path: path.to_path_buf(),
            kind,
            direct,
            capacity,
            block_size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> FileKind {
        self.kind
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Bytes that may be read and written, a whole number of blocks.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The smallest unit of I/O (and, with O_DIRECT, the alignment it needs).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs), so its I/O never waits.
    /// A device node sits on devtmpfs, which says nothing about the device behind it.
    pub fn is_memory_backed(&self) -> bool {
        self.kind == FileKind::Regular && sys::is_memory_backed(&self.file)
    }

    /// What an error names: the operation, the file and the range.
    /// Refuses `[offset, offset + len)` unless it lies within the target: a write past the
    /// end of an image file would grow it.
    pub(crate) fn within(&self, op: &str, offset: u64, len: u64) -> Result<()> {
        twinpath_core::within(self.capacity, offset, len, || {
            format!("{op} {}", self.path.display())
        })
    }

    pub(crate) fn context(&self, op: &str, offset: u64, len: u64) -> String {
        format!(
            "{op} {} at offset {offset} length {len}",
            self.path.display()
        )
    }
}
