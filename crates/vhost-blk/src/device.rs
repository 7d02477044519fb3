//! The vhost-user-blk device for one frontend connection.
//!
//! One worker thread per queue (vhost-user-backend's epoll threads). A worker pops chains,
//! parses them, and turns each into a future that drives the backend; the futures live in the
//! queue's own executor and are polled on the worker thread. When a future is woken (by a
//! backend thread, a tokio task, ...), the queue's eventfd fires and the worker polls again.
//! Requests therefore run concurrently and finish out of order, with no lock held across I/O;
//! the used ring takes them in the order the driver made them available (see `order`).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use twinpath_core::stats::Op;
use twinpath_core::{BlockIo, ErrorKind, GuestBuffers, QueueLink};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config_space::{BlkConfig, WRITEBACK_OFFSET};
use crate::disk::{Disk, InflightGuard, WorkGuard};
use crate::lock;
use crate::order::UsedOrder;
use crate::request::{
    self, Limits, Request, RequestKind, StatusByte, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::sigbus::Watched;

type Mem = GuestMemoryMmap<()>;
type RequestFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest single data segment we advertise (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (SEG_MAX). A driver without indirect descriptors needs
/// SEG_MAX + 2 ring entries per request; 254 fits the common 256-entry ring, and a driver
/// with a smaller ring either uses indirect descriptors (offered) or splits its requests.
const SEG_MAX: u32 = 254;
/// What a write-zeroes request counts against the disk's byte budget: the buffer of zeros a
/// backend may write it from.
const WRITE_ZEROES_BUDGET: usize = 1 << 20;
/// Guest mappings one connection may have watched (vhost-user allows 509 regions at once).
const MAX_WATCHED: usize = 1024;
/// How long GET_VRING_BASE waits for accepted requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A finished request, ready to be written back to the used ring.
struct Done {
    /// Its number in the queue's line (see [`UsedOrder`]).
    seq: u64,
    head: u16,
    used_len: u32,
    status: StatusByte,
    code: u8,
    // The status byte lives in this mapping.
    _mem: Arc<Mem>,
    _inflight: InflightGuard,
}

/// A queue's requests in flight, and the heads they hold until they are in the used ring: a
/// head the driver makes available again before that is refused, so a queue never has more
/// requests than its ring has entries (each popped chain is memory until it completes).
#[derive(Default)]
struct Inflight {
    futures: FuturesUnordered<RequestFuture>,
    heads: bitvec::BitArr!(for MAX_QUEUE_SIZE, in u64),
    /// Popped requests, finished or not, in the order they were made available.
    order: UsedOrder,
    /// The line was as long as the ring at the last pass: popping goes on once it is not.
    full: bool,
    /// Requests of a queue stopped while they ran (GET_VRING_BASE gave up waiting): they
    /// finish without touching the ring, which may be a new driver's by then (their heads and
    /// status bytes may be its), and the queue takes no new request before they did, since
    /// one may still write a block the new driver writes too.
    detached: FuturesUnordered<RequestFuture>,
}

/// Wakes a queue's worker through its eventfd.
struct QueueWaker {
    eventfd: EventFd,
    armed: AtomicBool,
    /// Set by every wake; lets a polling worker see wakes that wrote no eventfd.
    woken: AtomicBool,
}

impl Wake for QueueWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        // One write per polling round is enough; the worker re-arms before it polls.
        if !self.armed.swap(true, Ordering::SeqCst) {
            let _ = self.eventfd.write(1);
        }
    }
}

/// A queue polls only while at least this many operations are in flight on its worker's own
/// rings: then completions come often enough to be caught while polling. With one, the wait
/// is a whole device round trip; and completions that come from other threads (SMB, thread
/// pools) need those threads to get the CPU, not a spinning worker (smb disks at QD32 lost
/// ~20 % when their workers polled).
const POLL_MIN_INFLIGHT: usize = 4;

struct Queue {
    /// The backend's I/O path for this queue: its requests go there, and the worker reaps
    /// and submits what it holds.
    io: Arc<dyn BlockIo>,
    inflight: Mutex<Inflight>,
    notify: Arc<QueueWaker>,
    // `notify` as a std Waker, built once rather than per polling round.
    waker: Waker,
    /// The ring could not be read at the last pass: polling must not go round it.
    stalled: AtomicBool,
    /// The queue takes no new chain now (its line is full, or detached requests run): what
    /// waits in the ring is no work for polling.
    no_room: AtomicBool,
    /// The queue's vring, kept at its worker's first event for `stop_vring` (which
    /// vhost-user-backend calls without it).
    vring: std::sync::OnceLock<VringRwLock>,
    /// The connection is over: the worker finishes `io` at its next event and then
    /// handles nothing more (see [`BlkDevice::finish_queues`]).
    finishing: AtomicBool,
    /// The worker finished `io`.
    finished: AtomicBool,
    /// The worker is handling an event (and may submit to `io`).
    busy: AtomicBool,
}

