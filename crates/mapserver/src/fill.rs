//! Making the holes and unwritten ranges of an image written, without ever writing over data.
//!
//! A write map may grant only written extents (a device write into an unwritten extent stays
//! invisible to the filesystem). Writing zeros through the file would erase any write that
//! lands after the server looked at the file: another SMB client, the host's own fallback
//! write through smbd, a local process. On a filesystem with reflink, a dedupe from a file of
//! written zeros is instead a compare-and-remap done under both inodes' locks, after the
//! kernel flushed and compared both ranges: a range that no longer reads as zeros reports
//! DIFFERS and is left as it is. Unsharing then copies the shared zeros into private written
//! extents under the inode lock, keeping the content (a write in between simply copies on
//! write). Without reflink the server fills nothing: holes stay gaps in write maps and the
//! host writes them over the network, which allocates them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use linux_raw_sys::general::{
    file_dedupe_range, file_dedupe_range_info, FILE_DEDUPE_RANGE_DIFFERS, FILE_DEDUPE_RANGE_SAME,
};
use linux_raw_sys::ioctl::FIDEDUPERANGE;
use twinpath_filemap::{file_extents, ExtentClass};

use crate::error::{io, Error, Result};

/// Name of the zero file in the export's root.
pub const ZERO_FILE: &str = ".twinpath-zeros";
/// The zero file's length, and so the longest dedupe asked for in one call (xfs caps one
/// dedupe at 16 MiB anyway).
const PIECE: u64 = 16 << 20;

/// Fills holes where the filesystem can do it safely; see the module's comment.
pub struct Filler {
    /// The zero file, open for reading only (a dedupe never changes its source), and its
    /// (st_dev, st_ino); `None` where the filesystem has no reflink.
    zeros: Option<(File, (u64, u64))>,
}

/// struct file_dedupe_range with the one destination every call here names.
#[repr(C)]
struct DedupeOne {
    range: file_dedupe_range,
    dest: [file_dedupe_range_info; 1],
}

enum Dedupe {
    /// The first this many bytes now share the source's blocks.
    Same(u64),
    /// The destination no longer read as the source did; nothing changed.
    Differs,
}

