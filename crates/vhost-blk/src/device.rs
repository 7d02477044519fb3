//! The vhost-user-blk device for one frontend connection.
//!
//! One worker thread per queue (vhost-user-backend's epoll threads). A worker pops chains,
//! parses them, and turns each into a future that drives the backend; the futures live in the
//! queue's own executor and are polled on the worker thread. When a future is woken (by a
//! backend thread, a tokio task, ...), the queue's eventfd fires and the worker polls again.
//! Requests therefore run concurrently and complete out of order, with no lock held across I/O.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use twinpath_core::{ErrorKind, GuestBuffers};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config_space::{BlkConfig, WRITEBACK_OFFSET};
use crate::disk::{Disk, InflightGuard};
use crate::request::{
    self, Limits, Request, RequestKind, StatusByte, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};

type Mem = GuestMemoryMmap<()>;
type RequestFuture = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Largest queue a frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest single data segment we advertise (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// How long GET_VRING_BASE waits for accepted requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A finished request, ready to be written back to the used ring.
struct Done {
    head: u16,
    used_len: u32,
    status: StatusByte,
    code: u8,
    // The status byte lives in this mapping.
    _mem: Arc<Mem>,
    _inflight: InflightGuard,
}

/// Wakes a queue's worker through its eventfd.
struct QueueWaker {
    eventfd: EventFd,
    armed: AtomicBool,
}

impl Wake for QueueWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // One write per polling round is enough; the worker re-arms before it polls.
        if !self.armed.swap(true, Ordering::AcqRel) {
            let _ = self.eventfd.write(1);
        }
    }
}

struct Queue {
    inflight: Mutex<FuturesUnordered<RequestFuture>>,
    waker: Arc<QueueWaker>,
}

struct Inner {
    disk: Arc<Disk>,
    limits: Limits,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    queues: Vec<Queue>,
}

/// The device state of one frontend connection.
#[derive(Clone)]
pub struct BlkDevice(Arc<Inner>);

impl BlkDevice {
    pub fn new(disk: Arc<Disk>) -> io::Result<Self> {
        let queues = (0..disk.settings.num_queues)
            .map(|_| {
                Ok(Queue {
                    inflight: Mutex::new(FuturesUnordered::new()),
                    waker: Arc::new(QueueWaker {
                        eventfd: EventFd::new(EFD_NONBLOCK)?,
                        armed: AtomicBool::new(false),
                    }),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let writeback = disk.settings.cache == twinpath_core::CacheMode::Writeback;
        Ok(BlkDevice(Arc::new(Inner {
            limits: disk.limits(),
            disk,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(writeback),
            mem: RwLock::new(None),
            queues,
        })))
    }

    /// The epoll id of the per-queue completion eventfd: above the ids the library reserves.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.0.disk.settings.num_queues) + 1
    }

    /// The completion eventfd of queue `index`, to register on that queue's worker epoll.
    pub fn completion_fd(&self, index: usize) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.queues[index].waker.eventfd.as_raw_fd()
    }

    /// Requests of this connection still running.
    pub fn inflight(&self) -> usize {
        self.0.queues.iter().map(|q| lock(&q.inflight).len()).sum()
    }

    /// Drops the requests of a connection that is gone. Their backend work may still finish in
    /// the background; the guest memory they point into stays mapped until it does.
    pub fn abandon(&self) {
        for q in &self.0.queues {
            lock(&q.inflight).clear();
        }
    }

    fn memory(&self) -> Option<Arc<Mem>> {
        let guard = self.0.mem.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|m| m.memory().into_inner())
    }

    fn config(&self) -> BlkConfig {
        let d = &self.0.disk;
        let block_sectors = d.info.block_size / 512;
        BlkConfig {
            capacity_sectors: self.0.limits.capacity_sectors,
            size_max: SIZE_MAX,
            seg_max: (MAX_QUEUE_SIZE - 2) as u32,
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
        let event_idx = self.0.event_idx.load(Ordering::Acquire);
        let mut used = Vec::new();
        let mut inflight = lock(&queue.inflight);
        loop {
            let popping = pop && !self.0.disk.is_draining();
            if popping {
                if event_idx {
                    vring.disable_notification().map_err(io::Error::other)?;
                }
                loop {
                    let chain = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = chain else { break };
                    let head = chain.head_index();
                    match request::parse(&*mem, chain, &self.0.limits) {
                        Ok(req) => inflight.push(self.run(head, req, mem.clone())),
                        Err(rejected) => {
                            self.0.disk.note_rejected(&rejected.reason);
                            let len = match rejected.status {
                                Some(status) => {
                                    // SAFETY: `mem` (alive here) holds the checked status byte.
                                    unsafe { status.write(rejected.code) };
                                    1
                                }
                                None => 0,
                            };
                            used.push((head, len));
                        }
                    }
                }
            }
            // Fast backends finish inside the first poll; collect them in this same pass.
            queue.waker.armed.store(false, Ordering::Release);
            let waker = Waker::from(queue.waker.clone());
            let mut cx = Context::from_waker(&waker);
            while let Poll::Ready(Some(done)) = inflight.poll_next_unpin(&mut cx) {
                // SAFETY: `done._mem` keeps the status byte's mapping alive.
                unsafe { done.status.write(done.code) };
                used.push((done.head, done.used_len));
            }
            if !(popping && event_idx) {
                break;
            }
            // New chains may have arrived between the last pop and re-enabling notifications.
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        drop(inflight);

        if used.is_empty() {
            return Ok(());
        }
        for (head, len) in used {
            if let Err(e) = vring.add_used(head, len) {
                self.0
                    .disk
                    .note_rejected(&format!("cannot add used entry {head}: {e}"));
            }
        }
        if vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// The future that carries one request from the guest to the backend and back.
    fn run(&self, head: u16, req: Request, mem: Arc<Mem>) -> RequestFuture {
        let disk = self.0.disk.clone();
        let guard = InflightGuard::new(&disk);
        let writethrough = !self.0.writeback.load(Ordering::Acquire);
        let keepalive: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
        // SAFETY: the parser checked every segment against `mem`, which `keepalive` holds.
        let bufs = unsafe { GuestBuffers::from_raw_parts(req.data.iter().copied(), keepalive) };
        let used_len = req.used_len();
        Box::pin(async move {
            let backend = disk.backend();
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
            Done {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
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
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend reads the ring state after this returns: accepted requests must be done.
        let Some(queue) = self.0.queues.get(queue_index as usize) else {
            return Ok(());
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !lock(&queue.inflight).is_empty() {
            if Instant::now() > deadline {
                tracing::error!(disk = %self.0.disk.name(), queue = queue_index, "requests still running after {STOP_TIMEOUT:?}; stopping the queue anyway");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
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
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per worker thread: the thread's only vring is queue `thread_id`.
        let vring = vrings
            .first()
            .ok_or_else(|| io::Error::other("worker without a vring"))?;
        if u64::from(device_event) == self.completion_event_id() {
            let _ = self.0.queues[thread_id].waker.eventfd.read();
            return self.process(thread_id, vring, false);
        }
        if device_event == 0 {
            return self.process(thread_id, vring, true);
        }
        Err(io::Error::other(format!("unknown event {device_event}")))
    }
}
