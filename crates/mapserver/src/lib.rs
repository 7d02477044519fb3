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
mod maps;
mod volume;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twinpath_core::lock;
use twinpath_mapproto::{Frame, Key, MapGrant, Reply, Request, VolumeIdentity};

pub use config::MapServerConfig;
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
    leases: Mutex<Leases>,
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
                leases: Mutex::default(),
            }),
        })
    }

    /// Serves hosts until the task is dropped.
    pub async fn serve(self) {
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
                let mut l = lock(&state.leases);
                l.outboxes.remove(&conn);
                l.by_id.retain(|_, lease| lease.conn != conn);
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
                let reply = handle(&state, conn, &host, request).await;
                if outbox.send(Frame::Reply { id, reply }).is_err() {
                    break Ok(());
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

fn refused(reason: impl Into<String>) -> Reply {
    Reply::Refused {
        reason: reason.into(),
    }
}

async fn handle(state: &Arc<State>, conn: u64, host: &str, request: Request) -> Reply {
    match request {
        Request::Identity => Reply::Identity(state.identity.clone()),
        Request::GetMap {
            path,
            offset,
            len,
            write,
        } => {
            let real = match state.export.resolve(&path) {
                Ok(p) => p,
                Err(e) => return refused(e),
            };
            if let Some(holders) = recall_conflicts(state, conn, &real, write) {
                return refused(format!("`{path}` is leased by {holders}; recalled"));
            }
            let chunk = state.chunk;
            let target = real.clone();
            let mapped = tokio::task::spawn_blocking(move || {
                maps::get_map(&target, offset, len, write, chunk)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match mapped {
                Err(e) => refused(e),
                Ok((file_size, spans)) => {
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
                    Reply::Map(MapGrant {
                        lease,
                        file_size,
                        spans,
                    })
                }
            }
        }
        Request::Allocate { path, offset, len } => {
            let real = match state.export.resolve(&path) {
                Ok(p) => p,
                Err(e) => return refused(e),
            };
            let chunk = state.chunk;
            let done =
                tokio::task::spawn_blocking(move || maps::allocate(&real, offset, len, chunk))
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
                        return refused(format!("lease {lease} is not a write lease of this host"))
                    }
                }
            };
            match tokio::task::spawn_blocking(move || maps::commit(&path)).await {
                Ok(Ok(())) => Reply::Done,
                Ok(Err(e)) => refused(e),
                Err(e) => refused(e.to_string()),
            }
        }
        Request::Return { lease } => {
            let mut l = lock(&state.leases);
            match l.by_id.get(&lease) {
                Some(x) if x.conn == conn => {
                    l.by_id.remove(&lease);
                    Reply::Done
                }
                _ => refused(format!("lease {lease} is not held by this host")),
            }
        }
    }
}

/// Recalls other hosts' leases on `path` that conflict with a new lease (any lease against a
/// write, a write lease against a read). Returns who held them, or `None` if nobody did.
fn recall_conflicts(state: &State, conn: u64, path: &PathBuf, write: bool) -> Option<String> {
    let mut l = lock(&state.leases);
    let mut holders = Vec::new();
    let mut recalls = Vec::new();
    for (&id, lease) in l.by_id.iter_mut() {
        if lease.conn != conn && &lease.path == path && (write || lease.write) {
            holders.push(lease.host.clone());
            if !lease.recalled {
                lease.recalled = true;
                recalls.push((lease.conn, id));
            }
        }
    }
    for (holder, id) in recalls {
        tracing::info!(lease = id, path = %path.display(), "recalling lease for another host");
        if let Some(outbox) = l.outboxes.get(&holder) {
            let _ = outbox.send(Frame::Recall {
                lease: id,
                reason: "another host asked for the file".into(),
            });
        }
    }
    holders.sort();
    holders.dedup();
    (!holders.is_empty()).then(|| holders.join(", "))
}
