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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use tokio::sync::mpsc;
use twinpath_core::stats::{Op, PathStats};
use twinpath_core::{lock, BlockBackend, Error, ErrorKind, GuestBuffers, Result};
use twinpath_filemap::{Grant, Guard, Piece};
use twinpath_mapproto::{Alive, MapClient, Reply, Request};
use twinpath_pipeline::{Pipeline, PipelineConfig, Section};

use crate::link::{Event, Member};
use crate::throttle::{Admission, Throttle};
use crate::volume::Volume;

/// Maps are asked for in windows of the image this large (the map server's default
/// allocation chunk, so a write map allocates one chunk).
pub const WINDOW: u64 = 64 << 20;

/// How long a refusal, a lost map server or a device error keeps a window (or the whole
/// direct path) on the network before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Device pieces larger than this go through the pipeline engine in sections of this size.
const DEVICE_SECTION: usize = 1 << 20;

/// The pipeline for large device pieces: many sections in flight, a deadline after which the
/// request goes over the network instead.
fn device_pipeline() -> Pipeline {
    Pipeline::new(PipelineConfig {
        section_len: Some(DEVICE_SECTION),
        max_in_flight: 16,
        timeout: Duration::from_secs(10),
    })
}

/// A granted window: its map, its lease, and what is going on under it.
struct Window {
    grant: Grant,
    guard: Guard,
    lease: u64,
    write: bool,
    /// The connection the grant came on: when it ends, so does the grant, at once.
    conn: Alive,
    /// Direct I/Os under this grant still running.
    inflight: AtomicUsize,
    /// Direct writes not yet committed to the server.
    dirty: AtomicBool,
}

enum Slot {
    Mapped(Arc<Window>),
    /// The server refused, or the grant was taken back: network until then.
    Resting(Instant),
}

/// Counts a direct I/O against its window while it lives.
struct InFlight(Arc<Window>);

impl InFlight {
    fn new(w: &Arc<Window>) -> InFlight {
        w.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(w.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request resolved under a grant and counted against it, ready for the device.
pub struct Ready {
    pieces: Vec<Piece>,
    offset: u64,
    len: u64,
    write: bool,
    counted: InFlight,
}

/// The shared volume as this host sees it.
pub struct LunDevice {
    pub volume: Arc<dyn Volume>,
    /// Device I/O on it.
    pub io: Arc<dyn BlockBackend>,
}

/// What happened to a request offered to the direct path.
pub enum Outcome {
    Done,
    /// Not possible directly (no grant, not covered, resting): use the network.
    Network,
}

pub struct Direct {
    /// This disk on the host's map connection.
    member: Member,
    /// The connection generation whose volume identity this disk's device was checked
    /// against.
    checked: AtomicU64,
    /// Leases recalled before their grant reached the window being fetched (the recall is
    /// read right after the grant, and may be handled first).
    early_recalls: Mutex<Vec<u64>>,
    /// The image's path in the export (the same as on the share).
    path: String,
    volume: Arc<dyn Volume>,
    device_size: u64,
    lun: Arc<dyn BlockBackend>,
    windows: Mutex<HashMap<u64, Slot>>,
    /// The whole direct path rests until then (map server lost, device error).
    down_until: Mutex<Option<Instant>>,
    /// One map request at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Direct writes since the last device flush.
    device_dirty: AtomicBool,
    throttle: Option<Arc<Throttle>>,
    /// The direct path's counters; they outlive this `Direct` (the disk's metrics keep them).
    stats: Arc<PathStats>,
}

impl Drop for Direct {
    fn drop(&mut self) {
        // The connection outlives this disk when other disks share it: leases go back now.
        if let Some(c) = self.member.link.current() {
            for slot in lock(&self.windows).values() {
                if let Slot::Mapped(w) = slot {
                    c.give_back(w.lease);
                }
            }
        }
        let s = self.stats.snapshot();
        tracing::info!(
            image = %self.describe(),
            requests = s.io.requests(),
            bytes = s.io.read_bytes + s.io.written_bytes,
            throttled = s.throttled,
            "direct path totals"
        );
    }
}

impl Direct {
    /// The direct path for image `path`, as `member` of the host's map connection, on a
    /// device checked against the volume identity of connection `generation`.
    pub fn new(
        (member, events): (Member, mpsc::UnboundedReceiver<Event>),
        generation: u64,
        path: String,
        lun: LunDevice,
        throttle: Option<Arc<Throttle>>,
        stats: Arc<PathStats>,
    ) -> Arc<Direct> {
        let d = Arc::new(Direct {
            member,
            checked: AtomicU64::new(generation),
            early_recalls: Mutex::default(),
            path,
            device_size: lun.volume.size(),
            volume: lun.volume,
            lun: lun.io,
            windows: Mutex::default(),
            down_until: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
            device_dirty: AtomicBool::new(false),
            throttle,
            stats,
        });
        d.watch(events);
        d
    }

    fn describe(&self) -> String {
        format!("{} on {}", self.path, self.volume.describe())
    }

    fn resting(&self) -> bool {
        lock(&self.down_until).is_some_and(|t| Instant::now() < t)
    }

    /// Takes every grant away and rests the whole direct path.
    fn go_down(&self, why: &str) {
        tracing::warn!(image = %self.describe(), "direct path off for {RETRY_AFTER:?}: {why}");
        *lock(&self.down_until) = Some(Instant::now() + RETRY_AFTER);
        lock(&self.windows).clear();
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
                d.stats.recalls.fetch_add(1, Ordering::Relaxed);
                let found = {
                    let mut windows = lock(&d.windows);
                    let hit = windows.iter().find_map(|(&w, s)| match s {
                        Slot::Mapped(win) if win.lease == r.lease => Some((w, win.clone())),
                        _ => None,
                    });
                    match hit {
                        Some((w, _)) => {
                            windows.insert(w, Slot::Resting(Instant::now() + RETRY_AFTER));
                        }
                        None => lock(&d.early_recalls).push(r.lease),
                    }
                    hit
                };
                // Retiring waits for the grant's I/O and a device flush: not here, where a
                // lost connection queued behind it would wait too.
                tokio::spawn(async move {
                    match found {
                        Some((_, win)) => d.retire(win).await,
                        None => d.give_back(r.lease).await,
                    }
                });
            }
        });
    }

