//! The direct path when its right to the LUN is in doubt: a map server that stops answering,
//! a host frozen while it holds a write lease, a map connection cut without a word. The guest
//! sees delays, never errors; the host never writes blocks the server has taken back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinpath_filemap::read_direct;
use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::relay::LatencyRelay;
use twinpath_tests::sanhost::{
    extents, fencing_map_server, overlap, registered, xflags, Host, Lun,
};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// Leaves about `free` bytes free on the filesystem at `mnt`, so that blocks freed later are
/// the ones a new file gets.
fn fill_up(mnt: &std::path::Path, free: u64) {
    let avail = fs_available(mnt);
    let size = avail.saturating_sub(free);
    let f = std::fs::File::create(mnt.join("filler")).unwrap();
    // SAFETY: fallocate on a file we hold open.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, size as i64) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// The second half of the 128 MiB image `img` is truncated away while the host holds a
/// write lease on it, and another tenant's file takes the freed blocks. Returns that file's
/// extents, with the content it wrote.
fn truncate_and_reuse(img: &std::path::Path) -> (Vec<(u64, u64)>, Vec<u8>) {
    let freed = extents(img, 64 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let other = img.with_file_name("other.raw");
    let content = pattern(700, 40 * MIB as usize);
    std::fs::write(&other, &content).unwrap();
    let taken = extents(&other, 0);
    assert!(
        overlap(&freed, &taken) >= 8 * MIB,
        "the new file did not get the freed blocks: {freed:?} / {taken:?}"
    );
    (taken, content)
}

/// Whether the device holds `content` in `ranges` (past every cache).
fn on_device(device: &std::path::Path, ranges: &[(u64, u64)], content: &[u8]) -> bool {
    let dev = std::fs::File::open(device).unwrap();
    // tgtd may write the device through its page cache.
    dev.sync_all().unwrap();
    let mut at = 0usize;
    ranges.iter().all(|&(physical, len)| {
        let got = read_direct(&dev, physical, len as usize).unwrap();
        let ok = got[..] == content[at..at + len as usize];
        at += len as usize;
        ok
    })
}

/// A 128 MiB image on a nearly full filesystem (the guest's writes after the truncation,
/// over SMB, need room too: they stay within 24 MiB).
fn image(fs: &FileServer) -> std::path::PathBuf {
    let mnt = fs.lun.mount_point();
    let img = mnt.join("vm.raw");
    std::fs::write(&img, pattern(1, 128 * MIB as usize)).unwrap();
    fill_up(&mnt, 24 * MIB);
    img
}

/// A guest writing 64 KiB pieces over a range of its disk until stopped, 32 at a time (a
/// frozen host finds many in its queue when it resumes).
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Written, String>>,
}

/// What a [`Writer`] wrote: each piece's offset, and the index of its content in the
/// writer's buffer (the last write there).
#[derive(Default)]
struct Written {
    count: u64,
    piece: usize,
    last: std::collections::HashMap<u64, usize>,
}

impl Written {
    /// `image` with these writes laid over it.
    fn apply(&self, image: &mut [u8]) {
        let piece = self.piece;
        let data = pattern(9, self.last.values().max().map_or(0, |i| i + 1) * piece);
        for (&at, &i) in &self.last {
            image[at as usize..at as usize + piece].copy_from_slice(&data[i * piece..][..piece]);
        }
    }
}

impl Writer {
    /// Writes over `[from, from + span)`, 32 requests of 64 KiB at a time.
    fn start(host: &Host, from: u64, span: u64) -> Writer {
        Writer::with(host, from, span, 65536, 32)
    }

    /// Writes over `[from, from + span)`, `batch` requests of `piece` bytes at a time.
    fn with(host: &Host, from: u64, span: u64, piece: usize, batch: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = host.client();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let data = pattern(9, batch as usize * piece);
                c.buffer()[..data.len()].copy_from_slice(&data);
                let mut n = 0u64;
                let mut written = Written {
                    piece,
                    ..Written::default()
                };
                while !stop.load(Ordering::Relaxed) {
                    let reqs: Vec<Req> = (0..batch)
                        .map(|i| Req {
                            op: Op::Write,
                            offset: from + ((n + i) * 7919 * piece as u64) % span,
                            len: piece,
                            buf_offset: i as usize * piece,
                        })
                        .collect();
                    for (i, r) in c.batch(0, &reqs).unwrap().into_iter().enumerate() {
                        r.map_err(|e| format!("guest write {}: {e}", n + i as u64))?;
                        written.last.insert(reqs[i].offset, i);
                    }
                    n += batch;
                }
                c.flush(0).map_err(|e| format!("guest flush: {e}"))?;
                written.count = n;
                Ok(written)
            }
        });
        Writer { stop, thread }
    }

    /// Stops it (after a flush); the writes it did, or the error the guest saw, with
    /// `host`'s log.
    fn stop(self, host: &Host) -> Written {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join().unwrap() {
            Ok(w) => w,
            Err(e) => panic!("{e}\n{}", host.daemon.log()),
        }
    }
}

