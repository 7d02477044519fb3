//! Hostile frontends: a frontend that builds its own descriptor chains (tests/src/frontend.rs)
//! against the real daemon, with another disk of the same daemon serving a real client all
//! along (safety.md promise 3: one guest cannot take memory or the daemon from the others).

use std::path::Path;
use std::time::{Duration, Instant};

use twinpath_client::{Client, ClientOptions};
use twinpath_tests::frontend::{RawFrontend, Seg, DATA};
use twinpath_tests::lun::{Fs, LoopLun};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// A daemon serving `victim` (an O_DIRECT file disk on a filesystem that wants aligned
/// buffers, so odd guest addresses go through bounce buffers) and `other` (on tmpfs).
fn two_disks(disk_dir: &Path, shm: &Path) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let (victim, other) = (disk_dir.join("victim.img"), shm.join("other.img"));
    make_image(&victim, 2 << 30);
    // Written data: O_DIRECT reads of holes and unwritten extents take any buffer (the kernel
    // zero-fills them), only reads of data insist on alignment.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        let chunk = pattern(7, MIB as usize);
        for _ in 0..1024 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    make_image(&other, 16 * MIB);
    let (vsock, osock) = (shm.join("victim.sock"), shm.join("other.sock"));
    let cfg = format!(
        "disks:\n{}      direct: true\n{}",
        file_disk_yaml("victim", &vsock, &victim, ""),
        file_disk_yaml("other", &osock, &other, "")
    );
    (Daemon::start(shm, &cfg), vsock, osock)
}

/// Shrinks `fe`'s memory to its rings and points a read's data and status past the new end;
/// waits until the daemon has closed that connection, alive.
fn shrink_and_touch(fe: &mut RawFrontend, daemon: &mut Daemon) {
    fe.memfd().set_len(DATA).unwrap();
    let past_the_end = Seg {
        addr: DATA,
        len: 4096,
        write: true,
    };
    fe.read_with_status(0, &[past_the_end], DATA + 8192);
    fe.kick();
    daemon.wait_for_log("shrank guest memory", Duration::from_secs(10));
    assert!(daemon.is_running(), "the daemon died:\n{}", daemon.log());
}

/// A daemon serving `victim` and `other`, both on tmpfs.
fn two_tmpfs_disks(shm: &Path) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let (victim, other) = (shm.join("victim.img"), shm.join("other.img"));
    make_image(&victim, 16 * MIB);
    make_image(&other, 16 * MIB);
    let (vsock, osock) = (shm.join("victim.sock"), shm.join("other.sock"));
    let cfg = format!(
        "disks:\n{}{}",
        file_disk_yaml("victim", &vsock, &victim, ""),
        file_disk_yaml("other", &osock, &other, "")
    );
    (Daemon::start(shm, &cfg), vsock, osock)
}

#[test]
fn huge_aliased_misaligned_reads_cost_bounded_memory_and_other_disks_keep_serving() {
    let disk_dir = tempfile::Builder::new()
        .prefix("twinpath-hostile-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let shm = scratch();
    let (daemon, vsock, osock) = two_disks(disk_dir.path(), shm.path());
    let pid = daemon.pid();
    let before = rss_anon(pid);

    // Eight READs of 1 GiB each, every one made of 16 descriptors over the same 64 MiB of
    // guest memory, at an odd address (O_DIRECT cannot take it: bounced).
    let mut fe = RawFrontend::connect(&vsock, 64 * MIB as usize);
    let seg = Seg {
        addr: DATA + 1,
        len: (64 * MIB - 4096) as u32,
        write: true,
    };
    let n = 8u16;
    let reqs: Vec<u16> = (0..n).map(|_| fe.read(0, &[seg; 16])).collect();
    fe.kick();

    let mut c = Client::connect(&osock, &ClientOptions::default()).unwrap();
    let (mut peak, mut served) = (before, 0u32);
    let started = Instant::now();
    while fe.used() < n {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the huge reads did not finish:\n{}",
            daemon.log()
        );
        peak = peak.max(rss_anon(pid));
        let block = pattern(u64::from(served), 4096);
        c.write(0, u64::from(served % 64) * 4096, &block).unwrap();
        assert_eq!(
            c.read(0, u64::from(served % 64) * 4096, 4096).unwrap(),
            block
        );
        served += 1;
    }
    peak = peak.max(rss_anon(pid));
    eprintln!(
        "{n} reads of ~1 GiB in {:?}; daemon RssAnon {} -> peak {} KiB; the other disk did \
         {served} write+read pairs meanwhile",
        started.elapsed(),
        before / 1024,
        peak / 1024
    );
    for r in reqs {
        assert_eq!(fe.status(r), 0, "request {r}:\n{}", daemon.log());
    }
    assert!(
        daemon.log().contains("bounce buffer"),
        "the reads were not bounced:\n{}",
        daemon.log()
    );
    assert!(
        peak - before < 128 * MIB,
        "daemon grew by {} MiB",
        (peak - before) / MIB
    );
    assert!(served > 0);
}