/// Dedupes `len` bytes at `src_offset` of `src` into `dest` at `dest_offset`.
fn dedupe(
    src: &File,
    src_offset: u64,
    dest: &File,
    dest_offset: u64,
    len: u64,
) -> std::io::Result<Dedupe> {
    // SAFETY: both structs are plain integers (and a zero-length array), for which all
    // zeros is a valid value.
    let mut arg: DedupeOne = unsafe { std::mem::zeroed() };
    arg.range.src_offset = src_offset;
    arg.range.src_length = len;
    arg.range.dest_count = 1;
    arg.dest[0].dest_fd = dest.as_raw_fd().into();
    arg.dest[0].dest_offset = dest_offset;
    // SAFETY: `arg` is a file_dedupe_range followed by exactly `dest_count` (1) infos, as the
    // kernel reads and writes them; both descriptors are open for the whole call.
    let r = unsafe {
        libc::ioctl(
            src.as_raw_fd(),
            FIDEDUPERANGE as _,
            std::ptr::addr_of_mut!(arg),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let info = arg.dest[0];
    match info.status {
        s if s < 0 => Err(std::io::Error::from_raw_os_error(-s)),
        s if s as u32 == FILE_DEDUPE_RANGE_SAME => Ok(Dedupe::Same(info.bytes_deduped)),
        s if s as u32 == FILE_DEDUPE_RANGE_DIFFERS => Ok(Dedupe::Differs),
        s => Err(std::io::Error::other(format!("dedupe status {s}"))),
    }
}

/// Writes a fresh zero file of PIECE bytes at `path` (replacing one left by an earlier run)
/// and returns it open for reading.
fn write_zero_file(path: &Path) -> std::io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..PIECE / zeros.len() as u64 {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    let mut at = 0;
    // xfs may keep speculative preallocation past the end: only the file's bytes count.
    for e in file_extents(&f)?.into_iter().filter(|e| e.logical < PIECE) {
        if e.logical != at || e.class != ExtentClass::Written {
            return Err(std::io::Error::other(format!(
                "not one run of written extents: {e:?} at {at}"
            )));
        }
        at += e.len;
    }
    if at < PIECE {
        return Err(std::io::Error::other("not written to its end"));
    }
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if reader.metadata()?.ino() != f.metadata()?.ino() {
        return Err(std::io::Error::other("replaced while being written"));
    }
    Ok(reader)
}

impl Filler {
    /// Writes the zero file in `export_root` and finds out whether the filesystem can dedupe
    /// into holes (one block of the zero file into itself). Without reflink the zero file is
    /// removed again and nothing is ever filled.
    pub fn new(export_root: &Path) -> Result<Filler> {
        let path = export_root.join(ZERO_FILE);
        let file = write_zero_file(&path).map_err(io(path.display()))?;
        let meta = file.metadata().map_err(io(path.display()))?;
        let block = meta.blksize();
        let probe = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|dest| dedupe(&file, 0, &dest, block, block));
        match probe {
            Ok(Dedupe::Same(_)) => {
                tracing::info!(
                    "holes are filled by dedupe from {} (reflink)",
                    path.display()
                );
                Ok(Filler {
                    zeros: Some((file, (meta.dev(), meta.ino()))),
                })
            }
            Ok(Dedupe::Differs) => Err(Error::Unfit(format!(
                "{}: zeros differ from zeros; the file was changed while starting",
                path.display()
            ))),
            Err(e) => {
                tracing::info!(
                    "no reflink on {} ({e}): holes stay on the network path",
                    export_root.display()
                );
                drop(file);
                std::fs::remove_file(&path).map_err(io(path.display()))?;
                Ok(Filler { zeros: None })
            }
        }
    }

    /// The zero file's (st_dev, st_ino), where there is one: it must never be mapped (a
    /// direct write into its blocks would turn every later fill into someone else's data).
    pub fn zero_file_id(&self) -> Option<(u64, u64)> {
        self.zeros.as_ref().map(|(_, id)| *id)
    }

    /// Whether holes can be filled on this filesystem at all.
    pub fn fills(&self) -> bool {
        self.zeros.is_some()
    }

    /// Makes `holes` (holes and unwritten ranges FIEMAP reported inside `[lo, hi)`, maybe
    /// stale by now) written where they still read as zeros, then unshares all of `[lo, hi)`
    /// so that no extent there is shared (with the zero file, or left shared by a crash or
    /// a reflink copy) and fsyncs. A hole that someone wrote meanwhile is left to them; a
    /// tail shorter than a block stays a hole. Does nothing without reflink.
    pub fn make_written(&self, file: &File, holes: &[(u64, u64)], lo: u64, hi: u64) -> Result<()> {
        let Some((zeros, _)) = &self.zeros else {
            return Ok(());
        };
        let block = file.metadata().map_err(io("stat"))?.blksize();
        if !PIECE.is_multiple_of(block) {
            return Err(Error::Unfit(format!(
                "block size {block} does not divide {PIECE}"
            )));
        }
        for &(a, b) in holes {
            let (mut at, end) = (a.next_multiple_of(block), b / block * block);
            while at < end {
                let len = (end - at).min(PIECE);
                match dedupe(zeros, 0, file, at, len) {
                    Ok(Dedupe::Same(n)) if n > 0 => at += n,
                    Ok(Dedupe::Same(_)) => {
                        return Err(Error::Unfit(format!("dedupe at {at}: no progress")))
                    }
                    Ok(Dedupe::Differs) => {
                        tracing::debug!(at, len, "written meanwhile; not filled");
                        at += len;
                    }
                    Err(e) => return Err(io(format_args!("dedupe of {len} bytes at {at}"))(e)),
                }
            }
        }
        if hi > lo {
            // SAFETY: plain syscall on a descriptor we hold open.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_UNSHARE_RANGE,
                    lo as libc::off_t,
                    (hi - lo) as libc::off_t,
                )
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(io(format_args!("unshare of [{lo}, {hi})"))(e));
            }
        }
        file.sync_all().map_err(io("fsync after filling"))
    }
}
