//! twinpath-mapserver: `twinpath map-server`, run on the file-server host next to smbd, over
//! a directory tree on the filesystem that lives on the shared LUN. VM hosts connect (one
//! authenticated connection each), learn which volume to look for, and ask for maps of the
//! images they serve; the server hands out extents with leases and takes them back.
//!
//! Leases: any number of hosts may hold read leases on a file, or one host a write lease.
//! A request that conflicts recalls the leases in its way (the holders fall back to the
//! network path and return them) and is refused meanwhile; the asking host retries later.

mod config;
mod export;
mod fill;
mod maps;
mod volume;
mod watch;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twinpath_core::lock;
use twinpath_mapproto::{Frame, Key, MapGrant, Reply, Request, VolumeIdentity};

pub use config::MapServerConfig;
pub use fill::ZERO_FILE;
pub use volume::TOKEN_FILE;

use crate::export::Export;

/// How long a host may take to answer the challenge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Lease {
    conn: u64,
    host: String,
    path: PathBuf,
    write: bool,
    recalled: bool,
}

#[derive(Default)]
struct Leases {
    next: u64,
    by_id: HashMap<u64, Lease>,
    /// Where to push frames (recalls) for each connected host.
    outboxes: HashMap<u64, mpsc::UnboundedSender<Frame>>,
}

struct State {
    export: Export,
    key: Key,
    chunk: u64,
    identity: VolumeIdentity,
    fill: fill::Filler,
    leases: Mutex<Leases>,
    /// Reports changes to leased files by others; `None` where fanotify is unavailable.
    watcher: Option<watch::Watcher>,
}

impl Leases {
    /// Sends a recall for every lease that `pred` selects and that was not recalled yet.
    /// Returns the hosts holding selected leases.
    fn recall(&mut self, pred: impl Fn(&Lease) -> bool, reason: &str) -> Vec<String> {
        let mut holders = Vec::new();
        let mut recalls = Vec::new();
        for (&id, lease) in self.by_id.iter_mut() {
            if pred(lease) {
                holders.push(lease.host.clone());
                if !lease.recalled {
                    lease.recalled = true;
                    recalls.push((lease.conn, id, lease.path.clone()));
                }
            }
        }
        for (holder, id, path) in recalls {
            tracing::info!(lease = id, path = %path.display(), "recalling lease: {reason}");
            if let Some(outbox) = self.outboxes.get(&holder) {
                let _ = outbox.send(Frame::Recall {
                    lease: id,
                    reason: reason.to_owned(),
                });
            }
        }
        holders.sort();
        holders.dedup();
        holders
    }
}

impl State {
    /// Stops watching `path` once no lease refers to it.
    fn forget_if_unleased(&self, path: &std::path::Path) {
        let leased = lock(&self.leases).by_id.values().any(|l| l.path == path);
        if let (false, Some(w)) = (leased, &self.watcher) {
            w.unwatch(path);
        }
    }
}

/// A running map server.
pub struct MapServer {
    pub local_addr: std::net::SocketAddr,
    listener: TcpListener,
    state: Arc<State>,
}