/// A frontend that shrinks its guest memory after handing it over, then points a request's
/// data and status byte past the new end: the device's next touch there raised SIGBUS and
/// killed the daemon with every disk in it. Now only that connection ends.
#[test]
fn a_frontend_shrinking_its_memory_loses_its_connection_not_the_daemon() {
    let shm = scratch();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());

    // A memory table whose region reaches past the end of its file is refused outright.
    let refused = RawFrontend::try_connect(&vsock, MIB as usize, Some(DATA as usize));
    assert!(refused.is_err(), "a region past its file's end was taken");
    daemon.wait_for_log("past the end of its file", Duration::from_secs(10));
    drop(refused);

    let mut fe = RawFrontend::connect(&vsock, MIB as usize);
    let first = fe.read(
        0,
        &[Seg {
            addr: DATA,
            len: 4096,
            write: true,
        }],
    );
    fe.kick();
    assert!(fe.wait_used(1, Duration::from_secs(10)));
    assert_eq!(fe.status(first), 0);

    // Everything from the data area on goes away under the device.
    shrink_and_touch(&mut fe, &mut daemon);
    let t = Instant::now();
    while fe.alive() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "connection kept:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(fe);

    // The other disk, and the victim's disk for its next frontend, serve on.
    for sock in [&osock, &vsock] {
        let mut c = Client::connect(sock, &ClientOptions::default()).unwrap();
        let block = pattern(5, 4096);
        // Failed once in CI with EIO (not reproduced since): say where, with the daemon's log.
        if let Err(e) = c.write(0, 4096, &block) {
            panic!(
                "write on {} after the attack: {e:?}\n{}",
                sock.display(),
                daemon.log()
            );
        }
        assert_eq!(c.read(0, 4096, 4096).unwrap(), block);
    }
    assert!(daemon.stop().success());
}

/// (Review of 8e52547.) The SIGBUS watch held 256 mappings and evicted the oldest: a frontend
/// with 256 more regions (ADD_MEM_REG) pushed its first one out, shrank it, and the daemon died
/// of SIGBUS as before. Now a connection's mappings stay watched until it ends, and a table
/// that would need more is refused.
#[test]
fn a_frontend_with_hundreds_of_regions_still_cannot_kill_the_daemon() {
    let shm = scratch();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let mut fe = RawFrontend::try_connect_with(&vsock, MIB as usize, None, true).unwrap();
    let mut extra = Vec::new();
    for i in 0..256 {
        extra.push(fe.add_region(0x1_0000_0000 + i * 0x10000, 4096).unwrap());
    }
    assert!(fe.alive(), "{}", daemon.log());
    shrink_and_touch(&mut fe, &mut daemon);
    drop((fe, extra));
    let mut c = Client::connect(&osock, &ClientOptions::default()).unwrap();
    c.write(0, 0, &pattern(1, 4096)).unwrap();
    assert!(daemon.stop().success());
}

