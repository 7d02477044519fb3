//! twinpath-mapserver: `twinpath map-server`, run on the file-server host next to smbd, over
//! a directory tree on the filesystem that lives on the shared LUN. VM hosts connect (one
//! authenticated connection each, with their own key), learn which volume to look for, and
//! ask for maps of the images they serve; the server hands out extents with leases and takes
//! them back.
//!
//! Leases: any number of hosts may hold read leases on a file, or one host a write lease.
//! A request that conflicts recalls the leases in its way (the holders fall back to the
//! network path and return them) and is refused meanwhile; the asking host retries later.

mod admission;
mod config;
mod error;
mod export;
mod fence;
mod fill;
mod leases;
mod maps;
mod metrics;
mod nodefrag;
mod record;
mod volume;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twinpath_core::lock;
use twinpath_mapproto::{Frame, HostKeys, Key, MapGrant, Reply, Request, VolumeIdentity};

pub use config::{HostConfig, MapServerConfig};
pub use error::Error;
pub use fill::ZERO_FILE;
pub use leases::LeaseInfo;
pub use volume::TOKEN_FILE;

use crate::admission::Admission;
use crate::export::{Export, Inode, Opened};
use crate::fill::Filler;
use crate::leases::{Denied, Lease, Leases, MAX_LEASES_PER_CONN};
use crate::metrics::Metrics;

/// The longest range one map or allocation covers (hosts ask for 64 MiB windows): a larger
/// request is clipped, so that one request cannot make the server fill a whole image.
const MAX_MAP_LEN: u64 = 1 << 30;

/// How long a peer may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a lease is kept from others after its host went silent or it was recalled: the
/// lease time, plus a margin for the two machines' clocks running at slightly different
/// rates and for direct I/O the host issued just before its lease ran out.
fn hold(lease_time: Duration) -> Duration {
    lease_time + lease_time / 10 + Duration::from_secs(1)
}

/// A request the server will not carry out: a reason from a fixed set (the metric label),
/// and what the host is told.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
        }
    }

    /// Opening `rel` failed with `e`.
    fn io(rel: &str, e: std::io::Error) -> Refusal {
        let reason = match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => "not_found",
            // RESOLVE_BENEATH / RESOLVE_NO_XDEV / RESOLVE_NO_MAGICLINKS said no.
            Some(libc::EXDEV | libc::ELOOP) => "outside",
            _ => "io",
        };
        Refusal::new(reason, format!("path {rel:?}: {e}"))
    }
}

/// A host as the config lists it.
struct Host {
    name: Arc<str>,
    paths: Option<Vec<String>>,
}

struct State {
    export: Export,
    hosts: Vec<Arc<Host>>,
    keys: HostKeys,
    chunk: u64,
    lease_time: Duration,
    fill: Arc<Filler>,
    identity: VolumeIdentity,
    /// Files of the server's own (token, zeros): never mapped.
    internal: Vec<Inode>,
    leases: std::sync::Mutex<Leases>,
    /// Reports changes to leased files by others; `None` where fanotify is unavailable.
    watcher: Option<watch::Watcher>,
    /// Fences hosts on the LUN; `None`: lost hosts' leases are waited out.
    fencer: Option<fence::Fencer>,
    /// With a fencer, how long a host may take to return a recalled lease before it is
    /// fenced.
    recall_deadline: Duration,
    /// Failed fencings are retried every sweep; logged at most every 10 s.
    fence_failures: std::sync::Mutex<admission::Throttled>,
    /// Leased files kept from `xfs_fsr`; `None` on filesystems without the flag.
    nodefrag: Option<std::sync::Mutex<nodefrag::NoDefrag>>,
    metrics: Metrics,
    /// What the next run must know of this run's leases.
    record: record::LeaseRecord,
    /// Whether the record says this run has leases out (written once, before the first
    /// grant).
    recorded: tokio::sync::OnceCell<()>,
    /// Until when this run answers no maps: leases of an earlier run may still be in use.
    grace_until: Option<std::time::Instant>,
}

