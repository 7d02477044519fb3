//! Watching leased files for changes made by anyone but the map server itself: writes
//! (through smbd or locally), truncation, renames, deletion. fanotify
//! with file identifiers reports all of these with the writer's PID, so the server's own
//! filling of holes (dedupe, unshare) is told apart without guessing. No crate wraps fanotify's FID mode, hence
//! the few raw calls here.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use twinpath_core::lock;

use crate::export::Inode;

/// Writes and truncation (a size change is reported as a modification), renames, deletion.
/// Attribute changes are left out: they do not move data, and smbd touches timestamps
/// after its own writes, which would recall leases for nothing.
///
/// A leased file is held open (by its lease), so unlinking it frees nothing and reports no
/// DELETE_SELF: the unlink shows as an attribute change (the link count), told apart from
/// timestamp changes by the link count being zero.
const EVENTS: u64 =
    libc::FAN_MODIFY | libc::FAN_MOVE_SELF | libc::FAN_DELETE_SELF | libc::FAN_ATTRIB;
/// MAX_HANDLE_SZ in <linux/exportfs.h>.
const MAX_HANDLE: usize = 128;

/// A file's identity as fanotify reports it: handle type and handle bytes.
type Handle = (i32, Vec<u8>);

#[derive(Default)]
struct Watched {
    by_handle: HashMap<Handle, Inode>,
    /// The descriptor each mark was made through (a mark is removed through it too).
    files: HashMap<Inode, Arc<File>>,
}

pub struct Watcher {
    fd: AsyncFd<OwnedFd>,
    watched: Mutex<Watched>,
    own_pid: i32,
}

fn handle_of(file: &File) -> io::Result<Handle> {
    // struct file_handle: handle_bytes (u32), handle_type (i32), then the bytes.
    let mut buf = vec![0u8; 8 + MAX_HANDLE];
    buf[..4].copy_from_slice(&(MAX_HANDLE as u32).to_ne_bytes());
    let mut mount_id = 0;
    // SAFETY: `buf` is a file_handle with room for MAX_HANDLE bytes, as handle_bytes says;
    // the empty path with AT_EMPTY_PATH names the open file itself.
    let r = unsafe {
        libc::name_to_handle_at(
            file.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
    let kind = i32::from_ne_bytes(buf[4..8].try_into().unwrap());
    Ok((kind, buf[8..8 + len].to_vec()))
}

fn what(mask: u64) -> &'static str {
    if mask & libc::FAN_DELETE_SELF != 0 {
        "deleted on the server"
    } else if mask & libc::FAN_MOVE_SELF != 0 {
        "renamed on the server"
    } else {
        "written by another client"
    }
}

impl Watcher {
    /// Needs CAP_SYS_ADMIN (the map server runs as root to read the volume's device).
    pub fn new() -> io::Result<Watcher> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_REPORT_FID,
                libc::O_RDONLY as u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is an owned, open descriptor that lives inside the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Watcher {
            fd,
            watched: Mutex::default(),
            own_pid: std::process::id() as i32,
        })
    }

    fn mark(&self, file: &File, op: libc::c_uint) -> io::Result<()> {
        // SAFETY: plain syscall on our fanotify descriptor; a null path marks the open file.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.get_ref().as_raw_fd(),
                op,
                EVENTS,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Starts reporting changes to `file`, which is `inode` (idempotent).
    pub fn watch(&self, file: &Arc<File>, inode: Inode) -> io::Result<()> {
        let mut w = lock(&self.watched);
        if w.files.contains_key(&inode) {
            return Ok(());
        }
        let handle = handle_of(file)?;
        self.mark(file, libc::FAN_MARK_ADD)?;
        w.by_handle.insert(handle, inode);
        w.files.insert(inode, file.clone());
        Ok(())
    }

    /// Stops reporting changes to `inode`.
    pub fn unwatch(&self, inode: Inode) {
        let mut w = lock(&self.watched);
        if let Some(file) = w.files.remove(&inode) {
            w.by_handle.retain(|_, i| *i != inode);
            let _ = self.mark(&file, libc::FAN_MARK_REMOVE);
        }
    }

    /// The next changes by others: which watched file, and what happened to it.
    pub async fn changes(&self) -> io::Result<Vec<(Inode, &'static str)>> {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let mut ready = self.fd.readable().await?;
            let n = match ready.try_io(|fd| {
                // SAFETY: reading into a buffer we own, at most its length.
                let r = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            let found = self.parse(&buf[..n]);
            if !found.is_empty() {
                return Ok(found);
            }
        }
    }

    fn parse(&self, mut buf: &[u8]) -> Vec<(Inode, &'static str)> {
        const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
        let watched = lock(&self.watched);
        let mut out = Vec::new();
        while buf.len() >= META {
            // SAFETY: at least META bytes; read_unaligned copes with any alignment.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            let event_len = meta.event_len as usize;
            if event_len < META || event_len > buf.len() {
                break;
            }
            let info = &buf[meta.metadata_len as usize..event_len];
            buf = &buf[event_len..];
            if meta.pid == self.own_pid {
                continue;
            }
            // fanotify_event_info_fid: header (4), fsid (8), then a struct file_handle.
            if info.len() < 20 || info[0] != libc::FAN_EVENT_INFO_TYPE_FID {
                continue;
            }
            let len = u32::from_ne_bytes(info[12..16].try_into().unwrap()) as usize;
            let kind = i32::from_ne_bytes(info[16..20].try_into().unwrap());
            let Some(bytes) = info.get(20..20 + len) else {
                continue;
            };
            let Some(inode) = watched.by_handle.get(&(kind, bytes.to_vec())) else {
                continue;
            };
            let changed = libc::FAN_MODIFY | libc::FAN_MOVE_SELF | libc::FAN_DELETE_SELF;
            if meta.mask & changed != 0 {
                out.push((*inode, what(meta.mask)));
            } else if watched
                .files
                .get(inode)
                .and_then(|f| f.metadata().ok())
                .is_some_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
            {
                out.push((*inode, "deleted on the server"));
            }
        }
        out
    }
}