/// (Review of 8e52547.) A frontend that goes away while a large bounced write of it is still
/// running: its request was dropped, its write went on, and the next frontend of the disk,
/// served at once, had its acknowledged and flushed write overwritten a second later. Now the
/// next frontend is taken only once the gone one's work has landed.
#[test]
fn an_abandoned_write_lands_before_the_next_frontend_is_served() {
    let disk_dir = tempfile::Builder::new()
        .prefix("twinpath-hostile-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let shm = scratch();
    let (mut daemon, vsock, _osock) = two_disks(disk_dir.path(), shm.path());
    let mut fe = RawFrontend::connect(&vsock, 64 * MIB as usize);
    fe.fill(DATA, 64 * MIB as usize, 0xaa);
    let seg = Seg {
        addr: DATA + 1,
        len: (64 * MIB - 4096) as u32,
        write: false,
    };
    let total = 12 * (64 * MIB - 4096);
    let status = fe.status_addr(0);
    fe.post(1, 0, &[seg; 12], status);
    fe.kick();
    daemon.wait_for_log("bounce buffer", Duration::from_secs(20));
    drop(fe);
    // The next frontend (a restarted QEMU) writes near the end of the gone one's range.
    let at = total - 64 * 1024;
    let mut c = Client::connect(&vsock, &ClientOptions::default()).unwrap();
    let mine = pattern(9, 4096);
    c.write(0, at, &mine).unwrap();
    c.flush(0).unwrap();
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            c.read(0, at, 4096).unwrap(),
            mine,
            "an acknowledged, flushed write was overwritten after {:?}",
            watched.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (Review of 2057379.) A driver that did not accept SEG_MAX sent chains of 65,000 one-byte
/// segments through one indirect table: the segment lists took 476 MiB against a 64 MiB byte
/// budget. Now a chain longer than SEG_MAX + 2 is refused as it is read.
#[test]
fn chains_of_one_byte_segments_are_refused_before_they_cost_memory() {
    let disk_dir = tempfile::Builder::new()
        .prefix("twinpath-hostile-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let shm = scratch();
    let (daemon, vsock, _osock) = two_disks(disk_dir.path(), shm.path());
    let pid = daemon.pid();
    let before = rss_anon(pid);
    let mut fe = RawFrontend::try_connect_with(&vsock, 64 * MIB as usize, None, true).unwrap();
    // The indirect table: header, 65024 one-byte data descriptors, status.
    let table = DATA + 32 * MIB;
    let header = fe.header_addr(255);
    fe.write_bytes(header, &[0u8; 16]);
    let status = DATA + 48 * MIB;
    let ndata = 65024u32;
    let mut t = Vec::with_capacity((ndata as usize + 2) * 16);
    let mut d = |addr: u64, len: u32, flags: u16, next: u16| {
        t.extend_from_slice(&addr.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
        t.extend_from_slice(&next.to_le_bytes());
    };
    d(header, 16, 1, 1);
    for i in 0..ndata {
        d(DATA + 1 + u64::from(i % 4096), 1, 3, (i + 2) as u16);
    }
    d(status, 1, 2, 0);
    fe.write_bytes(table, &t);
    let chains = 250;
    for _ in 0..chains {
        fe.post_indirect(table, ndata + 2);
    }
    fe.kick();
    let started = Instant::now();
    let mut peak = before;
    while fe.used() < chains && started.elapsed() < Duration::from_secs(60) {
        peak = peak.max(rss_anon(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    peak = peak.max(rss_anon(pid));
    eprintln!(
        "{chains} chains of {ndata} one-byte segments answered in {:?}; RssAnon {} -> {} KiB",
        started.elapsed(),
        before / 1024,
        peak / 1024
    );
    assert_eq!(fe.used(), chains, "{}", daemon.log());
    assert!(
        peak - before < 32 * MIB,
        "daemon grew by {} MiB",
        (peak - before) / MIB
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Found by fuzzing the device (fuzz/fuzz_targets/device.rs): every connection leaked an
/// eventfd (vhost-user-backend registers the worker's exit eventfd with its epoll and never
/// closes it), so a frontend reconnecting in a loop ran the daemon out of descriptors, and
/// every disk with it. Connections that hang up at once, and ones that set up memory and a
/// queue and read, must leave the daemon with the descriptors it had.
#[test]
fn a_frontend_reconnecting_in_a_loop_leaves_the_daemon_no_descriptors_behind() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let pid = daemon.pid();
    // One full connection first: later ones find their disk as it stays.
    drop(RawFrontend::connect(&vsock, MIB as usize));
    std::thread::sleep(Duration::from_millis(300));
    let before = open_fds(pid);
    for _ in 0..300 {
        drop(std::os::unix::net::UnixStream::connect(&vsock).unwrap());
    }
    for _ in 0..20 {
        let mut fe = RawFrontend::connect(&vsock, MIB as usize);
        let seg = Seg {
            addr: DATA,
            len: 4096,
            write: true,
        };
        let n = fe.read(0, &[seg]);
        fe.kick();
        assert!(
            fe.wait_used(1, Duration::from_secs(5)),
            "a read was not answered"
        );
        assert_eq!(fe.status(n), 0);
    }
    // The last connections end asynchronously: give the daemon a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > before + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = open_fds(pid);
    assert!(
        after <= before + 4,
        "the daemon held {before} descriptors before 320 connections and {after} after"
    );
    assert!(daemon.is_running());
    let mut other = Client::connect(&osock, &ClientOptions::default()).unwrap();
    other.write(0, 0, &pattern(3, 4096)).unwrap();
    assert_eq!(other.read(0, 0, 4096).unwrap(), pattern(3, 4096));
}

/// Found by fuzzing the device: an available ring whose index runs further ahead than the
/// ring has entries, with EVENT_IDX, made the queue's worker go round forever (nothing could
/// be popped, yet the ring said there was more): a CPU taken from the other disks, and a
/// connection that could never end (its worker was never free to see the exit), so the disk
/// took no other frontend. Now the queue stalls until the driver resets it, and nothing
/// spins. A head outside the descriptor table, the other broken entry, is checked too.
#[test]
fn a_broken_available_ring_spins_no_worker_and_blocks_no_reconnect() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let mut fe = event_idx_frontend_served_once(&vsock);
    fe.post_bad_head();
    fe.kick();
    std::thread::sleep(Duration::from_millis(100));
    fe.post_bad_avail_index();
    fe.kick();
    spins_nothing_and_the_disks_serve_on(&mut daemon, fe, &vsock, &osock);
}

/// (Fuzzing, device target.) A queue the frontend unsets (its available ring at address 0)
/// while the ring's index still differs from the device's: nothing pops, yet re-arming
/// notifications kept reporting more, and the worker went round forever; the connection
/// never ended, so the disk took no other frontend.
#[test]
fn a_queue_set_up_again_without_a_ring_spins_no_worker() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let mut fe = event_idx_frontend_served_once(&vsock);
    fe.move_avail_ring(0).unwrap();
    // A request with a reply: the device has taken the move before the kick.
    assert!(fe.alive());
    // The index the device reads there: a few entries ahead.
    fe.write_bytes(2, &5u16.to_le_bytes());
    fe.kick();
    daemon.wait_for_log("cannot be read", Duration::from_secs(5));
    spins_nothing_and_the_disks_serve_on(&mut daemon, fe, &vsock, &osock);
}

/// (Review of 3ce6541.) The available ring's flags and index lie in guest memory but its
/// entries do not (the ring ends past the end of the only region): the index read well, every
/// entry load failed, and the worker went round forever as before.
#[test]
fn an_available_ring_whose_entries_lie_outside_memory_spins_no_worker() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let mut fe = event_idx_frontend_served_once(&vsock);
    // Guest memory is DATA + 1 MiB long: the ring's flags and index are its last 4 bytes.
    let end = DATA + MIB;
    fe.move_avail_ring(end - 4).unwrap();
    assert!(fe.alive());
    fe.write_bytes(end - 2, &5u16.to_le_bytes());
    fe.kick();
    daemon.wait_for_log("cannot be read", Duration::from_secs(5));
    spins_nothing_and_the_disks_serve_on(&mut daemon, fe, &vsock, &osock);
}

/// A frontend with EVENT_IDX whose first 4 KiB read (at `DATA`) the device has served.
fn event_idx_frontend_served_once(sock: &Path) -> RawFrontend {
    let mut fe = RawFrontend::connect_event_idx(sock, MIB as usize);
    let first = fe.read(
        0,
        &[Seg {
            addr: DATA,
            len: 4096,
            write: true,
        }],
    );
    fe.kick();
    assert!(fe.wait_used(1, Duration::from_secs(5)));
    assert_eq!(fe.status(first), 0);
    fe
}

/// With `fe`'s broken queue kicked: the daemon uses next to no CPU, the other disk serves,
/// and once `fe` goes the next frontend of its disk is served.
fn spins_nothing_and_the_disks_serve_on(
    daemon: &mut Daemon,
    fe: RawFrontend,
    vsock: &Path,
    osock: &Path,
) {
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 100 ticks a second: a spinning worker would use about 200.
    assert!(
        used < 50,
        "the daemon used {used} ticks in 2 s with the broken ring queued"
    );
    let mut other = Client::connect(osock, &ClientOptions::default()).unwrap();
    other.write(0, 0, &pattern(4, 4096)).unwrap();
    assert_eq!(other.read(0, 0, 4096).unwrap(), pattern(4, 4096));
    drop(fe);
    // In a thread: a disk whose last connection never ends leaves the next frontend waiting
    // for its first reply forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let sock = vsock.to_path_buf();
    std::thread::spawn(move || {
        let served = RawFrontend::try_connect(&sock, MIB as usize, None).is_ok_and(|mut next| {
            let n = next.read(
                0,
                &[Seg {
                    addr: DATA,
                    len: 4096,
                    write: true,
                }],
            );
            next.kick();
            next.wait_used(1, Duration::from_secs(10)) && next.status(n) == 0
        });
        let _ = tx.send(served);
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap_or(false),
        "the next frontend was not served:\n{}",
        daemon.log()
    );
    assert!(daemon.is_running());
}

/// (Fuzzing, device target.) vhost-user-backend puts a new memory table in place for the
/// queues before the device may refuse it: a table whose region lies past the end of its
/// file was refused, yet a queue worker woken by a kick in between read the ring from it and
/// the daemon died of SIGBUS. Queues now read only tables the device has checked.
#[test]
fn a_memory_table_the_device_refuses_is_never_read_by_a_queue() {
    let shm = scratch();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let seg = Seg {
        addr: DATA,
        len: 4096,
        write: true,
    };
    for round in 0..40 {
        let mut fe = match RawFrontend::try_connect(&vsock, MIB as usize, None) {
            Ok(fe) => fe,
            Err(e) => panic!(
                "round {round}: {e}; daemon running: {}\n{}",
                daemon.is_running(),
                daemon.log()
            ),
        };
        let n = fe.read(0, &[seg]);
        fe.kick();
        assert!(fe.wait_used(1, Duration::from_secs(10)), "{}", daemon.log());
        assert_eq!(fe.status(n), 0);
        let kick = fe.kicker();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kicking = std::thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = kick.write(1);
                    std::thread::yield_now();
                }
            }
        });
        // Only the first page (the descriptor table) is in the file; the rings are past it.
        let short = fe.replace_memory_with_short_file(4096);
        let t = Instant::now();
        while fe.alive() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        kicking.join().unwrap();
        assert!(
            daemon.is_running(),
            "the daemon died in round {round}:\n{}",
            daemon.log()
        );
        assert!(!fe.alive(), "a refused memory table kept its connection");
        drop((fe, short));
    }
    daemon.wait_for_log("past the end of its file", Duration::from_secs(1));
    let mut c = Client::connect(&osock, &ClientOptions::default()).unwrap();
    c.write(0, 0, &pattern(2, 4096)).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(2, 4096));
    assert!(daemon.stop().success());
}

/// (Review 2 of 3263a30/8322b3e.) The ring check runs only when a pass pops nothing: a pass
/// that pops a chain goes on to re-arm notifications (EVENT_IDX), which writes the used
/// ring's avail_event. With the used ring's flags and index in memory and its entries past
/// the end, that write fails, `process` returns the error with `?`, and vhost-user-backend
/// ends the queue's worker thread. The queue is dead for the rest of the connection, even
/// once the frontend sets it up properly again; a request in flight then is never completed
/// and GET_VRING_BASE waits out the 30 s stop timeout.
#[test]
fn a_used_ring_whose_entries_lie_outside_memory_kills_no_worker() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    // An O_DIRECT disk on a real filesystem: a read is still in flight when the pass ends.
    let disk_dir = tempfile::tempdir_in("/tmp").unwrap();
    let victim = disk_dir.path().join("victim.img");
    std::fs::write(&victim, pattern(7, 16 * MIB as usize)).unwrap();
    let other = shm.path().join("other.img");
    make_image(&other, 16 * MIB);
    let (vsock, osock) = (
        shm.path().join("victim.sock"),
        shm.path().join("other.sock"),
    );
    let cfg = format!(
        "disks:\n{}      direct: true\n{}",
        file_disk_yaml("victim", &vsock, &victim, ""),
        file_disk_yaml("other", &osock, &other, "")
    );
    let mut daemon = Daemon::start(shm.path(), &cfg);
    let seg = |addr| Seg {
        addr,
        len: 65536,
        write: true,
    };
    let mut fe = RawFrontend::connect_event_idx(&vsock, 4 * MIB as usize);
    let first = fe.read(0, &[seg(DATA)]);
    fe.kick();
    assert!(fe.wait_used(1, Duration::from_secs(5)));
    assert_eq!(fe.status(first), 0);
    // Guest memory is DATA + 4 MiB long: the used ring's flags and index are its last 4
    // bytes (the index says 1, as the device has it).
    let end = DATA + 4 * MIB;
    fe.write_bytes(end - 2, &1u16.to_le_bytes());
    fe.move_used_ring(end - 4).unwrap();
    assert!(fe.alive());
    fe.read(128, &[seg(DATA + MIB)]);
    fe.kick();
    std::thread::sleep(Duration::from_millis(500));
    // GET_VRING_BASE: the device stops the queue once its accepted requests are done.
    let (base, took) = fe.get_vring_base_timed();
    eprintln!("GET_VRING_BASE: {base:?} after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "GET_VRING_BASE took {took:?}:\n{}",
        daemon.log()
    );
    drop(fe);
    let _ = osock;
    assert!(daemon.is_running());
}

