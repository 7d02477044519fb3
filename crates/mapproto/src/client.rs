//! The host side of a map connection: requests matched to replies by id, recalls handed out
//! as they arrive, each naming the owner of its lease.
//!
//! One connection serves every disk of a host. A request may name its owner (a disk); the
//! lease of the map it is granted is then remembered as that owner's, and recalls of the
//! lease say so. The reader registers the lease before it reads the next frame, and the
//! server sends a grant before any recall of it, so no recall can outrun its owner's record.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::{select, Either};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::{ConnReader, Frame, Key, ProtoError, Reply, Request};

/// The server wants a lease back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recall {
    pub lease: u64,
    pub reason: String,
    /// Who asked for the lease (see [`MapClient::call_as`]); `None` if nobody named one or
    /// the lease was already given back.
    pub owner: Option<u64>,
}

/// Where a call's answer goes.
type Waiter = oneshot::Sender<Result<Reply, ProtoError>>;

#[derive(Default)]
struct Book {
    /// Waiting callers by request id, with the owner they asked as.
    pending: HashMap<u64, (Waiter, Option<u64>)>,
    /// Owner of each lease granted to a named owner and not given back.
    owners: HashMap<u64, u64>,
    /// Why the connection ended, once it has.
    lost: Option<String>,
}

pub struct MapClient {
    /// Frames for the writer task: sending never waits, so it works from `Drop` too.
    outbox: mpsc::UnboundedSender<Frame>,
    book: Arc<Mutex<Book>>,
    next_id: AtomicU64,
    alive: Alive,
}

/// Whether a connection still stands, cheap enough to ask before every direct I/O: it turns
/// false the moment the connection's reader sees it end, before any waiting call or owner
/// hears of it.
#[derive(Clone, Debug)]
pub struct Alive(Arc<AtomicBool>);

impl Alive {
    pub fn is_alive(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands replies to their callers and recalls to `recalls` until a frame cannot be read.
async fn receive(
    reader: &mut ConnReader<TcpStream>,
    book: &Mutex<Book>,
    recalls: &mpsc::UnboundedSender<Recall>,
) -> ProtoError {
    loop {
        match reader.recv().await {
            Ok(Frame::Reply { id, reply }) => {
                let mut b = lock(book);
                if let Some((waiter, owner)) = b.pending.remove(&id) {
                    if let (Reply::Map(m), Some(owner)) = (&reply, owner) {
                        b.owners.insert(m.lease, owner);
                    }
                    let _ = waiter.send(Ok(reply));
                }
            }
            Ok(Frame::Recall { lease, reason }) => {
                let owner = lock(book).owners.get(&lease).copied();
                let _ = recalls.send(Recall {
                    lease,
                    reason,
                    owner,
                });
            }
            Ok(other) => tracing::warn!("map client: ignored frame {other:?}"),
            Err(e) => return e,
        }
    }
}

impl MapClient {
    /// Connects to the map server at `addr` and authenticates as `host`. Recalls arrive on
    /// the returned channel; it closes when the connection does. Dropping the client closes
    /// the connection (the server then drops every lease it held).
    ///
    /// Any frame that fails authentication or breaks the protocol's bounds ends the
    /// connection: every waiting call fails with [`ProtoError::Lost`], every lease is
    /// forgotten, and the recall channel closes.
    pub async fn connect(
        addr: &str,
        key: &Key,
        host: &str,
    ) -> Result<(MapClient, mpsc::UnboundedReceiver<Recall>), ProtoError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let conn = crate::connect(stream, key, host).await?;
        let book: Arc<Mutex<Book>> = Arc::default();
        let (recalls, recalled) = mpsc::unbounded_channel();
        let (outbox, mut outgoing) = mpsc::unbounded_channel::<Frame>();
        let (send_failed, sending_failed) = oneshot::channel::<ProtoError>();
        let mut writer = conn.writer;
        let sending = tokio::spawn(async move {
            while let Some(f) = outgoing.recv().await {
                if let Err(e) = writer.send(&f).await {
                    let _ = send_failed.send(e);
                    return;
                }
            }
            let _ = writer.close().await;
        });
        let mut reader = conn.reader;
        let replies = book.clone();
        let alive = Alive(Arc::default());
        let lost_flag = alive.0.clone();
        tokio::spawn(async move {
            // A request that cannot go out would never be answered: that ends the
            // connection as surely as a bad frame coming in.
            let send_failed = async move {
                match sending_failed.await {
                    Ok(e) => e,
                    // The client was dropped and the writer closed: read until the server
                    // closes too.
                    Err(_) => std::future::pending().await,
                }
            };
            let receiving = receive(&mut reader, &replies, &recalls);
            let e = match select(pin!(receiving), pin!(send_failed)).await {
                Either::Left((e, _)) | Either::Right((e, _)) => e,
            };
            if !matches!(e, ProtoError::Closed) {
                tracing::warn!("map connection dropped: {e}");
            }
            // First of all: no direct I/O may start under this connection's grants now.
            lost_flag.store(true, Ordering::Release);
            // Nothing more goes out either: the connection is dropped as a whole, and the
            // server sees it end and takes back this host's leases.
            sending.abort();
            let why = e.to_string();
            let mut b = lock(&replies);
            for (_, (waiter, _)) in b.pending.drain() {
                let _ = waiter.send(Err(ProtoError::Lost(why.clone())));
            }
            b.owners.clear();
            b.lost = Some(why);
            drop(b);
            // Only now, with every grant forgotten here: the owners hear the connection is gone.
            drop(recalls);
        });
        Ok((
            MapClient {
                outbox,
                book,
                next_id: AtomicU64::new(1),
                alive,
            },
            recalled,
        ))
    }

    /// Whether the server closed the connection, or it broke.
    pub fn is_closed(&self) -> bool {
        !self.alive.is_alive() || self.outbox.is_closed()
    }

    /// A handle that tells whether this connection still stands (for grants made on it).
    pub fn alive(&self) -> Alive {
        self.alive.clone()
    }

    /// Sends `request` and waits for its reply.
    pub async fn call(&self, request: Request) -> Result<Reply, ProtoError> {
        self.call_as(None, request).await
    }

    /// Sends `request` on behalf of `owner` and waits for its reply: a lease granted to it
    /// is recalled with `owner` named.
    pub async fn call_as(&self, owner: Option<u64>, request: Request) -> Result<Reply, ProtoError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut b = lock(&self.book);
            // Checked under the lock the reader takes to fail waiters, so no call can wait
            // on a connection that is already gone.
            if let Some(why) = &b.lost {
                return Err(ProtoError::Lost(why.clone()));
            }
            if let Request::Return { lease } = &request {
                b.owners.remove(lease);
            }
            b.pending.insert(id, (tx, owner));
        }
        if self.outbox.send(Frame::Request { id, request }).is_err() {
            lock(&self.book).pending.remove(&id);
            return Err(ProtoError::Closed);
        }
        rx.await.map_err(|_| ProtoError::Closed)?
    }

    /// Returns `lease` without waiting for the answer: for owners going away, and for
    /// recalls of leases nobody here uses any more.
    pub fn give_back(&self, lease: u64) {
        lock(&self.book).owners.remove(&lease);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.outbox.send(Frame::Request {
            id,
            request: Request::Return { lease },
        });
    }
}
