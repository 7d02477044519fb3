//! io_uring submission for the [`Uring`](crate::Uring) engine.
//!
//! A device queue's requests go to the queue worker's own ring ([`QueueRing`], handed in by
//! the caller): operations are queued while the worker polls and submitted in one call at its
//! `submit`, and the kernel signals the worker's own eventfd on completion, so the worker
//! reaps them itself with no other thread involved. Anywhere else (tokio tasks), an operation
//! goes to the backend's [`SharedRing`] at once and the ring's eventfd wakes a small tokio
//! task that reaps it. Either eventfd is registered for every completion:
//! `IORING_REGISTER_EVENTFD_ASYNC` would only report io-wq completions and miss O_DIRECT
//! ones, which the kernel posts from task work on the submitting thread.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use twinpath_core::Permit;

/// Ring size: a queue never has more requests in flight than its 1024 descriptors.
const RING_ENTRIES: u32 = 1024;
/// io_uring_enter flag (linux/io_uring.h); the io-uring crate keeps its own copy private.
const IORING_ENTER_GETEVENTS: u32 = 1;

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
    /// The future was dropped before the kernel finished; keeps the buffers alive until then.
    Orphaned(#[allow(dead_code)] Box<dyn Send>),
}

struct State {
    uring: IoUring,
    ops: Slab<Slot>,
    /// Whether completions wait for this ring's thread to ask for them (`DEFER_TASKRUN`).
    deferred: bool,
    /// A worker's operations under a permit, until its flush asks the permits again: a
    /// worker stopped between queueing them and its flush must not submit them when it
    /// resumes if their grants went meanwhile.
    held: Vec<Held>,
}

struct Held {
    entry: squeue::Entry,
    key: usize,
    permit: Arc<dyn Permit>,
}

/// The result of an operation whose permit was withdrawn before it was submitted.
pub(crate) const WITHDRAWN: i32 = -libc::ECANCELED;

impl State {
    /// Submits what is queued and runs the completions the kernel deferred to this thread.
    fn enter(&mut self) {
        let pending = self.uring.submission().len() as u32;
        // SAFETY: no argument is passed; the queued entries' buffers are kept by their slots.
        let r = unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(pending, 0, IORING_ENTER_GETEVENTS, None)
        };
        if let Err(e) = r {
            // The entries stay queued and go with the next call.
            tracing::warn!("io_uring submit failed: {e}");
        }
    }

    fn reap(&mut self) {
        let done: Vec<(usize, i32)> = self
            .uring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        for (key, res) in done {
            self.complete(key, res);
        }
    }

    fn complete(&mut self, key: usize, res: i32) {
        match self.ops.get_mut(key) {
            Some(Slot::Waiting(waker)) => {
                let waker = waker.take();
                self.ops[key] = Slot::Done(res);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Some(Slot::Orphaned(_)) => {
                self.ops.remove(key);
            }
            Some(Slot::Done(_)) | None => {
                tracing::error!(key, "io_uring completion for an unknown operation");
            }
        }
    }

    /// Queues the held operations whose permits still allow them; the others end as
    /// [`WITHDRAWN`] without reaching the kernel.
    fn release_held(&mut self) {
        for h in std::mem::take(&mut self.held) {
            if !h.permit.allows() {
                self.complete(h.key, WITHDRAWN);
                continue;
            }
            // SAFETY: the entry's pointers are kept by its slot (see `Rings::submit`).
            while unsafe { self.uring.submission().push(&h.entry) }.is_err() {
                if let Err(e) = self.uring.submit() {
                    tracing::error!("io_uring submit failed: {e}");
                    self.complete(h.key, -e.raw_os_error().unwrap_or(libc::EIO));
                    break;
                }
            }
        }
    }

    /// Ends the held operations unsubmitted (the worker goes away).
    fn cancel_held(&mut self) {
        for h in std::mem::take(&mut self.held) {
            self.complete(h.key, WITHDRAWN);
        }
    }
}

struct Ring {
    state: Mutex<State>,
    /// The task that reaps a ring used off the workers; a worker reaps its own ring.
    reaper: Option<tokio::task::JoinHandle<()>>,
}

