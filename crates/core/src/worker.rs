//! A queue worker as the reactor of the I/O engines whose futures it polls.
//!
//! The device polls request futures on its queue threads. An engine whose completions arrive
//! through the kernel (io_uring) would otherwise need a second thread to notice them and wake
//! the queue: two thread switches per batch, which is most of the cost of small I/O. Instead,
//! an engine running on a worker makes the kernel signal the worker's own eventfd and
//! registers a [`Source`]; the device calls [`reap`] before it polls and [`flush`] after, so
//! submissions made while polling go to the kernel in one batch.
//!
//! Everything here is per thread; a thread that is not inside a worker has no current worker
//! and engines fall back to their own means.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

/// Completions an engine delivers on a worker thread.
pub trait Source: Send + Sync {
    /// Takes finished operations off the engine and wakes their futures.
    fn reap(&self);
    /// Hands operations queued since the last flush to the kernel.
    fn flush(&self);
    /// Operations submitted and not yet reaped: completions the worker will find itself.
    fn in_flight(&self) -> usize;
    /// The worker is ending and nobody else reaps this source: waits for the operations in
    /// flight and takes them off, so that what they hold (guest buffers) is let go.
    fn finish(&self);
}

struct Worker {
    id: u64,
    notify: RawFd,
    // Shared with the loops in `reap` and `flush`, so a source may add another while they run.
    sources: Rc<Vec<Arc<dyn Source>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        for s in self.sources.iter() {
            s.finish();
        }
    }
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Makes this thread worker `id` whose epoll watches the eventfd `notify` (which must outlive
/// the worker). Sources of a previous worker on this thread are dropped: their eventfd is
/// no longer watched.
pub fn enter(id: u64, notify: RawFd) {
    WORKER.with_borrow_mut(|w| {
        if w.as_ref().is_none_or(|w| w.id != id) {
            *w = Some(Worker {
                id,
                notify,
                sources: Rc::default(),
            });
        }
    });
}

/// The current worker's id and eventfd, if this thread is one.
pub fn current() -> Option<(u64, RawFd)> {
    WORKER.with_borrow(|w| w.as_ref().map(|w| (w.id, w.notify)))
}

/// Registers `source` with the current worker (for as long as the worker lives). Returns
/// false when this thread is not a worker.
pub fn add_source(source: Arc<dyn Source>) -> bool {
    WORKER.with_borrow_mut(|w| match w {
        Some(w) => {
            Rc::make_mut(&mut w.sources).push(source);
            true
        }
        None => false,
    })
}

/// Calls every source's `reap`.
pub fn reap() {
    for s in sources().iter() {
        s.reap();
    }
}

/// Calls every source's `flush`.
pub fn flush() {
    for s in sources().iter() {
        s.flush();
    }
}

/// Operations in flight on the current worker's sources.
pub fn in_flight() -> usize {
    sources().iter().map(|s| s.in_flight()).sum()
}

fn sources() -> Rc<Vec<Arc<dyn Source>>> {
    WORKER.with_borrow(|w| w.as_ref().map(|w| w.sources.clone()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counts(AtomicUsize, AtomicUsize, AtomicUsize);

    impl Source for Counts {
        fn reap(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn flush(&self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        fn in_flight(&self) -> usize {
            3
        }
        fn finish(&self) {
            self.2.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn sources_live_as_long_as_their_worker() {
        std::thread::spawn(|| {
            let counts = Arc::new(Counts::default());
            assert!(current().is_none());
            assert!(!add_source(counts.clone()), "no worker yet");
            enter(1, 7);
            assert_eq!(current(), Some((1, 7)));
            assert!(add_source(counts.clone()));
            enter(1, 7);
            reap();
            flush();
            flush();
            assert_eq!(in_flight(), 3);
            assert_eq!(counts.0.load(Ordering::SeqCst), 1);
            assert_eq!(counts.1.load(Ordering::SeqCst), 2);
            enter(2, 8);
            reap();
            assert_eq!(
                counts.0.load(Ordering::SeqCst),
                1,
                "a new worker drops old sources"
            );
            assert_eq!(counts.2.load(Ordering::SeqCst), 1, "finished as they go");
            assert_eq!(Arc::strong_count(&counts), 1);
        })
        .join()
        .unwrap();
    }
}
