//! Watching leased files for changes made by anyone but the map server itself: writes
//! (through smbd or locally), truncation, renames, deletion. fanotify
//! with file identifiers reports all of these with the writer's PID, so the server's own
//! filling of holes (dedupe, unshare) is told apart without guessing. No crate wraps fanotify's FID mode, hence
//! the few raw calls here.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;
use twinpath_core::lock;

/// Writes and truncation (a size change is reported as a modification), renames, deletion.
/// Attribute changes are left out: they do not move data, and smbd touches timestamps
/// after its own writes, which would recall leases for nothing.
const EVENTS: u64 = libc::FAN_MODIFY | libc::FAN_MOVE_SELF | libc::FAN_DELETE_SELF;
/// MAX_HANDLE_SZ in <linux/exportfs.h>.
const MAX_HANDLE: usize = 128;

/// A file's identity as fanotify reports it: handle type and handle bytes.
type Handle = (i32, Vec<u8>);

pub struct Watcher {
    fd: AsyncFd<OwnedFd>,
    watched: Mutex<HashMap<Handle, PathBuf>>,
    own_pid: i32,
}

fn handle_of(path: &Path) -> io::Result<Handle> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // struct file_handle: handle_bytes (u32), handle_type (i32), then the bytes.
    let mut buf = vec![0u8; 8 + MAX_HANDLE];
    buf[..4].copy_from_slice(&(MAX_HANDLE as u32).to_ne_bytes());
    let mut mount_id = 0;
    // SAFETY: `buf` is a file_handle with room for MAX_HANDLE bytes, as handle_bytes says.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            0,
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

    fn mark(&self, path: &Path, op: libc::c_uint) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: plain syscall on our fanotify descriptor and a NUL-terminated path.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.get_ref().as_raw_fd(),
                op,
                EVENTS,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Starts reporting changes to `path` (idempotent).
    pub fn watch(&self, path: &Path) -> io::Result<()> {
        let handle = handle_of(path)?;
        if let std::collections::hash_map::Entry::Vacant(slot) = lock(&self.watched).entry(handle) {
            self.mark(path, libc::FAN_MARK_ADD)?;
            slot.insert(path.to_path_buf());
        }
        Ok(())
    }

    /// Stops reporting changes to `path`.
    pub fn unwatch(&self, path: &Path) {
        let mut w = lock(&self.watched);
        w.retain(|_, p| p != path);
        let _ = self.mark(path, libc::FAN_MARK_REMOVE);
    }

    /// The next changes by others: which watched file, and what happened to it.
    pub async fn changes(&self) -> io::Result<Vec<(PathBuf, &'static str)>> {
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

    fn parse(&self, mut buf: &[u8]) -> Vec<(PathBuf, &'static str)> {
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
            if let Some(path) = watched.get(&(kind, bytes.to_vec())) {
                out.push((path.clone(), what(meta.mask)));
            }
        }
        out
    }
}
