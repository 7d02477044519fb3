//! twinpath-iscsi: a LUN on an iSCSI target, read and written from userspace with libiscsi,
//! for hosts without a kernel initiator.
//!
//! A libiscsi context is not thread-safe, so each [`Session`] owns one on a service thread:
//! requests from any thread go to it over a channel (an eventfd wakes it), it turns them into
//! SCSI tasks (READ(16)/WRITE(16) straight from and into the caller's iovecs, SYNCHRONIZE
//! CACHE(16)), polls the connection and completes each request's future from the task's
//! callback. Many tasks are outstanding at once. Reads and writes may carry a [`Permit`] (a
//! shared LUN's grant): once it is withdrawn, nothing more of theirs leaves the process
//! (`serve` and the [`gate`] say how). A connection that fails, or on which a task waits
//! longer than [`TASK_TIMEOUT`], is closed with every task on it (they fail, and nothing of
//! theirs is sent later), and the service thread logs in again, once a second until it can.

mod ffi;
mod gate;
mod url;

use std::ffi::{c_int, c_void, CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use twinpath_core::{Error, ErrorKind, GuestBuffers, Permit, Result};

use gate::Gate;
pub use url::{BadUrl, IscsiUrl, DEFAULT_PORT};

/// How long a task may wait for the target (also across a reconnect) before it fails.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the service thread is asked to do.
enum Cmd {
    Io {
        write: bool,
        lba: u64,
        bufs: GuestBuffers,
        /// Asked before the command is queued and, while the task lives, before every turn
        /// of the connection (see [`serve`]).
        permit: Option<Arc<dyn Permit>>,
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

/// What a login needs, kept by the service thread to log in again after it dropped a
/// connection.
struct Login {
    url: IscsiUrl,
    initiator: CString,
    target: CString,
    portal: CString,
    chap: Option<(CString, CString)>,
}

/// What a login, or the set-up of a connection, ran into.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot create an iSCSI context")]
    NoContext,
    /// libiscsi or the target refused `step`; libiscsi's words for it.
    #[error("{step}: {message}")]
    Refused { step: &'static str, message: String },
    #[error("iSCSI connection gate: {0}")]
    Gate(#[source] std::io::Error),
}

impl LinkError {
    fn refused(step: &'static str, message: impl Into<String>) -> LinkError {
        LinkError::Refused {
            step,
            message: message.into(),
        }
    }
}

impl Login {
    /// A new context, logged in to the LUN. Blocks.
    fn connect(&self) -> std::result::Result<Context, LinkError> {
        let ctx = self.context()?;
        let lun = c_int::from(self.url.lun);
        // SAFETY: the context is live and the portal outlives the call.
        if unsafe { (lib().iscsi_full_connect_sync)(ctx.0, self.portal.as_ptr(), lun) } != 0 {
            return Err(LinkError::refused("login failed", ctx.error()));
        }
        Ok(ctx)
    }

    /// A login under way on a new context, driven by the service thread's poll loop.
    fn start(&self) -> std::result::Result<Attempt, LinkError> {
        let ctx = self.context()?;
        let status = Box::new(AtomicI32::new(LOGIN_PENDING));
        let lun = c_int::from(self.url.lun);
        // SAFETY: the context is live, the portal outlives the call, and `status` outlives
        // the context (an Attempt drops its context first).
        let r = unsafe {
            (lib().iscsi_full_connect_async)(
                ctx.0,
                self.portal.as_ptr(),
                lun,
                on_login,
                std::ptr::from_ref::<AtomicI32>(&status).cast_mut().cast(),
            )
        };
        if r != 0 {
            return Err(LinkError::refused("login failed", ctx.error()));
        }
        Ok(Attempt {
            ctx,
            status,
            deadline: Instant::now() + LOGIN_TIMEOUT,
        })
    }

    /// A new context with the session's settings, not connected.
    fn context(&self) -> std::result::Result<Context, LinkError> {
        // SAFETY: a NUL-terminated name; a null return is checked.
        let raw = unsafe { (lib().iscsi_create_context)(self.initiator.as_ptr()) };
        if raw.is_null() {
            return Err(LinkError::NoContext);
        }
        let ctx = Context(raw);
        // SAFETY: for each call, the context is live and the strings outlive the calls.
        unsafe {
            (lib().iscsi_set_targetname)(ctx.0, self.target.as_ptr());
            (lib().iscsi_set_session_type)(ctx.0, ffi::ISCSI_SESSION_NORMAL);
            (lib().iscsi_set_header_digest)(ctx.0, ffi::ISCSI_HEADER_DIGEST_NONE_CRC32C);
            // For the login; `Link` takes over for tasks.
            (lib().iscsi_set_timeout)(ctx.0, TASK_TIMEOUT.as_secs() as c_int);
        }
        if let Some((user, password)) = &self.chap {
            // SAFETY: as above.
            if unsafe {
                (lib().iscsi_set_initiator_username_pwd)(ctx.0, user.as_ptr(), password.as_ptr())
            } != 0
            {
                return Err(LinkError::refused("CHAP", ctx.error()));
            }
        }
        Ok(ctx)
    }
}

/// How long a login again may take before it is given up (and tried again a second later).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The status of a login whose callback has not run.
const LOGIN_PENDING: i32 = i32::MIN;

/// A login again under way. The context goes first: its callback may still run as it goes.
struct Attempt {
    ctx: Context,
    status: Box<AtomicI32>,
    deadline: Instant,
}

extern "C" fn on_login(
    _iscsi: *mut ffi::IscsiContext,
    status: c_int,
    _data: *mut c_void,
    private: *mut c_void,
) {
    // SAFETY: `private` is the Attempt's status, which outlives its context.
    unsafe { &*private.cast::<AtomicI32>() }.store(status, Ordering::Release);
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
        let what = |e: LinkError| Error::new(ErrorKind::Io, format!("{url}: {e}"));
        ffi::api().map_err(|e| Error::new(ErrorKind::Unsupported, format!("{url}: {e}")))?;
        let login = Login {
            url: url.clone(),
            initiator: c_string("initiator name", initiator)?,
            target: c_string("target", &url.target)?,
            portal: c_string("portal", &url.portal)?,
            chap: match (&url.user, password) {
                (Some(user), Some(password)) => {
                    Some((c_string("user", user)?, c_string("password", password)?))
                }
                (Some(_), None) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("{url}: the URL names a CHAP user but no password was given"),
                    ))
                }
                (None, _) => None,
            },
        };
        let ctx = login.connect().map_err(what)?;
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
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("iscsi".into())
                .spawn(move || serve(ctx, &login, block_size, rx, &wake))
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

    async fn io(
        &self,
        write: bool,
        offset: u64,
        bufs: &GuestBuffers,
        permit: Option<Arc<dyn Permit>>,
    ) -> Result<()> {
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
            permit,
            done,
        })?;
        let what = if write { "write" } else { "read" };
        result
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "session closed")))
            .map_err(|e| e.within(format!("{} {what} of {len} bytes at {offset}", self.url)))
    }

    pub async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.io(false, offset, bufs, None).await
    }

    pub async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.io(true, offset, bufs, None).await
    }

    /// A read that goes out only while `permit` allows it: withdrawn before the command
    /// leaves this process, the read fails and nothing is sent (see [`serve`]).
    pub async fn read_under(
        &self,
        offset: u64,
        bufs: &GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> Result<()> {
        self.io(false, offset, bufs, Some(permit)).await
    }

    /// A write whose command and data go out only while `permit` allows it: withdrawn
    /// before all of it left this process, the write fails and no byte more is sent.
    pub async fn write_under(
        &self,
        offset: u64,
        bufs: &GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> Result<()> {
        self.io(true, offset, bufs, Some(permit)).await
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

fn read_capacity(ctx: &Context, lun: u16) -> std::result::Result<(u64, u32), LinkError> {
    const STEP: &str = "READ CAPACITY(16)";
    // SAFETY: the context is live and logged in; the task is checked and freed here.
    unsafe {
        let task = (lib().iscsi_readcapacity16_sync)(ctx.0, c_int::from(lun));
        if task.is_null() {
            return Err(LinkError::refused(STEP, ctx.error()));
        }
        let status = (lib().scsi_task_get_status)(task, std::ptr::null_mut());
        let data = (lib().scsi_datain_unmarshall)(task) as *const ffi::ReadCapacity16;
        let result = if status != ffi::SCSI_STATUS_GOOD || data.is_null() {
            Err(LinkError::refused(STEP, ctx.error()))
        } else {
            let rc = &*data;
            let bs = rc.block_length;
            if bs == 0 || !bs.is_multiple_of(512) {
                Err(LinkError::refused(STEP, format!("block size {bs}")))
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
        ffi::SCSI_STATUS_TIMEOUT => Err(timed_out()),
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

/// How often the service thread tries to log in again after it dropped a connection.
const RELOGIN_EVERY: Duration = Duration::from_secs(1);

/// A task libiscsi holds, as the service thread watches it.
struct Outstanding {
    /// When it fails unanswered.
    due: Instant,
    /// Its result slot, gone once libiscsi let go of the task.
    slot: Weak<Slot>,
    permit: Option<Arc<dyn Permit>>,
}

impl Outstanding {
    fn withdrawn(&self) -> bool {
        self.permit.as_ref().is_some_and(|p| !p.allows())
    }
}

/// A logged-in connection. The context goes first (its tasks' callbacks run), then the gate
/// (the connection is reset).
struct Link {
    ctx: Context,
    gate: Gate,
}

impl Link {
    /// The connection of `ctx`, just logged in, with no task yet.
    fn adopt(ctx: Context) -> std::result::Result<Link, LinkError> {
        // SAFETY: for each call, the context is live and logged in.
        unsafe {
            // A connection that fails takes its tasks with it (`serve` logs in anew): a
            // reconnect inside libiscsi would send them again, past the gate.
            (lib().iscsi_set_noautoreconnect)(ctx.0, 1);
            // Overdue tasks are `serve`'s to end, with their connection.
            (lib().iscsi_set_timeout)(ctx.0, 0);
        }
        // SAFETY: as above.
        let fd = unsafe { (lib().iscsi_get_fd)(ctx.0) };
        let gate = Gate::install(fd).map_err(LinkError::Gate)?;
        Ok(Link { ctx, gate })
    }
}

/// Where the service thread's connection is.
enum Connection {
    Up(Link),
    /// Logging in again, without blocking the thread: reads and writes fail meanwhile.
    LoggingIn(Attempt),
    /// Down; the next login starts then.
    Down(Instant),
}

/// The service thread: runs commands and the connection until the session is dropped.
///
/// Everything a task sends (its command, and the data the target asks for with R2T) may
/// leave long after the task was queued: the socket may be full, the target may ask for data
/// late, the process may have been stopped in between. So libiscsi's bytes wait in the
/// [`Gate`], and right before each write to the target, and on every turn while the kernel
/// still holds unsent bytes, the permits of all live tasks are asked again; if one was
/// withdrawn, no byte more goes out on this connection: it is reset with every task on it
/// (the target discards commands whose data never came) and a new one is logged in. A task
/// unanswered for [`TASK_TIMEOUT`] ends its connection the same way, so nothing of a
/// request that failed can reach the target later. Logins again run inside this loop, so
/// that requests fail at once meanwhile instead of waiting for a silent target.
fn serve(
    ctx: Context,
    login: &Login,
    block_size: u32,
    commands: mpsc::Receiver<Cmd>,
    wake: &OwnedFd,
) {
    let name = login.url.to_string();
    let lun = c_int::from(login.url.lun);
    let mut conn = match Link::adopt(ctx) {
        Ok(l) => Connection::Up(l),
        Err(e) => {
            tracing::warn!(lun = name, "{e}");
            Connection::Down(Instant::now())
        }
    };
    let mut tasks: Vec<Outstanding> = Vec::new();
    // Flushes and reservation commands that came while no connection was up: they wait for
    // the next one (a flush after a target restart must reach the target), at most
    // TASK_TIMEOUT. Reads and writes fail at once instead; their callers have another path.
    let mut parked: Vec<(Instant, Cmd)> = Vec::new();
    loop {
        tasks.retain(|t| t.slot.strong_count() > 0);
        let now = Instant::now();
        if matches!(conn, Connection::Up(_)) && tasks.iter().any(|t| t.due <= now) {
            tracing::warn!(lun = name, "no answer from the target in {TASK_TIMEOUT:?}");
            close(&mut conn, &mut tasks, &timed_out(), now + RELOGIN_EVERY);
        }
        while parked.first().is_some_and(|(due, _)| *due <= now) {
            parked.remove(0).1.fail(timed_out());
        }
        conn = match conn {
            Connection::Down(at) if now >= at => match login.start() {
                Ok(attempt) => Connection::LoggingIn(attempt),
                Err(e) => {
                    tracing::warn!(lun = name, "logging in again: {e}");
                    Connection::Down(now + RELOGIN_EVERY)
                }
            },
            Connection::LoggingIn(attempt) => match attempt.status.load(Ordering::Acquire) {
                LOGIN_PENDING if now < attempt.deadline => Connection::LoggingIn(attempt),
                ffi::SCSI_STATUS_GOOD => match Link::adopt(attempt.ctx) {
                    Ok(l) => {
                        tracing::info!(lun = name, "logged in again");
                        for (_, cmd) in parked.drain(..) {
                            tasks.extend(issue(&l.ctx, lun, block_size, cmd));
                        }
                        Connection::Up(l)
                    }
                    Err(e) => {
                        tracing::warn!(lun = name, "{e}");
                        Connection::Down(now + RELOGIN_EVERY)
                    }
                },
                status => {
                    let why = match status {
                        LOGIN_PENDING => format!("no login in {LOGIN_TIMEOUT:?}"),
                        _ => attempt.ctx.error(),
                    };
                    tracing::warn!(lun = name, "logging in again: {why}");
                    Connection::Down(now + RELOGIN_EVERY)
                }
            },
            other => other,
        };
        let mut fds = [pollfd(-1, 0); 4];
        let ctx = match &conn {
            Connection::Up(l) => {
                [fds[1], fds[2]] = l.gate.interest();
                Some(&l.ctx)
            }
            Connection::LoggingIn(a) => Some(&a.ctx),
            Connection::Down(_) => None,
        };
        if let Some(ctx) = ctx {
            // SAFETY: the context is live; these only read its state.
            let (fd, events) = unsafe {
                (
                    (lib().iscsi_get_fd)(ctx.0),
                    (lib().iscsi_which_events)(ctx.0),
                )
            };
            fds[0] = pollfd(fd, events as i16);
        }
        fds[3] = pollfd(wake.as_raw_fd(), libc::POLLIN);
        // A timeout, so that overdue tasks, permits and logins are seen to while idle.
        // SAFETY: four valid pollfds (poll skips the negative ones).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 4, 250) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!(lun = name, "poll: {}", std::io::Error::last_os_error());
            let closed = Error::new(ErrorKind::Io, "the iSCSI service thread stopped");
            close(&mut conn, &mut tasks, &closed, Instant::now());
            return;
        }
        if fds[3].revents != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes from our eventfd into `count`.
            unsafe { libc::read(wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            loop {
                match commands.try_recv() {
                    Ok(cmd) => match &conn {
                        Connection::Up(l) => tasks.extend(issue(&l.ctx, lun, block_size, cmd)),
                        _ if matches!(cmd, Cmd::Io { .. }) => cmd.fail(Error::new(
                            ErrorKind::Io,
                            "not logged in (the connection was closed; logging in again)",
                        )),
                        _ => parked.push((Instant::now() + TASK_TIMEOUT, cmd)),
                    },
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // Parked commands fail as they are dropped (session closed).
                        let closed = Error::new(ErrorKind::Io, "session closed");
                        close(&mut conn, &mut tasks, &closed, Instant::now());
                        return;
                    }
                }
            }
        }
        match &mut conn {
            Connection::Up(l) => {
                if let Err(e) = turn(l, &tasks) {
                    let retry = match e.kind() {
                        ErrorKind::Timeout => {
                            tracing::warn!(
                                lun = name,
                                "a task's permit was withdrawn before all of it was sent: \
                                 resetting the connection with every task on it, so that \
                                 nothing more of it goes out"
                            );
                            Instant::now()
                        }
                        _ => {
                            tracing::warn!(lun = name, "{e}; logging in again");
                            Instant::now() + RELOGIN_EVERY
                        }
                    };
                    close(&mut conn, &mut tasks, &e, retry);
                }
            }
            Connection::LoggingIn(a) => {
                // SAFETY: the context is live; the login's callback runs inside.
                unsafe { (lib().iscsi_service)(a.ctx.0, c_int::from(fds[0].revents)) };
            }
            Connection::Down(_) => {}
        }
    }
}

/// One turn of a logged-in connection: the target's bytes to libiscsi, libiscsi's turn (both
/// ways: its socket is local and never blocks long), what it wrote into the gate, then the
/// permits and at most one write to the target.
fn turn(l: &mut Link, tasks: &[Outstanding]) -> Result<()> {
    let broken = |e: String| Error::new(ErrorKind::Io, format!("iSCSI connection: {e}"));
    l.gate.pump().map_err(|e| broken(e.to_string()))?;
    let both = c_int::from(libc::POLLIN | libc::POLLOUT);
    // SAFETY: the context is live; callbacks run inside and only touch their Pending.
    if unsafe { (lib().iscsi_service)(l.ctx.0, both) } < 0 {
        return Err(broken(l.ctx.error()));
    }
    l.gate.pump().map_err(|e| broken(e.to_string()))?;
    if l.gate.holds_unsent() && tasks.iter().any(Outstanding::withdrawn) {
        return Err(Error::new(ErrorKind::Timeout, "the permit was withdrawn"));
    }
    if l.gate.holds_outbound() {
        l.gate.send().map_err(|e| broken(e.to_string()))?;
    }
    Ok(())
}

fn pollfd(fd: c_int, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Closes the connection with every task on it: their requests fail with `why`, then
/// libiscsi lets go of the tasks (their callbacks run, and find the requests answered), and
/// the connection is reset. The next login starts at `retry`.
fn close(conn: &mut Connection, tasks: &mut Vec<Outstanding>, why: &Error, retry: Instant) {
    for t in tasks.drain(..) {
        if let Some(slot) = t.slot.upgrade() {
            finish(&slot, Err(Error::new(why.kind(), why.to_string())));
        }
    }
    *conn = Connection::Down(retry);
}

fn timed_out() -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no answer from the target in {TASK_TIMEOUT:?}"),
    )
}

impl Cmd {
    /// Fails the request without sending anything.
    fn fail(self, e: Error) {
        let done = match self {
            Cmd::Io { done, .. }
            | Cmd::Flush { done }
            | Cmd::PrOut { done, .. }
            | Cmd::ReadKeys { done, .. } => done,
        };
        let _ = done.send(Err(e));
    }
}

/// Starts the task for `cmd` (unless its permit was withdrawn already) and returns it to
/// watch.
fn issue(ctx: &Context, lun: c_int, block_size: u32, cmd: Cmd) -> Option<Outstanding> {
    let permit = match &cmd {
        Cmd::Io { permit, .. } => permit.clone(),
        _ => None,
    };
    if permit.as_ref().is_some_and(|p| !p.allows()) {
        cmd.fail(Error::new(
            ErrorKind::Timeout,
            "the permit was withdrawn before the command went out",
        ));
        return None;
    }
    let (pending, task) = match cmd {
        Cmd::Io {
            write,
            lba,
            bufs,
            done,
            ..
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
        return None;
    }
    Some(Outstanding {
        due: Instant::now() + TASK_TIMEOUT,
        // SAFETY: libiscsi holds `pending` until the callback, which runs only inside
        // iscsi_service on this thread, so it is still alive here.
        slot: Arc::downgrade(unsafe { &(*pending).done }),
        permit,
    })
}