impl Ring {
    /// A ring whose completions signal `notify`, the eventfd of the queue worker that
    /// submits to it and reaps it.
    fn for_worker(notify: &OwnedFd) -> io::Result<Ring> {
        // Only this thread submits to the ring, so the kernel may keep completions until the
        // worker asks (no interrupting task work); kernels before 6.1 lack that.
        let (uring, deferred) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES)
        {
            Ok(uring) => (uring, true),
            Err(_) => (IoUring::new(RING_ENTRIES)?, false),
        };
        uring.submitter().register_eventfd(notify.as_raw_fd())?;
        Ok(Ring {
            state: Mutex::new(State {
                uring,
                ops: Slab::new(),
                deferred,
                held: Vec::new(),
            }),
            reaper: None,
        })
    }

    fn with_reaper(runtime: &tokio::runtime::Handle) -> io::Result<Arc<Ring>> {
        let uring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor that we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        uring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let _enter = runtime.enter();
        // SAFETY: `eventfd` is an OwnedFd moved into the AsyncFd, so it stays open and the same
        // for the AsyncFd's whole life.
        let notify = unsafe { AsyncFd::register(eventfd) }.map_err(io::Error::from)?;
        Ok(Arc::new_cyclic(|weak: &std::sync::Weak<Ring>| {
            let weak = weak.clone();
            let reaper = runtime.spawn(async move {
                loop {
                    let Ok(mut guard) = notify.readable().await else {
                        break;
                    };
                    let mut count = [0u8; 8];
                    // SAFETY: reads 8 bytes into `count` from our eventfd.
                    unsafe { libc::read(notify.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                    guard.clear_ready();
                    match weak.upgrade() {
                        Some(ring) => ring.lock().reap(),
                        None => break,
                    }
                }
            });
            Ring {
                state: Mutex::new(State {
                    uring,
                    ops: Slab::new(),
                    deferred: false,
                    held: Vec::new(),
                }),
                reaper: Some(reaper),
            }
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue worker's own ring, made on the worker thread by its first submission: operations
/// are queued while the worker polls its requests and go to the kernel in one call at
/// [`QueueRing::submit`]; the kernel signals the worker's eventfd on completion and the
/// worker reaps them at [`QueueRing::reap`], with no other thread involved.
pub struct QueueRing {
    notify: OwnedFd,
    ring: OnceLock<Arc<Ring>>,
}

impl QueueRing {
    pub fn new(notify: OwnedFd) -> QueueRing {
        QueueRing {
            notify,
            ring: OnceLock::new(),
        }
    }

    /// The ring, made by the first call: on the worker thread, whose submissions alone it
    /// takes once the kernel bound it to that thread (`SINGLE_ISSUER`).
    fn ring(&self) -> io::Result<&Arc<Ring>> {
        if let Some(ring) = self.ring.get() {
            return Ok(ring);
        }
        let ring = Arc::new(Ring::for_worker(&self.notify)?);
        Ok(self.ring.get_or_init(|| ring))
    }

    pub fn reap(&self) {
        let Some(ring) = self.ring.get() else { return };
        let mut st = ring.lock();
        if st.deferred {
            st.enter();
        }
        st.reap();
    }

    pub fn submit(&self) {
        let Some(ring) = self.ring.get() else { return };
        let mut st = ring.lock();
        st.release_held();
        if !st.uring.submission().is_empty() {
            st.enter();
            st.reap();
        }
    }

    pub fn in_flight(&self) -> usize {
        self.ring.get().map_or(0, |ring| ring.lock().ops.len())
    }

    /// The worker ends: ends what waits for its submit unsubmitted and waits for the kernel
    /// to finish the rest.
    pub fn finish(&self) {
        let Some(ring) = self.ring.get() else { return };
        let mut st = ring.lock();
        st.cancel_held();
        st.reap();
        // Done slots wait for futures that observe them; the others for the kernel.
        while st.ops.iter().any(|(_, s)| !matches!(s, Slot::Done(_))) {
            if let Err(e) = st.uring.submit_and_wait(1) {
                tracing::error!("io_uring wait at worker exit failed: {e}");
                break;
            }
            st.reap();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Some(reaper) = &self.reaper {
            reaper.abort();
        }
        // Operations whose futures were dropped may still be writing into the buffers their
        // slots keep: wait for the kernel before freeing them.
        // (A queue's ring goes with its connection, after the worker thread ended, and a
        // thread ending waits for its I/O; so this waits only on the thread that submitted.)
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.cancel_held();
        st.reap();
        while !st.ops.is_empty() {
            if let Err(e) = st.uring.submit_and_wait(1) {
                tracing::error!("io_uring wait at drop failed, leaking its buffers: {e}");
                std::mem::forget(std::mem::take(&mut st.ops));
                break;
            }
            st.reap();
        }
    }
}

/// The ring of one backend off the queue workers (tokio tasks, the daemon's own flush),
/// reaped by a task on the runtime.
pub(crate) struct SharedRing(Arc<Ring>);

impl SharedRing {
    /// Fails where io_uring is unavailable (old kernel, seccomp, container policy).
    pub(crate) fn new(runtime: &tokio::runtime::Handle) -> io::Result<SharedRing> {
        Ring::with_reaper(runtime).map(SharedRing)
    }

    /// Submits `entry`, on `queue`'s ring when given (the caller runs on that queue's worker)
    /// and on this shared ring otherwise, and resolves to its result (`-errno` on failure).
    /// `keep` is whatever the entry points into (iovecs, buffers); it is handed back once the
    /// kernel is done. Under a `permit`, the entry reaches the kernel only while the permit
    /// allows it, asked right before the system call that submits it; otherwise it resolves
    /// to [`WITHDRAWN`].
    ///
    /// # Safety
    /// Every pointer in `entry` must point into `keep` (or be otherwise valid until the
    /// operation completes).
    pub(crate) unsafe fn submit<K: Send + 'static>(
        &self,
        queue: Option<&QueueRing>,
        entry: squeue::Entry,
        keep: K,
        permit: Option<Arc<dyn Permit>>,
    ) -> io::Result<Op<K>> {
        let ring = match queue {
            Some(q) => q.ring()?.clone(),
            None => self.0.clone(),
        };
        let key = {
            let mut st = ring.lock();
            let key = st.ops.insert(Slot::Waiting(None));
            let entry = entry.user_data(key as u64);
            match permit {
                // A worker's entries wait for its flush, to go to the kernel in one call;
                // those under a permit wait apart, for the flush to ask it again.
                Some(permit) if ring.reaper.is_none() => st.held.push(Held { entry, key, permit }),
                Some(permit) if !permit.allows() => st.complete(key, WITHDRAWN),
                _ => {
                    // SAFETY: the caller guarantees the entry's pointers stay valid (held
                    // in `keep`).
                    while unsafe { st.uring.submission().push(&entry) }.is_err() {
                        st.uring.submit()?;
                    }
                    if ring.reaper.is_some() {
                        if let Err(e) = st.uring.submit() {
                            st.ops.remove(key);
                            return Err(e);
                        }
                        st.reap();
                    }
                }
            }
            key
        };
        Ok(Op {
            ring,
            key: Some(key),
            keep: Some(keep),
        })
    }
}

/// An operation in flight; resolves to `(keep, result)`.
pub(crate) struct Op<K: Send + 'static> {
    ring: Arc<Ring>,
    key: Option<usize>,
    keep: Option<K>,
}

impl<K: Send + 'static> Unpin for Op<K> {}

impl<K: Send + 'static> Future for Op<K> {
    type Output = (K, i32);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key.expect("Op polled after completion");
        let mut st = self.ring.lock();
        st.reap();
        match &mut st.ops[key] {
            Slot::Done(res) => {
                let res = *res;
                st.ops.remove(key);
                drop(st);
                self.key = None;
                Poll::Ready((
                    self.keep.take().expect("keep is present until completion"),
                    res,
                ))
            }
            Slot::Waiting(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Orphaned(_) => unreachable!("a live Op is never orphaned"),
        }
    }
}

impl<K: Send + 'static> Drop for Op<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut st = self.ring.lock();
        match st.ops.get(key) {
            Some(Slot::Done(_)) => {
                st.ops.remove(key);
            }
            Some(Slot::Waiting(_)) => {
                let keep: Box<dyn Send> = Box::new(self.keep.take());
                st.ops[key] = Slot::Orphaned(keep);
            }
            _ => {}
        }
    }
}
