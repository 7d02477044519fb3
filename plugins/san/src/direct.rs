//! The direct path of one disk: maps fetched per window of the image, device I/O under them,
//! and the bookkeeping that keeps the server's view and the host's writes apart.
//!
//! Rules, each for a reason:
//! - A request is done directly only when one window's grant covers all of it with the access
//!   it needs; otherwise it goes over SMB whole (never split between the paths).
//! - Every device I/O passes the grant's [`Guard`] first.
//! - A network write in a window first retires that window's grant (waits for its direct I/O,
//!   commits it, returns the lease): the next direct use re-maps, and the server fsyncs before
//!   mapping, so its dirty pages can never be written back over a direct write.
//! - A network read in a window with uncommitted direct writes commits them first, so the
//!   server drops cached pages that predate them.
//! - A recall, a lost map connection or a device error takes grants away at once; the
//!   requests continue over SMB and the direct path is tried again after [`RETRY_AFTER`].
//! - A disk that goes away gives its leases back; the server drops its cached pages of a
//!   file whose write lease comes back, so uncommitted direct writes cannot be hidden.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::mpsc;
use twinpath_blockio::QueueRing;
use twinpath_core::stats::{self, Op, PathStats};
use twinpath_core::{lock, Error, ErrorKind, GuestBuffers, Permit, Result};
use twinpath_filemap::{Grant, Piece};
use twinpath_mapproto::{clock, MapClient, ProtoError, Reply, Request};
use twinpath_pipeline::{Pipeline, PipelineConfig, Section};

use crate::link::{Event, Member};
use crate::state::{DirectState, Lookup, Recalled, Ticket, Window, RETRY_AFTER, WINDOW};
use crate::throttle::{Admission, Throttle};
use crate::volume::{LunIo, Volume};

/// Device pieces larger than this go through the pipeline engine in sections of this size.
const DEVICE_SECTION: usize = 1 << 20;

/// The pipeline for large device pieces: many sections in flight. Its deadline would drop
/// sections still on the device, which could then land after the lease went back: it is
/// set beyond any real device's own timeouts, which end a stuck operation first.
fn device_pipeline() -> Pipeline {
    Pipeline::new(PipelineConfig {
        section_len: Some(DEVICE_SECTION),
        max_in_flight: 16,
        timeout: Duration::from_secs(24 * 3600),
    })
}

/// The shared volume as this host sees it.
pub struct LunDevice {
    pub volume: Arc<dyn Volume>,
    /// Device I/O on it.
    pub io: Arc<dyn LunIo>,
}

/// What happened to a request offered to the direct path.
pub enum Outcome {
    Done,
    /// Not possible directly (no grant, not covered, resting, lease run out): use the
    /// network.
    Network,
}

pub struct Direct {
    /// This disk on the host's map connection.
    member: Member,
    /// The connection generation whose volume identity this disk's device was checked
    /// against.
    checked: AtomicU64,
    /// The image's path in the export (the same as on the share).
    path: String,
    volume: Arc<dyn Volume>,
    device_size: u64,
    lun: Arc<dyn LunIo>,
    state: Mutex<DirectState>,
    /// One map request at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Direct writes since the last device flush.
    device_dirty: AtomicBool,
    throttle: Option<Arc<Throttle>>,
    /// Every map call waits at most this long; then the request goes over SMB.
    map_timeout: Duration,
    /// This host's persistent reservation key on the LUN.
    fence_key: u64,
    /// The registration must be made again before the next direct I/O (a device error,
    /// maybe a RESERVATION CONFLICT after the server fenced this host).
    register: AtomicBool,
    /// The direct path's counters; they outlive this `Direct` (the disk's metrics keep them).
    stats: Arc<PathStats>,
    /// Where background work goes: [`Direct::run`] also runs on queue threads, outside it.
    runtime: tokio::runtime::Handle,
}

impl Drop for Direct {
    fn drop(&mut self) {
        // The connection outlives this disk when other disks share it: leases go back now.
        if let Some(c) = self.member.link.current() {
            for w in lock(&self.state).mapped() {
                c.give_back(w.lease);
            }
        }
        let s = self.stats.snapshot();
        tracing::info!(
            image = %self.describe(),
            requests = s.io.requests(),
            bytes = s.io.read_bytes + s.io.written_bytes,
            throttled = self.stats.get(THROTTLED),
            "direct path totals"
        );
    }
}

