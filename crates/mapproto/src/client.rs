//! The host side of a map connection: requests matched to replies by id, recalls handed out
//! as they arrive, each naming the owner of its lease.
//!
//! One connection serves every disk of a host. A request may name its owner (a disk); the
//! lease of the map it is granted is then remembered as that owner's, and recalls of the
//! lease say so. The reader registers the lease before it reads the next frame, and the
//! server sends a grant before any recall of it, so no recall can outrun its owner's record.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock;
use crate::{ConnReader, Frame, Key, ProtoError, Reply, Request};

/// The server wants a lease back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recall {
    pub lease: u64,
    pub reason: String,
    /// Who asked for the lease (see [`MapClient::call_as`]); `None` if nobody named one or
    /// the lease was already given back.
    pub owner: Option<u64>,
    /// No direct I/O under the lease after this time ([`clock::now`]), whatever renewals come
    /// later: how long the connection's leases were valid when the recall arrived. Every
    /// renewal counted in it was answered before the server sent the recall, so the server,
    /// which waits a lease time after recalling before it gives the blocks to anyone else,
    /// never waits less than this.
    pub deadline: Duration,
}

/// Until when the leases of one connection may be used: renewed by every answered request
/// (a lease time after the request was sent), and over at once when the connection ends.
/// Cheap enough to ask before every direct I/O (one atomic load).
#[derive(Clone, Debug)]
pub struct Validity(Arc<AtomicU64>);

/// The value of a connection that ended: nothing is valid under it any more, ever.
const LOST: u64 = 0;

fn nanos(t: Duration) -> u64 {
    u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)
}

impl Validity {
    /// Valid until `until` ([`clock::now`] time), then renewed by [`Validity::renew`].
    pub fn new(until: Duration) -> Validity {
        Validity(Arc::new(AtomicU64::new(nanos(until).max(LOST + 1))))
    }

    /// Whether leases under it may be used at `now`.
    pub fn valid_at(&self, now: Duration) -> bool {
        nanos(now) < self.0.load(Ordering::Acquire)
    }

    /// The end of the current validity.
    pub fn until(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Acquire))
    }

    /// Whether the connection ended.
    pub fn is_lost(&self) -> bool {
        self.0.load(Ordering::Acquire) == LOST
    }

    /// Extends the validity to `until`, unless it is later already or the connection ended.
    pub fn renew(&self, until: Duration) {
        let until = nanos(until);
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v != LOST && until > v).then_some(until)
            });
    }

    /// Ends it for good.
    pub fn lose(&self) {
        self.0.store(LOST, Ordering::Release);
    }
}

/// Where a call's answer goes.
type Waiter = oneshot::Sender<Result<Reply, ProtoError>>;

/// A call waiting for its reply.
struct Pending {
    waiter: Waiter,
    /// The owner it was asked for.
    owner: Option<u64>,
    /// When it was sent: a reply renews the validity from here, never from its arrival.
    sent: Duration,
}

#[derive(Default)]
struct Book {
    /// Waiting callers by request id.
    pending: HashMap<u64, Pending>,
    /// Owner of each lease granted to a named owner and not given back.
    owners: HashMap<u64, u64>,
    /// The server's lease time, once a renewal told it.
    lease_time: Option<Duration>,
    /// Why the connection ended, once it has.
    lost: Option<String>,
}

/// What the client and its tasks share.
struct Inner {
    /// Frames for the writer task: sending never waits, so it works from `Drop` too.
    outbox: mpsc::UnboundedSender<Frame>,
    book: Arc<Mutex<Book>>,
    next_id: AtomicU64,
    validity: Validity,
    /// Ends the connection from this side (its leases ran out unrenewed).
    hang_up: Arc<Notify>,
}