/// (Review 2 of 8322b3e.) Same cause as above, without a request in flight: after the broken
/// used ring, the frontend puts the ring back where it was and kicks; a live queue serves the
/// waiting requests, a dead worker never does.
#[test]
fn a_queue_set_up_again_after_a_broken_used_ring_is_served() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (mut daemon, vsock, osock) = two_tmpfs_disks(shm.path());
    let seg = Seg {
        addr: DATA,
        len: 4096,
        write: true,
    };
    let mut fe = event_idx_frontend_served_once(&vsock);
    let end = DATA + MIB;
    fe.write_bytes(end - 2, &1u16.to_le_bytes());
    fe.move_used_ring(end - 4).unwrap();
    assert!(fe.alive());
    fe.read(0, &[seg]);
    fe.kick();
    std::thread::sleep(Duration::from_millis(300));
    // Set up properly again (the used index where the device left it) and kick.
    fe.move_used_ring(0x2000).unwrap();
    assert!(fe.alive());
    let third = fe.read(0, &[seg]);
    fe.kick();
    assert!(
        fe.wait_used(2, Duration::from_secs(5)),
        "the queue set up again was not served (used {}):\n{}",
        fe.used(),
        daemon.log()
    );
    let _ = third;
    spins_nothing_and_the_disks_serve_on(&mut daemon, fe, &vsock, &osock);
}