struct Inner {
    disk: Arc<Disk>,
    limits: Limits,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    /// The last memory table this device checked. Queues read guest memory only through it,
    /// never through the table vhost-user-backend holds: that one is put in place before
    /// [`VhostUserBackend::update_memory`] may refuse it.
    mem: RwLock<Option<Arc<Mem>>>,
    queues: Vec<Queue>,
    /// The guest mappings of this connection, watched for a frontend shrinking them.
    watched: Mutex<Vec<Watched>>,
    /// Ends this connection (set once it is up).
    hang_up: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
    /// The exit eventfds handed to vhost-user-backend, which registers them with its epoll
    /// by `into_raw_fd` and never closes them (0.24): closed by [`BlkDevice::release`].
    exit_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

impl Queue {
    /// Finishes the queue's I/O path once, on its worker (see [`BlkDevice::finish_queues`]).
    fn finish_io(&self) {
        if !self.finished.load(Ordering::Acquire) {
            self.io.finish();
            self.finished.store(true, Ordering::Release);
        }
    }
}

/// Why queue `q`'s rings cannot be used in `mem`, if they cannot: virtio-queue's `is_valid`
/// without its error line per call (a frontend can make this happen at every kick).
fn unreadable(q: &virtio_queue::Queue, mem: &Mem) -> Option<&'static str> {
    use vm_memory::{GuestAddress, GuestMemory, Permissions};
    let size = usize::from(q.size());
    let fits = |addr: u64, len: usize, access| {
        GuestMemory::check_range(mem, GuestAddress(addr), len, access)
    };
    if !q.ready() || q.avail_ring() == 0 {
        Some("it is not set up")
    } else if !fits(q.desc_table(), 16 * size, Permissions::Read) {
        Some("its descriptor table lies outside guest memory")
    } else if !fits(q.avail_ring(), 6 + 2 * size, Permissions::Read) {
        Some("its available ring lies outside guest memory")
    } else if !fits(q.used_ring(), 6 + 8 * size, Permissions::Write) {
        Some("its used ring lies outside guest memory")
    } else {
        None
    }
}

/// The device state of one frontend connection.
#[derive(Clone)]
pub struct BlkDevice(Arc<Inner>);

