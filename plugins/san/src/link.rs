//! One map connection per host and map server, shared by every san disk that names them.
//!
//! The server knows a host by its connection: leases, recalls and the identity token belong
//! to it. Each disk joins the link as a [`Member`]; its map requests name it as the owner, so
//! a recall reaches the disk holding the lease and no other. When the connection is lost
//! every member hears of it (their grants died with it); the next member that needs the
//! server dials again, at most once per [`RETRY_AFTER`] while dialing fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use twinpath_core::{lock, WeakMap};
use twinpath_mapproto::{Key, MapClient, Recall, Reply, Request, VolumeIdentity};

use crate::state::RETRY_AFTER;

/// What a member hears from the link.
#[derive(Debug)]
pub enum Event {
    /// The server wants this lease of the member back.
    Recall(Recall),
    /// The connection is gone, and every lease of it with it.
    Lost(String),
}

/// Why there is no map connection: the last dial's failure, kept (and cloned to every disk
/// that asks) until the next dial may be tried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("map server {addr}: {failure}")]
pub struct DialError {
    pub addr: String,
    pub failure: DialFailure,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DialFailure {
    #[error("no answer in {0:?}")]
    NoAnswer(Duration),
    /// The connection, the handshake or a request failed; the client's words for it.
    #[error("{0}")]
    Failed(String),
    #[error("asked for the volume identity, got {0}")]
    UnexpectedReply(String),
    #[error("first renewal: {0}")]
    FirstRenewal(String),
}

/// A live connection and what the server said about its volume on it.
#[derive(Clone)]
pub struct Connected {
    pub client: Arc<MapClient>,
    pub identity: VolumeIdentity,
    /// Counts connections of one link; a member re-checks its LUN when this changes (the
    /// server writes a new token file for each of its runs).
    pub generation: u64,
}

#[derive(Default)]
struct Dialer {
    /// When the last dial failed, and why.
    failed: Option<(Instant, DialError)>,
    generation: u64,
}

type Members = Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>;

pub struct MapLink {
    addr: String,
    key: Key,
    host: String,
    current: Mutex<Option<Connected>>,
    /// One dial at a time.
    dialer: tokio::sync::Mutex<Dialer>,
    members: Arc<Members>,
    next_member: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct LinkKey {
    addr: String,
    host: String,
    key: Key,
}

/// The map server connections of one daemon's disks (kept in its open context).
pub(crate) type Links = WeakMap<LinkKey, MapLink>;

impl MapLink {
    /// The link of this host to the map server at `addr`, shared while any disk holds it.
    pub fn shared(links: &Links, addr: &str, key: Key, host: &str) -> Arc<MapLink> {
        let id = LinkKey {
            addr: addr.to_owned(),
            host: host.to_owned(),
            key,
        };
        let (addr, key, host) = (id.addr.clone(), id.key.clone(), id.host.clone());
        links
            .get_or_insert_with(id, || {
                Arc::new(MapLink {
                    addr,
                    key,
                    host,
                    current: Mutex::default(),
                    dialer: tokio::sync::Mutex::default(),
                    members: Arc::default(),
                    next_member: AtomicU64::new(1),
                })
            })
            .0
    }

    /// Joins the link: events for the new member arrive on the returned channel.
    pub fn join(self: &Arc<Self>) -> (Member, mpsc::UnboundedReceiver<Event>) {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.members).insert(id, tx);
        (
            Member {
                link: self.clone(),
                id,
            },
            rx,
        )
    }

    fn live(&self) -> Option<Connected> {
        lock(&self.current)
            .as_ref()
            .filter(|c| !c.client.is_closed())
            .cloned()
    }

    /// The live connection, without dialing.
    pub fn current(&self) -> Option<Arc<MapClient>> {
        self.live().map(|c| c.client)
    }

    /// The live connection, dialing if there is none and the last failure is old enough;
    /// each step of a dial (connect and authenticate, identity, first renewal) waits at most
    /// `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Connected, DialError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let mut d = self.dialer.lock().await;
        // Someone else may have dialed while this waited.
        if let Some(c) = self.live() {
            return Ok(c);
        }
        if let Some((at, why)) = &d.failed {
            if at.elapsed() < RETRY_AFTER {
                return Err(why.clone());
            }
        }
        match self.dial(timeout).await {
            Ok((client, identity, recalls)) => {
                d.generation += 1;
                d.failed = None;
                let c = Connected {
                    client: Arc::new(client),
                    identity,
                    generation: d.generation,
                };
                *lock(&self.current) = Some(c.clone());
                self.route(&c.client, recalls);
                tracing::info!(
                    map_server = self.addr,
                    host = self.host,
                    "map connection up"
                );
                Ok(c)
            }
            Err(failure) => {
                let why = DialError {
                    addr: self.addr.clone(),
                    failure,
                };
                d.failed = Some((Instant::now(), why.clone()));
                Err(why)
            }
        }
    }

    async fn dial(
        &self,
        timeout: Duration,
    ) -> Result<(MapClient, VolumeIdentity, mpsc::UnboundedReceiver<Recall>), DialFailure> {
        // Requests that need a map wait for this; an unreachable server must not hold them
        // for the kernel's TCP connect timeout.
        let (client, recalls) = tokio::time::timeout(
            timeout,
            MapClient::connect(&self.addr, &self.key, &self.host),
        )
        .await
        .map_err(|_| DialFailure::NoAnswer(timeout))?
        .map_err(|e| DialFailure::Failed(e.to_string()))?;
        let id = match client
            .call_within(timeout, None, Request::Identity)
            .await
            .map_err(|e| DialFailure::Failed(e.to_string()))?
        {
            Reply::Identity(id) => id,
            other => return Err(DialFailure::UnexpectedReply(format!("{other:?}"))),
        };
        let lease_time = client
            .keep_alive(timeout)
            .await
            .map_err(|e| DialFailure::FirstRenewal(e.to_string()))?;
        tracing::debug!(map_server = self.addr, ?lease_time, "leases renewed");
        Ok((client, id, recalls))
    }

    /// Hands each recall to the member owning its lease (a lease nobody owns any more goes
    /// straight back); tells every member when the connection ends.
    fn route(&self, client: &Arc<MapClient>, mut recalls: mpsc::UnboundedReceiver<Recall>) {
        let members = Arc::downgrade(&self.members);
        let client = Arc::downgrade(client);
        tokio::spawn(async move {
            while let Some(r) = recalls.recv().await {
                let Some(members) = members.upgrade() else {
                    return;
                };
                let owner = r.owner.and_then(|o| lock(&members).get(&o).cloned());
                let lease = r.lease;
                match owner {
                    Some(tx) if tx.send(Event::Recall(r)).is_ok() => {}
                    _ => {
                        if let Some(c) = client.upgrade() {
                            c.give_back(lease);
                        }
                    }
                }
            }
            if let Some(members) = members.upgrade() {
                for tx in lock(&members).values() {
                    let _ = tx.send(Event::Lost("map server connection lost".into()));
                }
            }
        });
    }
}

/// A disk's place on a link; leaving it (dropping) returns nothing by itself: the disk gives
/// its leases back first.
pub struct Member {
    pub link: Arc<MapLink>,
    pub id: u64,
}

impl Drop for Member {
    fn drop(&mut self) {
        lock(&self.link.members).remove(&self.id);
    }
}