/// (Review 2.) Nothing bounds how many chains of one queue are in flight: the device takes
/// whatever the available ring names, and a frontend may name the same head again and again
/// (a real driver has at most the ring size outstanding). A frontend that keeps moving the
/// available index ahead of the device (within the ring size, so nothing stalls) over one
/// valid READ chain makes the worker pop without end; every popped chain is a future kept in
/// the queue's executor until it completes (the byte budget makes it wait, it does not stop
/// the pop), so the daemon's memory grows as fast as the frontend writes one index.
#[test]
fn a_frontend_naming_one_head_again_and_again_costs_bounded_memory() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    // An O_DIRECT disk on a real filesystem: reads complete later, not inside the poll.
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let victim = disk_dir.path().join("victim.img");
    std::fs::write(&victim, pattern(7, 16 * MIB as usize)).unwrap();
    let other = shm.path().join("other.img");
    make_image(&other, 16 * MIB);
    let (vsock, osock) = (
        shm.path().join("victim.sock"),
        shm.path().join("other.sock"),
    );
    let cfg = format!(
        "disks:\n{}      direct: true\n{}",
        file_disk_yaml("victim", &vsock, &victim, ""),
        file_disk_yaml("other", &osock, &other, "")
    );
    let mut daemon = Daemon::start(shm.path(), &cfg);
    let mut fe = RawFrontend::connect_event_idx(&vsock, MIB as usize);
    let first = fe.read(
        0,
        &[Seg {
            addr: DATA,
            len: MIB as u32,
            write: true,
        }],
    );
    fe.kick();
    assert!(fe.wait_used(1, Duration::from_secs(5)));
    assert_eq!(fe.status(first), 0);
    // Every entry of the available ring names that chain (head 0).
    for i in 0..256u64 {
        fe.write_bytes(0x1004 + 2 * i, &0u16.to_le_bytes());
    }
    let before = rss_anon(daemon.pid());
    let start = Instant::now();
    let mut peak = before;
    let mut sampled = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        // avail_event: where the device has popped to.
        let popped = fe.read_u16(0x2000 + 4 + 8 * 256);
        fe.write_bytes(0x1002, &popped.wrapping_add(200).to_le_bytes());
        fe.kick();
        if sampled.elapsed() < Duration::from_millis(100) {
            continue;
        }
        sampled = Instant::now();
        peak = peak.max(rss_anon(daemon.pid()));
        if peak > before + 512 * MIB {
            break;
        }
    }
    eprintln!(
        "used {} popped {}: RssAnon {} MiB -> peak {} MiB in {:?}",
        fe.used(),
        fe.read_u16(0x2000 + 4 + 8 * 256),
        before >> 20,
        peak >> 20,
        start.elapsed()
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(
        peak < before + 64 * MIB,
        "the daemon grew from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    let mut other = Client::connect(&osock, &ClientOptions::default()).unwrap();
    other.write(0, 0, &pattern(4, 4096)).unwrap();
    drop(fe);
}

/// Freezes (or thaws) the filesystem mounted at `dir`.
fn freeze(dir: &std::path::Path, on: bool) {
    let st = std::process::Command::new("fsfreeze")
        .arg(if on { "-f" } else { "-u" })
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

/// (Review 3 of f7fa80c.) A request still running when GET_VRING_BASE gives up waiting (30 s; a frozen or slow
/// filesystem) keeps its head's bit. The driver resets the device (guest reboot, driver
/// reload): QEMU sets the queue up again from index 0 and the fresh driver's first request
/// uses head 0 again. The device refuses it without a used entry ("made available again
/// while in flight"), so the new request is lost; when the old one finishes, its used entry
/// for head 0 lands in the new ring and the driver takes it for the new request: a write
/// never performed is completed (with whatever its status byte held). Now such requests
/// finish detached from the ring, and the queue takes the new driver's requests after them.
#[test]
fn a_request_outliving_the_stop_timeout_makes_the_next_drivers_first_request_vanish() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let lun = LoopLun::new(256 * MIB, Fs::Ext4);
    let mnt = lun.mount_point();
    let victim = mnt.join("victim.img");
    std::fs::write(&victim, vec![0u8; 16 * MIB as usize]).unwrap();
    let vsock = shm.path().join("victim.sock");
    let cfg = format!(
        "disks:\n{}      direct: true\n",
        file_disk_yaml("victim", &vsock, &victim, "")
    );
    let mut daemon = Daemon::start(shm.path(), &cfg);
    let mut fe = RawFrontend::connect(&vsock, MIB as usize);
    let data = |addr| Seg {
        addr,
        len: 4096,
        write: false,
    };
    fe.fill(DATA, 4096, 0xaa);
    fe.fill(DATA + 65536, 4096, 0xbb);

    freeze(&mnt, true);
    let old = fe.write_req(0, &[data(DATA)], 0xff);
    fe.kick();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fe.used(), 0, "the write finished on a frozen filesystem");
    let (base, took) = fe.get_vring_base_timed();
    eprintln!("GET_VRING_BASE {base:?} after {took:?}");

    // The guest driver starts over: new rings, head 0 again.
    fe.restart_queue().unwrap();
    let new = fe.write_req(8, &[data(DATA + 65536)], 0xff);
    assert_eq!((old, new), (0, 0));
    fe.kick();
    std::thread::sleep(Duration::from_millis(1000));
    freeze(&mnt, false);
    let completed = fe.wait_used(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let status = fe.status(new);
    let image = std::fs::read(&victim).unwrap();
    let landed = image[8 * 512..8 * 512 + 4096].iter().all(|&b| b == 0xbb);
    let log = daemon.log();
    eprintln!(
        "used {} status {status:#x} new write landed {landed}; refused: {}",
        fe.used(),
        log.lines().filter(|l| l.contains("again while in")).count()
    );
    drop(fe);
    assert!(daemon.is_running());
    assert!(
        !completed || (landed && status == 0),
        "the new driver's write got a used entry (status byte {status:#x}) but was never \
         performed (landed {landed}):\n{log}"
    );
    assert!(
        completed,
        "the new driver's write was never completed:\n{log}"
    );
}
