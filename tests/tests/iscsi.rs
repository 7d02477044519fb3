//! The userspace iSCSI initiator (`twinpath-iscsi`, libiscsi) against tgtd on loopback,
//! exporting a loop device: what it writes is on the device, what is on the device it reads,
//! many tasks at once, CHAP, clear errors, and a target restart in the middle of I/O.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;

use futures::executor::block_on;
use futures::future::join_all;
use twinpath_core::GuestBuffers;
use twinpath_filemap::read_direct;
use twinpath_iscsi::{IscsiUrl, Session};
use twinpath_tests::iscsi::{Tgtd, CHAP_PASSWORD};
use twinpath_tests::lun::{Fs, LoopLun};
use twinpath_tests::{pattern, scratch};

const MIB: u64 = 1 << 20;
const INITIATOR: &str = "iqn.2026-11.io.twinpath:test-host";

fn raw_lun() -> LoopLun {
    let mut lun = LoopLun::new(512 * MIB, Fs::Ext4);
    lun.unmount();
    lun
}

fn device(lun: &LoopLun) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(lun.device())
        .unwrap()
}

/// Writes `data` at `offset` through the session.
fn write(s: &Session, offset: u64, data: Vec<u8>) -> Result<(), String> {
    let (bufs, _keep) = GuestBuffers::from_vec(data);
    block_on(s.write(offset, &bufs)).map_err(|e| e.to_string())
}

fn read(s: &Session, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let (bufs, keep) = GuestBuffers::from_vec(vec![0; len]);
    block_on(s.read(offset, &bufs)).map_err(|e| e.to_string())?;
    drop(bufs);
    let v = keep.lock().unwrap().clone();
    Ok(v)
}

#[test]
fn a_session_reads_and_writes_the_lun_with_many_tasks_in_flight() {
    let lun = raw_lun();
    let dir = scratch();
    let tgt = Tgtd::start(lun.device(), false, dir.path());
    let s = Session::connect(&IscsiUrl::parse(&tgt.url()).unwrap(), None, INITIATOR)
        .unwrap_or_else(|e| panic!("{e}\n{}", tgt.log()));
    assert_eq!(s.capacity(), 512 * MIB);
    assert_eq!(s.block_size(), 512);

    // 64 writes of 64 KiB at once, then a flush: the device holds them.
    let blocks: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| ((i * 7 % 64) * MIB + 4096, pattern(i + 1, 65536)))
        .collect();
    let bufs: Vec<_> = blocks
        .iter()
        .map(|(_, d)| GuestBuffers::from_vec(d.clone()))
        .collect();
    let results = block_on(join_all(
        blocks
            .iter()
            .zip(&bufs)
            .map(|((at, _), (b, _))| s.write(*at, b)),
    ));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    block_on(s.flush()).unwrap();
    let dev = device(&lun);
    for (at, data) in &blocks {
        assert!(
            read_direct(&dev, *at, data.len()).unwrap() == *data,
            "device at {at}"
        );
    }
    // And back through the session, all at once.
    let bufs: Vec<_> = blocks
        .iter()
        .map(|(_, d)| GuestBuffers::from_vec(vec![0; d.len()]))
        .collect();
    let results = block_on(join_all(
        blocks
            .iter()
            .zip(&bufs)
            .map(|((at, _), (b, _))| s.read(*at, b)),
    ));
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    for ((_, data), (_, keep)) in blocks.iter().zip(&bufs) {
        assert!(*keep.lock().unwrap() == *data);
    }
    // A scattered request (several iovecs) and the last block of the LUN.
    assert_eq!(read(&s, 512 * MIB - 512, 512).unwrap().len(), 512);
    let e = read(&s, 512 * MIB, 512).unwrap_err();
    assert!(e.contains("inside the LUN"), "{e}");
    let e = read(&s, 100, 512).unwrap_err();
    assert!(e.contains("whole 512-byte blocks"), "{e}");
}

#[test]
fn chap_logins_and_errors_say_what_went_wrong() {
    let lun = raw_lun();
    let dir = scratch();
    let tgt = Tgtd::start(lun.device(), true, dir.path());
    let url = IscsiUrl::parse(&tgt.url()).unwrap();
    let s = Session::connect(&url, Some(CHAP_PASSWORD), INITIATOR)
        .unwrap_or_else(|e| panic!("{e}\n{}", tgt.log()));
    write(&s, 0, pattern(9, 4096)).unwrap();
    assert_eq!(read(&s, 0, 4096).unwrap(), pattern(9, 4096));
    drop(s);

    let wrong = "not-the-password-at-all";
    let e = Session::connect(&url, Some(wrong), INITIATOR)
        .err()
        .expect("a wrong CHAP password logs in")
        .to_string();
    assert!(e.contains("login failed") && !e.contains(wrong), "{e}");
    let e = Session::connect(&url, None, INITIATOR)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no password"), "{e}");

    let mut missing = url.clone();
    missing.lun = 5;
    let e = Session::connect(&missing, Some(CHAP_PASSWORD), INITIATOR)
        .err()
        .expect("LUN 5 does not exist")
        .to_string();
    assert!(e.contains("/5"), "{e}");

    let nobody = IscsiUrl::parse(&format!(
        "iscsi://127.0.0.1:{}/{}/1",
        twinpath_tests::samba::free_port(),
        url.target
    ))
    .unwrap();
    let e = Session::connect(&nobody, None, INITIATOR)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("login failed"), "{e}");
}

