//! `san` disks end to end: a loop device with xfs as the shared LUN, mounted and shared by a
//! private smbd, the map server on it, and the daemon opening the loop device as its LUN,
//! driven by the real vhost-user client.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use twinpath_mapproto::{MapClient, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::{Fs, LoopLun};
use twinpath_tests::samba::{self, SHARE, USER};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// The file server (LUN, smbd, map server) and the VM host's view of it.
struct Rig(FileServer);

impl Deref for Rig {
    type Target = FileServer;
    fn deref(&self) -> &FileServer {
        &self.0
    }
}

impl DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut FileServer {
        &mut self.0
    }
}

impl Rig {
    fn start(fs: Fs) -> Rig {
        Rig::start_with(fs, "")
    }

    /// With `map_extra` lines in the map server's config.
    fn start_with(fs: Fs, map_extra: &str) -> Rig {
        Rig(FileServer::start(512 * MIB, fs, true, map_extra))
    }

    /// An image written through the server's filesystem, so all of it is allocated.
    fn image(&self, name: &str, seed: u64, size: u64) -> Vec<u8> {
        let data = pattern(seed, size as usize);
        std::fs::write(self.lun.mount_point().join(name), &data).unwrap();
        data
    }

    fn disk_yaml(&self, name: &str, image: &str, lun: &str) -> String {
        format!(
            "  - name: {name}\n    socket: {}\n    backend:\n      type: san\n      server: {}\n      share: {SHARE}\n      path: {image}\n      user: {USER}\n      password_file: {}\n      map_server: {}\n      map_key_file: {}\n      lun: {lun}\n      host_name: test-host\n",
            self.sock(name).display(),
            self.samba().addr(),
            self.password_file().display(),
            self.map_addr,
            self.key_file().display(),
        )
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    fn serve(&self, disks: &str) -> Daemon {
        let d = self.dir.path().join("daemon");
        std::fs::create_dir_all(&d).unwrap();
        Daemon::start(&d, &format!("disks:\n{disks}"))
    }

    /// Sectors written to the LUN so far (from the block layer's counters).
    fn lun_sectors_written(&self) -> u64 {
        self.lun_stat(6)
    }

    fn lun_sectors_read(&self) -> u64 {
        self.lun_stat(2)
    }

    /// Field `field` of the LUN's /sys/block/*/stat.
    fn lun_stat(&self, field: usize) -> u64 {
        let name = self
            .lun
            .device()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        stat.split_whitespace().nth(field).unwrap().parse().unwrap()
    }

    fn server_file(&self, image: &str) -> Vec<u8> {
        std::fs::read(self.lun.mount_point().join(image)).unwrap()
    }
}

/// How many connections this host (`test-host`) opened to the map server so far.
fn map_connections(rig: &Rig) -> (usize, String) {
    let map_log = rig.map.as_ref().unwrap().log();
    let n = map_log
        .lines()
        .filter(|l| l.contains("host connected") && l.contains("test-host"))
        .count();
    (n, map_log)
}

/// A second VM host on the same map server, wanting the images this host's disks use.
struct OtherHost {
    rt: tokio::runtime::Runtime,
    client: MapClient,
}

impl OtherHost {
    fn connect(rig: &Rig) -> OtherHost {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (client, _) = rt
            .block_on(MapClient::connect(
                &rig.map_addr,
                &host_key("host-b"),
                "host-b",
            ))
            .unwrap();
        OtherHost { rt, client }
    }

    /// Asks for a write map of the first `len` bytes of `image`.
    fn ask_write(&self, image: &str, len: u64) -> Reply {
        self.call(Request::GetMap {
            path: image.into(),
            offset: 0,
            len,
            write: true,
        })
    }