#[test]
fn a_stopped_map_server_costs_a_guest_request_at_most_the_map_timeout() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    let mut expect = pattern(1, 320 * MIB as usize);
    std::fs::write(mnt.join("vm.raw"), &expect).unwrap();
    let host = Host::start(&fs, "vm.raw", &fs.map_addr.clone(), "map_timeout: 1s");
    let mut c = host.client();
    let write = |c: &mut Client, expect: &mut Vec<u8>, at: u64, seed: u64| {
        let data = pattern(seed, MIB as usize);
        let started = Instant::now();
        c.write(0, at, &data).unwrap();
        expect[at as usize..(at + MIB) as usize].copy_from_slice(&data);
        started.elapsed()
    };
    write(&mut c, &mut expect, 0, 2);
    let direct = host.done("direct", "write");
    assert!(direct >= 1.0, "window 0 was written directly");

    let map_server = fs.map.as_ref().unwrap().pid();
    signal(map_server, libc::SIGSTOP);
    // New windows: each request waits at most the map timeout, then goes over SMB.
    let limit = Duration::from_secs(2);
    for w in 1..4u64 {
        let took = write(&mut c, &mut expect, w * 64 * MIB, 10 + w);
        assert!(took < limit, "a write to window {w} took {took:?}");
        let started = Instant::now();
        let back = c.read(0, w * 64 * MIB, MIB as usize).unwrap();
        assert!(
            started.elapsed() < limit,
            "a read took {:?}",
            started.elapsed()
        );
        assert!(back[..] == expect[(w * 64 * MIB) as usize..][..MIB as usize]);
    }
    // The grant held keeps working, and a flush commits nothing but completes in time.
    write(&mut c, &mut expect, MIB, 20);
    assert!(
        host.done("direct", "write") > direct,
        "window 0 stays direct"
    );
    let started = Instant::now();
    c.flush(0).unwrap();
    assert!(
        started.elapsed() < limit,
        "a flush took {:?}",
        started.elapsed()
    );

    // The map server comes back: so does the direct path, after its rest.
    signal(map_server, libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(6));
    let direct = host.done("direct", "write");
    write(&mut c, &mut expect, 4 * 64 * MIB, 30);
    assert!(
        host.done("direct", "write") > direct,
        "the direct path came back"
    );
    write(&mut c, &mut expect, 4 * 64 * MIB + MIB, 31);
    c.flush(0).unwrap();

    // What was flushed is durable: the host is killed, and the image read over SMB.
    drop(c);
    signal(host.daemon.pid(), libc::SIGKILL);
    let log = host.daemon.log();
    host.daemon.wait_exit(Duration::from_secs(10));
    assert!(log.contains("map server did not answer"), "{log}");
    assert!(
        read_over_smb(&fs, 320 * MIB) == expect,
        "what was flushed is not durable"
    );
}

#[test]
fn a_host_frozen_past_its_lease_time_never_writes_blocks_freed_meanwhile() {
    frozen_host(Lun::Device);
}