#[test]
fn io_survives_a_target_restart() {
    let lun = raw_lun();
    let dir = scratch();
    let mut tgt = Tgtd::start(lun.device(), false, dir.path());
    let s = Session::connect(&IscsiUrl::parse(&tgt.url()).unwrap(), None, INITIATOR).unwrap();
    let data = pattern(21, 65536);
    write(&s, 0, data.clone()).unwrap();
    // Requests issued while the target is down complete once it is back (libiscsi
    // reconnects and sends them again), well inside the task timeout.
    let restarted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut results = Vec::new();
            let mut i = 0u64;
            while !restarted.load(std::sync::atomic::Ordering::SeqCst) {
                results.push(read(&s, (i % 16) * 65536, 4096).map(|_| ()));
                i += 1;
            }
            results
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        tgt.restart();
        std::thread::sleep(std::time::Duration::from_millis(200));
        restarted.store(true, std::sync::atomic::Ordering::SeqCst);
        let results = reader.join().unwrap();
        let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
        assert!(results.len() > 10, "{} reads", results.len());
        assert!(failed.is_empty(), "{failed:?}\n{}", tgt.log());
    });
    assert_eq!(read(&s, 0, 65536).unwrap(), data);
    write(&s, MIB, pattern(22, 4096)).unwrap();
    assert_eq!(read(&s, MIB, 4096).unwrap(), pattern(22, 4096));
}

#[test]
fn a_session_whose_target_is_gone_fails_in_time_and_closes() {
    let lun = raw_lun();
    let dir = scratch();
    let mut tgt = Tgtd::start(lun.device(), false, dir.path());
    let s = Session::connect(&IscsiUrl::parse(&tgt.url()).unwrap(), None, INITIATOR).unwrap();
    write(&s, 0, pattern(31, 4096)).unwrap();
    tgt.stop();
    let started = std::time::Instant::now();
    let e = block_on(s.flush()).unwrap_err().to_string();
    let failed_after = started.elapsed();
    assert!(
        failed_after < twinpath_iscsi::TASK_TIMEOUT + std::time::Duration::from_secs(5),
        "the flush took {failed_after:?}: {e}"
    );
    let started = std::time::Instant::now();
    drop(s);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "closing took {:?}",
        started.elapsed()
    );
}

#[test]
fn persistent_reservations_fence_a_host_until_it_registers_again() {
    let lun = raw_lun();
    let dir = scratch();
    let tgt = Tgtd::start(lun.device(), false, dir.path());
    let url = IscsiUrl::parse(&tgt.url()).unwrap();
    let host = Session::connect(&url, None, INITIATOR).unwrap();
    let server = Session::connect(&url, None, "iqn.2026-11.io.twinpath:map-server").unwrap();
    let (host_key, server_key) = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888);
    block_on(host.pr_register(host_key)).unwrap();
    block_on(server.pr_register(server_key)).unwrap();
    block_on(server.pr_reserve(server_key)).unwrap();
    let mut keys = block_on(server.pr_read_keys()).unwrap();
    keys.sort();
    assert_eq!(keys, vec![host_key, server_key]);
    write(&host, 0, pattern(1, 4096)).unwrap();

    // Preempted: its key is gone, and its writes and reads conflict (Exclusive Access).
    // tgtd has no PREEMPT AND ABORT (ILLEGAL REQUEST); a plain PREEMPT does the fencing.
    let abort = block_on(server.pr_preempt(server_key, host_key, true)).unwrap_err();
    assert!(abort.to_string().contains("ILLEGAL_REQUEST"), "{abort}");
    block_on(server.pr_preempt(server_key, host_key, false)).unwrap();
    assert_eq!(block_on(server.pr_read_keys()).unwrap(), vec![server_key]);
    let mut conflicts = 0;
    for _ in 0..3 {
        // The first command after the preemption may get the unit attention instead.
        if let Err(e) = write(&host, 4096, pattern(2, 4096)) {
            conflicts += u32::from(e.contains("RESERVATION CONFLICT") && e.contains("fenced"));
        }
        if let Err(e) = read(&host, 0, 4096) {
            conflicts += u32::from(e.contains("RESERVATION CONFLICT"));
        }
    }
    assert!(
        conflicts >= 5,
        "the fenced host's I/O did not conflict ({conflicts})"
    );
    assert!(read_direct(&device(&lun), 4096, 4096).unwrap() != pattern(2, 4096));

    // A restarted server (same key, another nexus) takes the reservation over.
    let again = Session::connect(&url, None, "iqn.2026-11.io.twinpath:map-server-2").unwrap();
    block_on(again.pr_register(server_key)).unwrap();
    let held = block_on(again.pr_reserve(server_key)).unwrap_err();
    assert!(held.to_string().contains("RESERVATION CONFLICT"), "{held}");
    block_on(again.pr_preempt(server_key, server_key, false)).unwrap();

    // Registered again, it reads and writes again.
    block_on(host.pr_register(host_key)).unwrap();
    let _ = write(&host, 4096, pattern(3, 4096));
    write(&host, 4096, pattern(3, 4096)).unwrap();
    assert_eq!(read(&host, 0, 4096).unwrap(), pattern(1, 4096));
}
