//! twinpath-iscsi: a LUN on an iSCSI target, read and written from userspace with libiscsi,
//! for hosts without a kernel initiator.
//!
//! A libiscsi context is not thread-safe, so each [`Session`] owns one on a service thread:
//! requests from any thread go to it over a channel (an eventfd wakes it), it turns them into
//! SCSI tasks (READ(16)/WRITE(16) straight from and into the caller's iovecs, SYNCHRONIZE
//! CACHE(16)), polls the connection and completes each request's future from the task's
//! callback. Many tasks are outstanding at once; libiscsi reconnects and resends them after
//! the target comes back. A request not answered within [`TASK_TIMEOUT`] fails (libiscsi
//! keeps tasks forever while it reconnects); its buffers stay alive until libiscsi lets go
//! of the task.

mod ffi;
mod url;

use std::collections::VecDeque;
use std::ffi::{c_int, c_void, CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use twinpath_core::{Error, ErrorKind, GuestBuffers, Result};

pub use url::{IscsiUrl, DEFAULT_PORT};

/// How long a task may wait for the target (also across a reconnect) before it fails.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the service thread is asked to do.
enum Cmd {
    Io {
        write: bool,
        lba: u64,
        bufs: GuestBuffers,
        done: oneshot::Sender<Result<()>>,
    },
    Flush {
        done: oneshot::Sender<Result<()>>,
    },
    /// PERSISTENT RESERVE OUT `action` of type Exclusive Access - Registrants Only.
    PrOut {
        action: c_int,
        key: u64,
        action_key: u64,
        done: oneshot::Sender<Result<()>>,
    },
    /// PERSISTENT RESERVE IN, READ KEYS, into `keys`.
    ReadKeys {
        keys: Arc<Mutex<Vec<u64>>>,
        done: oneshot::Sender<Result<()>>,
    },
}

/// A logged-in session on one LUN.
pub struct Session {
    url: IscsiUrl,
    commands: mpsc::Sender<Cmd>,
    wake: std::sync::Arc<OwnedFd>,
    service: Option<std::thread::JoinHandle<()>>,
    block_size: u32,
    capacity: u64,
}

/// The context, owned by one thread at a time.
struct Context(*mut ffi::IscsiContext);

// SAFETY: the context is only ever used by the thread that owns this value; it moves from the
// connecting thread to the service thread once.
unsafe impl Send for Context {}

impl Context {
    fn error(&self) -> String {
        error_of(self.0)
    }
}

/// libiscsi's text for the last error on `ctx`.
fn error_of(ctx: *mut ffi::IscsiContext) -> String {
    // SAFETY: the context is live; libiscsi returns a NUL-terminated string it owns.
    let msg = unsafe { (lib().iscsi_get_error)(ctx) };
    if msg.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null, NUL-terminated, valid until the next libiscsi call on the context.
    unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned()
}

impl Drop for Context {
    fn drop(&mut self) {
        // Cancels outstanding tasks (their callbacks run with SCSI_STATUS_CANCELLED) and
        // closes the connection.
        // SAFETY: the context is live and dropped once.
        unsafe { (lib().iscsi_destroy_context)(self.0) };
    }
}

/// libiscsi, which [`Session::connect`] loaded before any context or task existed.
fn lib() -> &'static ffi::Api {
    ffi::api().expect("libiscsi is loaded before any context exists")
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::new(ErrorKind::InvalidInput, format!("{what} holds a NUL")))
}

