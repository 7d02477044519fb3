//! A real QEMU guest on a twinpath disk: the guest kernel's virtio-blk driver writes, reads and
//! compares data and runs fio with crc32c verification. Needs qemu-system-x86, busybox-static,
//! cpio, fio and Debian's archive, which scripts/test.sh installs; hence `#[ignore]` for plain
//! `cargo test`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twinpath_tests::*;

fn boot(sock: &Path, log: &Path, args: &[&str]) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/run-guest.sh");
    Command::new(script)
        .arg(sock)
        .arg(guest_dir())
        .arg(log)
        .args(args)
        .status()
        .expect("run-guest.sh")
        .success()
}

/// Guests run one at a time: they share one guest build, and two TCG guests on a small
/// machine would only slow each other down.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn one_guest() -> MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for_console(log: &Path, needle: &str, guest: &JoinHandle<bool>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let console = || std::fs::read_to_string(log).unwrap_or_default();
    while !console().contains(needle) {
        assert!(
            !guest.is_finished(),
            "guest ended before {needle:?}:\n{}",
            console()
        );
        assert!(
            Instant::now() < deadline,
            "guest never printed {needle:?}:\n{}",
            console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A 64 MiB `file` disk for a guest, served by a fresh daemon.
struct GuestDisk {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl GuestDisk {
    fn serve(name: &str, disk_extra: &str) -> (GuestDisk, Daemon) {
        let dir = scratch();
        let (img, sock, log) = (
            dir.path().join("g.img"),
            dir.path().join("g.sock"),
            dir.path().join("guest.log"),
        );
        make_image(&img, 64 << 20);
        let daemon = Daemon::start(
            dir.path(),
            &format!("disks:\n{}", file_disk_yaml(name, &sock, &img, disk_extra)),
        );
        (
            GuestDisk {
                dir,
                img,
                sock,
                log,
            },
            daemon,
        )
    }
}

/// Boots a guest on `sock` that writes, reads and compares data, runs fio with crc32c
/// verification and leaves a marker in the first sector; checks all of it, including the
/// marker in `img` (the image as the backend stores it) and the disk's serial.
fn verify_in_guest(daemon: Daemon, sock: &Path, log: &Path, img: &Path, serial: &str) {
    let nonce = std::process::id().to_string();
    let ok = boot(
        sock,
        log,
        &[&format!("twinpath.nonce={nonce}"), "twinpath.fio=1"],
    );
    let console = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        ok,
        "guest failed:\n{console}\n--- daemon ---\n{}",
        daemon.log()
    );
    assert!(
        console.contains(&format!("serial {serial}")),
        "GET_ID reached the guest:\n{console}"
    );
    assert!(console.contains("fio verify ok"), "{console}");
    // The guest's marker went through the device into the image.
    let head = std::fs::read(img).unwrap();
    let marker = format!("twinpath-guest-{nonce}\n");
    assert_eq!(&head[..marker.len()], marker.as_bytes());
    assert!(daemon.log().contains("frontend connected"));
    assert!(daemon.stop().success());
}

#[test]
#[ignore = "boots a QEMU guest; scripts/test.sh runs it"]
fn qemu_guest_writes_reads_and_verifies_a_file_disk() {
    let _one = one_guest();
    let (disk, daemon) = GuestDisk::serve("guest0", "    serial: tp-guest0\n");
    verify_in_guest(daemon, &disk.sock, &disk.log, &disk.img, "tp-guest0");
}

/// A 64 MiB `smb` disk `name` (extra disk keys in `extra`) on `smb`'s share for a guest,
/// served by a fresh daemon: (its directory, the image on the share, socket, console log,
/// the daemon).
fn smb_guest_disk(
    smb: &samba::Samba,
    name: &str,
    extra: &str,
) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, Daemon) {
    let dir = scratch();
    let image = format!("{name}.raw");
    let img = smb.share_dir().join(&image);
    make_image(&img, 64 << 20);
    let (sock, log) = (dir.path().join("g.sock"), dir.path().join("guest.log"));
    let pass = dir.path().join("smb.pass");
    twinpath_tests::write_secret(&pass, samba::PASSWORD);
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n  - name: {name}\n    socket: {}\n{extra}    backend:\n      type: smb\n      server: {}\n      share: {}\n      path: {image}\n      user: {}\n      password_file: {}\n",
            sock.display(),
            smb.addr(),
            samba::SHARE,
            samba::USER,
            pass.display()
        ),
    );
    (dir, img, sock, log, daemon)
}

