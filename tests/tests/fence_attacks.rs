//! Attacks on fencing (review of f39e110): real tgtd, real map server with `fence:`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::sanhost::{registered, xflags, Host, Lun};
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

// tgtd has no PREEMPT AND ABORT: a write it accepted from the host before the preemption
// may still land. The server used to free the host's leases at once all the same; xfs_fsr
// then moved the image's extents and another tenant's file took the freed blocks while the
// host's commands could still be in the target. Now its leases are waited out: the
// no-defrag flag stays, and the fenced host, whose direct reads the reservation refuses
// (Exclusive Access - Registrants Only), reads its image over SMB.

#[test]
fn a_host_preempted_without_abort_keeps_its_blocks_until_the_hold_and_reads_over_smb() {
    fenced_reads(false);
}

/// The same, the guest flushing right after the preemption.
#[test]
fn a_host_preempted_without_abort_keeps_its_blocks_until_the_hold_and_flushes() {
    fenced_reads(true);
}

fn fenced_reads(flush: bool) {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    let img = mnt.join("vm.raw");
    let original: Vec<u8> = (0..32u64).flat_map(|i| pattern(i, MIB as usize)).collect();
    std::fs::write(&img, &original).unwrap();

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
    // "host preempted on the LUN" (or, wrongly here, "host fenced on the LUN").
    map.wait_for_log("on the LUN;", Duration::from_secs(15));
    eprintln!("preempted {:?} after the cut", cut.elapsed());
    assert!(!registered(&target).contains(&a_key));
    // The leases are kept: nobody else may get the image's blocks while a write of the host
    // may still be in the target.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert!(
            xflags(&img).contains("no-defrag"),
            "the leases went with the host's commands possibly still in the target:\n{}",
            map.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !map.log().contains("host fenced on the LUN"),
        "{}",
        map.log()
    );

    if flush {
        // The guest flushes: the first command after the preemption (UNIT ATTENTION) and its
        // retry (RESERVATION CONFLICT, taken as "the server flushed") are both spent here.
        c.flush(0).unwrap();
    }
    // The fenced host's guest reads its disk again, still within its own lease time: the
    // target refuses its direct reads, the guest gets its image over SMB.
    let network0 = a.done("network", "read");
    for at in (0..32 * MIB).step_by(MIB as usize) {
        let got = c.read(0, at, MIB as usize).unwrap();
        assert!(
            got[..] == original[at as usize..][..MIB as usize],
            "fenced host read wrong data at {at}:\n{}",
            a.daemon.log()
        );
    }
    assert!(
        a.done("network", "read") - network0 >= 32.0,
        "reads went direct after the preemption:\n{}",
        a.daemon.log()
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