impl Session {
    /// Logs in to the LUN at `url` (CHAP with `password` when the URL names a user) as
    /// `initiator` (an IQN) and reads its capacity. Blocks until the login is done.
    pub fn connect(url: &IscsiUrl, password: Option<&str>, initiator: &str) -> Result<Session> {
        let what = |e: String| Error::new(ErrorKind::Io, format!("{url}: {e}"));
        ffi::api().map_err(|e| Error::new(ErrorKind::Unsupported, format!("{url}: {e}")))?;
        let initiator = c_string("initiator name", initiator)?;
        // SAFETY: a NUL-terminated name; a null return is checked.
        let raw = unsafe { (lib().iscsi_create_context)(initiator.as_ptr()) };
        if raw.is_null() {
            return Err(what("cannot create an iSCSI context".into()));
        }
        let ctx = Context(raw);
        let target = c_string("target", &url.target)?;
        let portal = c_string("portal", &url.portal)?;
        // SAFETY (these calls): the context is live and the strings outlive the calls.
        unsafe {
            (lib().iscsi_set_targetname)(ctx.0, target.as_ptr());
            (lib().iscsi_set_session_type)(ctx.0, ffi::ISCSI_SESSION_NORMAL);
            (lib().iscsi_set_header_digest)(ctx.0, ffi::ISCSI_HEADER_DIGEST_NONE_CRC32C);
            (lib().iscsi_set_timeout)(ctx.0, TASK_TIMEOUT.as_secs() as c_int);
            // A restarted target reports a bus reset (UNIT ATTENTION) to the first command
            // after the reconnect; let libiscsi take it, not a guest's I/O.
            (lib().iscsi_set_no_ua_on_reconnect)(ctx.0, 1);
        }
        match (&url.user, password) {
            (Some(user), Some(password)) => {
                let user = c_string("user", user)?;
                let password = c_string("password", password)?;
                // SAFETY: as above.
                if unsafe {
                    (lib().iscsi_set_initiator_username_pwd)(
                        ctx.0,
                        user.as_ptr(),
                        password.as_ptr(),
                    )
                } != 0
                {
                    return Err(what(format!("CHAP: {}", ctx.error())));
                }
            }
            (Some(_), None) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{url}: the URL names a CHAP user but no password was given"),
                ))
            }
            (None, _) => {}
        }
        // SAFETY: as above.
        if unsafe { (lib().iscsi_full_connect_sync)(ctx.0, portal.as_ptr(), c_int::from(url.lun)) }
            != 0
        {
            return Err(what(format!("login failed: {}", ctx.error())));
        }
        let (capacity, block_size) = read_capacity(&ctx, url.lun).map_err(what)?;
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let wake = std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (commands, rx) = mpsc::channel();
        let service = {
            let (wake, lun, name) = (wake.clone(), url.lun, url.to_string());
            std::thread::Builder::new()
                .name("iscsi".into())
                .spawn(move || serve(ctx, lun, block_size, rx, &wake, &name))
                .map_err(|e| Error::io("spawn the iSCSI service thread", e))?
        };
        tracing::info!(lun = %url, capacity, block_size, "iSCSI session up");
        Ok(Session {
            url: url.clone(),
            commands,
            wake,
            service: Some(service),
            block_size,
            capacity,
        })
    }

    /// Size of the LUN in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The LUN's logical block size; offsets and lengths must be multiples of it.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn url(&self) -> &IscsiUrl {
        &self.url
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.commands
            .send(cmd)
            .map_err(|_| Error::new(ErrorKind::Io, format!("{}: session closed", self.url)))?;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        Ok(())
    }

    async fn io(&self, write: bool, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let bs = u64::from(self.block_size);
        let len = bufs.len() as u64;
        if !offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || len == 0
            || offset + len > self.capacity
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at {offset} are not whole {bs}-byte blocks inside the LUN",
                    self.url
                ),
            ));
        }
        let (done, result) = oneshot::channel();
        self.send(Cmd::Io {
            write,
            lba: offset / bs,
            // The service thread keeps the memory alive until the target is done with it,
            // even if this future is dropped first.
            bufs: bufs.slice(0, bufs.len()),
            done,
        })?;
        let what = if write { "write" } else { "read" };
        result
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "session closed")))
            .map_err(|e| e.within(format!("{} {what} of {len} bytes at {offset}", self.url)))
    }

    pub async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.io(false, offset, bufs).await
    }

    pub async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.io(true, offset, bufs).await
    }

    /// SYNCHRONIZE CACHE(16) of the whole LUN.
    pub async fn flush(&self) -> Result<()> {
        let (done, result) = oneshot::channel();
        self.send(Cmd::Flush { done })?;
        self.answer(result, "flush").await
    }

    async fn answer(&self, result: oneshot::Receiver<Result<()>>, what: &str) -> Result<()> {
        result
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "session closed")))
            .map_err(|e| e.within(format!("{} {what}", self.url)))
    }

    async fn pr_out(&self, what: &str, action: c_int, key: u64, action_key: u64) -> Result<()> {
        let (done, result) = oneshot::channel();
        self.send(Cmd::PrOut {
            action,
            key,
            action_key,
            done,
        })?;
        self.answer(result, what).await
    }

    /// Registers `key` for this session's I_T nexus (SCSI-3 persistent reservations),
    /// replacing any key it had: while an Exclusive Access - Registrants Only reservation is
    /// held, only registered nexuses may read or write.
    pub async fn pr_register(&self, key: u64) -> Result<()> {
        let action = ffi::PR_OUT_REGISTER_AND_IGNORE_EXISTING_KEY;
        self.pr_out("PR REGISTER", action, 0, key).await
    }

    /// Takes the Exclusive Access - Registrants Only reservation as registrant `key`.
    pub async fn pr_reserve(&self, key: u64) -> Result<()> {
        self.pr_out("PR RESERVE", ffi::PR_OUT_RESERVE, key, 0).await
    }

    /// Removes registrant `victim`, as registrant `key`, and holds the reservation: the
    /// victim's reads and writes fail with RESERVATION CONFLICT from now on (with `victim`
    /// the reservation holder's key, this takes the reservation over). With `abort`, its commands still in the target are aborted too
    /// (PREEMPT AND ABORT), so none it sent before completes after this.
    pub async fn pr_preempt(&self, key: u64, victim: u64, abort: bool) -> Result<()> {
        if abort {
            let action = ffi::PR_OUT_PREEMPT_AND_ABORT;
            self.pr_out("PR PREEMPT AND ABORT", action, key, victim)
                .await
        } else {
            self.pr_out("PR PREEMPT", ffi::PR_OUT_PREEMPT, key, victim)
                .await
        }
    }

    /// The keys registered on the LUN.
    pub async fn pr_read_keys(&self) -> Result<Vec<u64>> {
        let (done, result) = oneshot::channel();
        let keys = Arc::new(Mutex::new(Vec::new()));
        self.send(Cmd::ReadKeys {
            keys: keys.clone(),
            done,
        })?;
        self.answer(result, "PR READ KEYS").await?;
        let keys = std::mem::take(&mut *keys.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(keys)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing the channel stops the service thread; it cancels what is still in flight.
        let (dead, _) = mpsc::channel();
        self.commands = dead;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.service.take() {
            let _ = t.join();
        }
    }
}