impl State {
    /// Stops watching `inode` once no lease refers to it. Decided and done under the lease
    /// table's lock: a reservation made meanwhile (which watches after it reserved) cannot
    /// lose its mark to this.
    fn forget_if_unleased(&self, inode: Inode) {
        let l = lock(&self.leases);
        if l.refers_to(inode) {
            return;
        }
        if let Some(w) = &self.watcher {
            w.unwatch(inode);
        }
        if let Some(n) = &self.nodefrag {
            lock(n).unpin(inode);
        }
    }
}

/// Records a clean stop: see [`MapServer::stopper`].
pub struct Stopper(Arc<State>);

impl Stopper {
    pub fn stopped(&self) {
        let state = &self.0;
        if state.recorded.get().is_none() {
            // Nothing was granted in this run: the record is as the earlier run left it.
            return;
        }
        let held = lock(&state.leases).counts() != (0, 0);
        let hold = lock(&state.leases).hold;
        match state.record.stopped(held, hold) {
            Ok(()) => tracing::info!(leases_held = held, "lease record written"),
            Err(e) => tracing::warn!("lease record: {e}"),
        }
    }
}

/// A running map server.
pub struct MapServer {
    pub local_addr: std::net::SocketAddr,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: Arc<State>,
}

impl MapServer {
    /// Reads the host keys, identifies the volume (writing this session's token file) and
    /// binds.
    pub async fn bind(cfg: &MapServerConfig) -> Result<MapServer, Error> {
        raise_open_files_limit();
        let mut keys = Vec::new();
        let mut hosts = Vec::new();
        for h in &cfg.hosts {
            let key = twinpath_core::read_secret_bytes("key_file", &h.key_file)
                .map_err(|e| Error::Unfit(format!("host {}: {e}", h.name)))?;
            let key = Key::new(key).map_err(|source| Error::Key {
                what: format!("host {}: key_file {}", h.name, h.key_file.display()),
                source,
            })?;
            keys.push((h.name.clone(), key));
            hosts.push(Arc::new(Host {
                name: h.name.as_str().into(),
                paths: h.paths.clone(),
            }));
        }
        let keys = HostKeys::new(keys).map_err(|source| Error::Key {
            what: "hosts".into(),
            source,
        })?;
        let export = Export::new(&cfg.export)
            .map_err(error::io(format_args!("export {}", cfg.export.display())))?;
        let root = export.root().to_path_buf();
        let hold = hold(cfg.lease_time);
        let (identity, fill, internal, record, grace) = tokio::task::spawn_blocking(move || {
            let (identity, token) = volume::identify(&root)?;
            let fill = Filler::new(&root)?;
            let record = record::LeaseRecord::new(&root);
            let grace = record.grace(hold);
            let (dev, ino) = record.create()?;
            let mut internal = vec![token, Inode { dev, ino }];
            internal.extend(fill.zero_file_id().map(|(dev, ino)| Inode { dev, ino }));
            Ok::<_, Error>((identity, fill, internal, record, grace))
        })
        .await
        .map_err(|e| Error::Unfit(format!("identifying the volume: {e}")))??;
        if !grace.is_zero() {
            tracing::warn!(
                ?grace,
                "an earlier run of this map server may have left leases in use (it did not \
                 stop cleanly, or hosts held leases when it stopped): no maps until they have \
                 run out"
            );
        }
        let xfs = identity.fs_type == "xfs";
        let watcher = match watch::Watcher::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch files with fanotify ({e}); changes made on the server by others \
                     will not recall leases"
                );
                None
            }
        };
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(error::io(format_args!("listen {}", cfg.listen)))?;
        let local_addr = listener
            .local_addr()
            .map_err(error::io(format_args!("listen {}", cfg.listen)))?;
        let metrics_listener = match &cfg.metrics {
            Some(m) => Some(
                TcpListener::bind(m.listen)
                    .await
                    .map_err(error::io(format_args!("metrics.listen {}", m.listen)))?,
            ),
            None => None,
        };
        tracing::info!(
            %local_addr,
            export = %cfg.export.display(),
            hosts = cfg.hosts.len(),
            lease_time = ?cfg.lease_time,
            "map server listening"
        );
        let recall_deadline = (cfg.lease_time / 3).max(Duration::from_secs(1));
        let fencer = match cfg.fence.clone() {
            Some(f) => {
                let fencer = tokio::task::spawn_blocking(move || fence::Fencer::start(&f))
                    .await
                    .map_err(|e| Error::Fence(format!("fence.lun: {e}")))??;
                tracing::info!(
                    lun = fencer.describe(),
                    ?recall_deadline,
                    "fencing with SCSI-3 persistent reservations: a lost host, or one that does \
                     not return a recalled lease in time, is preempted on the LUN"
                );
                Some(fencer)
            }
            None => {
                tracing::info!(
                    "no fencing configured: the leases of a lost or silent host are waited out \
                     ({hold:?}) before its blocks go to anyone else"
                );
                None
            }
        };
        Ok(MapServer {
            local_addr,
            listener,
            metrics_listener,
            state: Arc::new(State {
                export,
                hosts,
                keys,
                chunk: cfg.allocation_chunk.0,
                lease_time: cfg.lease_time,
                fencer,
                recall_deadline,
                fence_failures: Default::default(),
                fill: Arc::new(fill),
                identity,
                internal,
                leases: std::sync::Mutex::new(Leases::new(hold)),
                watcher,
                nodefrag: xfs.then(Default::default),
                metrics: Metrics::default(),
                record,
                recorded: tokio::sync::OnceCell::new(),
                grace_until: (!grace.is_zero()).then(|| std::time::Instant::now() + grace),
            }),
        })
    }

    /// What to call when the server stops cleanly (after `serve` was dropped): records
    /// whether leases were still out, for the next run.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.state.clone())
    }

    /// Serves hosts until the task is dropped.
    pub async fn serve(self) {
        if let Some(l) = self.metrics_listener {
            tokio::spawn(metrics::serve(l, self.state.clone()));
        }
        let watching = self.state.clone();
        let _changes = tokio::spawn(async move {
            let Some(w) = &watching.watcher else { return };
            loop {
                match w.changes().await {
                    Ok(changes) => {
                        let mut l = lock(&watching.leases);
                        for (inode, why) in changes {
                            let (_, sent) = l.recall(|lease| lease.inode == inode, why);
                            watching.metrics.recalled("changed", sent);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("watching leased files: {e}");
                        return;
                    }
                }
            }
        });
        let sweeping = self.state.clone();
        let _sweep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                expire(&sweeping).await;
            }
        });
        let admission = Admission::default();
        let failed_handshakes = Arc::new(std::sync::Mutex::new(admission::Throttled::default()));
        let mut next_conn = 0u64;
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over the cap the connection is closed before anything is read from it.
            let Some(pending) = admission.admit(peer.ip()) else {
                self.state.metrics.auth_failed("capacity");
                continue;
            };
            next_conn += 1;
            let state = self.state.clone();
            let conn = next_conn;
            let failed_handshakes = failed_handshakes.clone();
            tokio::spawn(async move {
                match serve_host(&state, conn, stream, pending).await {
                    Ok(()) => {}
                    Err(Failed::Handshake(e)) => {
                        if let Some(n) = lock(&failed_handshakes).due() {
                            tracing::warn!(%peer, failed = n, "map connection refused: {e}");
                        }
                    }
                    Err(Failed::WrongName(e)) => {
                        tracing::warn!(%peer, "map connection refused: {e}")
                    }
                    Err(Failed::Session(e)) => tracing::warn!(%peer, "map connection: {e}"),
                }
                let (dropped, written) = lock(&state.leases).disconnect(conn);
                for lease in dropped {
                    released(&state, lease).await;
                }
                // The host may have written directly without committing: reads over SMB
                // must not be served from pages cached before. Its leases themselves wait
                // out their hold.
                let _ = tokio::task::spawn_blocking(move || {
                    written.iter().for_each(|f| maps::commit(f))
                })
                .await;
            });
        }
    }
}