/// Data requests the direct path handed to the network path.
pub const FALLBACKS: stats::Event = stats::Event {
    name: "fallbacks",
    help: "data requests the direct path handed to the network path",
};
/// Leases the map server recalled.
pub const RECALLS: stats::Event = stats::Event {
    name: "recalls",
    help: "leases the map server recalled",
};
/// Requests the throttle delayed or sent to the network path.
pub const THROTTLED: stats::Event = stats::Event {
    name: "throttled",
    help: "requests the direct-path throttle delayed or sent over the network",
};
/// Direct requests stopped because their grant's lease ran out (not renewed in time, or
/// recalled) before all of their device I/O was issued.
pub const EXPIRED: stats::Event = stats::Event {
    name: "expired",
    help: "direct requests sent over the network because their lease ran out or was recalled",
};
/// What the direct path's [`PathStats`] counts beside its I/O.
pub const EVENTS: [stats::Event; 4] = [FALLBACKS, RECALLS, THROTTLED, EXPIRED];

/// How the direct path of one disk is set up.
pub struct DirectConfig {
    /// The image's path in the export.
    pub path: String,
    pub throttle: Option<Arc<Throttle>>,
    pub map_timeout: Duration,
    /// This host's persistent reservation key, registered on the LUN already.
    pub fence_key: u64,
}

impl Direct {
    /// The direct path for `config`, as `member` of the host's map connection, on a device
    /// checked against the volume identity of connection `generation`.
    pub fn new(
        (member, events): (Member, mpsc::UnboundedReceiver<Event>),
        generation: u64,
        config: DirectConfig,
        lun: LunDevice,
        stats: Arc<PathStats>,
    ) -> Arc<Direct> {
        let d = Arc::new(Direct {
            member,
            checked: AtomicU64::new(generation),
            path: config.path,
            device_size: lun.volume.size(),
            volume: lun.volume,
            lun: lun.io,
            state: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            device_dirty: AtomicBool::new(false),
            throttle: config.throttle,
            map_timeout: config.map_timeout,
            fence_key: config.fence_key,
            register: AtomicBool::new(false),
            stats,
            runtime: tokio::runtime::Handle::current(),
        });
        d.watch(events);
        d
    }

    fn describe(&self) -> String {
        format!("{} on {}", self.path, self.volume.describe())
    }

    /// Takes every grant away and rests the whole direct path; the grants are retired
    /// (their I/O waited for, returned) in the background.
    fn go_down(self: &Arc<Self>, why: &str) {
        tracing::warn!(image = %self.describe(), "direct path off for {RETRY_AFTER:?}: {why}");
        let wins = lock(&self.state).down(clock::now());
        for win in wins {
            let me = self.clone();
            self.runtime.spawn(async move { me.retire(win).await });
        }
    }

    /// Registers this host's key on the LUN again where a connection change or a device
    /// error calls for it (the server fences hosts whose connection it lost). A failure is
    /// logged: without fencing configured on the server the LUN needs no registration.
    async fn register_again(&self, force: bool) {
        if !(self.register.swap(false, Ordering::AcqRel) || force) {
            return;
        }
        let (volume, key) = (self.volume.clone(), self.fence_key);
        match tokio::task::spawn_blocking(move || volume.register(key)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(image = %self.describe(), "registering on the LUN: {e}"),
            Err(e) => tracing::warn!(image = %self.describe(), "registering on the LUN: {e}"),
        }
    }