impl MapServer {
    /// Reads the key, identifies the volume (writing this session's token file) and binds.
    pub async fn bind(cfg: &MapServerConfig) -> Result<MapServer, String> {
        let key = Key::from_file(&cfg.key_file)?;
        let export = Export::new(&cfg.export)
            .map_err(|e| format!("export {}: {e}", cfg.export.display()))?;
        let root = export.root().to_path_buf();
        let identity = tokio::task::spawn_blocking(move || volume::identify(&root))
            .await
            .map_err(|e| e.to_string())??;
        let root = export.root().to_path_buf();
        let fill = tokio::task::spawn_blocking(move || fill::Filler::new(&root))
            .await
            .map_err(|e| e.to_string())??;
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
            .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%local_addr, export = %cfg.export.display(), "map server listening");
        Ok(MapServer {
            local_addr,
            listener,
            state: Arc::new(State {
                export,
                key,
                chunk: cfg.allocation_chunk.0,
                identity,
                fill,
                leases: Mutex::default(),
                watcher,
            }),
        })
    }

    /// Serves hosts until the task is dropped.
    pub async fn serve(self) {
        let watching = self.state.clone();
        let _changes = tokio::spawn(async move {
            let Some(w) = &watching.watcher else { return };
            loop {
                match w.changes().await {
                    Ok(changes) => {
                        let mut l = lock(&watching.leases);
                        for (path, why) in changes {
                            l.recall(|lease| lease.path == path, why);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("watching leased files: {e}");
                        return;
                    }
                }
            }
        });
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
            next_conn += 1;
            let state = self.state.clone();
            let conn = next_conn;
            tokio::spawn(async move {
                if let Err(e) = serve_host(state.clone(), conn, stream).await {
                    tracing::warn!(%peer, "map connection: {e}");
                }
                let gone: Vec<(PathBuf, bool)> = {
                    let mut l = lock(&state.leases);
                    l.outboxes.remove(&conn);
                    let gone = l
                        .by_id
                        .values()
                        .filter(|lease| lease.conn == conn)
                        .map(|lease| (lease.path.clone(), lease.write))
                        .collect();
                    l.by_id.retain(|_, lease| lease.conn != conn);
                    gone
                };
                for (path, write) in gone {
                    released(&state, path, write).await;
                }
            });
        }
    }
}

async fn serve_host(state: Arc<State>, conn: u64, stream: TcpStream) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (c, host) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        twinpath_mapproto::accept(stream, &state.key),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    tracing::info!(host, "host connected");
    let (mut reader, mut writer) = (c.reader, c.writer);
    let (outbox, mut outgoing) = mpsc::unbounded_channel::<Frame>();
    lock(&state.leases).outboxes.insert(conn, outbox.clone());
    let sender = tokio::spawn(async move {
        while let Some(f) = outgoing.recv().await {
            if writer.send(&f).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        match reader.recv().await {
            Ok(Frame::Request { id, request }) => {
                let respond = Respond {
                    id,
                    outbox: &outbox,
                };
                if let Some(reply) = handle(&state, conn, &host, request, &respond).await {
                    respond.send(reply);
                }
            }
            Ok(other) => break Err(format!("host {host} sent {other:?}")),
            Err(twinpath_mapproto::ProtoError::Closed) => break Ok(()),
            Err(e) => break Err(format!("host {host}: {e}")),
        }
    };
    tracing::info!(host, "host disconnected");
    sender.abort();
    result
}

/// Where the reply to one request goes.
struct Respond<'a> {
    id: u64,
    outbox: &'a mpsc::UnboundedSender<Frame>,
}

impl Respond<'_> {
    fn send(&self, reply: Reply) {
        // A closed outbox means the host is gone; its reader loop ends on its own.
        let _ = self.outbox.send(Frame::Reply { id: self.id, reply });
    }
}

/// A lease is gone (returned, or its host disconnected). The host may have written under a
/// write lease without committing: drop the server's cached pages of the file, so they cannot
/// hide those writes. Stops watching the file once nobody holds a lease on it.
async fn released(state: &Arc<State>, path: PathBuf, write: bool) {
    if write {
        let p = path.clone();
        let dropped =
            tokio::task::spawn_blocking(move || open(&p, false).map(|f| maps::commit(&f)));
        match dropped.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("dropping cache: {e}"),
            Err(e) => tracing::warn!(path = %path.display(), "dropping cache: {e}"),
        }
    }
    state.forget_if_unleased(&path);
}