impl BlkDevice {
    pub fn new(disk: Arc<Disk>) -> io::Result<Self> {
        let queues = (0..usize::from(disk.settings.num_queues))
            .map(|index| {
                let notify = Arc::new(QueueWaker {
                    eventfd: EventFd::new(EFD_NONBLOCK)?,
                    armed: AtomicBool::new(false),
                    woken: AtomicBool::new(false),
                });
                let dup = notify.eventfd.try_clone()?;
                // SAFETY: `into_raw_fd` hands over the duplicate, which nothing else owns.
                let notify_fd = unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) };
                let link = QueueLink {
                    index,
                    notify: notify_fd,
                };
                let io = match disk.backend.queue(link) {
                    Ok(Some(io)) => io,
                    Ok(None) => disk.backend.clone(),
                    Err(e) => {
                        return Err(io::Error::other(format!(
                            "disk `{}`: queue {index}: {e}",
                            disk.name()
                        )))
                    }
                };
                Ok(Queue {
                    io,
                    inflight: Mutex::default(),
                    waker: Waker::from(notify.clone()),
                    notify,
                    stalled: AtomicBool::new(false),
                    no_room: AtomicBool::new(false),
                    vring: std::sync::OnceLock::new(),
                    finishing: AtomicBool::new(false),
                    finished: AtomicBool::new(false),
                    busy: AtomicBool::new(false),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let writeback =
            disk.settings.cache == twinpath_core::CacheMode::Writeback && disk.info.volatile_cache;
        Ok(BlkDevice(Arc::new(Inner {
            limits: disk.limits(),
            disk,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(writeback),
            mem: RwLock::new(None),
            queues,
            watched: Mutex::default(),
            hang_up: Mutex::default(),
            exit_fds: Mutex::default(),
        })))
    }

    /// The epoll id of the per-queue completion eventfd: above the ids the library reserves.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.0.disk.settings.num_queues) + 1
    }

    /// The completion eventfd of queue `index`, to register on that queue's worker epoll.
    pub fn completion_fd(&self, index: usize) -> std::os::fd::RawFd {
        self.0.queues[index].notify.eventfd.as_raw_fd()
    }

    /// How to end this connection, for a frontend that breaks the rules.
    pub fn set_hang_up(&self, handle: Option<vhost_user_backend::ShutdownHandle>) {
        *lock(&self.0.hang_up) = handle;
    }

    /// Frees what the connection's vhost-user daemon leaves behind, once it is dropped (its
    /// worker threads joined, their epoll closed): without this every connection leaked an
    /// eventfd, and a frontend reconnecting in a loop ran the whole daemon out of descriptors.
    pub fn release(&self) {
        *lock(&self.0.hang_up) = None;
        for fd in lock(&self.0.exit_fds).drain(..) {
            // SAFETY: an eventfd this device made for the daemon, which only registered it
            // with the epoll it has closed by now; nobody else holds this number.
            unsafe { libc::close(fd) };
        }
    }

    /// Ends the connection if its frontend shrank guest memory under the device (the
    /// accesses that hit it completed on pages of zeros).
    fn hang_up_if_poisoned(&self) {
        if !lock(&self.0.watched).iter().any(Watched::poisoned) {
            return;
        }
        if let Some(h) = lock(&self.0.hang_up).take() {
            tracing::error!(
                disk = %self.0.disk.name(),
                "the frontend shrank guest memory it had handed over: closing its connection"
            );
            h.shutdown();
        }
    }

    /// Checks a new memory table before any queue may read it: every region lies within its
    /// file, and every mapping is watched for the frontend shrinking it later. Mappings stay
    /// watched until the connection ends: requests of an earlier table may still use theirs.
    fn check_memory(&self, table: &Mem) -> io::Result<()> {
        let mut watched = lock(&self.0.watched);
        for region in table.iter() {
            let len = region.len() as usize;
            // A region larger than its file faults as soon as the device touches its end.
            if let Some(f) = region.file_offset() {
                let size = f.file().metadata()?.len();
                if f.start()
                    .checked_add(len as u64)
                    .is_none_or(|end| end > size)
                {
                    return Err(io::Error::other(format!(
                        "guest memory region at {:#x} of {len} bytes lies past the end of its \
                         file ({size} bytes from offset {})",
                        region.start_addr().0,
                        f.start()
                    )));
                }
            }
            if watched.iter().any(|w| w.covers(region.as_ptr(), len)) {
                continue;
            }
            if watched.len() >= MAX_WATCHED {
                return Err(io::Error::other(format!(
                    "more than {MAX_WATCHED} guest memory mappings on one connection"
                )));
            }
            let w = crate::sigbus::watch(region.as_ptr(), len).ok_or_else(|| {
                io::Error::other("too many guest memory mappings in the daemon to watch")
            })?;
            watched.push(w);
        }
        Ok(())
    }

    /// Requests of this connection still running.
    pub fn inflight(&self) -> usize {
        self.0
            .queues
            .iter()
            .map(|q| {
                let i = lock(&q.inflight);
                i.futures.len() + i.detached.len()
            })
            .sum()
    }

    /// Has every queue's worker finish its queue's I/O path (wait for what its engine has in
    /// flight, on the worker thread, see [`BlockIo::finish`]) and then take no more requests:
    /// for a connection whose frontend is gone, while its workers still run. Returns the
    /// queues whose worker did not answer within `timeout`.
    ///
    /// A queue whose worker is not inside an event and has nothing in flight is done at once:
    /// any later event sees `finishing` and submits nothing. So a worker that vhost-user-backend
    /// already ended (a broken kick, say) costs no wait unless it left I/O behind.
    pub fn finish_queues(&self, timeout: Duration) -> usize {
        for q in &self.0.queues {
            q.finishing.store(true, Ordering::SeqCst);
            let _ = q.notify.eventfd.write(1);
        }
        let unfinished = || {
            self.0
                .queues
                .iter()
                .filter(|q| {
                    let idle = !q.busy.load(Ordering::SeqCst) && q.io.in_flight() == 0;
                    !(q.finished.load(Ordering::Acquire) || idle)
                })
                .count()
        };
        twinpath_core::wait_until(timeout, || unfinished() == 0);
        unfinished()
    }

    /// Drops the requests of a connection that is gone. Their backend work may still finish in
    /// the background; the guest memory they point into stays mapped until it does.
    pub fn abandon(&self) {
        for q in &self.0.queues {
            *lock(&q.inflight) = Inflight::default();
        }
    }

    fn memory(&self) -> Option<Arc<Mem>> {
        self.0.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The disk's limits with the segment limits this connection's driver accepted.
    fn limits(&self) -> Limits {
        let acked = self.0.acked_features.load(Ordering::Acquire);
        let has = |bit: u32| acked & (1 << bit) != 0;
        Limits {
            size_max: has(VIRTIO_BLK_F_SIZE_MAX).then_some(SIZE_MAX),
            // Always: the segment list is memory the byte budget does not count (a chain of
            // 65,000 one-byte descriptors took 2 MiB before it), and drivers that did not
            // accept SEG_MAX (firmware) send a header, one buffer and a status.
            seg_max: Some(SEG_MAX),
            ..self.0.limits
        }
    }

    fn config(&self) -> BlkConfig {
        let d = &self.0.disk;
        let block_sectors = d.info.block_size / 512;
        BlkConfig {
            capacity_sectors: self.0.limits.capacity_sectors,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: d.info.block_size,
            writeback: self.0.writeback.load(Ordering::Acquire),
            num_queues: d.settings.num_queues,
            max_discard_sectors: self.0.limits.max_discard_sectors,
            discard_sector_alignment: block_sectors,
            max_write_zeroes_sectors: self.0.limits.max_write_zeroes_sectors,
        }
    }

    /// Pops new chains (unless draining) and completes whatever is ready, then tells the guest.
    fn process(&self, queue_index: usize, vring: &VringRwLock, pop: bool) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let queue = &self.0.queues[queue_index];
        let limits = self.limits();
        let event_idx = self.0.event_idx.load(Ordering::Acquire);
        let mut used = Vec::new();
        let mut guard = lock(&queue.inflight);
        let inflight = &mut *guard;
        let mut cx = Context::from_waker(&queue.waker);
        let detached = !inflight.detached.is_empty();
        while let Poll::Ready(Some(_)) = inflight.detached.poll_next_unpin(&mut cx) {}
        // The driver's requests waited for the detached ones, or for room in the line: take
        // them now.
        let pop = pop || (detached && inflight.detached.is_empty()) || inflight.full;
        let ring_size = usize::from(vring.get_ref().get_queue().size());
        let mut empty_pass = false;
        loop {
            let popping = pop && !self.0.disk.is_draining() && inflight.detached.is_empty();
            // Why the ring cannot be read, if it cannot. Nothing will pop until the frontend
            // sets the queue up again, so this pass is the last.
            let mut stuck = None;
            let mut popped = false;
            if popping {
                // Checked before popping only once the ring was found unreadable (until it is
                // readable again): reading it logs an error line per try in virtio-queue.
                if queue.stalled.load(Ordering::Acquire) {
                    stuck = unreadable(vring.get_ref().get_queue(), &mem).map(str::to_owned);
                }
                if stuck.is_none() && event_idx {
                    if let Err(e) = vring.get_mut().get_queue_mut().disable_notification(&*mem) {
                        stuck = Some(e.to_string());
                    }
                }
                while stuck.is_none() {
                    // A driver has at most one request per ring entry that is not in the used
                    // ring; one that makes more available waits until it has fewer.
                    inflight.full = inflight.order.len() >= ring_size;
                    if inflight.full {
                        break;
                    }
                    let chain = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
                        Ok(mut available) => available.next(),
                        Err(e) => {
                            stuck = Some(e.to_string());
                            None
                        }
                    };
                    let Some(chain) = chain else {
                        // Rare when the ring is fine (a kick with nothing new): look why.
                        if !popped && stuck.is_none() {
                            stuck =
                                unreadable(vring.get_ref().get_queue(), &mem).map(str::to_owned);
                        }
                        break;
                    };
                    popped = true;
                    let head = chain.head_index();
                    let mut held = inflight.heads.get_mut(usize::from(head));
                    if held.as_deref() == Some(&true) {
                        self.0.disk.note_rejected(format!(
                            "queue {queue_index}: head {head} made available again while in \
                             flight"
                        ));
                        continue;
                    }
                    if let Some(h) = held.as_deref_mut() {
                        *h = true;
                    }
                    drop(held);
                    let seq = inflight.order.join();
                    match request::parse(&*mem, chain, &limits) {
                        Ok(req) => {
                            let io = queue.io.clone();
                            inflight
                                .futures
                                .push(self.run(io, seq, head, req, mem.clone()));
                        }
                        Err(rejected) => {
                            self.0.disk.note_rejected(rejected.reason);
                            let len = match rejected.status {
                                Some(status) => {
                                    // SAFETY: `mem` (alive here) holds the checked status byte.
                                    unsafe { status.write(rejected.code()) };
                                    1
                                }
                                None => 0,
                            };
                            inflight.order.finish(seq, head, len);
                        }
                    }
                }
                queue.stalled.store(stuck.is_some(), Ordering::Release);
            }
            // Fast backends finish inside the first poll; collect them in this same pass.
            queue.notify.armed.store(false, Ordering::Release);
            while let Poll::Ready(Some(done)) = inflight.futures.poll_next_unpin(&mut cx) {
                // SAFETY: `done._mem` keeps the status byte's mapping alive.
                unsafe { done.status.write(done.code) };
                inflight.order.finish(done.seq, done.head, done.used_len);
            }
            let published = used.len();
            inflight.order.take_ready(&mut used);
            for &(head, _) in &used[published..] {
                // A refused chain's head may lie beyond any ring, and so beyond `heads`.
                if let Some(mut held) = inflight.heads.get_mut(usize::from(head)) {
                    *held = false;
                }
            }
            // What the requests queued with the engine while being polled goes out now.
            queue.io.submit();
            if popping && inflight.full && inflight.order.len() < ring_size {
                continue;
            }
            if !(popping && event_idx) || inflight.full {
                break;
            }
            // Going round again for a ring that cannot be read would spin this worker (and
            // its CPU) forever; the queue waits for the frontend to set it up again and kick.
            if let Some(reason) = stuck {
                self.0
                    .disk
                    .note_rejected(format!("queue {queue_index} cannot be read: {reason}"));
                break;
            }
            // New chains may have arrived between the last pop and re-enabling notifications.
            let more = vring.get_mut().get_queue_mut().enable_notification(&*mem);
            match more {
                Ok(true) => {}
                Ok(false) => break,
                // An error here ends nothing but this pass: a `?` would end the queue's worker
                // thread, and with it the requests in flight.
                Err(e) => {
                    queue.stalled.store(true, Ordering::Release);
                    self.0
                        .disk
                        .note_rejected(format!("queue {queue_index} cannot be read: {e}"));
                    break;
                }
            }
            // A chain that arrived so is popped by the next pass. A second pass in a row that
            // pops nothing has a ring whose entries cannot be read (whatever the cause).
            if !popped && empty_pass {
                queue.stalled.store(true, Ordering::Release);
                self.0.disk.note_rejected(format!(
                    "queue {queue_index} cannot be read: its available index moves but no \
                     entry pops"
                ));
                break;
            }
            empty_pass = !popped;
        }
        queue.no_room.store(
            inflight.full || !inflight.detached.is_empty(),
            Ordering::Release,
        );
        // The used entries and their signal before the queue's lock goes: `stop_vring` waits
        // on it, and GET_VRING_BASE must not answer before they are in the ring.
        let published = self.publish(vring, &mem, used);
        drop(guard);
        self.hang_up_if_poisoned();
        published
    }