#[test]
#[ignore = "boots a QEMU guest; scripts/test.sh runs it"]
fn qemu_guest_writes_reads_and_verifies_an_smb_disk() {
    let _one = one_guest();
    let smb = samba::Samba::start();
    let (_dir, img, sock, log, daemon) = smb_guest_disk(&smb, "smbguest", "    serial: tp-smb0\n");
    verify_in_guest(daemon, &sock, &log, &img, "tp-smb0");
}

#[test]
#[ignore = "boots a QEMU guest; scripts/test.sh runs it"]
fn qemu_guest_rides_out_a_daemon_restart() {
    let _one = one_guest();
    let (
        GuestDisk {
            dir,
            img,
            sock,
            log,
        },
        daemon,
    ) = GuestDisk::serve("restart0", "");
    let nonce = format!("r{}", std::process::id());
    let guest = std::thread::spawn({
        let (sock, log, nonce) = (sock.clone(), log.clone(), nonce.clone());
        move || {
            boot(
                &sock,
                &log,
                &[&format!("twinpath.nonce={nonce}"), "twinpath.reconnect=1"],
            )
        }
    });
    // The guest writes and checks a block every half second for 40 s; restart the daemon
    // (drain, stop, start again) in the middle of that.
    wait_for_console(&log, "reconnect phase", &guest, Duration::from_secs(300));
    std::thread::sleep(Duration::from_secs(5));
    assert!(daemon.stop().success());
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let daemon = Daemon::start_with(&dir.path().join("twinpath.yaml"), &second);
    let ok = guest.join().unwrap();
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ok && console.contains("reconnect phase ok"),
        "guest failed:\n{console}\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("frontend connected"),
        "QEMU reconnected:\n{}",
        daemon.log()
    );
    let data = std::fs::read(&img).unwrap();
    for i in 0..80 {
        let want = format!("block-{i}-{nonce}\n");
        let at = (8192 + i) * 4096;
        assert_eq!(&data[at..at + want.len()], want.as_bytes(), "block {i}");
    }
    assert!(daemon.stop().success());
}

/// Boots a guest on `sock` that runs fio with verification while the daemon (started from
/// `config`) is killed with SIGKILL and started again; QEMU reconnects (`reconnect=1`) and
/// the requests the killed daemon had taken go to the new one.
fn fio_verify_across_a_daemon_kill(
    daemon: Daemon,
    config: &Path,
    dir: &Path,
    sock: &Path,
    log: &Path,
) {
    let guest = std::thread::spawn({
        let (sock, log) = (sock.to_path_buf(), log.to_path_buf());
        move || boot(&sock, &log, &["twinpath.nonce=crash", "twinpath.crash=1"])
    });
    wait_for_console(log, "crash phase", &guest, Duration::from_secs(300));
    std::thread::sleep(Duration::from_secs(5));
    daemon.kill();
    let second = dir.join("after-kill");
    std::fs::create_dir(&second).unwrap();
    let daemon = Daemon::start_with(config, &second);
    let ok = guest.join().unwrap();
    let console = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        ok && console.contains("crash phase ok"),
        "guest failed:\n{console}\n--- daemon after the kill ---\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("frontend connected"),
        "QEMU reconnected:\n{}",
        daemon.log()
    );
    assert!(daemon.stop().success());
}

#[test]
#[ignore = "boots a QEMU guest; scripts/test.sh runs it"]
fn qemu_guest_fio_verify_survives_a_file_daemon_killed_and_restarted() {
    let _one = one_guest();
    let (disk, daemon) = GuestDisk::serve("crash0", "");
    let config = disk.dir.path().join("twinpath.yaml");
    fio_verify_across_a_daemon_kill(daemon, &config, disk.dir.path(), &disk.sock, &disk.log);
}

#[test]
#[ignore = "boots a QEMU guest; scripts/test.sh runs it"]
fn qemu_guest_fio_verify_survives_an_smb_daemon_killed_and_restarted() {
    let _one = one_guest();
    let smb = samba::Samba::start();
    let (dir, _img, sock, log, daemon) = smb_guest_disk(&smb, "smbcrash", "");
    let config = dir.path().join("twinpath.yaml");
    fio_verify_across_a_daemon_kill(daemon, &config, dir.path(), &sock, &log);
}