fn read_capacity(ctx: &Context, lun: u16) -> std::result::Result<(u64, u32), String> {
    // SAFETY: the context is live and logged in; the task is checked and freed here.
    unsafe {
        let task = (lib().iscsi_readcapacity16_sync)(ctx.0, c_int::from(lun));
        if task.is_null() {
            return Err(format!("READ CAPACITY(16): {}", ctx.error()));
        }
        let status = (lib().scsi_task_get_status)(task, std::ptr::null_mut());
        let data = (lib().scsi_datain_unmarshall)(task) as *const ffi::ReadCapacity16;
        let result = if status != ffi::SCSI_STATUS_GOOD || data.is_null() {
            Err(format!("READ CAPACITY(16): {}", ctx.error()))
        } else {
            let rc = &*data;
            let bs = rc.block_length;
            if bs == 0 || !bs.is_multiple_of(512) {
                Err(format!("READ CAPACITY(16): block size {bs}"))
            } else {
                Ok(((rc.returned_lba + 1) * u64::from(bs), bs))
            }
        };
        (lib().scsi_free_scsi_task)(task);
        result
    }
}

/// Where a request's result goes: taken by whoever finishes it first, the task's callback
/// or the service thread's deadline.
type Done = Arc<Slot>;
type Slot = Mutex<Option<oneshot::Sender<Result<()>>>>;

fn finish(done: &Done, result: Result<()>) {
    let sender = done.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(s) = sender {
        let _ = s.send(result);
    }
}

/// One task's state, owned by libiscsi between submission and its callback.
struct Pending {
    // The iovecs libiscsi reads from or writes into; they point into `_bufs`.
    iov: Vec<ffi::ScsiIovec>,
    _bufs: Option<GuestBuffers>,
    /// Where a READ KEYS puts the keys.
    keys: Option<Arc<Mutex<Vec<u64>>>>,
    done: Done,
}

impl Pending {
    fn new(bufs: Option<GuestBuffers>, done: oneshot::Sender<Result<()>>) -> *mut Pending {
        let iov = bufs
            .iter()
            .flat_map(|b| b.iovecs())
            .map(|v| ffi::ScsiIovec {
                iov_base: v.iov_base,
                iov_len: v.iov_len,
            })
            .collect();
        Box::into_raw(Box::new(Pending {
            iov,
            _bufs: bufs,
            keys: None,
            done: Arc::new(Mutex::new(Some(done))),
        }))
    }
}