    /// Puts `used` (in line order) into the used ring and signals the guest if it asked.
    fn publish(&self, vring: &VringRwLock, mem: &Mem, used: Vec<(u16, u32)>) -> io::Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let notify = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            for (head, len) in used {
                // A refused chain whose head names no descriptor has no used entry (it was
                // counted when refused; virtio-queue would log an error per entry).
                if head >= q.size() {
                    continue;
                }
                if let Err(e) = q.add_used(mem, head, len) {
                    self.0
                        .disk
                        .note_rejected(format!("cannot add used entry {head}: {e}"));
                }
            }
            // When the ring cannot tell, the guest is told: a spare interrupt costs nothing.
            q.needs_notification(mem).unwrap_or(true)
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// While enough operations are in flight on the worker's own rings, keeps looking for
    /// their completions and for new requests until the disk's `poll_us` passes without
    /// either, before the worker sleeps in epoll (like QEMU's iothread polling): each round
    /// found this way saves a wake-up of this thread, which at depth costs more than the
    /// polling. Requests on other threads (a san disk's SMB fallback) may complete meanwhile:
    /// their wakes are taken from the `woken` flag.
    fn poll_while_busy(&self, thread_id: usize, vring: &VringRwLock) -> io::Result<()> {
        let poll = Duration::from_micros(u64::from(self.0.disk.settings.poll_us));
        if poll.is_zero() {
            return Ok(());
        }
        let queue = &self.0.queues[thread_id];
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut since = Instant::now();
        loop {
            if queue.io.in_flight() < POLL_MIN_INFLIGHT || since.elapsed() >= poll {
                break;
            }
            // Wakes only mark `woken` now; taking it with a swap loses none.
            queue.notify.armed.store(true, Ordering::SeqCst);
            queue.io.reap();
            let woken = queue.notify.woken.swap(false, Ordering::SeqCst);
            let arrived = !queue.stalled.load(Ordering::Acquire)
                && !queue.no_room.load(Ordering::Acquire)
                && {
                    let q = vring.get_ref();
                    let q = q.get_queue();
                    q.avail_idx(&*mem, Ordering::Acquire)
                        .is_ok_and(|idx| idx.0 != q.next_avail())
                };
            if woken || arrived {
                self.process(thread_id, vring, arrived)?;
                since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Wakes from here on must write the eventfd again; one that came in between did not.
        queue.notify.armed.store(false, Ordering::SeqCst);
        if queue.notify.woken.swap(false, Ordering::SeqCst) {
            self.process(thread_id, vring, false)?;
        }
        Ok(())
    }

    /// The future that carries one request from the guest to the backend and back.
    fn run(
        &self,
        io: Arc<dyn BlockIo>,
        seq: u64,
        head: u16,
        req: Request,
        mem: Arc<Mem>,
    ) -> RequestFuture {
        let guard = InflightGuard::new(self.0.disk.clone());
        // Only a volatile cache needs a flush after every write to be written through.
        let writethrough = !self.0.writeback.load(Ordering::Acquire) && self.0.limits.flush;
        // The buffers keep the mapping alive, and count as work of the disk for as long as
        // any backend holds them.
        let keepalive: Arc<dyn std::any::Any + Send + Sync> =
            Arc::new((mem.clone(), WorkGuard::new(self.0.disk.clone())));
        // SAFETY: the parser checked every segment against `mem`, which `keepalive` holds.
        let bufs = unsafe { GuestBuffers::from_raw_parts(req.data.iter().copied(), keepalive) };
        let used_len = req.used_len();
        let started = Instant::now();
        Box::pin(async move {
            let disk = guard.disk();
            // At most the whole budget: a request larger than it still runs, alone. Zeroing
            // without guest data still holds a buffer of zeros in some backends.
            let bytes = match req.kind {
                RequestKind::WriteZeroes { .. } => WRITE_ZEROES_BUDGET,
                _ => req.data_len,
            };
            let want = bytes.min(disk.settings.max_inflight_bytes as usize) as u32;
            let budget = disk.budget.acquire_many(want).await;
            let op = match req.kind {
                RequestKind::Read { .. } => Op::Read,
                RequestKind::Write { .. } => Op::Write,
                _ => Op::Other,
            };
            let backend = &*io;
            let (what, result) = match req.kind {
                RequestKind::Read { offset } => (
                    "read",
                    backend.read(offset, bufs).await.map_err(|e| (offset, e)),
                ),
                RequestKind::Write { offset } => {
                    let mut r = backend.write(offset, bufs).await;
                    if r.is_ok() && writethrough {
                        r = backend.flush().await;
                    }
                    ("write", r.map_err(|e| (offset, e)))
                }
                RequestKind::Flush => ("flush", backend.flush().await.map_err(|e| (0, e))),
                RequestKind::GetId => {
                    bufs.copy_from_slice(0, &disk.serial);
                    ("get-id", Ok(()))
                }
                RequestKind::Discard { offset, len } => (
                    "discard",
                    backend.discard(offset, len).await.map_err(|e| (offset, e)),
                ),
                RequestKind::WriteZeroes { offset, len, unmap } => (
                    "write-zeroes",
                    backend
                        .write_zeroes(offset, len, unmap)
                        .await
                        .map_err(|e| (offset, e)),
                ),
            };
            disk.io
                .record(op, req.data_len as u64, started, result.is_ok());
            let code = match result {
                Ok(()) => STATUS_OK,
                Err((offset, e)) => {
                    disk.note_failed(&format!("{what} at offset {offset}"), &e);
                    if e.kind() == ErrorKind::Unsupported {
                        STATUS_UNSUPP
                    } else {
                        STATUS_IOERR
                    }
                }
            };
            drop(budget);
            Done {
                seq,
                head,
                used_len: if code == STATUS_OK { used_len } else { 1 },
                status: req.status,
                code,
                _mem: mem,
                _inflight: guard,
            }
        })
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.0.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let limits = &self.0.limits;
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ;
        // A backend without a volatile cache has nothing to flush and no cache mode.
        if limits.flush {
            f |= 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_CONFIG_WCE;
        }
        if limits.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if limits.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if limits.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_acked =
            self.0.acked_features.load(Ordering::Acquire) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 && wce_acked {
            let writeback = buf[0] != 0;
            tracing::info!(disk = %self.0.disk.name(), "guest set cache mode to {}", if writeback { "writeback" } else { "writethrough" });
            self.0.writeback.store(writeback, Ordering::Release);
            return Ok(());
        }
        // Every other field is read-only for the driver (virtio 1.2, 5.2.4).
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("config offset {offset} is read-only"),
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        let table = mem.memory().into_inner();
        if let Err(e) = self.check_memory(&table) {
            // vhost-user-backend's own accesses (SET_VRING_ADDR reads the used index) go
            // through its table: give it back the last good one.
            let good = self.memory().map_or_else(Mem::new, |m| (*m).clone());
            mem.lock().unwrap_or_else(|e| e.into_inner()).replace(good);
            return Err(e);
        }
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(table);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock(&self.0.exit_fds).push(std::os::fd::AsRawFd::as_raw_fd(&consumer));
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend reads the ring state after this returns: accepted requests must be done.
        let Some(queue) = self.0.queues.get(queue_index as usize) else {
            return Ok(());
        };
        if !twinpath_core::wait_until(STOP_TIMEOUT, || lock(&queue.inflight).futures.is_empty()) {
            tracing::error!(disk = %self.0.disk.name(), queue = queue_index, "requests still running after {STOP_TIMEOUT:?}; stopping the queue anyway (they finish without a used entry, and the queue takes new requests once they did)");
            let mut inflight = lock(&queue.inflight);
            let running = std::mem::take(&mut inflight.futures);
            inflight.detached.extend(running);
            inflight.heads = Default::default();
            inflight.order.forget();
            inflight.full = false;
            // Nothing of the line is in the used ring: the frontend takes it all as not
            // done and makes it available again (the queue takes it once the detached
            // requests finished), as after a kill.
            if let Some(vring) = queue.vring.get() {
                let mut state = vring.get_mut();
                let q = state.get_queue_mut();
                let used = q.next_used();
                q.set_next_avail(used);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let queue = &self.0.queues[thread_id];
        // Paired with `finish_queues` (both SeqCst): either it sees this worker busy and waits,
        // or this worker sees `finishing` and submits nothing more.
        queue.busy.store(true, Ordering::SeqCst);
        if queue.finishing.load(Ordering::SeqCst) {
            queue.finish_io();
            queue.busy.store(false, Ordering::SeqCst);
            return Ok(());
        }
        let handled = self.handle_queue_event(queue, device_event, evset, vrings, thread_id);
        if handled.is_err() {
            // vhost-user-backend ends the worker on an error: nobody else could empty the
            // queue's I/O path.
            queue.finish_io();
        }
        queue.busy.store(false, Ordering::SeqCst);
        handled
    }
}

impl BlkDevice {
    fn handle_queue_event(
        &self,
        queue: &Queue,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per worker thread: the thread's only vring is queue `thread_id`.
        let vring = vrings
            .first()
            .ok_or_else(|| io::Error::other("worker without a vring"))?;
        queue.vring.get_or_init(|| vring.clone());
        if u64::from(device_event) == self.completion_event_id() {
            let _ = queue.notify.eventfd.read();
            // The futures the reap wakes are polled right below: no eventfd write for them.
            queue.notify.armed.store(true, Ordering::Release);
            queue.io.reap();
            self.process(thread_id, vring, false)?;
            return self.poll_while_busy(thread_id, vring);
        }
        if device_event == 0 {
            self.process(thread_id, vring, true)?;
            return self.poll_while_busy(thread_id, vring);
        }
        Err(io::Error::other(format!("unknown event {device_event}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SECTOR_SIZE;
    use crate::testing::{Rig, RigOptions};
    use vm_memory::Bytes;

    fn rig(read_only: bool) -> Rig {
        rig_with(read_only, 64 << 20)
    }

    fn rig_with(read_only: bool, max_inflight_bytes: u32) -> Rig {
        rig_on(read_only, max_inflight_bytes, true)
    }

    fn rig_on(read_only: bool, max_inflight_bytes: u32, volatile_cache: bool) -> Rig {
        Rig::new(RigOptions {
            read_only,
            max_inflight_bytes,
            volatile_cache,
        })
    }

    #[test]
    fn malformed_chain_is_answered_and_queue_keeps_working() {
        let mut rig = rig(false);
        let bad = rig.push(99, 0, None);
        rig.mem.write_slice(&[7u8; 512], rig.data_addr(2)).unwrap();
        let write = rig.push(VIRTIO_BLK_T_OUT, 2, Some((512, false)));
        let beyond = rig.push(VIRTIO_BLK_T_IN, 1 << 20, Some((512, true)));
        let read = rig.push(VIRTIO_BLK_T_IN, 2, Some((512, true)));
        rig.kick();
        assert_eq!(rig.used().len(), 4);
        assert_eq!(rig.status(bad), STATUS_UNSUPP);
        assert_eq!(rig.status(write), STATUS_OK);
        assert_eq!(rig.status(beyond), STATUS_IOERR);
        assert_eq!(rig.status(read), STATUS_OK);
        let mut back = [0u8; 512];
        rig.mem.read_slice(&mut back, rig.data_addr(8)).unwrap();
        assert_eq!(back, [7u8; 512]);
        assert_eq!(
            &rig.backend.data()[2 * SECTOR_SIZE as usize..][..4],
            &[7, 7, 7, 7]
        );
        assert_eq!(rig.device.0.disk.rejected_count(), 2);
    }

    #[test]
    fn requests_finish_out_of_order_and_are_used_in_the_order_they_came() {
        let mut rig = rig(false);
        rig.backend.hold_reads();
        rig.push(VIRTIO_BLK_T_IN, 0, Some((512, true)));
        let write = rig.push(VIRTIO_BLK_T_OUT, 8, Some((512, false)));
        rig.kick();
        // The write (head 3) finished while the read (head 0) is still in flight; the used
        // ring takes it only after the read.
        assert_eq!(rig.status(write), STATUS_OK);
        assert_eq!(rig.used(), Vec::<u32>::new());
        assert_eq!(rig.device.inflight(), 1);
        rig.backend.release_reads();
        // The waker fired the queue's eventfd; the worker's completion event finishes the read.
        assert_eq!(rig.device.0.queues[0].notify.eventfd.read().unwrap(), 1);
        rig.completion();
        assert_eq!(rig.used(), vec![0, 3]);
        assert_eq!(rig.device.inflight(), 0);
    }

    #[test]
    fn a_driver_with_more_requests_than_ring_entries_waits_for_room() {
        let mut rig = rig(false);
        rig.backend.hold_reads();
        let read = rig.push(VIRTIO_BLK_T_IN, 0, Some((512, true)));
        // Entries naming heads beyond the ring: each is refused, and waits in line behind the
        // read. 70 of them, in a ring of 64, in two rounds.
        let avail = rig.vq.avail();
        let line = || lock(&rig.device.0.queues[0].inflight).order.len();
        for (from, to) in [(1u16, 64u16), (64, 71)] {
            for i in from..to {
                // Every other one beyond the largest ring, where no head is tracked.
                let head = if i % 2 == 0 { 100 + i } else { 2000 + i };
                avail
                    .ring()
                    .ref_at(usize::from(i % 64))
                    .unwrap()
                    .store(head);
            }
            avail.idx().store(to);
            rig.kick();
            assert_eq!(line(), 64, "the line stops at the ring's size");
            assert_eq!(rig.used(), Vec::<u32>::new());
        }
        rig.backend.release_reads();
        rig.completion();
        // The read first; the refused entries name no descriptor, so no used entry either.
        assert_eq!(rig.used(), vec![0]);
        assert_eq!(rig.status(read), STATUS_OK);
        assert_eq!(line(), 0, "the last 7 were taken once there was room");
        assert!(rig.device.0.disk.rejected_count() >= 70);
    }

    #[test]
    fn requests_over_the_byte_budget_wait_for_it() {
        let mut rig = rig_with(false, 4096);
        rig.backend.hold_reads();
        rig.push(VIRTIO_BLK_T_IN, 0, Some((4096, true)));
        let write = rig.push(VIRTIO_BLK_T_OUT, 8, Some((512, false)));
        rig.kick();
        // The read holds the whole budget: the write waits, accepted, not failed.
        assert_eq!(rig.used(), Vec::<u32>::new());
        assert_eq!(rig.device.inflight(), 2);
        assert_eq!(rig.status(write), 0xff);
        rig.backend.release_reads();
        rig.completion();
        assert_eq!(rig.used(), vec![0, 3]);
        assert_eq!(rig.status(write), STATUS_OK);
    }

    #[test]
    fn read_only_disk_refuses_writes_and_get_id_returns_serial() {
        let mut rig = rig(true);
        assert_ne!(rig.device.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let write = rig.push(VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        let id = rig.push(VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
        rig.kick();
        assert_eq!(rig.status(write), STATUS_IOERR);
        assert_eq!(rig.status(id), STATUS_OK);
        let mut serial = [0u8; 20];
        rig.mem.read_slice(&mut serial, rig.data_addr(3)).unwrap();
        assert_eq!(&serial[..9], b"serial-1\0");
    }

    #[test]
    fn writethrough_flushes_every_write() {
        let mut rig = rig(false);
        rig.push(VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        rig.kick();
        assert_eq!(rig.backend.flushes(), 0);
        // Without CONFIG_WCE acked, the guest cannot change the cache mode.
        assert!(rig
            .device
            .set_config(WRITEBACK_OFFSET as u32, &[0])
            .is_err());
        rig.device.acked_features(rig.device.features());
        rig.device
            .set_config(WRITEBACK_OFFSET as u32, &[0])
            .unwrap();
        assert_eq!(rig.device.get_config(WRITEBACK_OFFSET as u32, 1), vec![0]);
        rig.push(VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        rig.kick();
        assert_eq!(rig.backend.flushes(), 1);
        assert!(
            rig.device.set_config(0, &[1, 2, 3, 4]).is_err(),
            "capacity is read-only"
        );
    }

    #[test]
    fn a_backend_without_a_volatile_cache_offers_no_flush_and_writes_through_without_one() {
        let mut rig = rig_on(false, 64 << 20, false);
        let features = rig.device.features();
        assert_eq!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_CONFIG_WCE), 0);
        rig.device.acked_features(features);
        assert_eq!(rig.device.get_config(WRITEBACK_OFFSET as u32, 1), vec![0]);
        let write = rig.push(VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        let flush = rig.push(VIRTIO_BLK_T_FLUSH, 0, None);
        rig.kick();
        assert_eq!(rig.status(write), STATUS_OK);
        assert_eq!(rig.status(flush), STATUS_UNSUPP);
        assert_eq!(rig.backend.flushes(), 0);
    }

    #[test]
    fn draining_finishes_accepted_requests_and_takes_no_new_ones() {
        let mut rig = rig(false);
        rig.backend.hold_reads();
        rig.push(VIRTIO_BLK_T_IN, 0, Some((512, true)));
        rig.kick();
        assert_eq!(rig.device.0.disk.inflight(), 1);
        rig.device.0.disk.start_draining();
        let late = rig.push(VIRTIO_BLK_T_OUT, 8, Some((512, false)));
        rig.kick();
        assert!(
            rig.used().is_empty(),
            "nothing completed, nothing new taken"
        );
        assert_eq!(rig.status(late), 0xff, "the late write was never started");
        rig.backend.release_reads();
        rig.completion();
        assert_eq!(rig.used(), vec![0]);
        assert_eq!(rig.device.0.disk.inflight(), 0);
    }
}
