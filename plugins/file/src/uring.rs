//! io_uring submission for the file engine: one ring per calling thread (each queue worker
//! gets its own, so rings are never contended on the hot path).
//!
//! An operation is pushed and submitted at once and the completion queue reaped right away:
//! when the kernel completes it inside the submit call, the request finishes in the same poll.
//! Completions that happen later (real disks, io-wq) raise the ring's eventfd, and a small
//! tokio task reaps them and wakes their futures. The eventfd is registered for every
//! completion: `IORING_REGISTER_EVENTFD_ASYNC` would only report io-wq completions and miss
//! O_DIRECT ones, which the kernel posts from task work on the submitting thread.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};
use slab::Slab;
use thread_local::ThreadLocal;
use tokio::io::unix::AsyncFd;

/// Ring size: a queue never has more requests in flight than its 1024 descriptors.
const RING_ENTRIES: u32 = 1024;

enum Slot {
    Waiting(Option<Waker>),
    Done(i32),
    /// The future was dropped before the kernel finished; keeps the buffers alive until then.
    Orphaned(#[allow(dead_code)] Box<dyn Send>),
}

struct State {
    uring: IoUring,
    ops: Slab<Slot>,
}

impl State {
    fn reap(&mut self) {
        let State { uring, ops } = self;
        for cqe in uring.completion() {
            let key = cqe.user_data() as usize;
            match ops.get_mut(key) {
                Some(Slot::Waiting(waker)) => {
                    let waker = waker.take();
                    ops[key] = Slot::Done(cqe.result());
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                Some(Slot::Orphaned(_)) => {
                    ops.remove(key);
                }
                Some(Slot::Done(_)) | None => {
                    tracing::error!(key, "io_uring completion for an unknown operation");
                }
            }
        }
    }
}

struct Ring {
    state: Mutex<State>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Ring {
    fn new(runtime: &tokio::runtime::Handle) -> io::Result<Arc<Ring>> {
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
                }),
                reaper,
            }
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

/// The rings of one backend.
pub(crate) struct Rings {
    rings: ThreadLocal<Arc<Ring>>,
    runtime: tokio::runtime::Handle,
}

impl Rings {
    /// Fails where io_uring is unavailable (old kernel, seccomp, container policy).
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> io::Result<Rings> {
        let rings = Rings {
            rings: ThreadLocal::new(),
            runtime,
        };
        rings.ring()?;
        Ok(rings)
    }

    fn ring(&self) -> io::Result<&Arc<Ring>> {
        self.rings.get_or_try(|| Ring::new(&self.runtime))
    }

    /// Submits `entry` and resolves to its result (`-errno` on failure). `keep` is whatever
    /// the entry points into (iovecs, buffers); it is handed back once the kernel is done.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into `keep` (or be otherwise valid until the
    /// operation completes).
    pub(crate) unsafe fn submit<K: Send + 'static>(
        &self,
        entry: squeue::Entry,
        keep: K,
    ) -> io::Result<Op<K>> {
        let ring = self.ring()?.clone();
        let key = {
            let mut st = ring.lock();
            let key = st.ops.insert(Slot::Waiting(None));
            let entry = entry.user_data(key as u64);
            // SAFETY: the caller guarantees the entry's pointers stay valid (held in `keep`).
            while unsafe { st.uring.submission().push(&entry) }.is_err() {
                st.uring.submit()?;
            }
            if let Err(e) = st.uring.submit() {
                st.ops.remove(key);
                return Err(e);
            }
            st.reap();
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