/// Every leased file is held open: take the hard limit on open files, not the soft one
/// (1024 under systemd), so that the number of images leased, not a default, is the bound.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read the struct we pass.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    if !raised {
        tracing::warn!(
            "cannot raise the open files limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How a connection ended badly: before authentication (logged throttled: anyone can cause
/// it), with a real host's key under another name, or after authentication.
enum Failed {
    Handshake(String),
    WrongName(String),
    Session(String),
}

async fn serve_host(
    state: &Arc<State>,
    conn: u64,
    stream: TcpStream,
    pending: admission::Pending,
) -> Result<(), Failed> {
    stream
        .set_nodelay(true)
        .map_err(|e| Failed::Handshake(e.to_string()))?;
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        twinpath_mapproto::accept(stream, &state.keys),
    )
    .await;
    drop(pending);
    let (c, name) = match accepted {
        Err(_) => {
            state.metrics.auth_failed("timeout");
            return Err(Failed::Handshake("handshake timed out".into()));
        }
        Ok(Err(e)) => {
            state.metrics.auth_failed(auth_reason(&e));
            return Err(match e {
                twinpath_mapproto::ProtoError::WrongName { .. } => Failed::WrongName(e.to_string()),
                e => Failed::Handshake(e.to_string()),
            });
        }
        Ok(Ok(a)) => a,
    };
    let host = &state
        .hosts
        .iter()
        .find(|h| *h.name == name)
        .cloned()
        .ok_or_else(|| Failed::Session(format!("host {name:?} verified but is not configured")))?;
    tracing::info!(host = %host.name, "host connected");
    let (mut reader, mut writer) = (c.reader, c.writer);
    let (outbox, mut outgoing) = mpsc::channel::<Frame>(OUTBOX_FRAMES);
    let hang_up = lock(&state.leases).connect(conn, outbox.clone());
    let sender = tokio::spawn(async move {
        while let Some(f) = outgoing.recv().await {
            if writer.send(&f).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        let frame = tokio::select! {
            // The hang-up first: a request read after it must find the connection closed.
            biased;
            () = hang_up.notified() => {
                break Err(format!("host {}: connection closed, its leases were taken back", host.name));
            }
            f = reader.recv() => f,
        };
        match frame {
            Ok(Frame::Request { id, request }) => {
                if !lock(&state.leases).heard(conn) {
                    break Err(format!(
                        "host {}: connection closed, its leases were taken back",
                        host.name
                    ));
                }
                // A host that does not read its replies stops being read from: its requests
                // wait in its own socket buffer, not in the server's memory.
                let Ok(permit) = outbox.clone().reserve_owned().await else {
                    break Ok(());
                };
                let respond = Respond {
                    id,
                    permit: std::sync::Mutex::new(Some(permit)),
                };
                match handle(state, conn, host, request, &respond).await {
                    Ok(Some(reply)) => respond.send(reply),
                    Ok(None) => {}
                    Err(r) => {
                        state.metrics.refused(r.reason);
                        tracing::debug!(host = %host.name, reason = r.reason, "refused: {}", r.message);
                        respond.send(Reply::Refused { reason: r.message });
                    }
                }
            }
            Ok(_) => break Err(format!("host {}: unexpected frame", host.name)),
            Err(twinpath_mapproto::ProtoError::Closed) => break Ok(()),
            Err(e) => break Err(format!("host {}: {e}", host.name)),
        }
    };
    tracing::info!(host = %host.name, "host disconnected");
    sender.abort();
    result.map_err(Failed::Session)
}

/// The metric label for a failed handshake.
fn auth_reason(e: &twinpath_mapproto::ProtoError) -> &'static str {
    use twinpath_mapproto::ProtoError as P;
    match e {
        P::Auth(_) => "bad_key",
        P::WrongName { .. } => "wrong_name",
        P::Version { .. } => "version",
        P::Malformed(_) | P::Unexpected(_) => "malformed",
        _ => "io",
    }
}

/// Frames queued for one host at most (replies and recalls).
const OUTBOX_FRAMES: usize = 64;

/// Where the reply to one request goes: a slot in the host's outbox taken before the request
/// is handled, so the reply never waits (a grant is sent under the lease table's lock).
struct Respond {
    id: u64,
    permit: std::sync::Mutex<Option<mpsc::OwnedPermit<Frame>>>,
}

impl Respond {
    fn send(&self, reply: Reply) {
        if let Some(p) = lock(&self.permit).take() {
            p.send(Frame::Reply { id: self.id, reply });
        }
    }
}

/// A lease is gone (returned, or its host disconnected). The host may have written under a
/// write lease without committing: drop the server's cached pages of the file, so they cannot
/// hide those writes. Stops watching the file once nobody holds a lease on it.
async fn released(state: &Arc<State>, lease: Lease) {
    let inode = lease.inode;
    if lease.write {
        let file = lease.file.clone();
        let _ = tokio::task::spawn_blocking(move || maps::commit(&file)).await;
    }
    state.forget_if_unleased(inode);
}

/// Fences the hosts that must be (with a fencer), then releases every lease they held and
/// every lease past its hold.
async fn expire(state: &Arc<State>) {
    if let Some(fencer) = &state.fencer {
        let due = lock(&state.leases).fence_due(std::time::Instant::now(), state.recall_deadline);
        for (conn, host) in due {
            match fencer.fence(&host).await {
                Ok(fence::Fenced::Aborted) => {
                    let gone = lock(&state.leases).fenced(conn);
                    tracing::warn!(%host, leases = gone.len(), "host fenced on the LUN; its leases are free");
                    for lease in gone {
                        released(state, lease).await;
                    }
                }
                Ok(fence::Fenced::Preempted) => {
                    lock(&state.leases).preempted(conn);
                    tracing::warn!(
                        %host,
                        "host preempted on the LUN; the target cannot abort the commands it \
                         has of the host: its leases are waited out"
                    );
                }
                Err(e) => {
                    if let Some(failed) = lock(&state.fence_failures).due() {
                        tracing::warn!(
                            %host,
                            failed,
                            "cannot fence the host ({e}); its leases are waited out"
                        );
                    }
                }
            }
        }
    }
    let gone = lock(&state.leases).expire(std::time::Instant::now());
    for lease in gone {
        released(state, lease).await;
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(Error::Unfit(format!("blocking task: {e}"))))
}

/// The reply to `request`, `Ok(None)` where `handle` sent it itself (a grant goes out under
/// the lease table's lock, so that no recall of its lease can overtake it).
async fn handle(
    state: &Arc<State>,
    conn: u64,
    host: &Arc<Host>,
    request: Request,
    respond: &Respond,
) -> Result<Option<Reply>, Refusal> {
    let reply = match request {
        Request::Identity => Reply::Identity(state.identity.clone()),
        Request::Renew => {
            // Sent under the lease table's lock, like a grant: a sweep cannot take the
            // connection's leases between the check and the reply.
            let l = lock(&state.leases);
            if !l.is_up(conn) {
                return Err(Refusal::new("closed", "the connection was closed"));
            }
            respond.send(Reply::Renewed {
                lease_time_ms: state.lease_time.as_millis() as u64,
            });
            return Ok(None);
        }
        Request::GetMap {
            path,
            offset,
            len,
            write,
        } => {
            let len = len.min(MAX_MAP_LEN);
            return get_map(state, conn, host, path, offset, len, write, respond).await;
        }
        Request::Allocate { lease, offset, len } => {
            let len = len.min(MAX_MAP_LEN);
            let file = write_lease(state, conn, lease)?;
            let (chunk, fill) = (state.chunk, state.fill.clone());
            let (offset, len) = blocking(move || maps::allocate(&file, offset, len, chunk, &fill))
                .await
                .map_err(|e| Refusal::new("map_error", format!("allocate: {e}")))?;
            Reply::Allocated { offset, len }
        }
        Request::Commit { lease, size: _ } => {
            let file = write_lease(state, conn, lease)?;
            blocking(move || {
                maps::commit(&file);
                Ok(())
            })
            .await
            .map_err(|e| Refusal::new("io", format!("commit: {e}")))?;
            Reply::Done
        }
        Request::Return { lease } => {
            let returned = {
                let mut l = lock(&state.leases);
                match l.held(lease, conn) {
                    Some(_) => l.remove(lease),
                    None => None,
                }
            };
            let Some(returned) = returned else {
                return Err(Refusal::new(
                    "bad_lease",
                    format!("lease {lease} is not held by this host"),
                ));
            };
            released(state, returned).await;
            Reply::Done
        }
    };
    Ok(Some(reply))
}

/// The file of write lease `lease`, if connection `conn` holds it.
fn write_lease(state: &State, conn: u64, lease: u64) -> Result<Arc<std::fs::File>, Refusal> {
    match lock(&state.leases).held(lease, conn) {
        Some(l) if l.write => Ok(l.file.clone()),
        _ => Err(Refusal::new(
            "bad_lease",
            format!("lease {lease} is not a write lease of this host"),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn get_map(
    state: &Arc<State>,
    conn: u64,
    host: &Arc<Host>,
    path: String,
    offset: u64,
    len: u64,
    write: bool,
    respond: &Respond,
) -> Result<Option<Reply>, Refusal> {
    if let Some(until) = state.grace_until {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if !left.is_zero() {
            return Err(Refusal::new(
                "grace",
                format!("leases of the map server's earlier run may be in use for {left:?} more"),
            ));
        }
    }
    // Durably on record before any grant of this run goes out.
    state
        .recorded
        .get_or_try_init(|| {
            let s = state.clone();
            blocking(move || s.record.outstanding())
        })
        .await
        .map_err(|e| Refusal::new("io", format!("lease record: {e}")))?;
    let opened = {
        let (s, h, rel) = (state.clone(), host.clone(), path.clone());
        tokio::task::spawn_blocking(move || s.export.open(&rel, h.paths.as_deref(), write))
            .await
            .map_err(|e| Refusal::new("io", e.to_string()))??
    };
    let Opened { file, inode } = opened;
    if state.internal.contains(&inode) {
        return Err(Refusal::new(
            "internal_file",
            format!("path {path:?} is the map server's own file"),
        ));
    }
    // Leases past their hold stop being in the way first.
    expire(state).await;
    let reserved = {
        let mut l = lock(&state.leases);
        let r = l.reserve(Lease {
            conn,
            host: host.name.clone(),
            path: path.clone(),
            inode,
            file: Arc::new(file),
            write,
            granted: false,
            recalled: false,
            recalled_at: None,
            since: std::time::SystemTime::now(),
        });
        if let Err(Denied::Conflict(holders)) = &r {
            state.metrics.recalled("conflict", holders.len() as u64);
        }
        r
    };
    let (id, file) = reserved.map_err(|denied| match denied {
        Denied::Conflict(holders) => {
            let names: Vec<&str> = holders.iter().map(|h| &**h).collect();
            Refusal::new(
                "conflict",
                format!("{path:?} is leased by {}; recalled", names.join(", ")),
            )
        }
        Denied::TooMany => Refusal::new(
            "too_many_leases",
            format!("this host holds {MAX_LEASES_PER_CONN} leases already; return some"),
        ),
    })?;
    if let Some(w) = &state.watcher {
        if let Err(e) = w.watch(&file, inode) {
            tracing::warn!(path = ?path, "cannot watch for changes: {e}");
        }
    }
    if let Some(n) = &state.nodefrag {
        // Under the lease table's lock, like the unpin, so that a release racing with this
        // reservation cannot clear the flag after it was set for it.
        let _l = lock(&state.leases);
        lock(n).pin(inode, &file, &path);
    }
    let (chunk, fill, f) = (state.chunk, state.fill.clone(), file.clone());
    let mapped = blocking(move || maps::get_map(&f, offset, len, write, chunk, &fill)).await;
    let (file_size, spans) = match mapped {
        // A host hangs up on a map of more spans than it accepts; the rest of the range is
        // simply not granted (the host goes over SMB there).
        Ok((size, mut spans)) => {
            spans.truncate(twinpath_mapproto::MAX_SPANS);
            (size, spans)
        }
        Err(e) => {
            let dropped = lock(&state.leases).remove(id);
            if let Some(l) = dropped {
                released(state, l).await;
            }
            return Err(Refusal::new("map_error", format!("{path:?}: {e}")));
        }
    };
    let overtaken = {
        let mut l = lock(&state.leases);
        let granted = if l.is_up(conn) {
            l.grant(id)
        } else {
            Err(l.remove(id))
        };
        match granted {
            Ok(_) => {
                state.metrics.granted(write);
                tracing::debug!(host = %host.name, path = ?path, lease = id, write, spans = spans.len(), "map granted");
                respond.send(Reply::Map(MapGrant {
                    lease: id,
                    file_size,
                    spans,
                }));
                return Ok(None);
            }
            Err(e) => e,
        }
    };
    if let Some(l) = overtaken {
        released(state, l).await;
    }
    Err(Refusal::new(
        "recalled",
        format!("{path:?} was recalled while its map was made"),
    ))
}