    /// The map connection, dialed again if it was lost; the device is checked against the
    /// volume identity of every new connection (a restarted server has a new token).
    async fn client(self: &Arc<Self>) -> Option<Arc<MapClient>> {
        let c = match self.member.link.connect().await {
            Ok(c) => c,
            Err(e) => {
                self.go_down(&e);
                return None;
            }
        };
        let checked = self.checked.load(Ordering::Acquire);
        if c.generation != checked {
            let (volume, id) = (self.volume.clone(), c.identity.clone());
            let matches = tokio::task::spawn_blocking(move || crate::lun::check(&*volume, &id))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = matches {
                self.go_down(&format!("after reconnecting to the map server: {e}"));
                return None;
            }
            self.checked.store(c.generation, Ordering::Release);
            tracing::info!(image = %self.describe(), "map server connection back");
        }
        Some(c.client)
    }

    /// The grant of window `w` good for `write`, asking the map server if there is none.
    async fn window(self: &Arc<Self>, w: u64, write: bool) -> Option<Arc<Window>> {
        let usable = |d: &Direct| -> std::result::Result<Arc<Window>, bool> {
            match lock(&d.windows).get(&w) {
                // Its connection ended; the loss is on its way to `go_down`.
                Some(Slot::Mapped(win)) if !win.conn.is_alive() => Err(false),
                Some(Slot::Mapped(win)) if !write || win.write => Ok(win.clone()),
                Some(Slot::Resting(until)) if Instant::now() < *until => Err(false),
                _ => Err(true),
            }
        };
        if self.resting() {
            return None;
        }
        match usable(self) {
            Ok(win) => return Some(win),
            Err(false) => return None,
            Err(true) => {}
        }
        let _one = self.fetching.lock().await;
        match usable(self) {
            Ok(win) => return Some(win),
            Err(false) => return None,
            Err(true) => {}
        }
        let client = self.client().await?;
        lock(&self.early_recalls).clear();
        let asked = client
            .call_as(
                Some(self.member.id),
                Request::GetMap {
                    path: self.path.clone(),
                    offset: w * WINDOW,
                    len: WINDOW,
                    write,
                },
            )
            .await;
        let rest = |d: &Direct| {
            lock(&d.windows).insert(w, Slot::Resting(Instant::now() + RETRY_AFTER));
        };
        match asked {
            Ok(Reply::Map(m)) => match Grant::new(m.spans, self.device_size) {
                Ok(grant) => {
                    let win = Arc::new(Window {
                        guard: grant.guard(),
                        grant,
                        lease: m.lease,
                        write,
                        conn: client.alive(),
                        inflight: AtomicUsize::new(0),
                        dirty: AtomicBool::new(false),
                    });
                    // Recalled on its way here (and given back by the recall's handler). Checked
                    // under the windows lock, which the handler holds while it looks for the
                    // lease and notes it, so the recall cannot slip in between. The same for
                    // the direct path going down: `go_down` rests first, then clears the
                    // windows under this lock, so a grant is either seen resting here or
                    // cleared there.
                    let old = {
                        let mut windows = lock(&self.windows);
                        if self.resting() {
                            drop(windows);
                            self.give_back(m.lease).await;
                            return None;
                        }
                        if lock(&self.early_recalls).contains(&m.lease) {
                            windows.insert(w, Slot::Resting(Instant::now() + RETRY_AFTER));
                            return None;
                        }
                        windows.insert(w, Slot::Mapped(win.clone()))
                    };
                    if let Some(Slot::Mapped(old)) = old {
                        let me = self.clone();
                        tokio::spawn(async move { me.retire(old).await });
                    }
                    Some(win)
                }
                Err(e) => {
                    tracing::warn!(image = %self.describe(), window = w, "map refused here: {e}");
                    rest(self);
                    self.give_back(m.lease).await;
                    None
                }
            },
            Ok(Reply::Refused { reason }) => {
                tracing::debug!(image = %self.describe(), window = w, "no map: {reason}");
                rest(self);
                None
            }
            Ok(other) => {
                tracing::warn!(image = %self.describe(), "unexpected map reply {other:?}");
                rest(self);
                None
            }
            Err(e) => {
                self.go_down(&format!("map request: {e}"));
                None
            }
        }
    }

