//! The lease table: who may use which file's blocks, keyed by inode.
//!
//! A map request reserves its lease *before* any blocking map work, in the same critical
//! section that checks for conflicts, so two requests can never both win; the grant goes out
//! only if nothing recalled the reservation while the map was being made. Keyed by (device,
//! inode): a hard link or another name of a leased file conflicts like the same path.
//!
//! Lease time: a granted lease stays its host's, even after its connection is gone, until
//! [`Leases::hold`] has passed since the server last heard from the connection, or since it
//! recalled the lease; only then may anyone else get its blocks. A host stops using its
//! leases a lease time after it sent its last answered request (or at the recall), which is
//! never later.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use twinpath_mapproto::Frame;

use crate::export::Inode;

pub struct Lease {
    pub conn: u64,
    pub host: Arc<str>,
    /// The name the host used when it asked (for people reading /leases and logs).
    pub path: String,
    pub inode: Inode,
    /// The file as opened for this lease: cache drops act on it, not on a name.
    pub file: Arc<File>,
    pub write: bool,
    /// Sent to the host. Until then it is a reservation that blocks conflicting requests.
    pub granted: bool,
    /// Asked back (or, while reserved, overtaken: the grant will not be sent).
    pub recalled: bool,
    /// When a granted lease was asked back: its hold runs from here.
    pub recalled_at: Option<Instant>,
    pub since: SystemTime,
}

/// A lease as `/leases` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub host: String,
    /// `read` or `write`.
    pub mode: String,
    /// Seconds since the Unix epoch when it was granted.
    pub since: u64,
}

/// Leases one connection may hold at once: a window of 64 MiB each, so 4 TiB of images
/// mapped at the same time; beyond that a host is refused, not the server's memory taken.
pub const MAX_LEASES_PER_CONN: usize = 65536;

/// Why a reservation was not made.
pub enum Denied {
    /// Other hosts hold conflicting leases (recalled now).
    Conflict(Vec<Arc<str>>),
    /// The connection holds [`MAX_LEASES_PER_CONN`] already.
    TooMany,
}

/// A host's connection as the lease table sees it.
pub struct Conn {
    /// Where to push frames (recalls); `None` once the connection is gone.
    pub outbox: Option<mpsc::Sender<Frame>>,
    /// When the server last read a request from it: every request renews its leases.
    pub heard: Instant,
    /// Ends the connection from the server's side.
    hang_up: Arc<Notify>,
    /// Its host was preempted on the LUN without its commands aborted: not fenced again,
    /// its leases are waited out.
    preempted: bool,
}

pub struct Leases {
    /// How long a silent host's or a recalled lease is kept from others: the lease time and
    /// a margin for clock rates and direct I/O already on its way to the device.
    pub hold: Duration,
    next: u64,
    by_id: HashMap<u64, Lease>,
    /// Every connection that is up or still has leases.
    pub conns: HashMap<u64, Conn>,
    /// One open file per inode and access, shared by its leases: descriptors grow with the
    /// files leased, not with the leases (a host maps one image in many windows).
    files: HashMap<(Inode, bool), Weak<File>>,
}

impl Leases {
    pub fn new(hold: Duration) -> Leases {
        Leases {
            hold,
            next: 0,
            by_id: HashMap::new(),
            conns: HashMap::new(),
            files: HashMap::new(),
        }
    }

    /// A connection came up, with recalls going to `outbox`. The connection must end when
    /// the returned notification comes: the host's leases are being taken from it, and it
    /// must hear so before it can renew anything again.
    pub fn connect(&mut self, conn: u64, outbox: mpsc::Sender<Frame>) -> Arc<Notify> {
        let hang_up = Arc::new(Notify::new());
        self.conns.insert(
            conn,
            Conn {
                outbox: Some(outbox),
                heard: Instant::now(),
                hang_up: hang_up.clone(),
                preempted: false,
            },
        );
        hang_up
    }

