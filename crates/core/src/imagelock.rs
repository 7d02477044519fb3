//! QEMU's image locks, so that twinpath, QEMU and qemu-storage-daemon refuse to share an
//! image the way two QEMUs refuse each other: open file description (OFD) locks on single
//! bytes of the image. For each permission a user has it holds a shared lock on byte
//! 100 + bit; for each permission it does not share with others, on byte 200 + bit
//! (QEMU's block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE). A new user tests
//! the bytes that would conflict: someone not sharing a permission it wants, or someone
//! holding a permission it does not share.
//!
//! The locks live as long as the open file description: the disk's open image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's BLK_PERM_* bits, by bit number, with the names QEMU's errors use.
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;

/// Why [`lock`] did not lock an image.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another user's locks conflict with this disk's.
    #[error(
        "image {} is in use: {holder} {how} its \"{perm}\" permission (QEMU's image locks); \
         stop that user, or set `lock: false` on the disk if the users coordinate themselves",
        path.display()
    )]
    InUse {
        path: PathBuf,
        /// Who holds the conflicting lock, as far as /proc/locks tells.
        holder: String,
        /// "holds" or "does not share".
        how: &'static str,
        perm: &'static str,
        /// No live process but this one has the image open: the lock is held by one that has
        /// ended or is ending (killed, its last I/O on the image still under way, or its
        /// io_uring still being torn down by the kernel), and goes once that I/O has landed.
        exiting: bool,
    },
    /// The kernel refused to set or test a lock.
    #[error("{what} the image lock at byte {offset}: {source}")]
    Fcntl {
        what: &'static str,
        offset: i64,
        source: std::io::Error,
    },
}

/// Takes QEMU's locks on `file` (the image at `path`) for a disk that reads (and writes,
/// unless `read_only`) it and lets others only read it; refused, naming the holder where the
/// kernel tells, when another user's locks conflict.
pub fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), LockError> {
    let perm = if read_only { READ } else { READ | WRITE };
    // Like a QEMU drive without share-rw: others may read, nobody else may write or resize.
    let shared = READ | WRITE_UNCHANGED;
    // Locks first, then the test: of two users starting at once, at least one sees the other.
    for (bit, _) in PERMS.iter().enumerate() {
        let b = 1 << bit;
        if perm & b != 0 {
            set(file, PERM_BASE + bit as i64)?;
        }
        if shared & b == 0 {
            set(file, SHARED_BASE + bit as i64)?;
        }
    }
    for (bit, name) in PERMS.iter().enumerate() {
        let b = 1 << bit;
        if perm & b != 0 && held_by_others(file, SHARED_BASE + bit as i64)? {
            return Err(refused(
                file,
                path,
                SHARED_BASE + bit as i64,
                name,
                "does not share",
            ));
        }
        if shared & b == 0 && held_by_others(file, PERM_BASE + bit as i64)? {
            return Err(refused(file, path, PERM_BASE + bit as i64, name, "holds"));
        }
    }
    Ok(())
}

/// Gives up every lock [`lock`] took on `file`.
pub fn unlock(file: &File) {
    let mut l = flock_at(libc::F_UNLCK, PERM_BASE);
    l.l_len = SHARED_BASE + PERMS.len() as i64 - PERM_BASE;
    // SAFETY: F_OFD_SETLK reads the flock we pass, on our open file. Unlocking cannot fail
    // in a way that matters: the locks go with the file anyway.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
}

fn flock_at(kind: i32, offset: i64) -> libc::flock {
    // SAFETY: a zeroed flock is valid; the fields that matter are set below.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = offset;
    l.l_len = 1;
    l
}

/// A shared lock on byte `offset`.
fn set(file: &File, offset: i64) -> Result<(), LockError> {
    let l = flock_at(libc::F_RDLCK, offset);
    // SAFETY: F_OFD_SETLK reads the flock we pass, on our open file.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) };
    if r == 0 {
        return Ok(());
    }
    Err(LockError::Fcntl {
        what: "setting",
        offset,
        source: std::io::Error::last_os_error(),
    })
}