#[test]
fn a_host_frozen_past_its_lease_time_never_writes_freed_blocks_over_iscsi() {
    frozen_host(Lun::Iscsi);
}

#[test]
fn a_host_frozen_amid_many_small_direct_writes_never_writes_freed_blocks() {
    frozen_host_writing(Lun::Device, 4096, 128);
}

fn frozen_host(lun: Lun) {
    frozen_host_writing(lun, 65536, 32);
}

/// `batch` guest writes of `piece` bytes at a time, the host stopped among them.
fn frozen_host_writing(lun: Lun, piece: usize, batch: u64) {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "lease_time: 2s\n");
    let img = image(&fs);
    let host = Host::start_on(&fs, lun, "vm.raw", &fs.map_addr.clone(), "map_timeout: 1s");
    let writer = Writer::with(&host, 64 * MIB, 24 * MIB, piece, batch);
    wait_for_direct_writes(&host);

    // Frozen while writing; meanwhile the image is truncated and its blocks reused.
    signal(host.daemon.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    let (taken, content) = truncate_and_reuse(&img);
    std::thread::sleep(Duration::from_secs(4));
    signal(host.daemon.pid(), libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(2));
    assert!(writer.stop(&host).count > 20);
    assert!(
        on_device(fs.lun.device(), &taken, &content),
        "the host wrote blocks freed while it was frozen"
    );
    let log = host.daemon.log_after_stop();
    assert!(!log.contains("ERROR"), "{log}");
}

