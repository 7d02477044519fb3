//! The second part of the demo (scripts/demo.sh, as root): a file server on this machine — a
//! loop device with xfs as the shared LUN, a private smbd sharing it, `twinpath map-server`
//! on it — and a daemon serving a `san` disk and an `smb` disk side by side. Each is checked
//! and measured with `twinpath bench`; everything is stopped by PID at the end.

use std::process::Command;

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::lun::Fs;
use twinpath_tests::{pattern, twinpath_bin, Daemon};

const TESTS: &str = "read-1m-q16,write-1m-q16,randread-4k-q32,randwrite-4k-q32";

fn main() {
    println!("== file server: loop device with xfs, smbd sharing it, map server on it");
    let mut server = FileServer::start(1 << 30, Fs::Xfs, true, "");
    let (lun, dir) = (&server.lun, &server.dir);
    for name in ["san.raw", "smb.raw"] {
        std::fs::write(lun.mount_point().join(name), pattern(7, 256 << 20)).unwrap();
    }
    println!(
        "   LUN {} ({}), smbd on {}, map server on {}",
        lun.device().display(),
        lun.mount_point().display(),
        server.samba().addr(),
        server.map_addr
    );

    let cfg = format!(
        "disks:\n  - name: demo-san\n    socket: {}\n    backend: {}\n  - name: demo-smb\n    socket: {}\n    backend: {}\n",
        dir.path().join("demo-san.sock").display(),
        server.backend_yaml("san.raw", Some("auto")),
        dir.path().join("demo-smb.sock").display(),
        server.backend_yaml("smb.raw", None),
    );
    println!("== VM host: twinpath serve with a san disk and an smb disk");
    let daemon = Daemon::start(dir.path(), &cfg);
    for line in daemon.log().lines().filter(|l| {
        l.contains("direct path ready") || l.contains("opened image on SMB") || l.contains("ready:")
    }) {
        println!(
            "   {}",
            line.split_once("  ").map_or(line, |(_, rest)| rest.trim())
        );
    }
    for disk in ["demo-san", "demo-smb"] {
        println!("== {disk}: data check and a short benchmark");
        let status = Command::new(twinpath_bin())
            .arg("bench")
            .arg("--socket")
            .arg(dir.path().join(format!("{disk}.sock")))
            .args(["--verify", "--runtime", "2", "--quiet", "--tests", TESTS])
            .status()
            .expect("twinpath bench");
        assert!(status.success(), "bench on {disk} failed");
    }
    println!("== stopping");
    let log = daemon.log_after_stop();
    if let Some(totals) = log.lines().find(|l| l.contains("direct path totals")) {
        println!(
            "   {}",
            totals.split_once("  ").map_or(totals, |(_, r)| r.trim())
        );
    }
    drop(server.map.take());
    println!("daemon, map server and smbd stopped; LUN detached");
}