/// The keys of a READ KEYS task that succeeded.
///
/// # Safety
/// `task` is a live PERSISTENT RESERVE IN (READ KEYS) task whose data came in.
unsafe fn read_keys(task: *mut ffi::ScsiTask) -> Option<Vec<u64>> {
    // SAFETY: the caller's promise; libiscsi returns its unmarshalled struct or null.
    let data = unsafe { (lib().scsi_datain_unmarshall)(task) } as *const ffi::PrReadKeys;
    if data.is_null() {
        return None;
    }
    // SAFETY: non-null, laid out as the header declares, with `num_keys` keys after it.
    unsafe {
        let n = usize::try_from((*data).num_keys).ok()?;
        let keys = std::ptr::addr_of!((*data).keys).cast::<u64>();
        Some(std::slice::from_raw_parts(keys, n).to_vec())
    }
}

extern "C" fn on_done(
    iscsi: *mut ffi::IscsiContext,
    status: c_int,
    task: *mut c_void,
    private: *mut c_void,
) {
    // SAFETY: `private` is the Box leaked when the task was created, handed back exactly once.
    let pending = unsafe { Box::from_raw(private.cast::<Pending>()) };
    let result = match status {
        ffi::SCSI_STATUS_GOOD => match &pending.keys {
            None => Ok(()),
            // SAFETY: a task with `keys` is a READ KEYS task, and it succeeded.
            Some(out) => match unsafe { read_keys(task.cast()) } {
                Some(keys) => {
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = keys;
                    Ok(())
                }
                None => Err(Error::new(ErrorKind::Io, "READ KEYS: no data")),
            },
        },
        ffi::SCSI_STATUS_RESERVATION_CONFLICT => Err(Error::new(
            ErrorKind::Fenced,
            "RESERVATION CONFLICT: this host is not registered on the LUN (fenced)",
        )),
        ffi::SCSI_STATUS_CANCELLED => Err(Error::new(ErrorKind::Io, "cancelled")),
        ffi::SCSI_STATUS_TIMEOUT => Err(Error::new(
            ErrorKind::Timeout,
            format!("no answer from the target in {TASK_TIMEOUT:?}"),
        )),
        _ => Err(Error::new(
            ErrorKind::Io,
            format!("SCSI status {status:#x}: {}", error_of(iscsi)),
        )),
    };
    if !task.is_null() {
        // SAFETY: the task is ours to free once its callback runs.
        unsafe { (lib().scsi_free_scsi_task)(task.cast()) };
    }
    finish(&pending.done, result);
}

