//! Attacks on fencing (review of f39e110): real tgtd, real map server with `fence:`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::sanhost::{extents, overlap, registered, xflags, Host, Lun};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// A relay whose `cut_server_side` closes the connection towards the map server (which sees
/// the host gone) while the host's side stays open and silent (the host sees nothing: a
/// partition where only the server's end noticed, e.g. its keepalive or an RST on its side).
struct HalfCutRelay {
    port: u16,
    cut: Arc<AtomicBool>,
    servers: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl HalfCutRelay {
    fn start(target: std::net::SocketAddr) -> HalfCutRelay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let servers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, s2) = (cut.clone(), servers.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { continue };
                if c2.load(Ordering::Relaxed) {
                    // After the cut, new connections go nowhere (held open, silent).
                    std::mem::forget(client);
                    continue;
                }
                let server = TcpStream::connect(target).unwrap();
                s2.lock().unwrap().push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let cut = c2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || cut.load(Ordering::Relaxed) {
                                break;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        // Keep the host's end open: leak it.
                        std::mem::forget(from);
                        std::mem::forget(to);
                    });
                }
                std::mem::forget(client);
            }
        });
        HalfCutRelay { port, cut, servers }
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    fn cut_server_side(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for s in self.servers.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

// The server frees a fenced host's leases at once, well before the host's own lease time
// ends. Once free, the image's no-defrag flag goes; xfs_fsr moves its extents and another
// tenant's file takes the freed blocks. The fenced host's guest must not read that tenant's
// data (under Write Exclusive - Registrants Only it did: anyone may read there).

#[test]
fn a_fenced_host_never_reads_blocks_given_away_after_its_fence() {
    fenced_reads(false);
}

/// The same, the guest flushing right after the fence.
#[test]
fn a_fenced_host_never_reads_blocks_given_away_after_its_fence_and_a_guest_flush() {
    fenced_reads(true);
}

fn fenced_reads(flush: bool) {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    let img = mnt.join("vm.raw");
    let spacer = mnt.join("spacer");
    {
        use std::os::unix::fs::FileExt;
        let (a, b) = (
            std::fs::File::create(&img).unwrap(),
            std::fs::File::create(&spacer).unwrap(),
        );
        a.set_len(32 * MIB).unwrap();
        for i in (0..32u64).rev() {
            a.write_all_at(&pattern(i, MIB as usize), i * MIB).unwrap();
            a.sync_all().unwrap();
            b.write_all_at(&pattern(1000 + i, MIB as usize), i * MIB)
                .unwrap();
            b.sync_all().unwrap();
        }
    }
    std::fs::remove_file(&spacer).unwrap();
    let original: Vec<u8> = (0..32u64).flat_map(|i| pattern(i, MIB as usize)).collect();
    let before = extents(&img, 0);
    assert!(before.len() >= 8, "not fragmented: {before:?}");

    assert!(fs.map.take().unwrap().stop().success());
    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let config = fs.map_config(
        &mnt,
        &[],
        &format!("lease_time: 30s\nfence:\n  lun: \"{}\"\n", target.url()),
    );
    let mut map = Daemon::start_map_server(fs.dir.path(), &config);
    map.wait_for_log("fencing with SCSI-3", Duration::from_secs(5));

    let relay = HalfCutRelay::start(fs.map_addr.parse().unwrap());
    let a = Host::start_as(
        &fs,
        "test-host",
        Lun::Target(&target),
        "vm.raw",
        &relay.addr(),
        "map_timeout: 1s",
    );
    let mut c = a.client();
    // Read the whole image twice: grants for all of it.
    for _ in 0..2 {
        for at in (0..32 * MIB).step_by(4 * MIB as usize) {
            let got = c.read(0, at, 4 * MIB as usize).unwrap();
            assert!(got[..] == original[at as usize..][..4 * MIB as usize]);
        }
    }
    // One direct write (same bytes as there), so the disk's device is dirty: its next guest
    // flush goes to the LUN.
    if flush {
        let w0 = a.done("direct", "write");
        c.write(0, 0, &original[..MIB as usize]).unwrap();
        assert!(
            a.done("direct", "write") > w0,
            "write not direct:\n{}",
            a.daemon.log()
        );
    }
    let direct0 = a.done("direct", "read");
    assert!(direct0 > 0.0, "no direct reads:\n{}", a.daemon.log());
    assert!(xflags(&img).contains("no-defrag"), "{}", xflags(&img));
    let a_key = twinpath_mapproto::fence_key("test-host");
    assert!(registered(&target).contains(&a_key));

    // The server's side of the connection closes; the host hears nothing.
    relay.cut_server_side();
    let cut = Instant::now();
    map.wait_for_log("host fenced on the LUN", Duration::from_secs(5));
    eprintln!("fenced {:?} after the cut", cut.elapsed());
    // The lease is free: the flag goes, xfs_fsr defragments, another tenant's file takes the
    // freed blocks.
    let t = Instant::now();
    while xflags(&img).contains("no-defrag") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "flag kept: {}",
            xflags(&img)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = std::process::Command::new("xfs_fsr")
        .arg("-v")
        .arg(&img)
        .output()
        .unwrap();
    eprintln!("xfs_fsr: {}", String::from_utf8_lossy(&out.stdout));
    let after = extents(&img, 0);
    eprintln!("extents before {} after {}", before.len(), after.len());
    // Another tenant writes until the filesystem is full.
    let other = mnt.join("other.raw");
    {
        let mut f = std::fs::File::create(&other).unwrap();
        let chunk = pattern(777, MIB as usize);
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let taken = extents(&other, 0);
    let reused = overlap(&before, &taken);
    eprintln!(
        "other tenant got {} MiB of the image's old blocks; {:?} after the cut",
        reused / MIB,
        cut.elapsed()
    );

    if flush {
        // The guest flushes: the first command after the preemption (UNIT ATTENTION) and its
        // retry (RESERVATION CONFLICT, taken as "the server flushed") are both spent here.
        c.flush(0).unwrap();
    }
    let direct0 = a.done("direct", "read");
    let _ = direct0;
    // The fenced host's guest reads its disk again, still within its own lease time.
    let mut foreign = 0usize;
    let mut wrong = 0usize;
    let tenant = pattern(777, MIB as usize);
    for at in (0..32 * MIB).step_by(MIB as usize) {
        let got = c.read(0, at, MIB as usize).unwrap();
        if got[..] != original[at as usize..][..MIB as usize] {
            wrong += 1;
            if got[..4096] == tenant[..4096]
                || got
                    .windows(64)
                    .step_by(4096)
                    .any(|w| tenant.windows(64).step_by(4096).any(|t| t == w))
            {
                foreign += 1;
            }
        }
    }
    let direct1 = a.done("direct", "read");
    eprintln!(
        "after the fence: {} direct reads, {wrong} MiB differ from the image, {foreign} MiB look like the other tenant's; {:?} after the cut",
        direct1 - direct0,
        cut.elapsed()
    );
    assert!(
        wrong == 0,
        "fenced host read {wrong} MiB that are not its image ({foreign} MiB of another tenant's file), {} direct reads after the fence",
        direct1 - direct0
    );
}

/// The map server restarts (killed, started again on the same config): the reservation is
/// still held by the old instance's I_T nexus in the target. Does the new one start fencing?
#[test]
fn a_fencing_map_server_comes_back_after_a_crash() {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    assert!(fs.map.take().unwrap().stop().success());
    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let config = fs.map_config(
        &mnt,
        &[],
        &format!("lease_time: 3s\nfence:\n  lun: \"{}\"\n", target.url()),
    );
    let mut map = Daemon::start_map_server(fs.dir.path(), &config);
    map.wait_for_log("fencing with SCSI-3", Duration::from_secs(5));
    signal(map.pid(), libc::SIGKILL);
    let _ = map.wait_exit(Duration::from_secs(5));
    let dir2 = fs.dir.path().join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let cfg = dir2.join("map-server.yaml");
    std::fs::write(&cfg, &config).unwrap();
    let out = std::process::Command::new(twinpath_bin())
        .args(["map-server", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir2.join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = out;
    let started = Instant::now();
    let mut log = String::new();
    while started.elapsed() < Duration::from_secs(10) {
        log = std::fs::read_to_string(dir2.join("log")).unwrap_or_default();
        if log.contains("ready:") || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("second instance log:\n{log}");
    assert!(
        log.contains("fencing with SCSI-3"),
        "the restarted map server did not come back:\n{log}"
    );
}