    /// Returns a lease the host no longer uses.
    async fn give_back(&self, lease: u64) {
        if let Some(c) = self.member.link.current() {
            if let Err(e) = c.call(Request::Return { lease }).await {
                tracing::debug!(lease, "return: {e}");
            }
        }
    }

    /// Waits for a grant's direct I/O, commits its writes and returns its lease.
    async fn retire(&self, win: Arc<Window>) {
        while win.inflight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if win.dirty.load(Ordering::Acquire) {
            if let Err(e) = self.commit(&win).await {
                tracing::warn!(image = %self.describe(), lease = win.lease, "commit: {e}");
            }
        }
        self.give_back(win.lease).await;
    }

    /// Makes the window's direct writes durable on the device and tells the server.
    async fn commit(&self, win: &Window) -> Result<()> {
        self.flush_device().await?;
        win.dirty.store(false, Ordering::Release);
        let Some(c) = self.member.link.current() else {
            return Err(Error::new(ErrorKind::Io, "map server not connected"));
        };
        match c
            .call(Request::Commit {
                lease: win.lease,
                size: 0,
            })
            .await
        {
            Ok(Reply::Done) => Ok(()),
            Ok(other) => Err(Error::new(ErrorKind::Io, format!("commit: {other:?}"))),
            Err(e) => Err(Error::new(ErrorKind::Io, format!("commit: {e}"))),
        }
    }

    /// The one window `[offset, offset + len)` lies in, if it lies in one.
    fn window_of(offset: u64, len: u64) -> Option<u64> {
        let w = offset / WINDOW;
        (len > 0 && (offset + len - 1) / WINDOW == w).then_some(w)
    }

    /// Tries the request on the device. `Network` when it cannot be done directly; an error
    /// only when device I/O was issued and failed (the caller then uses the network).
    pub async fn io(
        self: &Arc<Self>,
        offset: u64,
        bufs: &GuestBuffers,
        write: bool,
    ) -> Result<Outcome> {
        let len = bufs.len() as u64;
        let Some(w) = Self::window_of(offset, len) else {
            return Ok(Outcome::Network);
        };
        let Some(win) = self.window(w, write).await else {
            return Ok(Outcome::Network);
        };
        let Some(pieces) = win.grant.resolve(offset, len, write) else {
            return Ok(Outcome::Network);
        };
        if let Some(t) = &self.throttle {
            let admission = t.admit(len).await;
            if admission != Admission::Now {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            }
            if admission == Admission::Network {
                return Ok(Outcome::Network);
            }
        }
        // The window may have been taken away while the map was fetched or the throttle waited.
        let counted = {
            let windows = lock(&self.windows);
            match windows.get(&w) {
                Some(Slot::Mapped(cur)) if Arc::ptr_eq(cur, &win) && win.conn.is_alive() => {
                    InFlight::new(&win)
                }
                _ => return Ok(Outcome::Network),
            }
        };
        let ready = Ready {
            pieces,
            offset,
            len,
            write,
            counted,
        };
        self.run(ready, bufs).await.map(|()| Outcome::Done)
    }