/// Whether another open file description holds a lock on byte `offset`.
fn held_by_others(file: &File, offset: i64) -> Result<bool, LockError> {
    let mut l = flock_at(libc::F_WRLCK, offset);
    // SAFETY: F_OFD_GETLK fills in the flock we pass, on our open file.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut l) };
    if r != 0 {
        return Err(LockError::Fcntl {
            what: "testing",
            offset,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(l.l_type != libc::F_UNLCK as i16)
}

fn refused(
    file: &File,
    path: &Path,
    offset: i64,
    perm: &'static str,
    how: &'static str,
) -> LockError {
    let holder = match holder(file, offset) {
        Some(Holder::Process { pid, comm }) => format!("process {pid} ({comm})"),
        Some(Holder::OurOtherDisk) => "another disk of this daemon".to_owned(),
        None => "another program".to_owned(),
    };
    LockError::InUse {
        path: path.to_owned(),
        holder,
        how,
        perm,
        exiting: !opened_by_another_live_process(file),
    }
}

/// Whether a running process has `file`'s inode open through another descriptor than
/// `file` (this process included: another of its disks), as far as /proc shows (all
/// processes to root). Kernels show no holder for OFD locks (pid -1), so this is how a lock
/// whose holder has died is told from a live user's.
fn opened_by_another_live_process(file: &File) -> bool {
    let Ok(meta) = file.metadata() else {
        return true;
    };
    let me = std::process::id().to_string();
    let mine = format!("/proc/{me}/fd/{}", file.as_raw_fd());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|p| {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        // A zombie's files are those its threads stuck in I/O still hold: it is ending.
        let state = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        let running = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']));
        running
            && std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    fd.path().to_str() != Some(mine.as_str())
                        && std::fs::metadata(fd.path())
                            .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
                })
            })
    })
}

/// Who holds a lock, as /proc/locks tells.
enum Holder {
    Process { pid: u32, comm: String },
    OurOtherDisk,
}

/// Who holds a lock on byte `offset` of `file`, from /proc/locks (OFD locks show the
/// process that took them).
fn holder(file: &File, offset: i64) -> Option<Holder> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let me = std::process::id().to_string();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let mut ours = 0;
    for line in locks.lines() {
        // "1: OFDLCK ADVISORY  READ 1234 fd:01:5678 100 100"
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(file_id), Some(start), Some(end)) =
            (f.get(4), f.get(5), f.get(6), f.get(7))
        else {
            continue;
        };
        let covers = start.parse::<i64>().is_ok_and(|s| s <= offset)
            && (*end == "EOF" || end.parse::<i64>().is_ok_and(|e| e >= offset));
        if *file_id != id || !covers {
            continue;
        }
        if *pid == me {
            ours += 1;
            continue;
        }
        // Kernels that do not record who took an OFD lock show -1.
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        return Some(Holder::Process {
            pid,
            comm: comm.trim().to_owned(),
        });
    }
    // Our own lock on the byte, if we hold one, is one of them.
    (ours >= 2).then_some(Holder::OurOtherDisk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    #[test]
    fn one_writer_or_many_readers() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let writer = open(&img, true);
        lock(&writer, &img, false).unwrap();
        let e = lock(&open(&img, true), &img, false).unwrap_err();
        // The writer is this process's other descriptor: a live user, not one that ended.
        assert!(
            matches!(
                e,
                LockError::InUse {
                    perm: "write",
                    exiting: false,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            lock(&open(&img, false), &img, true).is_err(),
            "a reader beside a writer"
        );
        drop(writer);
        let (r1, r2) = (open(&img, false), open(&img, false));
        lock(&r1, &img, true).unwrap();
        lock(&r2, &img, true).unwrap();
        assert!(
            lock(&open(&img, true), &img, false).is_err(),
            "a writer beside readers"
        );
        unlock(&r1);
        unlock(&r2);
        lock(&open(&img, true), &img, false).unwrap();
    }
}
