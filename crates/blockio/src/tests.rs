//! Every engine against the same expectations, on a real file (tmpfs and the host disk) and
//! with a queue worker's ring where the engine has one.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use twinpath_core::{ErrorKind, GuestBuffers, Permit};

use crate::{AnyEngine, Engine, EngineKind, QueueRing, Target};

struct Flag(AtomicBool);

impl Permit for Flag {
    fn allows(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new descriptor (checked), owned here.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: as above.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Polls `f` to its end as a queue worker does: poll, submit, reap, poll again.
fn on_worker<T>(queue: Option<&QueueRing>, f: impl Future<Output = T>) -> T {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = f.as_mut().poll(&mut cx) {
            return r;
        }
        if let Some(q) = queue {
            q.submit();
            q.reap();
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

fn image(dir: &Path, len: usize, fill: u8) -> std::path::PathBuf {
    let path = dir.join("image");
    std::fs::write(&path, vec![fill; len]).unwrap();
    path
}

fn engine(rt: &tokio::runtime::Runtime, path: &Path, direct: bool, kind: EngineKind) -> AnyEngine {
    let target = Arc::new(Target::open(path, false, direct).unwrap());
    AnyEngine::new(kind, target, rt.handle()).unwrap()
}

/// Writes, reads back, zeroes, discards and flushes through `engine`, on `queue` if given.
fn exercise(engine: &AnyEngine, queue: Option<&QueueRing>, path: &Path) {
    let what = engine.name();
    let (bufs, _) = GuestBuffers::from_vec((0..8192u32).map(|i| i as u8).collect());
    on_worker(queue, engine.write(queue, 4096, bufs, None)).unwrap();
    let (bufs, data) = GuestBuffers::from_vec(vec![0; 8192]);
    on_worker(queue, engine.read(queue, 4096, bufs, None)).unwrap();
    let want: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
    assert!(*data.lock().unwrap() == want, "{what}: read back");
    on_worker(queue, engine.write_zeroes(queue, 4096, 4096, false)).unwrap();
    on_worker(queue, engine.discard(queue, 8192, 4096)).unwrap();
    on_worker(queue, engine.flush(queue)).unwrap();
    let (bufs, data) = GuestBuffers::from_vec(vec![9; 8192]);
    on_worker(queue, engine.read(queue, 4096, bufs, None)).unwrap();
    assert!(
        data.lock().unwrap().iter().all(|&b| b == 0),
        "{what}: zeroed and discarded"
    );
    // Past the target's end: refused, and the file does not grow.
    let (bufs, _) = GuestBuffers::from_vec(vec![9; 8192]);
    let e = on_worker(queue, engine.write(queue, 61440, bufs, None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{what}: {e}");
    assert_eq!(std::fs::metadata(path).unwrap().len(), 65536, "{what}");
    // The file shrank under the engine: where it no longer reaches reads as zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(61440)
        .unwrap();
    let (bufs, data) = GuestBuffers::from_vec(vec![9; 8192]);
    on_worker(queue, engine.read(queue, 57344, bufs, None)).unwrap();
    let data = data.lock().unwrap();
    assert!(data[..4096].iter().all(|&b| b == 1), "{what}: last block");
    assert!(data[4096..].iter().all(|&b| b == 0), "{what}: past the end");
}

#[test]
fn every_engine_reads_writes_zeroes_and_flushes_alike() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for dir in [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir_in("/dev/shm").unwrap(),
    ] {
        for kind in [EngineKind::Inline, EngineKind::Threads, EngineKind::Uring] {
            let path = image(dir.path(), 65536, 1);
            let e = engine(&rt, &path, false, kind);
            exercise(&e, None, &path);
            let queue = e.queue(eventfd());
            assert_eq!(queue.is_some(), kind == EngineKind::Uring, "{kind:?}");
            if let Some(q) = &queue {
                std::fs::write(&path, vec![1; 65536]).unwrap();
                exercise(&e, Some(q), &path);
                assert_eq!(q.in_flight(), 0);
            }
        }
    }
}

#[test]
fn auto_picks_inline_in_memory_and_uring_on_disk() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let e = engine(&rt, &image(shm.path(), 4096, 0), false, EngineKind::Auto);
    assert_eq!(e.name(), "inline");
    let disk = tempfile::tempdir().unwrap();
    let e = engine(&rt, &image(disk.path(), 4096, 0), false, EngineKind::Auto);
    assert_eq!(e.name(), "uring");
}

#[test]
fn o_direct_with_unaligned_memory_bounces_on_every_engine() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for kind in [EngineKind::Inline, EngineKind::Threads, EngineKind::Uring] {
        let path = image(dir.path(), 65536, 0);
        let Ok(target) = Target::open(&path, false, true) else {
            eprintln!("no O_DIRECT on /var/tmp here: skipped");
            return;
        };
        let e = AnyEngine::new(kind, Arc::new(target), rt.handle()).unwrap();
        let queue = e.queue(eventfd());
        // A buffer one byte into an allocation: never aligned for O_DIRECT.
        let (bufs, _keep) = GuestBuffers::from_vec(vec![7u8; 4097]);
        let bufs = bufs.slice(1, 4096);
        on_worker(queue.as_ref(), e.write(queue.as_ref(), 8192, bufs, None)).unwrap();
        drop(e);
        assert_eq!(
            std::fs::read(&path).unwrap()[8192..12288],
            [7u8; 4096],
            "{kind:?}"
        );
    }
}

/// A write under a permit, queued on a worker's ring (polled once, as a queue worker polls a
/// request), then the worker's submit after `between` ran: what the file holds.
fn write_on_a_worker(between: impl FnOnce(&Flag)) -> (twinpath_core::Result<()>, Vec<u8>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 65536, 1);
    let engine = engine(&rt, &path, false, EngineKind::Uring);
    let queue = engine
        .queue(eventfd())
        .expect("a uring engine has queue rings");
    let permit = Arc::new(Flag(AtomicBool::new(true)));
    let (bufs, _data) = GuestBuffers::from_vec(vec![2u8; 4096]);
    let mut write = pin!(engine.write(Some(&queue), 0, bufs, Some(permit.clone())));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(write.as_mut().poll(&mut cx).is_pending());
    between(&permit);
    queue.submit();
    let result = loop {
        queue.reap();
        if let Poll::Ready(r) = write.as_mut().poll(&mut cx) {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    (result, std::fs::read(&path).unwrap()[..4096].to_vec())
}

#[test]
fn a_worker_stopped_between_queueing_and_submitting_submits_nothing_whose_permit_went() {
    let (result, on_disk) = write_on_a_worker(|p| p.0.store(false, Ordering::SeqCst));
    let e = result.unwrap_err().to_string();
    assert!(e.contains("permit was withdrawn"), "{e}");
    assert_eq!(on_disk, vec![1u8; 4096], "the write reached the file");
}

#[test]
fn a_worker_submit_sends_what_its_permits_still_allow() {
    let (result, on_disk) = write_on_a_worker(|_| {});
    result.unwrap();
    assert_eq!(on_disk, vec![2u8; 4096]);
}

#[test]
fn a_finished_queue_ring_has_nothing_left_in_flight() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20, 0);
    let engine = engine(&rt, &path, false, EngineKind::Uring);
    let queue = engine.queue(eventfd()).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut reads: Vec<_> = (0..16u64)
        .map(|i| {
            let (bufs, _) = GuestBuffers::from_vec(vec![0; 65536]);
            Box::pin(engine.read(Some(&queue), i * 65536, bufs, None))
        })
        .collect();
    for r in &mut reads {
        assert!(r.as_mut().poll(&mut cx).is_pending());
    }
    queue.submit();
    queue.finish();
    // Every operation is done: dropping the futures frees their slots at once.
    drop(reads);
    assert_eq!(queue.in_flight(), 0);
}
