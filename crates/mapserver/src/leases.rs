//! The lease table: who may use which file's blocks, keyed by inode.
//!
//! A map request reserves its lease *before* any blocking map work, in the same critical
//! section that checks for conflicts, so two requests can never both win; the grant goes out
//! only if nothing recalled the reservation while the map was being made. Keyed by (device,
//! inode): a hard link or another name of a leased file conflicts like the same path.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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

#[derive(Default)]
pub struct Leases {
    next: u64,
    by_id: HashMap<u64, Lease>,
    /// Where to push frames (recalls) for each connected host.
    pub outboxes: HashMap<u64, mpsc::Sender<Frame>>,
    /// One open file per inode and access, shared by its leases: descriptors grow with the
    /// files leased, not with the leases (a host maps one image in many windows).
    files: HashMap<(Inode, bool), Weak<File>>,
}

impl Leases {
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
            tracing::info!(lease = id, host = %lease.host, path = ?lease.path, "recalling lease: {reason}");
            if let Some(outbox) = self.outboxes.get(&lease.conn) {
                let recall = Frame::Recall {
                    lease: id,
                    reason: reason.to_owned(),
                };
                match outbox.try_send(recall) {
                    Ok(()) => sent += 1,
                    // A host that reads nothing holds its leases until its connection ends.
                    Err(e) => {
                        tracing::warn!(lease = id, host = %lease.host, "recall not sent: {e}")
                    }
                }
            }
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

    /// Drops every lease and reservation of connection `conn`.
    pub fn remove_conn(&mut self, conn: u64) -> Vec<Lease> {
        self.outboxes.remove(&conn);
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
