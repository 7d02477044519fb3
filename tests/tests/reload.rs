//! SIGHUP reloads the config of a running `twinpath serve`, driven by real vhost-user clients.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use twinpath_tests::*;

const MIB: u64 = 1 << 20;

struct Disks {
    dir: tempfile::TempDir,
}

impl Disks {
    fn new(names: &[&str]) -> Disks {
        let dir = scratch();
        for name in names {
            make_image(&dir.path().join(format!("{name}.img")), 16 * MIB);
        }
        Disks { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.sock"))
    }

    fn img(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.img"))
    }

    /// A config with `(name, extra disk keys)` for each disk.
    fn config(&self, disks: &[(&str, &str)]) -> String {
        let mut cfg = "disks:\n".to_owned();
        for (name, extra) in disks {
            cfg += &file_disk_yaml(name, &self.sock(name), &self.img(name), extra);
        }
        cfg
    }
}

/// Writes and reads back 4 KiB blocks on one connection until told to stop; returns how many
/// round trips it made, counting those after `mark` was set separately.
fn keep_busy(sock: PathBuf, stop: Arc<AtomicBool>, mark: Arc<AtomicBool>) -> (u64, u64) {
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    let blocks = c.capacity() / 4096;
    let (mut total, mut after_mark) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let data = pattern(total, 4096);
        let off = (total * 7919 % blocks) * 4096;
        c.write(0, off, &data)
            .unwrap_or_else(|e| panic!("write {total} at {off}: {e}"));
        let back = c
            .read(0, off, 4096)
            .unwrap_or_else(|e| panic!("read {total} at {off}: {e}"));
        assert_eq!(back, data, "round trip {total} at {off}");
        total += 1;
        after_mark += u64::from(mark.load(Ordering::Relaxed));
    }
    (total, after_mark)
}

#[test]
fn sighup_starts_added_stops_removed_and_leaves_unchanged_disks_alone() {
    let disks = Disks::new(&["keep", "gone", "change", "added"]);
    let d = disks.path();
    let mut daemon = Daemon::start(
        d,
        &disks.config(&[("keep", ""), ("gone", ""), ("change", "")]),
    );

    // What a guest wrote to the disk that goes away must be in its image afterwards.
    let mut gone = Client::connect(&disks.sock("gone"), &ClientOptions::default()).unwrap();
    gone.write(0, 8192, &pattern(77, 65536)).unwrap();
    drop(gone);

    let (stop, mark) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let busy = std::thread::spawn({
        let (sock, stop, mark) = (disks.sock("keep"), stop.clone(), mark.clone());
        move || keep_busy(sock, stop, mark)
    });
    std::thread::sleep(Duration::from_millis(300));

    let log = daemon.reload(
        d,
        &disks.config(&[
            ("keep", ""),
            ("change", "    read_only: true\n"),
            ("added", ""),
        ]),
    );
    assert!(
        log.contains("1 unchanged, 1 removed, 1 replaced, 1 added; 3 disks served"),
        "{log}"
    );
    assert!(
        !log.contains("disk=keep"),
        "the unchanged disk was touched:\n{log}"
    );
    assert!(
        !disks.sock("gone").exists(),
        "removed disk's socket is gone"
    );
    assert_eq!(
        std::fs::read(disks.img("gone")).unwrap()[8192..8192 + 65536],
        pattern(77, 65536)[..]
    );

    // The added disk serves; the changed one now has its new settings.
    let mut added = Client::connect(&disks.sock("added"), &ClientOptions::default()).unwrap();
    added.write(0, 0, &pattern(5, 4096)).unwrap();
    assert_eq!(added.read(0, 0, 4096).unwrap(), pattern(5, 4096));
    let e = Client::connect(&disks.sock("change"), &ClientOptions::default())
        .err()
        .expect("the replaced disk is read-only now");
    assert!(e.message.contains("read-only"), "{e}");

    // A config that does not parse changes nothing.
    let log = daemon.reload(d, "disks:\n  - name: keep\n    bogus: 1\n");
    assert!(log.contains("keeping the 3 running disks"), "{log}");
    assert!(disks.sock("added").exists() && disks.sock("change").exists());

    // The I/O on the unchanged disk ran through both reloads on one connection, unharmed.
    mark.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (total, after) = busy.join().expect("I/O on the unchanged disk failed");
    assert!(
        after > 0 && total > after,
        "{total} round trips, {after} after the reloads"
    );
    let log = daemon.log_after_stop();
    let keep_lines: Vec<&str> = log.lines().filter(|l| l.ends_with("disk=keep")).collect();
    assert_eq!(
        keep_lines
            .iter()
            .filter(|l| l.contains("frontend connected"))
            .count(),
        1,
        "one connection to the unchanged disk throughout:\n{log}"
    );
}