    /// Handles recalls and the loss of the map connection for as long as the disk lives.
    fn watch(self: &Arc<Self>, mut events: mpsc::UnboundedReceiver<Event>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(d) = me.upgrade() else { return };
                let r = match event {
                    Event::Recall(r) => r,
                    Event::Lost(why) => {
                        d.go_down(&why);
                        continue;
                    }
                };
                tracing::info!(image = %d.describe(), lease = r.lease, "recalled: {}", r.reason);
                d.stats.count(RECALLS);
                let recalled = lock(&d.state).recall(r.lease, r.deadline, clock::now());
                // Retiring waits for the grant's I/O and a device flush: not here, where a
                // lost connection queued behind it would wait too.
                tokio::spawn(async move {
                    match recalled {
                        Recalled::Retire(win) => d.retire(win).await,
                        Recalled::Retiring => {}
                        Recalled::GiveBack => d.give_back(r.lease).await,
                    }
                });
            }
        });
    }

    /// The map connection, dialed again if it was lost; the device is checked against the
    /// volume identity of every new connection (a restarted server has a new token).
    async fn client(self: &Arc<Self>) -> Option<Arc<MapClient>> {
        let c = match self.member.link.connect(self.map_timeout).await {
            Ok(c) => c,
            Err(e) => {
                self.go_down(&e.to_string());
                return None;
            }
        };
        let checked = self.checked.load(Ordering::Acquire);
        if c.generation != checked {
            // Registered first: a reserved LUN answers the check's reads only then.
            self.register_again(true).await;
            let (volume, id) = (self.volume.clone(), c.identity.clone());
            let matches = tokio::task::spawn_blocking(move || crate::lun::check(&*volume, &id))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::new(ErrorKind::Io, format!("checking the LUN: {e}")).into())
                });
            if let Err(e) = matches {
                self.go_down(&format!("after reconnecting to the map server: {e}"));
                return None;
            }
            self.checked.store(c.generation, Ordering::Release);
            tracing::info!(image = %self.describe(), "map server connection back");
        }
        self.register_again(false).await;
        Some(c.client)
    }

    /// The one look a request takes at the direct path's state.
    pub fn lookup(&self, offset: u64, len: u64, write: bool) -> Lookup {
        lock(&self.state).lookup(offset, len, write, clock::now())
    }

    /// Whether `ticket` may run on the calling thread: no throttle to wait for, and small
    /// enough for one device operation (the queue threads have no timers for the pipeline).
    pub fn inline(&self, ticket: &Ticket) -> bool {
        self.throttle.is_none() && ticket.len <= DEVICE_SECTION as u64
    }

    /// Asks the map server for window `w` on behalf of the request `(offset, len, write)`,
    /// which gets its ticket under the new grant.
    async fn fetch(
        self: &Arc<Self>,
        w: u64,
        (offset, len, write): (u64, u64, bool),
    ) -> Option<Ticket> {
        let _one = self.fetching.lock().await;
        // Another request may have fetched it while this one waited.
        match self.lookup(offset, len, write) {
            Lookup::Direct(t) => return Some(t),
            Lookup::Network => return None,
            Lookup::Fetch(_) => {}
        }
        let client = self.client().await?;
        lock(&self.state).fetching();
        let asked = client
            .call_within(
                self.map_timeout,
                Some(self.member.id),
                Request::GetMap {
                    path: self.path.clone(),
                    offset: w * WINDOW,
                    len: WINDOW,
                    write,
                },
            )
            .await;
        let now = clock::now();
        let m = match asked {
            Ok(Reply::Map(m)) => m,
            Ok(Reply::Refused { reason }) => {
                tracing::debug!(image = %self.describe(), window = w, "no map: {reason}");
                lock(&self.state).refused(w, now);
                return None;
            }
            Ok(other) => {
                tracing::warn!(image = %self.describe(), "unexpected map reply {other:?}");
                lock(&self.state).refused(w, now);
                return None;
            }
            Err(ProtoError::TimedOut(t)) => {
                tracing::warn!(
                    image = %self.describe(),
                    window = w,
                    "map server did not answer in {t:?}: new windows over SMB for {RETRY_AFTER:?}"
                );
                lock(&self.state).slow(now);
                return None;
            }
            Err(e) => {
                self.go_down(&format!("map request: {e}"));
                return None;
            }
        };
        let grant = match Grant::new(m.spans, self.device_size) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(image = %self.describe(), window = w, "map refused here: {e}");
                lock(&self.state).refused(w, now);
                self.give_back(m.lease).await;
                return None;
            }
        };
        let win = Window::new(grant, m.lease, write, client.validity());
        let g = lock(&self.state).granted(w, win, (offset, len, write), now);
        if let Some(old) = g.retire {
            let me = self.clone();
            tokio::spawn(async move { me.retire(old).await });
        }
        if let Some(lease) = g.give_back {
            self.give_back(lease).await;
        }
        g.ticket
    }

    /// Returns a lease the host no longer uses.
    async fn give_back(&self, lease: u64) {
        if let Some(c) = self.member.link.current() {
            if let Err(e) = c
                .call_within(self.map_timeout, None, Request::Return { lease })
                .await
            {
                tracing::debug!(lease, "return: {e}");
            }
        }
    }

    /// Waits for a grant's direct I/O, commits its writes and returns its lease (nothing to
    /// tell a server whose connection is gone: it released the lease itself).
    async fn retire(self: &Arc<Self>, win: Arc<Window>) {
        while win.inflight() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Whatever may still hold its permit (an iSCSI task that gave up waiting for the
        // target) sends nothing more under a lease that is going back.
        win.end();
        if win.connection_lost() {
            lock(&self.state).retired(win.lease);
            return;
        }
        if let Err(e) = self.commit(&win).await {
            tracing::warn!(image = %self.describe(), lease = win.lease, "commit: {e}");
        }
        self.give_back(win.lease).await;
        lock(&self.state).retired(win.lease);
    }

    /// Makes the window's direct writes durable on the device and tells the server; nothing
    /// to do if it has none.
    async fn commit(self: &Arc<Self>, win: &Window) -> Result<()> {
        if !win.take_dirty() {
            return Ok(());
        }
        if let Err(e) = self.flush_device().await {
            win.mark_dirty();
            return Err(e);
        }
        let Some(c) = self.member.link.current() else {
            return Err(Error::new(ErrorKind::Io, "map server not connected"));
        };
        let commit = Request::Commit {
            lease: win.lease,
            size: 0,
        };
        match c.call_within(self.map_timeout, None, commit).await {
            Ok(Reply::Done) => Ok(()),
            Ok(other) => Err(Error::new(ErrorKind::Io, format!("commit: {other:?}"))),
            Err(e) => Err(Error::new(ErrorKind::Io, format!("commit: {e}"))),
        }
    }

    /// Carries out a request the slow way (on the runtime): fetches the map if the lookup
    /// asked for it, waits for the throttle, then runs it on the device.
    pub async fn io(
        self: &Arc<Self>,
        lookup: Lookup,
        offset: u64,
        bufs: &GuestBuffers,
        write: bool,
    ) -> Result<Outcome> {
        let len = bufs.len() as u64;
        let ticket = match lookup {
            Lookup::Direct(t) => t,
            Lookup::Network => return Ok(Outcome::Network),
            Lookup::Fetch(w) => match self.fetch(w, (offset, len, write)).await {
                Some(t) => t,
                None => return Ok(Outcome::Network),
            },
        };
        if let Some(t) = &self.throttle {
            let admission = t.admit(len).await;
            if admission != Admission::Now {
                self.stats.count(THROTTLED);
            }
            if admission == Admission::Network {
                return Ok(Outcome::Network);
            }
        }
        self.run(None, ticket, bufs).await
    }

    /// Carries out a counted request on the device, every piece checked by the grant's guard
    /// and every device operation by the grant's validity first. `Network` if the lease ran
    /// out before all of it was issued (the whole request then goes over SMB); an error
    /// takes the direct path down (the caller retries over the network).
    /// `queue`: the I/O context of the queue worker this runs on, if it does.
    pub async fn run(
        self: &Arc<Self>,
        queue: Option<&QueueRing>,
        ticket: Ticket,
        bufs: &GuestBuffers,
    ) -> Result<Outcome> {
        let (offset, len, write) = (ticket.offset, ticket.len, ticket.write);
        let timer = self.stats.io.begin();
        let op = if write { Op::Write } else { Op::Read };
        let mut at = 0usize;
        let mut ops = Vec::with_capacity(ticket.pieces.len());
        for p in &ticket.pieces {
            match *p {
                Piece::Device { physical, len } => {
                    if let Err(e) = ticket.check(physical, len) {
                        timer.end(op, 0, false);
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!("{}: {e}", self.describe()),
                        ));
                    }
                    ops.push((physical, bufs.slice(at, len as usize)));
                    at += len as usize;
                }
                Piece::Zero { len } => {
                    bufs.fill_zero(at, len as usize);
                    at += len as usize;
                }
            }
        }
        if write {
            ticket.wrote();
            self.device_dirty.store(true, Ordering::Release);
        }
        let (lun, ticket) = (&self.lun, &ticket);
        let permit: Arc<dyn Permit> = ticket.window();
        let permit = &permit;
        let device_op = move |physical: u64, part: GuestBuffers| async move {
            // The last moment before the device: a host that was frozen, or could not
            // renew, or was recalled, issues nothing more under the grant.
            if !ticket.usable(clock::now()) {
                return Err(Error::new(ErrorKind::Timeout, LEASE_RAN_OUT));
            }
            if write {
                lun.write(queue, physical, part, permit.clone()).await
            } else {
                lun.read(queue, physical, part, permit.clone()).await
            }
        };
        let one = |(physical, part): (u64, GuestBuffers)| async move {
            if part.len() <= DEVICE_SECTION {
                return device_op(physical, part).await;
            }
            let what = if write { "device write" } else { "device read" };
            let part = &part;
            device_pipeline()
                .sections(
                    what,
                    physical,
                    part.len(),
                    DEVICE_SECTION,
                    &|| usize::MAX,
                    |s: Section| device_op(s.at, part.slice(s.start, s.len)),
                )
                .await
        };
        // Every piece runs to its end, even after another failed: a device operation whose
        // future were dropped could still land after the ticket (and with it the lease) is
        // gone.
        let done = match ops.len() {
            0 => Ok(()),
            1 => one(ops.pop().expect("one piece")).await,
            _ => join_all(ops.into_iter().map(one))
                .await
                .into_iter()
                .collect::<Result<Vec<()>>>()
                .map(|_| ()),
        };
        timer.end(op, len, done.is_ok());
        match done {
            Ok(()) => Ok(Outcome::Done),
            Err(_) if !ticket.usable(clock::now()) => {
                self.stats.count(EXPIRED);
                tracing::debug!(image = %self.describe(), offset, "{LEASE_RAN_OUT}: over SMB");
                Ok(Outcome::Network)
            }
            Err(e) => {
                self.register.store(true, Ordering::Release);
                self.go_down(&format!("device I/O at file offset {offset}: {e}"));
                Err(e)
            }
        }
    }

    /// Called before a request goes over the network: see the module rules.
    pub async fn before_network(self: &Arc<Self>, offset: u64, len: u64, write: bool) {
        let wins = lock(&self.state).before_network(offset, len, write, clock::now());
        for win in wins {
            if write {
                self.retire(win).await;
            } else if let Err(e) = self.commit(&win).await {
                tracing::warn!(image = %self.describe(), "commit before network read: {e}");
            }
        }
    }

    async fn flush_device(self: &Arc<Self>) -> Result<()> {
        if self.device_dirty.swap(false, Ordering::AcqRel) {
            // Once more after a failure: the first command after a target event (a
            // preemption among them) gets its UNIT ATTENTION instead of being done.
            let flushed = match self.lun.flush().await {
                Err(e) if e.kind() != ErrorKind::Fenced => {
                    tracing::debug!(image = %self.describe(), "device flush: {e}; once more");
                    self.lun.flush().await
                }
                r => r,
            };
            match flushed {
                Ok(()) => {}
                // The map server flushes the LUN right after it fences a host (and aborts
                // what the host had in the target), so what this host wrote is durable.
                Err(e) if e.kind() == ErrorKind::Fenced => {
                    self.register.store(true, Ordering::Release);
                    self.go_down(
                        "fenced on the LUN: the map server flushed it when it fenced this host",
                    );
                }
                Err(e) => {
                    self.device_dirty.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Device flush (an error here is the guest's: direct writes may not be durable), then
    /// commit of every window written since its last commit (an error there only costs the
    /// server a re-map, which fsyncs and drops its cache anyway; each waits at most the
    /// map timeout).
    pub async fn flush(self: &Arc<Self>) -> Result<()> {
        self.flush_device()
            .await
            .map_err(|e| e.within(format!("flush {}", self.describe())))?;
        let dirty = lock(&self.state).dirty();
        for w in dirty {
            if let Err(e) = self.commit(&w).await {
                tracing::warn!(image = %self.describe(), lease = w.lease, "commit: {e}");
            }
        }
        Ok(())
    }
}

/// A grant as the LUN asks it, on the executor's clock (the state machine keeps none).
impl Permit for Window {
    fn allows(&self) -> bool {
        self.usable(clock::now())
    }
}

/// Why a request stopped using its grant.
const LEASE_RAN_OUT: &str = "the grant's lease ran out or was recalled";

#[cfg(test)]
mod tests;
