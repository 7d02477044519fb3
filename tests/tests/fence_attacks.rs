//! Attacks on fencing (review of f39e110): real tgtd, real map server with `fence:`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::sanhost::{fencing_map_server, registered, xflags, Host, Lun};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

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

    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let (mut map, _) = fencing_map_server(&mut fs, &target.url(), "30s");
    let (a, relay) = Host::partitionable(&fs, Lun::Target(&target));
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
    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let (map, config) = fencing_map_server(&mut fs, &target.url(), "3s");
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

/// An iSCSI relay (map server -> tgtd) that holds the first SYNCHRONIZE CACHE it sees for
/// `stall` (a slow cache flush on the target), everything after it waiting behind.
fn slow_flush_relay(target_port: u16, stall: Duration) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut t = TcpStream::connect(("127.0.0.1", target_port)).unwrap();
            let (mut c2, mut t2) = (c.try_clone().unwrap(), t.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut t2, &mut c2);
            });
            let stalled = stalled.clone();
            std::thread::spawn(move || loop {
                let mut bhs = [0u8; 48];
                if c.read_exact(&mut bhs).is_err() {
                    return;
                }
                let ahs = bhs[4] as usize * 4;
                let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
                let mut rest = vec![0u8; ahs + dlen.div_ceil(4) * 4];
                if c.read_exact(&mut rest).is_err() {
                    return;
                }
                if bhs[0] & 0x3f == 0x01
                    && (bhs[32] == 0x35 || bhs[32] == 0x91)
                    && !stalled.swap(true, Ordering::SeqCst)
                {
                    eprintln!("relay: holding SYNCHRONIZE CACHE for {stall:?}");
                    std::thread::sleep(stall);
                }
                if t.write_all(&bhs).is_err() || t.write_all(&rest).is_err() {
                    return;
                }
            });
        }
    });
    port
}

// (Found by review of 817f324.) The PREEMPT takes effect but the target's flush outlasts the
// fencing timeout; the next sweep found the host's key gone and took that as "its commands
// were aborted": the leases went at once, on a target that cannot abort.
#[test]
fn a_preemption_whose_flush_times_out_still_waits_the_leases_out_on_tgtd() {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    let img = mnt.join("vm.raw");
    let original = pattern(1, 32 * MIB as usize);
    std::fs::write(&img, &original).unwrap();
    assert!(fs.map.take().unwrap().stop().success());
    let target = Tgtd::start(fs.lun.device(), false, fs.dir.path());
    let tport: u16 = target
        .url()
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let rport = slow_flush_relay(tport, Duration::from_secs(7));
    let url = target
        .url()
        .replace(&format!(":{tport}/"), &format!(":{rport}/"));
    let (map, _) = fencing_map_server(&mut fs, &url, "30s");
    let (a, relay) = Host::partitionable(&fs, Lun::Target(&target));
    let mut c = a.client();
    c.write(0, 0, &original[..MIB as usize]).unwrap();
    assert!(a.done("direct", "write") >= 1.0, "{}", a.daemon.log());
    assert!(xflags(&img).contains("no-defrag"));
    let a_key = twinpath_mapproto::fence_key("test-host");
    assert!(registered(&target).contains(&a_key));

    relay.cut_server_side();
    let cut = Instant::now();
    let mut flag_gone = None;
    while cut.elapsed() < Duration::from_secs(15) {
        if flag_gone.is_none() && !xflags(&img).contains("no-defrag") {
            flag_gone = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = map.log();
    for l in log
        .lines()
        .filter(|l| l.contains("LUN") || l.contains("lease"))
    {
        eprintln!("{l}");
    }
    eprintln!("no-defrag flag (leases) gone {flag_gone:?} after the cut; hold is 34 s");
    assert!(
        !log.contains("host fenced on the LUN"),
        "tgtd cannot abort, yet the host's leases were freed at once (flag gone {flag_gone:?} after the cut)"
    );
}
