//! Serving one disk on its socket: accept a frontend, serve it until it goes, accept the next
//! (so QEMU's `reconnect=` works), and stop cleanly on request.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twinpath_core::SocketAccess;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::BlkDevice;
use crate::disk::Disk;
use crate::lock;

/// How long the queue workers of a gone connection may take to answer before it is taken
/// down anyway (a worker waiting for its I/O goes on waiting while it is joined).
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    stopping: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// A disk being served on its socket by a dedicated thread.
pub struct DiskServer {
    disk: Arc<Disk>,
    socket: PathBuf,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl DiskServer {
    /// Binds the socket (with `access`'s mode and group) and starts accepting frontends.
    pub fn start(disk: Arc<Disk>, socket: &Path, access: SocketAccess) -> io::Result<DiskServer> {
        let listener = bind(socket, access)?;
        let state = Arc::new(State {
            stopping: AtomicBool::new(false),
            connection: Mutex::new(None),
        });
        let thread = std::thread::Builder::new()
            .name(format!("disk-{}", disk.name()))
            .spawn({
                let (disk, state) = (disk.clone(), state.clone());
                move || serve(disk, listener, state)
            })?;
        Ok(DiskServer {
            disk,
            socket: socket.to_owned(),
            state,
            thread: Some(thread),
        })
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops taking new requests and waits until the accepted ones complete. Returns how many
    /// were still running when `timeout` passed (0 on a clean drain).
    pub fn drain(&self, timeout: Duration) -> usize {
        self.disk.start_draining();
        let deadline = Instant::now() + timeout;
        twinpath_core::wait_until(timeout, || self.disk.inflight() == 0);
        // And the work of requests whose connection ended before they did.
        let left = deadline.saturating_duration_since(Instant::now());
        self.disk.inflight().max(self.disk.wait_for_work(left))
    }

    /// Disconnects the frontend, stops the thread and removes the socket.
    pub fn stop(mut self) {
        self.state.stopping.store(true, Ordering::Release);
        if let Some(conn) = lock(&self.state.connection).take() {
            conn.shutdown();
        }
        // Wake a thread blocked in accept(); it sees `stopping` and leaves.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Binds a fresh socket, replacing a stale one but never another kind of file. The socket
/// appears at `path` with its final mode and group: it is bound, chmod'ed and chown'ed in a
/// private (0700) directory next to it and renamed into place, so no one can connect in
/// between.
fn bind(path: &Path, access: SocketAccess) -> io::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let staging = tempfile::Builder::new()
        .prefix(".twinpath-socket-")
        .tempdir_in(dir)?;
    let staged = staging.path().join("socket");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(access.mode))?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("giving {} to group {gid}: {e}", path.display()),
            )
        })?;
    }
    std::fs::rename(&staged, path)?;
    Ok(Listener::from(listener))
}

fn serve(disk: Arc<Disk>, mut listener: Listener, state: Arc<State>) {
    let name = disk.name().to_owned();
    while !state.stopping.load(Ordering::Acquire) {
        if let Err(e) = serve_one(&disk, &mut listener, &state) {
            if state.stopping.load(Ordering::Acquire) {
                break;
            }
            tracing::warn!(disk = %name, "frontend connection failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    tracing::debug!(disk = %name, "stopped serving");
}

/// Serves one frontend connection from accept to hang-up.
fn serve_one(disk: &Arc<Disk>, listener: &mut Listener, state: &State) -> io::Result<()> {
    let device = BlkDevice::new(disk.clone())?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("vu-{}", disk.name()), device.clone(), mem)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for (index, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        handler.register_listener(
            device.completion_fd(index),
            EventSet::IN,
            device.completion_event_id(),
        )?;
    }
    daemon
        .start(listener)
        .map_err(|e| io::Error::other(e.to_string()))?;
    *lock(&state.connection) = daemon.shutdown_handle();
    device.set_hang_up(daemon.shutdown_handle());
    if state.stopping.load(Ordering::Acquire) {
        daemon.request_shutdown();
    } else {
        tracing::info!(disk = %disk.name(), "frontend connected");
    }
    let result = match daemon.wait() {
        // A frontend closing its socket is the normal end of a connection.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        r => r,
    };
    lock(&state.connection).take();
    // Before the workers are told to exit (when the daemon goes): each empties its queue's
    // engine itself.
    let unfinished = device.finish_queues(FINISH_TIMEOUT);
    if unfinished > 0 {
        tracing::warn!(disk = %disk.name(), unfinished, "queue workers did not finish their I/O in {FINISH_TIMEOUT:?}");
    }
    drop(daemon);
    device.release();
    let abandoned = device.inflight();
    device.abandon();
    // The last reference: the queues' I/O paths go with it, and with them what their
    // engines still hold of the gone requests.
    drop(device);
    // A request dropped here may still have a write on its way to the image (a bounce, a
    // submitted operation): the next frontend is not accepted before it lands, or it could
    // overwrite what that frontend writes and flushes.
    while disk.wait_for_work(Duration::from_secs(10)) > 0 && !state.stopping.load(Ordering::Acquire)
    {
        tracing::warn!(
            disk = %disk.name(),
            working = disk.working(),
            "waiting for the backend work of a gone frontend before taking the next one"
        );
    }
    match result {
        Ok(()) => tracing::info!(disk = %disk.name(), abandoned, "frontend disconnected"),
        Err(e) => tracing::warn!(disk = %disk.name(), abandoned, "frontend connection ended: {e}"),
    }
    Ok(())
}