    fn call(&self, request: Request) -> Reply {
        self.rt.block_on(self.client.call(request)).unwrap()
    }
}

fn client(sock: &Path) -> Client {
    Client::connect(
        sock,
        &ClientOptions {
            buffer_size: 4 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn san_disk_writes_go_to_the_lun_and_read_back_everywhere() {
    let rig = Rig::start(Fs::Xfs);
    let original = rig.image("vm.raw", 61, 72 * MIB);
    let lun = rig.lun.device().display().to_string();
    let daemon = rig.serve(&rig.disk_yaml("san0", "vm.raw", &lun));
    assert!(
        daemon.log().contains("direct path ready"),
        "{}",
        daemon.log()
    );
    let mut c = client(&rig.sock("san0"));
    assert_eq!(c.capacity(), 72 * MIB);

    assert_eq!(
        c.read(0, 3 * MIB, MIB as usize).unwrap(),
        original[3 * MIB as usize..4 * MIB as usize]
    );
    // A direct write reaches the device at once; over SMB it would sit in the server's
    // page cache until a flush.
    let before = rig.lun_sectors_written();
    let data = pattern(62, 2 * MIB as usize);
    c.write(0, 5 * MIB, &data).unwrap();
    let written = rig.lun_sectors_written() - before;
    assert!(
        written >= 2 * MIB / 512,
        "only {written} sectors reached the LUN"
    );
    c.flush(0).unwrap();
    assert_eq!(c.read(0, 5 * MIB, data.len()).unwrap(), data);
    // The server sees it through its filesystem, and smbclient through the share.
    let on_server = rig.server_file("vm.raw");
    assert_eq!(on_server[5 * MIB as usize..7 * MIB as usize], data[..]);
    let out = rig.samba().smbclient("get vm.raw /dev/stdout", false);
    assert!(out.status.success());
    assert_eq!(out.stdout[5 * MIB as usize..7 * MIB as usize], data[..]);
    // A 4 MiB request goes to the device through the pipeline engine, in sections.
    let before = rig.lun_sectors_written();
    let big = pattern(64, 4 * MIB as usize);
    c.write(0, 8 * MIB, &big).unwrap();
    assert!(rig.lun_sectors_written() - before >= 4 * MIB / 512);
    assert!(c.read(0, 8 * MIB, big.len()).unwrap() == big);
    // A write across a map window (64 MiB) goes over SMB whole and reads back the same.
    let across = pattern(63, MIB as usize);
    let at = 64 * MIB - MIB / 2;
    c.write(0, at, &across).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, at, across.len()).unwrap(), across);
    assert!(rig.server_file("vm.raw")[8 * MIB as usize..12 * MIB as usize] == big[..]);
    assert_eq!(
        rig.server_file("vm.raw")[at as usize..(at + MIB) as usize],
        across[..]
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn a_wrong_lun_means_smb_only_and_no_errors() {
    let rig = Rig::start(Fs::Xfs);
    let other = LoopLun::new(512 * MIB, Fs::Xfs);
    rig.image("vm.raw", 64, 16 * MIB);
    let daemon = rig.serve(&rig.disk_yaml("san1", "vm.raw", &other.device().display().to_string()));
    let log = daemon.log();
    assert!(
        log.contains("direct path unavailable") && log.contains("the server's volume is"),
        "{log}"
    );
    let mut c = client(&rig.sock("san1"));
    let data = pattern(65, MIB as usize);
    c.write(0, MIB, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, MIB, data.len()).unwrap(), data);
    assert_eq!(
        rig.server_file("vm.raw")[MIB as usize..2 * MIB as usize],
        data[..]
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn lun_auto_finds_the_servers_volume() {
    let rig = Rig::start(Fs::Ext4);
    // A second volume that is not the server's: auto must pick the right one.
    let _decoy = LoopLun::new(512 * MIB, Fs::Ext4);
    rig.image("vm.raw", 66, 8 * MIB);
    let daemon = rig.serve(&rig.disk_yaml("san2", "vm.raw", "auto"));
    let log = daemon.log();
    let device = rig.lun.device().display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("direct path ready") && l.contains(&device)),
        "{log}"
    );
    let mut c = client(&rig.sock("san2"));
    let data = pattern(67, MIB as usize);
    c.write(0, 0, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(rig.server_file("vm.raw")[..MIB as usize], data[..]);
    drop(c);
    assert!(daemon.stop().success());
}

/// The image as the guest should see it, and random I/O checked against it.
struct Model {
    data: Vec<u8>,
    rng: u64,
}

impl Model {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// `ops` random writes (4 KiB to 256 KiB, 4 KiB aligned), each read back and compared;
    /// every read also checks a random other range.
    fn churn(&mut self, c: &mut Client, ops: usize) {
        for _ in 0..ops {
            let blocks = self.data.len() as u64 / 4096;
            let len = (1 + self.next() % 64) * 4096;
            let at = (self.next() % (blocks - len / 4096)) * 4096;
            let seed = self.next();
            let data = pattern(seed, len as usize);
            c.write(0, at, &data).unwrap();
            self.data[at as usize..(at + len) as usize].copy_from_slice(&data);
            assert!(
                c.read(0, at, len as usize).unwrap() == data,
                "read back at {at}"
            );
            let other = (self.next() % (blocks - 16)) * 4096;
            assert!(
                c.read(0, other, 65536).unwrap()[..]
                    == self.data[other as usize..other as usize + 65536],
                "read at {other}"
            );
            if self.next().is_multiple_of(8) {
                c.flush(0).unwrap();
            }
        }
    }
}

#[test]
fn map_server_lost_mid_run_costs_no_guest_error_and_comes_back() {
    // A short lease time: the restarted server answers no maps until the leases of its
    // crashed run have run out (a hold of 3.2 s here).
    let mut rig = Rig::start_with(Fs::Xfs, "lease_time: 2s\n");
    let data = rig.image("vm.raw", 71, 32 * MIB);
    let daemon =
        rig.serve(&rig.disk_yaml("san3", "vm.raw", &rig.lun.device().display().to_string()));
    let mut c = client(&rig.sock("san3"));
    let mut model = Model { data, rng: 71 };
    model.churn(&mut c, 40);
    // SIGKILL: the connection drops with grants outstanding.
    drop(rig.map.take());
    model.churn(&mut c, 40);
    c.flush(0).unwrap();
    assert_eq!(
        rig.server_file("vm.raw"),
        model.data,
        "after the map server died"
    );
    assert!(daemon.log().contains("direct path off"), "{}", daemon.log());

    // The map server comes back: after its grace period and the disk's rest period, writes
    // go direct again.
    rig.restart_map();
    let restarted = std::time::Instant::now();
    loop {
        model.churn(&mut c, 5);
        let before = rig.lun_sectors_written();
        c.write(0, MIB, &pattern(72, MIB as usize)).unwrap();
        model.data[MIB as usize..2 * MIB as usize].copy_from_slice(&pattern(72, MIB as usize));
        if rig.lun_sectors_written() - before >= MIB / 512 {
            break;
        }
        assert!(
            restarted.elapsed() < std::time::Duration::from_secs(20),
            "not direct again:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    c.flush(0).unwrap();
    assert!(
        rig.server_file("vm.raw") == model.data,
        "image differs after the map server came back"
    );
    assert!(daemon.log().contains("map server connection back"));
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn another_host_asking_for_the_file_recalls_the_lease_without_guest_errors() {
    let rig = Rig::start(Fs::Xfs);
    let data = rig.image("vm.raw", 81, 32 * MIB);
    let mut other_data = rig.image("vm2.raw", 83, 16 * MIB);
    let lun = rig.lun.device().display().to_string();
    // Two disks of this host: one map connection carries both, recalls reach the right one.
    let daemon = rig.serve(&format!(
        "{}{}",
        rig.disk_yaml("san4", "vm.raw", &lun),
        rig.disk_yaml("san5", "vm2.raw", &lun)
    ));
    let mut c = client(&rig.sock("san4"));
    let mut c2 = client(&rig.sock("san5"));
    let mut model = Model { data, rng: 81 };
    model.churn(&mut c, 20);
    c2.write(0, 0, &pattern(84, MIB as usize)).unwrap();
    other_data[..MIB as usize].copy_from_slice(&pattern(84, MIB as usize));
    let (connections, map_log) = map_connections(&rig);
    assert_eq!(
        connections, 1,
        "one connection for the host's two disks:\n{map_log}"
    );

    let other = OtherHost::connect(&rig);
    let ask = || other.ask_write("vm.raw", 32 * MIB);
    match ask() {
        Reply::Refused { reason } => assert!(reason.contains("test-host"), "{reason}"),
        r => panic!("host-b got {r:?} while test-host held the file"),
    }
    // test-host gives the file up (it keeps serving the guest over SMB meanwhile).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lease = loop {
        model.churn(&mut c, 2);
        match ask() {
            Reply::Map(m) => break m.lease,
            Reply::Refused { .. } => {
                assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
            }
            r => panic!("{r:?}"),
        }
    };
    // The other disk kept its lease and writes on the LUN directly.
    let before = rig.lun_sectors_written();
    let fresh = pattern(85, 4 * MIB as usize);
    c2.write(0, 4 * MIB, &fresh).unwrap();
    other_data[4 * MIB as usize..8 * MIB as usize].copy_from_slice(&fresh);
    assert!(
        rig.lun_sectors_written() - before >= 4 * MIB / 512,
        "vm2.raw direct while vm.raw is recalled:\n{}",
        daemon.log()
    );
    model.churn(&mut c, 20);
    c.flush(0).unwrap();
    c2.flush(0).unwrap();
    assert!(rig.server_file("vm.raw") == model.data, "image differs");
    assert!(rig.server_file("vm2.raw") == other_data, "vm2.raw differs");
    let log = daemon.log();
    let recalls: Vec<&str> = log.lines().filter(|l| l.contains("recalled")).collect();
    assert!(
        !recalls.is_empty() && recalls.iter().all(|l| l.contains("vm.raw on")),
        "{log}"
    );
    // host-b is done; test-host regains the direct path after its rest.
    other.call(Request::Return { lease });
    std::thread::sleep(std::time::Duration::from_secs(6));
    model.churn(&mut c, 2);
    let before = rig.lun_sectors_written();
    let fresh = pattern(82, MIB as usize);
    c.write(0, 2 * MIB, &fresh).unwrap();
    model.data[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&fresh);
    assert!(
        rig.lun_sectors_written() - before >= MIB / 512,
        "direct again"
    );
    c.flush(0).unwrap();
    assert!(rig.server_file("vm.raw") == model.data, "image differs");
    drop((c, c2));
    assert!(daemon.stop().success());
}

/// Runs random I/O through a san disk while other files (canaries) fill most of the volume;
/// afterwards every canary block on the device is unchanged, the image holds exactly what
/// the guest wrote, and the filesystem checks clean. SAN_CANARY_SECS sets the run time.
/// Tests that load the machine for seconds, or measure a rate, run one at a time.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn canaries_stay_untouched(fs: Fs, over_iscsi: bool) {
    use twinpath_filemap::{file_extents, read_direct};
    let _one = heavy();
    let mut rig = Rig::start(fs);
    let data = rig.image("vm.raw", 91, 48 * MIB);
    // Canaries: 6 files of 48 MiB around the image, read back from the device as they are.
    // O_DIRECT: the block device's own page cache may hold stale pages from mkfs.
    let dev = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(rig.lun.device())
            .unwrap()
    };
    let mut canaries = Vec::new();
    for i in 0..6u64 {
        let path = rig.lun.mount_point().join(format!("canary-{i}.bin"));
        let content = pattern(900 + i, 48 * MIB as usize);
        std::fs::write(&path, &content).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        for e in file_extents(&f).unwrap() {
            let len = e
                .len
                .min(content.len() as u64 - e.logical.min(content.len() as u64));
            if len == 0 {
                continue;
            }
            let on_dev = read_direct(&dev, e.physical, len as usize).unwrap();
            assert!(
                on_dev[..] == content[e.logical as usize..(e.logical + len) as usize],
                "canary {i} is not where FIEMAP says: {e:?}"
            );
            canaries.push((e.physical, on_dev));
        }
    }
    // Over iSCSI the daemon reaches the same device through tgtd.
    let tgt = over_iscsi
        .then(|| twinpath_tests::iscsi::Tgtd::start(rig.lun.device(), false, rig.dir.path()));
    let lun = match &tgt {
        Some(t) => format!("\"{}\"", t.url()),
        None => rig.lun.device().display().to_string(),
    };
    let daemon = rig.serve(&rig.disk_yaml("san5", "vm.raw", &lun));
    assert!(
        daemon.log().contains("direct path ready"),
        "{}",
        daemon.log()
    );
    let mut c = client(&rig.sock("san5"));
    let mut model = Model { data, rng: 91 };
    let secs: u64 = std::env::var("SAN_CANARY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut ops = 0;
    while std::time::Instant::now() < until {
        model.churn(&mut c, 10);
        ops += 10;
    }
    c.flush(0).unwrap();
    drop(c);
    assert!(daemon.stop().success());
    assert!(
        rig.server_file("vm.raw") == model.data,
        "the image differs from what the guest wrote ({ops} writes)"
    );
    for (physical, before) in &canaries {
        let now = read_direct(&dev, *physical, before.len()).unwrap();
        assert!(now == *before, "canary at device offset {physical} changed");
    }
    // Stop the map server (it holds the token file open) and check the filesystem offline.
    drop(tgt);
    drop(rig.map.take());
    drop(rig.smb.take());
    rig.lun.unmount();
    let (tool, args): (&str, &[&str]) = match fs {
        Fs::Xfs => ("xfs_repair", &["-n"]),
        Fs::Ext4 => ("e2fsck", &["-fn"]),
    };
    let out = std::process::Command::new(tool)
        .args(args)
        .arg(rig.lun.device())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{fs:?} (iSCSI: {over_iscsi}): {ops} random writes (+reads) in {secs} s; {} canary extents unchanged; {tool} clean",
        canaries.len()
    );
}

#[test]
fn xfs_canaries_stay_untouched_and_the_fs_checks_clean() {
    canaries_stay_untouched(Fs::Xfs, false);
}

#[test]
fn canaries_stay_untouched_over_iscsi_too() {
    canaries_stay_untouched(Fs::Xfs, true);
}

#[test]
fn ext4_canaries_stay_untouched_and_the_fs_checks_clean() {
    canaries_stay_untouched(Fs::Ext4, false);
}

/// The figure `key=` of the "direct path totals" line the daemon logs when it stops.
fn direct_total(log: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("direct path totals"))
        .unwrap_or_else(|| panic!("no totals in the log:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Writes 256 KiB blocks in a loop for `secs`; returns (bytes written, seconds taken).
fn write_for(c: &mut Client, model: &mut Model, secs: f64) -> (u64, f64) {
    let start = std::time::Instant::now();
    let mut at = 0u64;
    let mut total = 0;
    let block = 256 * 1024;
    while start.elapsed().as_secs_f64() < secs {
        let data = pattern(at ^ 0x5a5a, block);
        c.write(0, at, &data).unwrap();
        model.data[at as usize..at as usize + block].copy_from_slice(&data);
        total += block as u64;
        at = (at + block as u64) % model.data.len() as u64;
    }
    (total, start.elapsed().as_secs_f64())
}

/// The throttle's limit in these tests: low enough that the slowest machine CI runs on (22 MiB/s
/// in all, seen) offers well over it, so the throttle has work to do.
const LIMIT_MIB: u64 = 6;

/// What a throttle may let through in `secs`: the rate, plus its bucket (one largest request,
/// 4 MiB) and the request in flight when the clock stops.
fn allowed(secs: f64) -> f64 {
    LIMIT_MIB as f64 * secs * MIB as f64 + (4 * MIB + 256 * 1024) as f64
}

fn throttled(on_exceed: &str) -> (u64, u64, u64, f64) {
    let _one = heavy();
    let rig = Rig::start(Fs::Xfs);
    let data = rig.image("vm.raw", 95, 64 * MIB);
    let disk = rig.disk_yaml("san6", "vm.raw", &rig.lun.device().display().to_string())
        + &format!("      throttle: {{bytes_per_sec: {LIMIT_MIB}M, on_exceed: {on_exceed}}}\n");
    let daemon = rig.serve(&disk);
    let mut c = client(&rig.sock("san6"));
    let mut model = Model { data, rng: 95 };
    let (written, secs) = write_for(&mut c, &mut model, 4.0);
    c.flush(0).unwrap();
    assert!(rig.server_file("vm.raw") == model.data, "image differs");
    drop(c);
    let log = daemon.log_after_stop();
    (
        direct_total(&log, "bytes"),
        direct_total(&log, "throttled"),
        written,
        secs,
    )
}

#[test]
fn throttle_delay_holds_the_direct_rate() {
    let (direct, throttled, written, secs) = throttled("delay");
    let rate = direct as f64 / secs / MIB as f64;
    eprintln!("delay: {rate:.1} MiB/s direct of {written} bytes written, limit {LIMIT_MIB}");
    assert!(throttled > 0, "requests over the limit were delayed");
    assert_eq!(direct, written, "everything went direct, delayed");
    assert!(
        direct as f64 <= allowed(secs),
        "{direct} bytes in {secs:.1}s against a {LIMIT_MIB} MiB/s limit"
    );
    // Delayed, not starved: the throttle lets the limit through.
    assert!(
        rate >= LIMIT_MIB as f64 / 2.0,
        "{rate:.1} MiB/s against a {LIMIT_MIB} MiB/s limit"
    );
}

#[test]
fn throttle_network_sends_the_excess_over_smb() {
    let (direct, throttled, written, secs) = throttled("network");
    let rate = direct as f64 / secs / MIB as f64;
    eprintln!(
        "network: {rate:.1} MiB/s direct, {:.1} MiB/s in all, {throttled} requests to SMB",
        written as f64 / secs / MIB as f64
    );
    // Every request the throttle turned away went over SMB instead, whole.
    assert!(throttled > 0);
    assert_eq!(written, direct + throttled * 256 * 1024);
    assert!(
        direct as f64 <= allowed(secs),
        "{direct} bytes in {secs:.1}s against a {LIMIT_MIB} MiB/s limit"
    );
}

#[test]
fn a_map_server_down_at_start_is_tried_again_and_the_direct_path_comes_up() {
    let mut rig = Rig::start(Fs::Xfs);
    let data = rig.image("vm.raw", 97, 16 * MIB);
    drop(rig.map.take());
    let mut daemon =
        rig.serve(&rig.disk_yaml("san7", "vm.raw", &rig.lun.device().display().to_string()));
    assert!(
        daemon.log().contains("direct path unavailable"),
        "{}",
        daemon.log()
    );
    let mut c = client(&rig.sock("san7"));
    let mut model = Model { data, rng: 97 };
    model.churn(&mut c, 10);
    // The map server starts; the disk finds it on its next try (every 10 s).
    rig.restart_map();
    daemon.wait_for_log("direct path ready", std::time::Duration::from_secs(25));
    let before = rig.lun_sectors_written();
    let fresh = pattern(98, MIB as usize);
    c.write(0, 4 * MIB, &fresh).unwrap();
    model.data[4 * MIB as usize..5 * MIB as usize].copy_from_slice(&fresh);
    assert!(
        rig.lun_sectors_written() - before >= MIB / 512,
        "direct now"
    );
    model.churn(&mut c, 10);
    c.flush(0).unwrap();
    assert!(rig.server_file("vm.raw") == model.data, "image differs");
    drop(c);
    assert!(daemon.stop().success());
}

/// The LUN reached over iSCSI from userspace (tgtd exporting the loop device, CHAP): the
/// same checks find the volume, direct writes reach the device through the target, data
/// written on either path reads back on the other and on the server, the canary files around
/// the image stay untouched, and a target restart costs the guest nothing.
#[test]
fn a_san_disk_over_iscsi_reads_and_writes_the_lun_through_the_target() {
    use twinpath_tests::iscsi::{Tgtd, CHAP_PASSWORD};
    let _heavy = heavy();
    let rig = Rig::start(Fs::Xfs);
    let data = rig.image("vm.raw", 91, 72 * MIB);
    let canary = rig.image("canary.raw", 92, 16 * MIB);
    let mut tgt = Tgtd::start(rig.lun.device(), true, rig.dir.path());
    let pass = rig.dir.path().join("chap.pass");
    twinpath_tests::write_secret(&pass, &format!("{CHAP_PASSWORD}\n"));
    let yaml = format!(
        "{}      lun_password_file: {}\n",
        rig.disk_yaml("san6", "vm.raw", &format!("\"{}\"", tgt.url())),
        pass.display()
    );
    let daemon = rig.serve(&yaml);
    let log = daemon.log();
    assert!(
        log.contains("direct path ready") && log.contains("iscsi://vmhost@127.0.0.1"),
        "{log}\n{}",
        tgt.log()
    );
    assert!(
        !log.contains(CHAP_PASSWORD),
        "the CHAP password is in the log"
    );
    let mut c = client(&rig.sock("san6"));
    let before = rig.lun_sectors_written();
    let fresh = pattern(93, 2 * MIB as usize);
    c.write(0, 4 * MIB, &fresh).unwrap();
    assert!(
        rig.lun_sectors_written() - before >= 2 * MIB / 512,
        "direct writes reach the LUN through the target"
    );
    let mut model = Model { data, rng: 91 };
    model.data[4 * MIB as usize..6 * MIB as usize].copy_from_slice(&fresh);
    model.churn(&mut c, 30);
    tgt.restart();
    model.churn(&mut c, 30);
    // A write across the 64 MiB map window goes over SMB; its first half is then read back
    // on the direct path (the window is mapped again after the network write).
    let across = pattern(94, 2 * MIB as usize);
    let at = 63 * MIB;
    c.write(0, at, &across).unwrap();
    model.data[at as usize..(at + 2 * MIB) as usize].copy_from_slice(&across);
    // The restart cost the requests on the old connection (over SMB since) and rests the
    // direct path for a few seconds; then the new connection carries it again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let reads_before = rig.lun_sectors_read();
        assert!(c.read(0, at, MIB as usize).unwrap()[..] == across[..MIB as usize]);
        if rig.lun_sectors_read() - reads_before >= MIB / 512 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the SMB-written range never read back directly\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    c.flush(0).unwrap();
    assert!(rig.server_file("vm.raw") == model.data, "image differs");
    let out = rig.samba().smbclient("get vm.raw /dev/stdout", false);
    assert!(
        out.status.success() && out.stdout == model.data,
        "smbclient sees another image"
    );
    assert!(rig.server_file("canary.raw") == canary, "a canary changed");
    drop(c);
    assert!(daemon.stop().success());
}

/// The value of the sample `series` (name and labels, exactly as rendered) in Prometheus text.
#[test]
fn metrics_count_each_path_while_io_runs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let _one = heavy();
    let rig = Rig::start(Fs::Xfs);
    let data = rig.image("vm.raw", 101, 32 * MIB);
    let lun = rig.lun.device().display().to_string();
    let port = samba::free_port();
    // A slow throttle keeps requests waiting, so a scrape finds them in flight.
    let disk = rig.disk_yaml("san8", "vm.raw", &lun)
        + "      throttle: {bytes_per_sec: 4M, on_exceed: delay}\n";
    let daemon = rig.serve(&format!("{disk}metrics:\n  listen: 127.0.0.1:{port}\n"));
    assert!(daemon
        .log()
        .contains(&format!("metrics on http://127.0.0.1:{port}/metrics")));
    let scrape = || scrape(port);
    const DISK: &str = "{disk=\"san8\"}";
    let path = |p: &str, op: Option<&str>| match op {
        Some(op) => format!("{{disk=\"san8\",path=\"{p}\",op=\"{op}\"}}"),
        None => format!("{{disk=\"san8\",path=\"{p}\"}}"),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let io = std::thread::spawn({
        let (sock, stop) = (rig.sock("san8"), stop.clone());
        move || {
            let mut c = client(&sock);
            let mut model = Model { data, rng: 101 };
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                model.churn(&mut c, 1);
                written += 1;
            }
            c.flush(0).unwrap();
            (model, written)
        }
    });

    // In flight, and growing, while the I/O runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&scrape(), &format!("twinpath_disk_in_flight{DISK}")) < 1.0 {
        assert!(Instant::now() < deadline, "never in flight:\n{}", scrape());
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = scrape();
    std::thread::sleep(Duration::from_secs(1));
    let after = scrape();
    for series in [
        "twinpath_disk_requests_total{disk=\"san8\",op=\"write\"}".to_owned(),
        format!(
            "twinpath_path_requests_total{}",
            path("direct", Some("write"))
        ),
        format!("twinpath_path_bytes_total{}", path("direct", Some("read"))),
        format!("twinpath_disk_latency_seconds_count{DISK}"),
        format!("twinpath_path_throttled_total{}", path("direct", None)),
    ] {
        assert!(
            sample(&after, &series) > sample(&before, &series),
            "{series} did not grow:\n{after}"
        );
    }

    // Another host wants the file: the lease is recalled and the disk falls back to SMB.
    let other = OtherHost::connect(&rig);
    other.ask_write("vm.raw", 32 * MIB);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape();
        if sample(
            &text,
            &format!("twinpath_path_recalls_total{}", path("direct", None)),
        ) >= 1.0
            && sample(
                &text,
                &format!("twinpath_path_fallbacks_total{}", path("direct", None)),
            ) > 0.0
            && sample(
                &text,
                &format!(
                    "twinpath_path_requests_total{}",
                    path("network", Some("write"))
                ),
            ) > 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recall and fallback counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let (model, rounds) = io.join().expect("guest I/O failed");
    assert!(rig.server_file("vm.raw") == model.data, "image differs");

    // The guest's view adds up: every round is a write, reads of it and of another range.
    let text = scrape();
    assert_eq!(
        sample(
            &text,
            "twinpath_disk_requests_total{disk=\"san8\",op=\"write\"}"
        ) as u64,
        rounds
    );
    assert_eq!(
        sample(&text, &format!("twinpath_disk_errors_total{DISK}")),
        0.0
    );
    assert_eq!(
        sample(&text, &format!("twinpath_disk_in_flight{DISK}")),
        0.0
    );

    // `twinpath stats` reads the same counters through the config.
    let cfg = rig.dir.path().join("daemon/twinpath.yaml");
    let (status, out, err) = run_twinpath(&["stats", "--config", &cfg.to_string_lossy()]);
    assert!(status.success(), "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["DISK", "PATH", "READS"], "{out}");
    assert_eq!(rows[1][..2], ["san8", "guest"], "{out}");
    assert_eq!(rows[1][3], rounds.to_string(), "writes column:\n{out}");
    assert!(rows.iter().any(|r| r.first() == Some(&"network")), "{out}");
    assert!(rows.iter().any(|r| r.first() == Some(&"direct")), "{out}");
    assert!(daemon.stop().success());
}

#[test]
fn reload_removing_a_san_disk_gives_its_leases_back_and_leaves_the_other_direct() {
    let rig = Rig::start(Fs::Xfs);
    let mut gone_data = rig.image("vm.raw", 111, 16 * MIB);
    rig.image("vm2.raw", 113, 16 * MIB);
    let lun = rig.lun.device().display().to_string();
    let keep = rig.disk_yaml("san9", "vm2.raw", &lun);
    let gone = rig.disk_yaml("san10", "vm.raw", &lun);
    let mut daemon = rig.serve(&format!("{keep}{gone}"));

    // The disk that goes away holds a write lease on its image when the reload comes.
    let mut c = client(&rig.sock("san10"));
    let fresh = pattern(112, MIB as usize);
    c.write(0, MIB, &fresh).unwrap();
    gone_data[MIB as usize..2 * MIB as usize].copy_from_slice(&fresh);
    drop(c);
    let mut kept = client(&rig.sock("san9"));
    kept.write(0, 0, &pattern(114, MIB as usize)).unwrap();

    let log = daemon.reload(&rig.dir.path().join("daemon"), &format!("disks:\n{keep}"));
    assert!(
        log.contains("1 unchanged, 1 removed, 0 replaced, 0 added"),
        "{log}"
    );
    assert!(
        rig.server_file("vm.raw") == gone_data,
        "vm.raw differs after the drain"
    );

    // Another host gets the write map at once: no recall needed, the lease came back.
    let other = OtherHost::connect(&rig);
    match other.ask_write("vm.raw", 16 * MIB) {
        Reply::Map(_) => {}
        r => panic!(
            "host-b got {r:?}: the removed disk kept its lease\n{}",
            daemon.log()
        ),
    }
    // The disk that stayed still writes the LUN directly, on the same map connection.
    let before = rig.lun_sectors_written();
    kept.write(0, 4 * MIB, &pattern(115, 2 * MIB as usize))
        .unwrap();
    assert!(
        rig.lun_sectors_written() - before >= 2 * MIB / 512,
        "san9 direct after the reload:\n{}",
        daemon.log()
    );
    let (connections, map_log) = map_connections(&rig);
    assert_eq!(connections, 1, "{map_log}");
    drop(kept);
    assert!(daemon.stop().success());
}