/// `path` opened for the map work, refused if it is the zero file (a host writing its blocks
/// would turn later fills into its data).
fn open(path: &Path, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn open_mappable(state: &State, path: &Path, write: bool) -> Result<File, String> {
    let file = open(path, write)?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if state.fill.zero_file_id() == Some((meta.dev(), meta.ino())) {
        return Err(format!("{} is the map server's own", path.display()));
    }
    Ok(file)
}

fn refused(reason: impl Into<String>) -> Reply {
    Reply::Refused {
        reason: reason.into(),
    }
}

/// The reply to `request`, or `None` where `handle` sent it itself (a grant goes out under
/// the lease table's lock, so that no recall of its lease can overtake it).
async fn handle(
    state: &Arc<State>,
    conn: u64,
    host: &str,
    request: Request,
    respond: &Respond<'_>,
) -> Option<Reply> {
    let reply = match request {
        Request::Identity => Reply::Identity(state.identity.clone()),
        Request::GetMap {
            path,
            offset,
            len,
            write,
        } => {
            let real = match state.export.resolve(&path) {
                Ok(p) => p,
                Err(e) => return Some(refused(e)),
            };
            if let Some(holders) = recall_conflicts(state, conn, &real, write) {
                return Some(refused(format!(
                    "`{path}` is leased by {holders}; recalled"
                )));
            }
            let worker = state.clone();
            let target = real.clone();
            let mapped = tokio::task::spawn_blocking(move || {
                let file = open_mappable(&worker, &target, write)?;
                maps::get_map(&file, offset, len, write, worker.chunk, &worker.fill)
                    .map_err(|e| format!("{}: {e}", target.display()))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match mapped {
                Err(e) => refused(e),
                Ok((file_size, spans)) => {
                    if let Some(w) = &state.watcher {
                        if let Err(e) = w.watch(&real) {
                            tracing::warn!(path, "cannot watch for changes: {e}");
                        }
                    }
                    let mut l = lock(&state.leases);
                    l.next += 1;
                    let lease = l.next;
                    l.by_id.insert(
                        lease,
                        Lease {
                            conn,
                            host: host.to_owned(),
                            path: real,
                            write,
                            recalled: false,
                        },
                    );
                    tracing::debug!(host, path, lease, write, spans = spans.len(), "map granted");
                    respond.send(Reply::Map(MapGrant {
                        lease,
                        file_size,
                        spans,
                    }));
                    return None;
                }
            }
        }
        Request::Allocate { path, offset, len } => {
            let real = match state.export.resolve(&path) {
                Ok(p) => p,
                Err(e) => return Some(refused(e)),
            };
            let worker = state.clone();
            let done = tokio::task::spawn_blocking(move || {
                let file = open_mappable(&worker, &real, true)?;
                maps::allocate(&file, offset, len, worker.chunk, &worker.fill)
                    .map_err(|e| format!("{}: {e}", real.display()))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match done {
                Ok((offset, len)) => Reply::Allocated { offset, len },
                Err(e) => refused(e),
            }
        }
        Request::Commit { lease, size: _ } => {
            let path = {
                let l = lock(&state.leases);
                match l.by_id.get(&lease) {
                    Some(x) if x.conn == conn && x.write => x.path.clone(),
                    _ => {
                        return Some(refused(format!(
                            "lease {lease} is not a write lease of this host"
                        )))
                    }
                }
            };
            match tokio::task::spawn_blocking(move || open(&path, false).map(|f| maps::commit(&f)))
                .await
            {
                Ok(Ok(())) => Reply::Done,
                Ok(Err(e)) => refused(e),
                Err(e) => refused(e.to_string()),
            }
        }
        Request::Return { lease } => {
            let returned = {
                let mut l = lock(&state.leases);
                match l.by_id.get(&lease) {
                    Some(x) if x.conn == conn => l.by_id.remove(&lease),
                    _ => None,
                }
            };
            match returned {
                Some(x) => {
                    released(state, x.path, x.write).await;
                    Reply::Done
                }
                None => refused(format!("lease {lease} is not held by this host")),
            }
        }
    };
    Some(reply)
}

/// Recalls other hosts' leases on `path` that conflict with a new lease (any lease against a
/// write, a write lease against a read). Returns who held them, or `None` if nobody did.
fn recall_conflicts(state: &State, conn: u64, path: &PathBuf, write: bool) -> Option<String> {
    let holders = lock(&state.leases).recall(
        |lease| lease.conn != conn && &lease.path == path && (write || lease.write),
        "another host asked for the file",
    );
    (!holders.is_empty()).then(|| holders.join(", "))
}