fn wait_for_direct_writes(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.done("direct", "write") < 20.0 {
        assert!(
            Instant::now() < deadline,
            "no direct writes:\n{}",
            host.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_silently_cut_host_stops_writing_directly_within_its_lease_time() {
    silently_cut(Lun::Device);
}

#[test]
fn a_silently_cut_host_stops_writing_directly_over_iscsi_within_its_lease_time() {
    silently_cut(Lun::Iscsi);
}

fn silently_cut(lun: Lun) {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "lease_time: 2s\n");
    let img = image(&fs);
    let relay = LatencyRelay::start(fs.map_addr.parse().unwrap(), Duration::ZERO);
    let addr = relay.addr().to_string();
    let host = Host::start_on(&fs, lun, "vm.raw", &addr, "map_timeout: 1s");
    let writer = Writer::start(&host, 64 * MIB, 24 * MIB);
    wait_for_direct_writes(&host);

    // Nothing more passes between host and map server, and neither side's socket closes;
    // the guest goes on writing. The server waits out the hold (2s + 0.2s + 1s) before
    // the host's blocks are anyone else's: here they are freed and reused after it.
    relay.cut_silently();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    let direct = host.done("direct", "write");
    let (taken, content) = truncate_and_reuse(&img);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        host.done("direct", "write"),
        direct,
        "direct writes {:?} after the cut",
        cut.elapsed()
    );
    assert!(writer.stop(&host).count > 20);
    assert!(
        on_device(fs.lun.device(), &taken, &content),
        "the host wrote blocks freed after its lease time"
    );
    let mut host = host;
    host.daemon
        .wait_for_log("leases ran out unrenewed", Duration::from_secs(10));
}

/// The first `len` bytes of a disk, in 4 MiB reads.
fn read_all(c: &mut Client, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    for at in (0..len).step_by(4 * MIB as usize) {
        out.extend(c.read(0, at, (4 * MIB).min(len - at) as usize).unwrap());
    }
    out
}

/// The first `len` bytes of `vm.raw` as an `smb` disk in a daemon of its own reads them.
fn read_over_smb(fs: &FileServer, len: u64) -> Vec<u8> {
    let dir = fs.dir.path().join("reader");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("smb.sock");
    let _smb = Daemon::start(
        &dir,
        &format!(
            "disks:\n  - name: smb\n    socket: {}\n    backend: {}\n",
            sock.display(),
            fs.backend_yaml("vm.raw", None)
        ),
    );
    read_all(
        &mut Client::connect(&sock, &ClientOptions::default()).unwrap(),
        len,
    )
}

/// Leases recalled from `host`'s disk so far.
fn recalls(host: &Host) -> f64 {
    sample(
        &scrape(host.metrics),
        "twinpath_path_recalls_total{disk=\"vm\",path=\"direct\"}",
    )
}

#[test]
fn a_truncate_of_a_leased_image_is_recalled_within_a_second_and_ends_direct_io() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let img = image(&fs);
    let host = Host::start(&fs, "vm.raw", &fs.map_addr.clone(), "map_timeout: 1s");
    let writer = Writer::start(&host, 64 * MIB, 24 * MIB);
    wait_for_direct_writes(&host);
    let (taken, content) = truncate_and_reuse(&img);
    let truncated = Instant::now();
    while recalls(&host) < 1.0 {
        assert!(
            truncated.elapsed() < Duration::from_secs(1),
            "no recall within a second of the truncate"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Direct I/O already under way when the recall came may finish; none starts after.
    std::thread::sleep(Duration::from_millis(100));
    let direct = host.done("direct", "write");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        host.done("direct", "write"),
        direct,
        "direct writes after the recall"
    );
    assert!(writer.stop(&host).count > 20);
    assert!(on_device(fs.lun.device(), &taken, &content));
}

#[test]
fn xfs_fsr_leaves_a_leased_image_alone_and_no_guest_write_is_lost() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "lease_time: 2s\n");
    let mnt = fs.lun.mount_point();
    // A fragmented image: its pieces written last to first (so no two merge), each between
    // two of a spacer's, each made durable.
    let img = mnt.join("vm.raw");
    let spacer = mnt.join("spacer");
    {
        use std::os::unix::fs::FileExt;
        let (a, b) = (
            std::fs::File::create(&img).unwrap(),
            std::fs::File::create(&spacer).unwrap(),
        );
        a.set_len(64 * MIB).unwrap();
        for i in (0..64u64).rev() {
            a.write_all_at(&pattern(i, MIB as usize), i * MIB).unwrap();
            a.sync_all().unwrap();
            b.write_all_at(&pattern(1000 + i, MIB as usize), i * MIB)
                .unwrap();
            b.sync_all().unwrap();
        }
    }
    std::fs::remove_file(&spacer).unwrap();
    let before = extents(&img, 0);
    assert!(before.len() >= 8, "not fragmented: {before:?}");

    let host = Host::start(&fs, "vm.raw", &fs.map_addr.clone(), "map_timeout: 1s");
    let writer = Writer::start(&host, 0, 60 * MIB);
    wait_for_direct_writes(&host);
    assert!(xflags(&img).contains("no-defrag"), "{}", xflags(&img));
    let out = std::process::Command::new("xfs_fsr")
        .arg("-v")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(writer.stop(&host).count > 20);
    assert_eq!(
        extents(&img, 0),
        before,
        "xfs_fsr moved the leased image's blocks"
    );

    let mut c = host.client();
    c.flush(0).unwrap();
    let through_san = read_all(&mut c, 64 * MIB);
    drop(c);
    let log = host.daemon.log_after_stop();
    assert!(!log.contains("ERROR"), "{log}");
    // The last lease is gone with the disk (returned as it closed, or at the latest after the
    // hold, 2s + 0.2s + 1s): the flag is as it was.
    let closed = Instant::now();
    while xflags(&img).contains("no-defrag") {
        assert!(
            closed.elapsed() < Duration::from_secs(8),
            "the flag stayed: {}",
            xflags(&img)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    assert!(
        read_over_smb(&fs, 64 * MIB) == through_san,
        "SMB and the san disk differ"
    );
}

#[test]
fn a_host_cut_off_is_fenced_on_the_lun_and_another_host_writes_directly() {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    let mut expect = pattern(1, 128 * MIB as usize);
    std::fs::write(mnt.join("vm.raw"), &expect).unwrap();
    // The map server again, now fencing on the LUN through tgtd.
    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let (map, _) = fencing_map_server(&mut fs, &target.url(), "3s");

    // Host A writes window 0 through a relay that will go silent.
    let relay = LatencyRelay::start(fs.map_addr.parse().unwrap(), Duration::ZERO);
    let addr = relay.addr().to_string();
    let lun = Lun::Target(&target);
    let a = Host::start_as(&fs, "test-host", lun, "vm.raw", &addr, "map_timeout: 1s");
    let a_key = twinpath_mapproto::fence_key("test-host");
    let a_writer = Writer::start(&a, 0, 24 * MIB);
    wait_for_direct_writes(&a);
    assert!(
        registered(&target).contains(&a_key),
        "host A not registered: {:?}\n{}\n{}",
        registered(&target),
        a.daemon.log(),
        map.log()
    );

    // Cut off; host B wants the image. A's lease is recalled into the void and A is fenced
    // within the recall deadline (1s, polled every 0.5s).
    relay.cut_silently();
    let b = Host::start_as(
        &fs,
        "host-a",
        lun,
        "vm.raw",
        &fs.map_addr,
        "map_timeout: 1s",
    );
    let asked = Instant::now();
    let b_writer = Writer::start(&b, 64 * MIB, 24 * MIB);
    while registered(&target).contains(&a_key) {
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "host A not fenced:\n{}",
            map.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A's guest goes on writing, over SMB (each of those writes recalls B's lease: one
    // image written by two hosts at once is for show here, not for use).
    let a_network = a.done("network", "write");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        a.done("network", "write") > a_network,
        "host A goes on over SMB:\n{}",
        a.daemon.log()
    );
    let a_wrote = a_writer.stop(&a);
    // With A quiet, B gets the write lease and writes directly.
    wait_for_direct_writes(&b);
    let b_wrote = b_writer.stop(&b);
    a_wrote.apply(&mut expect);
    b_wrote.apply(&mut expect);
    // tgtd cannot abort A's commands already in it: A's leases were waited out, not freed.
    let log = map.log();
    assert!(log.contains("host preempted on the LUN"), "{log}");
    assert!(!log.contains("host fenced on the LUN"), "{log}");
    drop((a, b));
    assert!(
        read_over_smb(&fs, 128 * MIB) == expect,
        "the image is not what the guests wrote"
    );
}

#[test]
fn a_map_server_told_to_fence_on_a_device_without_reservations_refuses_to_start() {
    let mut fs = FileServer::start(320 * MIB, Fs::Xfs, false, "");
    assert!(fs.map.take().unwrap().stop().success());
    let device = fs.lun.device().display().to_string();
    let config = fs.map_config(
        &fs.lun.mount_point(),
        &[],
        &format!("fence:\n  lun: \"{device}\"\n"),
    );
    let cfg = fs.dir.path().join("fence-loop.yaml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = std::process::Command::new(twinpath_bin())
        .args(["map-server", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("the map server serves without the fencing it was told to do");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&device) && err.contains("has no persistent reservations"),
        "{err}"
    );
}

#[test]
fn hole_punch_fallocate_and_reflink_by_others_are_recalled_within_a_second() {
    for (what, op) in [
        ("hole punch", "fpunch 80m 1m"),
        ("zero range", "fzero 90m 1m"),
        ("fallocate past the end", "falloc -k 128m 4m"),
        ("reflink into the image", "reflink SRC 0 70m 1m"),
    ] {
        let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
        let img = image(&fs);
        let src = fs.lun.mount_point().join("src.raw");
        std::fs::write(&src, pattern(5, MIB as usize)).unwrap();
        let host = Host::start(&fs, "vm.raw", &fs.map_addr.clone(), "map_timeout: 1s");
        let writer = Writer::start(&host, 64 * MIB, 24 * MIB);
        wait_for_direct_writes(&host);
        let out = std::process::Command::new("xfs_io")
            .args(["-c", &op.replace("SRC", &src.display().to_string())])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let changed = Instant::now();
        while recalls(&host) < 1.0 {
            assert!(
                changed.elapsed() < Duration::from_secs(1),
                "{what}: no recall within a second"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        let direct = host.done("direct", "write");
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            host.done("direct", "write"),
            direct,
            "{what}: direct writes after the recall"
        );
        assert!(writer.stop(&host).count > 20, "{what}");
    }
}
