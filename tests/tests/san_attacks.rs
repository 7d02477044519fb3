//! A san disk whose map connection runs through an on-path attacker that does not know the
//! key: whatever it does to the server's frames, the host never writes where the server did
//! not say, and the guest sees no error.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use twinpath_filemap::file_extents;
use twinpath_tests::fileserver::FileServer;
use twinpath_tests::lun::Fs;
use twinpath_tests::tamper::TamperRelay;
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// Sectors written to `device` so far (the block layer's counters).
fn sectors_written(device: &std::path::Path) -> u64 {
    let name = device.file_name().unwrap().to_string_lossy().into_owned();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(6).unwrap().parse().unwrap()
}

/// Reads `path` past the server's page cache (what is on the device).
fn on_device(path: &std::path::Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: advice on a file we hold open.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    let mut out = vec![0u8; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut out, 0).unwrap();
    out
}

#[test]
fn a_relay_rewriting_maps_never_makes_the_host_write_another_tenants_blocks() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, true, "");
    let mnt = fs.lun.mount_point();
    // Another tenant's image, and where its blocks are on the LUN.
    let victim = pattern(90, 8 * MIB as usize);
    std::fs::write(mnt.join("victim.raw"), &victim).unwrap();
    let v = std::fs::File::open(mnt.join("victim.raw")).unwrap();
    v.sync_all().unwrap();
    let victim_at = file_extents(&v).unwrap()[0].physical;
    drop(v);
    let mut expect = pattern(91, 128 * MIB as usize);
    std::fs::write(mnt.join("vm.raw"), &expect).unwrap();

    // After the handshake and the volume identity (frames 0-2) and the first map (frame 3),
    // every frame to the host is attacked: a map it can read is pointed at the victim's
    // blocks (what worked against protocol 1); one it cannot read gets a byte flipped.
    let relay = TamperRelay::start(
        fs.map_addr.parse().unwrap(),
        Arc::new(move |index, payload: Vec<u8>| {
            if index < 4 {
                return payload;
            }
            match serde_json::from_slice::<serde_json::Value>(&payload) {
                Ok(mut f) if f["reply"]["result"] == "map" => {
                    let spans = &mut f["reply"]["spans"];
                    let first = spans[0]["logical"].as_u64().unwrap_or(0);
                    *spans = serde_json::json!([{
                        "logical": first,
                        "len": 8 * MIB,
                        "kind": {"Data": {"physical": victim_at}},
                        "access": "ReadWrite",
                    }]);
                    serde_json::to_vec(&f).unwrap()
                }
                Ok(_) => payload,
                Err(_) => {
                    let mut p = payload;
                    let mid = p.len() / 2;
                    p[mid] ^= 0x40;
                    p
                }
            }
        }),
    );
    let dir = fs.dir.path().join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vm.sock");
    let backend = fs
        .backend_yaml("vm.raw", Some(&fs.lun.device().display().to_string()))
        .replace(&fs.map_addr, &relay.addr().to_string());
    let daemon = Daemon::start(
        &dir,
        &format!(
            "disks:\n  - name: vm\n    socket: {}\n    backend: {backend}\n",
            sock.display()
        ),
    );
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();

    // Window 0 is mapped untouched and written directly.
    let before = sectors_written(fs.lun.device());
    let data = pattern(92, MIB as usize);
    c.write(0, 0, &data).unwrap();
    expect[..MIB as usize].copy_from_slice(&data);
    assert!(
        sectors_written(fs.lun.device()) > before,
        "the first window went to the LUN"
    );
    // Window 1's map is attacked: the write must still land in vm.raw, not in the victim.
    for i in 0..4u64 {
        let at = 64 * MIB + i * MIB;
        let data = pattern(93 + i, MIB as usize);
        c.write(0, at, &data).unwrap();
        expect[at as usize..(at + MIB) as usize].copy_from_slice(&data);
    }
    assert!(
        relay.altered.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the relay attacked"
    );
    // Every grant of the attacked connection is gone: window 0 now goes over SMB too.
    let before = sectors_written(fs.lun.device());
    let data = pattern(99, MIB as usize);
    c.write(0, 2 * MIB, &data).unwrap();
    expect[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&data);
    assert_eq!(
        sectors_written(fs.lun.device()),
        before,
        "a grant of the attacked connection was used"
    );
    for at in (0..128 * MIB).step_by(4 * MIB as usize) {
        let got = c.read(0, at, 4 * MIB as usize).unwrap();
        assert!(
            got[..] == expect[at as usize..(at + 4 * MIB) as usize],
            "the guest reads its writes back at {at}"
        );
    }
    drop(c);
    let log = daemon.log_after_stop();
    assert!(log.contains("direct path off"), "{log}");
    assert!(
        on_device(&mnt.join("victim.raw")) == victim,
        "the victim's blocks were written"
    );
    assert!(
        on_device(&mnt.join("vm.raw")) == expect,
        "the image holds the guest's writes"
    );
}

#[test]
fn a_map_key_file_others_can_read_fails_the_disk_naming_file_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let key = dir.path().join("map.key");
    std::fs::write(&key, "a-key-long-enough-for-the-map-server\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pass = dir.path().join("smb.pass");
    write_secret(&pass, "unused");
    let cfg = format!(
        "disks:\n  - name: loose\n    socket: {}\n    backend: {{type: san, server: \"127.0.0.1:1\", share: s, path: a.raw, user: u, password_file: {}, map_server: \"127.0.0.1:1\", map_key_file: {}, lun: auto}}\n",
        dir.path().join("l.sock").display(),
        pass.display(),
        key.display()
    );
    let status = spawn_daemon(dir.path(), &cfg).wait_exit(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("disk `loose`"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&format!("{}: mode 0644", key.display())),
        "{log}"
    );
}