pub struct MapClient {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends a return of `lease` without waiting for the answer.
fn send_return(outbox: &mpsc::UnboundedSender<Frame>, next_id: &AtomicU64, lease: u64) {
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let _ = outbox.send(Frame::Request {
        id,
        request: Request::Return { lease },
    });
}

/// Hands replies to their callers and recalls to `recalls` until a frame cannot be read.
async fn receive(
    reader: &mut ConnReader<TcpStream>,
    inner: &Weak<Inner>,
    book: &Mutex<Book>,
    validity: &Validity,
    recalls: &mpsc::UnboundedSender<Recall>,
) -> ProtoError {
    loop {
        match reader.recv().await {
            Ok(Frame::Reply { id, reply }) => {
                let mut b = lock(book);
                let Some(p) = b.pending.remove(&id) else {
                    continue;
                };
                if let Reply::Renewed { lease_time_ms } = &reply {
                    b.lease_time = Some(Duration::from_millis(*lease_time_ms));
                }
                if let Some(t) = b.lease_time {
                    validity.renew(p.sent + t);
                }
                let granted = match &reply {
                    Reply::Map(m) => Some(m.lease),
                    _ => None,
                };
                if let (Some(lease), Some(owner)) = (granted, p.owner) {
                    b.owners.insert(lease, owner);
                }
                if p.waiter.send(Ok(reply)).is_err() {
                    // The caller gave up waiting (its deadline passed): nobody will use
                    // a lease granted now, so it goes straight back.
                    if let (Some(lease), Some(i)) = (granted, inner.upgrade()) {
                        b.owners.remove(&lease);
                        send_return(&i.outbox, &i.next_id, lease);
                    }
                }
            }
            Ok(Frame::Recall { lease, reason }) => {
                let owner = lock(book).owners.get(&lease).copied();
                let _ = recalls.send(Recall {
                    lease,
                    reason,
                    owner,
                    deadline: validity.until(),
                });
            }
            Ok(other) => tracing::warn!("map client: ignored frame {other:?}"),
            Err(e) => return e,
        }
    }
}

/// TCP keepalive on the map connection: a peer that vanished (power loss, a cable pulled)
/// ends the connection in seconds even while no request is outstanding.
fn keep_tcp_alive(stream: &TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

impl MapClient {
    /// Connects to the map server at `addr` and authenticates as `host`. Recalls arrive on
    /// the returned channel; it closes when the connection does. Dropping the client closes
    /// the connection (the server then gives its leases to others after the lease time).
    ///
    /// Any frame that fails authentication or breaks the protocol's bounds ends the
    /// connection: every waiting call fails with [`ProtoError::Lost`], every lease is
    /// forgotten, and the recall channel closes. Leases are valid only once
    /// [`MapClient::keep_alive`] has learnt the server's lease time.
    pub async fn connect(
        addr: &str,
        key: &Key,
        host: &str,
    ) -> Result<(MapClient, mpsc::UnboundedReceiver<Recall>), ProtoError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        keep_tcp_alive(&stream)?;
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
        let inner = Arc::new(Inner {
            outbox,
            book: book.clone(),
            next_id: AtomicU64::new(1),
            validity: Validity::new(Duration::ZERO),
            hang_up: Arc::default(),
        });
        let mut reader = conn.reader;
        let (validity, hang_up, weak) = (
            inner.validity.clone(),
            inner.hang_up.clone(),
            Arc::downgrade(&inner),
        );
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
            let hung_up = async move {
                hang_up.notified().await;
                ProtoError::Lost("the leases ran out unrenewed".into())
            };
            let e = tokio::select! {
                e = receive(&mut reader, &weak, &book, &validity, &recalls) => e,
                e = send_failed => e,
                e = hung_up => e,
            };
            if !matches!(e, ProtoError::Closed) {
                tracing::warn!("map connection dropped: {e}");
            }
            // First of all: no direct I/O may start under this connection's grants now.
            validity.lose();
            // Nothing more goes out either: the connection is dropped as a whole.
            sending.abort();
            let why = e.to_string();
            let mut b = lock(&book);
            for (_, p) in b.pending.drain() {
                let _ = p.waiter.send(Err(ProtoError::Lost(why.clone())));
            }
            b.owners.clear();
            b.lost = Some(why);
            drop(b);
            // Only now, with every grant forgotten here: the owners hear the connection is gone.
            drop(recalls);
        });
        Ok((MapClient { inner }, recalled))
    }

    /// Whether the server closed the connection, or it broke.
    pub fn is_closed(&self) -> bool {
        self.inner.validity.is_lost() || self.inner.outbox.is_closed()
    }

    /// Until when this connection's leases may be used (for grants made on it).
    pub fn validity(&self) -> Validity {
        self.inner.validity.clone()
    }

    /// Renews now, learning the server's lease time, and then every third of it, each
    /// renewal waiting at most `timeout`. Once the leases ran out with no renewal answered,
    /// the connection is closed (the host dials again). Returns the lease time.
    pub async fn keep_alive(&self, timeout: Duration) -> Result<Duration, ProtoError> {
        let lease_time = match self.call_within(timeout, None, Request::Renew).await? {
            Reply::Renewed { lease_time_ms } => Duration::from_millis(lease_time_ms),
            other => {
                return Err(ProtoError::Unexpected(format!(
                    "asked to renew the leases, got {other:?}"
                )))
            }
        };
        // Weak: the heartbeat must not keep a dropped client's connection open.
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease_time / 3).await;
                let Some(i) = inner.upgrade() else { return };
                let renewed = tokio::time::timeout(timeout, i.call_as(None, Request::Renew)).await;
                match renewed {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return,
                    Err(_) if i.validity.valid_at(clock::now()) => {
                        tracing::warn!("map server did not answer a renewal in {timeout:?}");
                    }
                    Err(_) => {
                        i.hang_up.notify_one();
                        return;
                    }
                }
            }
        });
        Ok(lease_time)
    }

    /// Sends `request` and waits for its reply.
    pub async fn call(&self, request: Request) -> Result<Reply, ProtoError> {
        self.inner.call_as(None, request).await
    }

    /// Sends `request` on behalf of `owner` and waits for its reply: a lease granted to it
    /// is recalled with `owner` named.
    pub async fn call_as(&self, owner: Option<u64>, request: Request) -> Result<Reply, ProtoError> {
        self.inner.call_as(owner, request).await
    }

    /// [`MapClient::call_as`] that gives up after `timeout` with [`ProtoError::TimedOut`]. A
    /// map granted after that is returned as it arrives.
    pub async fn call_within(
        &self,
        timeout: Duration,
        owner: Option<u64>,
        request: Request,
    ) -> Result<Reply, ProtoError> {
        tokio::time::timeout(timeout, self.inner.call_as(owner, request))
            .await
            .map_err(|_| ProtoError::TimedOut(timeout))?
    }

    /// Returns `lease` without waiting for the answer: for owners going away, and for
    /// recalls of leases nobody here uses any more.
    pub fn give_back(&self, lease: u64) {
        lock(&self.inner.book).owners.remove(&lease);
        send_return(&self.inner.outbox, &self.inner.next_id, lease);
    }
}

impl Inner {
    async fn call_as(&self, owner: Option<u64>, request: Request) -> Result<Reply, ProtoError> {
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
            let sent = clock::now();
            b.pending.insert(
                id,
                Pending {
                    waiter: tx,
                    owner,
                    sent,
                },
            );
        }
        if self.outbox.send(Frame::Request { id, request }).is_err() {
            lock(&self.book).pending.remove(&id);
            return Err(ProtoError::Closed);
        }
        rx.await.map_err(|_| ProtoError::Closed)?
    }
}