    /// A request that can go to the device right now, without asking the map server or
    /// waiting for the throttle, and small enough for one device operation: the common case,
    /// taken without leaving the calling thread (which has no timers for the pipeline).
    /// While the direct path rests there are no windows, so none is found here.
    pub fn ready(&self, offset: u64, len: u64, write: bool) -> Option<Ready> {
        if self.throttle.is_some() || len > DEVICE_SECTION as u64 {
            return None;
        }
        let w = Self::window_of(offset, len)?;
        // Looked up and counted under one lock, so the window cannot be retired in between.
        let counted = match lock(&self.windows).get(&w) {
            Some(Slot::Mapped(win)) if (!write || win.write) && win.conn.is_alive() => {
                InFlight::new(win)
            }
            _ => return None,
        };
        let pieces = counted.0.grant.resolve(offset, len, write)?;
        Some(Ready {
            pieces,
            offset,
            len,
            write,
            counted,
        })
    }

    /// Carries out a prepared request on the device, every piece checked by the guard first.
    /// An error takes the direct path down; the caller retries over the network.
    pub async fn run(&self, ready: Ready, bufs: &GuestBuffers) -> Result<()> {
        let Ready {
            pieces,
            offset,
            len,
            write,
            counted,
        } = ready;
        let win = &counted.0;
        let timer = self.stats.io.begin();
        let op = if write { Op::Write } else { Op::Read };
        let mut at = 0usize;
        let mut ops = Vec::with_capacity(pieces.len());
        for p in pieces {
            match p {
                Piece::Device { physical, len } => {
                    if let Err(e) = win.guard.check(physical, len, write) {
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
            win.dirty.store(true, Ordering::Release);
            self.device_dirty.store(true, Ordering::Release);
        }
        let lun = &self.lun;
        let device_op = move |physical: u64, part: GuestBuffers| async move {
            if write {
                lun.write(physical, part).await
            } else {
                lun.read(physical, part).await
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
        let done = match ops.len() {
            0 => Ok(()),
            1 => one(ops.pop().expect("one piece")).await,
            _ => try_join_all(ops.into_iter().map(one)).await.map(|_| ()),
        };
        timer.end(op, len, done.is_ok());
        match done {
            Ok(()) => Ok(()),
            Err(e) => {
                self.go_down(&format!("device I/O at file offset {offset}: {e}"));
                Err(e)
            }
        }
    }

    /// Called before a request goes over the network: see the module rules.
    pub async fn before_network(self: &Arc<Self>, offset: u64, len: u64, write: bool) {
        let first = offset / WINDOW;
        let last = (offset + len.max(1) - 1) / WINDOW;
        for w in first..=last {
            let win = match lock(&self.windows).get(&w) {
                Some(Slot::Mapped(win)) => win.clone(),
                _ => continue,
            };
            if write {
                lock(&self.windows).insert(w, Slot::Resting(Instant::now()));
                self.retire(win).await;
            } else if win.dirty.load(Ordering::Acquire) {
                if let Err(e) = self.commit(&win).await {
                    tracing::warn!(image = %self.describe(), "commit before network read: {e}");
                }
            }
        }
    }

    async fn flush_device(&self) -> Result<()> {
        if self.device_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.lun.flush().await {
                self.device_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Device flush (an error here is the guest's: direct writes may not be durable), then
    /// commit of every window written since its last commit (an error there only costs the
    /// server a re-map, which fsyncs and drops its cache anyway).
    pub async fn flush(&self) -> Result<()> {
        self.flush_device()
            .await
            .map_err(|e| e.within(format!("flush {}", self.describe())))?;
        let dirty: Vec<Arc<Window>> = lock(&self.windows)
            .values()
            .filter_map(|s| match s {
                Slot::Mapped(w) if w.dirty.load(Ordering::Acquire) => Some(w.clone()),
                _ => None,
            })
            .collect();
        for w in dirty {
            if let Err(e) = self.commit(&w).await {
                tracing::warn!(image = %self.describe(), lease = w.lease, "commit: {e}");
            }
        }
        Ok(())
    }
}