/// The service thread: runs commands and the connection until the session is dropped.
fn serve(
    ctx: Context,
    lun: u16,
    block_size: u32,
    commands: mpsc::Receiver<Cmd>,
    wake: &OwnedFd,
    name: &str,
) {
    let lun = c_int::from(lun);
    // Requests in the order they were issued, so the oldest deadline is in front.
    let mut waiting: VecDeque<(Instant, Weak<Slot>)> = VecDeque::new();
    loop {
        // Answered requests leave the front (answers come about in order), overdue ones fail.
        while waiting
            .front()
            .is_some_and(|(at, done)| done.strong_count() == 0 || *at <= Instant::now())
        {
            let (_, done) = waiting.pop_front().expect("front exists");
            if let Some(done) = done.upgrade() {
                finish(
                    &done,
                    Err(Error::new(
                        ErrorKind::Timeout,
                        format!("no answer from the target in {TASK_TIMEOUT:?}"),
                    )),
                );
            }
        }
        // SAFETY: the context is live; these only read its state.
        let (fd, events) = unsafe {
            (
                (lib().iscsi_get_fd)(ctx.0),
                (lib().iscsi_which_events)(ctx.0),
            )
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events: events as i16,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // A timeout, so libiscsi gets to scan for timed-out tasks and reconnect while idle.
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 250) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!(lun = name, "poll: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes from our eventfd into `count`.
            unsafe { libc::read(wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        let done = issue(&ctx, lun, block_size, cmd);
                        waiting.push_back((Instant::now() + TASK_TIMEOUT, done));
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
        // SAFETY: the context is live; callbacks run inside and only touch their Pending.
        if unsafe { (lib().iscsi_service)(ctx.0, c_int::from(fds[0].revents)) } < 0 {
            tracing::warn!(lun = name, "iSCSI connection: {}", ctx.error());
        }
    }
}

/// Starts the task for `cmd`; returns its result slot for the deadline.
fn issue(ctx: &Context, lun: c_int, block_size: u32, cmd: Cmd) -> Weak<Slot> {
    let (pending, task) = match cmd {
        Cmd::Io {
            write,
            lba,
            bufs,
            done,
        } => {
            let len = bufs.len() as u32;
            let pending = Pending::new(Some(bufs), done);
            // SAFETY: `pending` stays alive (leaked) until the callback takes it back; its
            // iovecs point into guest memory kept alive by its `_bufs`.
            let task = unsafe {
                let iov = (*pending).iov.as_mut_ptr();
                let niov = (*pending).iov.len() as c_int;
                if write {
                    (lib().iscsi_write16_iov_task)(
                        ctx.0,
                        lun,
                        lba,
                        std::ptr::null_mut(),
                        len,
                        block_size as c_int,
                        0,
                        0,
                        0,
                        0,
                        0,
                        on_done,
                        pending.cast(),
                        iov,
                        niov,
                    )
                } else {
                    (lib().iscsi_read16_iov_task)(
                        ctx.0,
                        lun,
                        lba,
                        len,
                        block_size as c_int,
                        0,
                        0,
                        0,
                        0,
                        0,
                        on_done,
                        pending.cast(),
                        iov,
                        niov,
                    )
                }
            };
            (pending, task)
        }
        Cmd::Flush { done } => {
            let pending = Pending::new(None, done);
            // SAFETY: as above; no data buffers.
            let task = unsafe {
                (lib().iscsi_synchronizecache16_task)(
                    ctx.0,
                    lun,
                    0,
                    0,
                    0,
                    0,
                    on_done,
                    pending.cast(),
                )
            };
            (pending, task)
        }
        Cmd::PrOut {
            action,
            key,
            action_key,
            done,
        } => {
            let pending = Pending::new(None, done);
            let mut params = ffi::PrOutBasic {
                reservation_key: key,
                service_action_reservation_key: action_key,
                spec_i_pt: 0,
                all_tg_pt: 0,
                aptpl: 0,
            };
            // SAFETY: as above; libiscsi marshals `params` into the task before returning.
            let task = unsafe {
                (lib().iscsi_persistent_reserve_out_task)(
                    ctx.0,
                    lun,
                    action,
                    ffi::PR_SCOPE_LU,
                    ffi::PR_TYPE_EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                    std::ptr::addr_of_mut!(params).cast(),
                    on_done,
                    pending.cast(),
                )
            };
            (pending, task)
        }
        Cmd::ReadKeys { keys, done } => {
            let pending = Pending::new(None, done);
            // SAFETY: `pending` was just made and is not shared yet.
            unsafe { (*pending).keys = Some(keys) };
            // SAFETY: as above; 8 KiB holds the header and 1022 keys.
            let task = unsafe {
                (lib().iscsi_persistent_reserve_in_task)(
                    ctx.0,
                    lun,
                    ffi::PR_IN_READ_KEYS,
                    8192,
                    on_done,
                    pending.cast(),
                )
            };
            (pending, task)
        }
    };
    if task.is_null() {
        // The callback will not run: take the state back and fail the request here.
        // SAFETY: libiscsi did not keep `pending`.
        let pending = unsafe { Box::from_raw(pending) };
        finish(
            &pending.done,
            Err(Error::new(
                ErrorKind::Io,
                format!("cannot queue the task: {}", ctx.error()),
            )),
        );
        return Weak::new();
    }
    // SAFETY: libiscsi holds `pending` until the callback, which runs only inside
    // iscsi_service on this thread, so it is still alive here.
    Arc::downgrade(unsafe { &(*pending).done })
}

/// The LUN as a block backend: how the san plugin's direct path reads and writes it.
#[async_trait::async_trait]
impl twinpath_core::BlockBackend for Session {
    fn info(&self) -> twinpath_core::DiskInfo {
        twinpath_core::DiskInfo {
            capacity: self.capacity,
            block_size: self.block_size,
            read_only: false,
            volatile_cache: true,
            discard: false,
            write_zeroes: false,
            serial: None,
        }
    }

    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        Session::read(self, offset, &bufs).await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        Session::write(self, offset, &bufs).await
    }

    async fn flush(&self) -> Result<()> {
        Session::flush(self).await
    }
}
