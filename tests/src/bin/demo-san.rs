//! The second part of the demo (scripts/demo.sh, as root): a file server on this machine — a
//! loop device with xfs as the shared LUN, a private smbd sharing it, `twinpath map-server`
//! on it — and a daemon serving a `san` disk and an `smb` disk side by side. Each is checked
//! and measured with `twinpath bench`; everything is stopped by PID at the end.

use std::process::Command;

use twinpath_tests::lun::{Fs, LoopLun};
use twinpath_tests::samba::{free_port, Samba, PASSWORD, SHARE, USER};
use twinpath_tests::{pattern, scratch, twinpath_bin, Daemon};

const TESTS: &str = "read-1m-q16,write-1m-q16,randread-4k-q32,randwrite-4k-q32";

fn main() {
    println!("== file server: loop device with xfs, smbd sharing it, map server on it");
    let lun = LoopLun::new(1 << 30, Fs::Xfs);
    let smb = Samba::start_sharing(Some(&lun.mount_point()));
    let dir = scratch();
    let key = dir.path().join("map.key");
    std::fs::write(&key, "demo-map-key-0123456789abcdef").unwrap();
    let pass = dir.path().join("smb.pass");
    std::fs::write(&pass, PASSWORD).unwrap();
    let map_addr = format!("127.0.0.1:{}", free_port());
    let map = Daemon::start_map_server(
        dir.path(),
        &format!(
            "listen: {map_addr}\nexport: {}\nkey_file: {}\n",
            lun.mount_point().display(),
            key.display()
        ),
    );
    for name in ["san.raw", "smb.raw"] {
        std::fs::write(lun.mount_point().join(name), pattern(7, 256 << 20)).unwrap();
    }
    println!(
        "   LUN {} ({}), smbd on {}, map server on {map_addr}",
        lun.device().display(),
        lun.mount_point().display(),
        smb.addr()
    );

    let common = format!(
        "server: \"{}\", share: {SHARE}, user: {USER}, password_file: {}",
        smb.addr(),
        pass.display()
    );
    let cfg = format!(
        "disks:\n  - name: demo-san\n    socket: {}\n    backend: {{type: san, path: san.raw, {common}, map_server: \"{map_addr}\", map_key_file: {}, lun: auto}}\n  - name: demo-smb\n    socket: {}\n    backend: {{type: smb, path: smb.raw, {common}}}\n",
        dir.path().join("demo-san.sock").display(),
        key.display(),
        dir.path().join("demo-smb.sock").display(),
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
    drop(map);
    println!("daemon, map server and smbd stopped; LUN detached");
}