    /// Ends connection `conn` (as seen from here: no more recalls go out on it).
    fn hang_up(&mut self, conn: u64, why: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.outbox.take().is_some() {
                tracing::warn!(conn, "closing a host's map connection: {why}");
                c.hang_up.notify_one();
            }
        }
    }

    /// The server read a request from `conn`: its leases are renewed. False once the
    /// connection was hung up: nothing it asks may be answered any more (its leases may be
    /// someone else's already, and an answer would renew them on the host).
    pub fn heard(&mut self, conn: u64) -> bool {
        match self.conns.get_mut(&conn) {
            Some(c) if c.outbox.is_some() => {
                c.heard = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Whether `conn` is up (not hung up, not gone).
    pub fn is_up(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.outbox.is_some())
    }

    /// Connections up (hosts connected).
    pub fn connected(&self) -> usize {
        self.conns.values().filter(|c| c.outbox.is_some()).count()
    }

    /// Whether granted lease `l` is past its hold at `now`: its host stopped using it.
    fn expired(&self, l: &Lease, now: Instant) -> bool {
        let past = |t: Instant| now.saturating_duration_since(t) >= self.hold;
        l.granted
            && (l.recalled_at.is_some_and(past)
                || self.conns.get(&l.conn).is_none_or(|c| past(c.heard)))
    }

    /// Takes out every lease past its hold, and forgets connections that are gone and hold
    /// nothing. A connection silent for the hold is closed first: a host that resumes must
    /// not renew leases that were taken from it. Returns the leases, for their files to be
    /// released.
    pub fn expire(&mut self, now: Instant) -> Vec<Lease> {
        let silent: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.outbox.is_some() && now.saturating_duration_since(c.heard) >= self.hold
            })
            .map(|(&id, _)| id)
            .collect();
        for conn in silent {
            let why = format!("nothing heard from the host in {:?}", self.hold);
            self.hang_up(conn, &why);
        }
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, l)| self.expired(l, now))
            .map(|(&id, _)| id)
            .collect();
        let gone: Vec<Lease> = ids.iter().filter_map(|id| self.by_id.remove(id)).collect();
        for (id, l) in ids.iter().zip(&gone) {
            tracing::warn!(lease = id, host = %l.host, path = ?l.path, recalled = l.recalled_at.is_some(),
                "lease taken back: its host did not return it or renew within {:?}", self.hold);
        }
        let by_id = &self.by_id;
        self.conns
            .retain(|&id, c| c.outbox.is_some() || by_id.values().any(|l| l.conn == id));
        gone
    }

    /// Reserves `lease` unless another connection holds a conflicting one (any lease against
    /// a write, a write lease against a read): then recalls those and returns their holders.
    /// Returns the reservation's id and the file it uses (an already open one of the inode
    /// where there is one).
    pub fn reserve(&mut self, mut lease: Lease) -> Result<(u64, Arc<File>), Denied> {
        let (inode, conn, write) = (lease.inode, lease.conn, lease.write);
        let (holders, _) = self.recall(
            |l| l.inode == inode && l.conn != conn && (write || l.write),
            "another host asked for the file",
        );
        if !holders.is_empty() {
            return Err(Denied::Conflict(holders));
        }
        if self.by_id.values().filter(|l| l.conn == conn).count() >= MAX_LEASES_PER_CONN {
            return Err(Denied::TooMany);
        }
        let key = (inode, write);
        match self.files.get(&key).and_then(Weak::upgrade) {
            Some(open) => lease.file = open,
            None => {
                self.files.retain(|_, f| f.strong_count() > 0);
                self.files.insert(key, Arc::downgrade(&lease.file));
            }
        }
        let file = lease.file.clone();
        self.next += 1;
        self.by_id.insert(self.next, lease);
        Ok((self.next, file))
    }

    /// Turns reservation `id` into a grant, unless it was recalled or dropped meanwhile
    /// (a recalled one is removed and returned, for its cache to be dropped).
    pub fn grant(&mut self, id: u64) -> Result<&Lease, Option<Lease>> {
        match self.by_id.get(&id).map(|l| l.recalled) {
            None => Err(None),
            Some(true) => Err(self.by_id.remove(&id)),
            Some(false) => {
                let l = self.by_id.get_mut(&id).expect("present");
                l.granted = true;
                l.since = SystemTime::now();
                Ok(l)
            }
        }
    }

    /// Asks back every lease `pred` selects: granted ones get a recall, reservations are
    /// marked so that they are never granted. Returns the hosts holding selected leases and
    /// how many recalls were sent.
    pub fn recall(&mut self, pred: impl Fn(&Lease) -> bool, reason: &str) -> (Vec<Arc<str>>, u64) {
        let mut holders = Vec::new();
        let mut sent = 0;
        let mut unsent = Vec::new();
        for (&id, lease) in self.by_id.iter_mut() {
            if !pred(lease) {
                continue;
            }
            holders.push(lease.host.clone());
            if lease.recalled {
                continue;
            }
            lease.recalled = true;
            if !lease.granted {
                continue;
            }
            lease.recalled_at = Some(Instant::now());
            tracing::info!(lease = id, host = %lease.host, path = ?lease.path, "recalling lease: {reason}");
            if let Some(outbox) = self.conns.get(&lease.conn).and_then(|c| c.outbox.as_ref()) {
                let recall = Frame::Recall {
                    lease: id,
                    reason: reason.to_owned(),
                };
                match outbox.try_send(recall) {
                    Ok(()) => sent += 1,
                    // A recall that cannot be queued ahead of the host's next renewal would
                    // let the host go on using the lease after it was taken back: the
                    // connection ends instead, and the host stops at its lease time.
                    Err(e) => {
                        tracing::warn!(lease = id, host = %lease.host, "recall not sent: {e}");
                        unsent.push(lease.conn);
                    }
                }
            }
        }
        for conn in unsent {
            self.hang_up(conn, "a recall could not be queued");
        }
        holders.sort();
        holders.dedup();
        (holders, sent)
    }

    /// The granted lease `id` if connection `conn` holds it.
    pub fn held(&self, id: u64, conn: u64) -> Option<&Lease> {
        self.by_id.get(&id).filter(|l| l.conn == conn && l.granted)
    }

    pub fn remove(&mut self, id: u64) -> Option<Lease> {
        self.by_id.remove(&id)
    }

    /// Connections whose host must be fenced before its leases can go to others: gone, or
    /// holding a lease recalled more than `deadline` ago. With the host of each.
    pub fn fence_due(&self, now: Instant, deadline: Duration) -> Vec<(u64, Arc<str>)> {
        let mut due: Vec<(u64, Arc<str>)> = self
            .by_id
            .values()
            .filter(|l| l.granted)
            .filter(|l| {
                let conn = self.conns.get(&l.conn);
                if conn.is_some_and(|c| c.preempted) {
                    return false;
                }
                let gone = conn.is_none_or(|c| c.outbox.is_none());
                let overdue = l
                    .recalled_at
                    .is_some_and(|r| now.saturating_duration_since(r) >= deadline);
                gone || overdue
            })
            .map(|l| (l.conn, l.host.clone()))
            .collect();
        due.sort();
        due.dedup();
        due
    }

    /// Connection `conn`'s host was fenced: the connection ends (the host registers again
    /// when it reconnects) and every lease of it is returned, for release.
    pub fn fenced(&mut self, conn: u64) -> Vec<Lease> {
        self.hang_up(conn, "its host was fenced");
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, l)| l.conn == conn)
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.by_id.remove(&id))
            .collect()
    }

    /// Connection `conn`'s host was preempted without its commands aborted: the connection
    /// ends, and its leases stay until their hold passes (a write the target had accepted may
    /// still land until then).
    pub fn preempted(&mut self, conn: u64) {
        self.hang_up(conn, "its host was preempted on the LUN");
        if let Some(c) = self.conns.get_mut(&conn) {
            c.preempted = true;
        }
    }

    /// Connection `conn` is gone: its reservations are dropped (returned, to be released);
    /// its granted leases stay until their hold passes, since the host may not know yet.
    /// Returns the files of its write leases too, for their cached pages to be dropped now.
    pub fn disconnect(&mut self, conn: u64) -> (Vec<Lease>, Vec<Arc<File>>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbox = None;
        }
        let ids: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, l)| l.conn == conn && !l.granted)
            .map(|(&id, _)| id)
            .collect();
        let dropped = ids
            .into_iter()
            .filter_map(|id| self.by_id.remove(&id))
            .collect();
        let written = self
            .by_id
            .values()
            .filter(|l| l.conn == conn && l.write)
            .map(|l| l.file.clone())
            .collect();
        (dropped, written)
    }

    /// Whether any lease or reservation refers to `inode`.
    pub fn refers_to(&self, inode: Inode) -> bool {
        self.by_id.values().any(|l| l.inode == inode)
    }

    /// Granted leases, oldest first.
    pub fn list(&self) -> Vec<LeaseInfo> {
        let mut out: Vec<LeaseInfo> = self
            .by_id
            .values()
            .filter(|l| l.granted)
            .map(|l| LeaseInfo {
                path: l.path.clone(),
                dev: l.inode.dev,
                ino: l.inode.ino,
                host: l.host.to_string(),
                mode: if l.write { "write" } else { "read" }.to_owned(),
                since: l
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect();
        out.sort_by(|a, b| (a.since, &a.path).cmp(&(b.since, &b.path)));
        out
    }

    /// Granted leases by mode: (read, write).
    pub fn counts(&self) -> (u64, u64) {
        self.by_id
            .values()
            .filter(|l| l.granted)
            .fold(
                (0, 0),
                |(r, w), l| if l.write { (r, w + 1) } else { (r + 1, w) },
            )
    }
}
