//! `twinpath map-server` on a real filesystem on a loop device, talked to by real hosts over
//! TCP: identity and token, read and write maps that point at the right device bytes, direct
//! writes visible to the server after commit, leases recalled for another host, and refusals.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use sha2::{Digest, Sha256};
use twinpath_filemap::{read_direct, Grant, Piece, SpanKind};
use twinpath_mapproto::{Key, MapClient, MapGrant, ProtoError, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tests::{pattern, scratch, Daemon};

const MIB: u64 = 1 << 20;

struct Setup {
    /// The LUN and the host-side scratch directory; its map server is `server`.
    fs: FileServer,
    server: Daemon,
    addr: String,
    device_size: u64,
}

fn setup(fs: Fs) -> Setup {
    setup_with(fs, "")
}

fn setup_with(fs: Fs, extra: &str) -> Setup {
    let config = format!("allocation_chunk: 4M\n{extra}");
    let mut fs = FileServer::start(512 * MIB, fs, false, &config);
    let server = fs.map.take().expect("map server");
    Setup {
        device_size: 512 * MIB,
        addr: fs.map_addr.clone(),
        fs,
        server,
    }
}

/// Connects as test host `name`, with its own key.
async fn connect(
    s: &Setup,
    name: &str,
) -> (
    MapClient,
    tokio::sync::mpsc::UnboundedReceiver<twinpath_mapproto::Recall>,
) {
    MapClient::connect(&s.addr, &host_key(name), name)
        .await
        .unwrap()
}

async fn map(c: &MapClient, path: &str, offset: u64, len: u64, write: bool) -> Reply {
    c.call(Request::GetMap {
        path: path.into(),
        offset,
        len,
        write,
    })
    .await
    .unwrap()
}

fn granted(reply: Reply) -> MapGrant {
    match reply {
        Reply::Map(m) => m,
        other => panic!("expected a map, got {other:?}"),
    }
}

fn device(s: &Setup, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(s.fs.lun.device())
        .unwrap()
}

/// Writes `data` at file offset `offset` on the device, where `grant` says, as a host would.
fn write_under(grant: &Grant, dev: &File, offset: u64, data: &[u8]) {
    let pieces = grant
        .resolve(offset, data.len() as u64, true)
        .expect("writable");
    let mut at = 0usize;
    for p in pieces {
        let Piece::Device { physical, len } = p else {
            panic!("write map with zeros");
        };
        grant.guard().check(physical, len, true).unwrap();
        write_direct(dev, physical, &data[at..at + len as usize]);
        at += len as usize;
    }
    dev.sync_all().unwrap();
}

/// Writes `data` at `physical` with O_DIRECT (4096-aligned buffer).
fn write_direct(dev: &File, physical: u64, data: &[u8]) {
    let mut buf = twinpath_blockio::AlignedBuf::zeroed(data.len(), 4096).unwrap();
    buf.as_mut_slice()[..data.len()].copy_from_slice(data);
    dev.write_all_at(&buf.as_slice()[..data.len()], physical)
        .unwrap();
}

async fn identity_and_maps(fs: Fs) {
    let s = setup(fs);
    let (c, _recalls) = connect(&s, "host-a").await;

    // Identity: the volume the host must find, and a token only that volume holds.
    let Reply::Identity(id) = c.call(Request::Identity).await.unwrap() else {
        panic!("no identity");
    };
    assert_eq!(id.fs_type, if fs == Fs::Xfs { "xfs" } else { "ext4" });
    assert_eq!(id.size, s.device_size);
    let dev = device(&s, true);
    let token = read_direct(&dev, id.token_offset, id.token_len as usize).unwrap();
    assert_eq!(hex(&Sha256::digest(&token)), id.token_sha256);

    // A read map of a written file points at its bytes.
    let data = pattern(51, 8 * MIB as usize);
    let img = s.fs.lun.mount_point().join("vm.raw");
    std::fs::write(&img, &data).unwrap();
    let m = granted(map(&c, "vm.raw", 0, 8 * MIB, false).await);
    assert_eq!(m.file_size, 8 * MIB);
    let grant = Grant::new(m.spans.clone(), s.device_size).unwrap();
    let pieces = grant.resolve(0, 8 * MIB, false).expect("all of it mapped");
    let mut at = 0usize;
    for p in pieces {
        let Piece::Device { physical, len } = p else {
            panic!("written file mapped as zeros: {:?}", m.spans);
        };
        let got = read_direct(&dev, physical, len as usize).unwrap();
        assert_eq!(got, data[at..at + len as usize], "{fs:?} at {at}");
        at += len as usize;
    }
    assert!(
        grant.resolve(0, 4096, true).is_none(),
        "a read map grants no writes"
    );

    // A preallocated file maps as zeros for reading. On xfs (reflink) a write map makes the
    // range written first, and a direct write under it is what the server reads after commit.
    // ext4 cannot fill without risking a concurrent write: the range is no write grant there.
    let pre = s.fs.lun.mount_point().join("pre.raw");
    let f = File::create(&pre).unwrap();
    // SAFETY: fallocate on a file we own.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 8 * MIB as i64) };
    assert_eq!(r, 0);
    drop(f);
    let m = granted(map(&c, "pre.raw", 0, 8 * MIB, false).await);
    assert!(
        m.spans.iter().all(|s| s.kind == SpanKind::Zero),
        "{:?}",
        m.spans
    );
    let w = granted(map(&c, "pre.raw", MIB, MIB, true).await);
    let grant = Grant::new(w.spans.clone(), s.device_size).unwrap();
    if fs == Fs::Ext4 {
        assert!(
            grant.resolve(MIB, 4096, true).is_none(),
            "ext4: preallocated space granted for writing: {:?}",
            w.spans
        );
        assert!(
            w.spans.iter().all(|s| s.kind == SpanKind::Zero),
            "{:?}",
            w.spans
        );
    } else {
        let new = pattern(52, MIB as usize);
        // The server's page cache now holds the zeros; commit must drop them.
        let mut back = vec![1u8; MIB as usize];
        File::open(&pre)
            .unwrap()
            .read_exact_at(&mut back, MIB)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0));
        write_under(&grant, &dev, MIB, &new);
        assert_eq!(
            c.call(Request::Commit {
                lease: w.lease,
                size: 8 * MIB
            })
            .await
            .unwrap(),
            Reply::Done
        );
        let mut back = vec![0u8; MIB as usize];
        File::open(&pre)
            .unwrap()
            .read_exact_at(&mut back, MIB)
            .unwrap();
        assert!(
            back == new,
            "{fs:?}: the server reads the host's direct write"
        );
    }

    // Allocation: on xfs a sparse file gets whole chunks (4 MiB here) written, its size
    // unchanged; ext4 refuses (holes stay on the network path) and allocates nothing.
    let sparse = s.fs.lun.mount_point().join("sparse.raw");
    File::create(&sparse).unwrap().set_len(16 * MIB).unwrap();
    // Allocation acts under a write lease of the file (this one fills its own last chunk).
    let lease = granted(map(&c, "sparse.raw", 12 * MIB, 4096, true).await).lease;
    let allocated = c
        .call(Request::Allocate {
            lease,
            offset: MIB,
            len: 4096,
        })
        .await
        .unwrap();
    let chunk = if fs == Fs::Ext4 {
        match allocated {
            Reply::Refused { reason } => assert!(reason.contains("network path"), "{reason}"),
            other => panic!("ext4 allocated: {other:?}"),
        }
        0
    } else {
        assert_eq!(
            allocated,
            Reply::Allocated {
                offset: 0,
                len: 4 * MIB
            }
        );
        4 * MIB
    };
    assert_eq!(std::fs::metadata(&sparse).unwrap().len(), 16 * MIB);
    let m = granted(map(&c, "sparse.raw", 0, 8 * MIB, false).await);
    let grant = Grant::new(m.spans, s.device_size).unwrap();
    if chunk > 0 {
        assert!(
            grant
                .resolve(0, chunk, false)
                .unwrap()
                .iter()
                .all(|p| matches!(p, Piece::Device { .. })),
            "the allocated chunk is on the device"
        );
    }
    assert!(
        grant
            .resolve(chunk, 8 * MIB - chunk, false)
            .unwrap()
            .iter()
            .all(|p| matches!(p, Piece::Zero { .. })),
        "the rest is still a hole"
    );

    // Paths outside the export are refused, the key never shows in the log.
    for bad in ["../etc/passwd", "/etc/passwd", "nope.raw"] {
        match map(&c, bad, 0, 4096, false).await {
            Reply::Refused { reason } => assert!(
                reason.contains(bad.trim_start_matches('/')) || reason.contains("relative"),
                "{reason}"
            ),
            other => panic!("{bad}: {other:?}"),
        }
    }
    drop(c);
    assert!(s.server.stop().success());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn xfs_identity_maps_and_direct_writes() {
    identity_and_maps(Fs::Xfs).await;
}

#[tokio::test]
async fn ext4_identity_maps_and_direct_writes() {
    identity_and_maps(Fs::Ext4).await;
}

#[tokio::test]
async fn a_second_hosts_write_map_recalls_the_first() {
    let s = setup(Fs::Xfs);
    let img = s.fs.lun.mount_point().join("vm.raw");
    let mut f = File::create(&img).unwrap();
    f.write_all(&pattern(53, 4 * MIB as usize)).unwrap();
    drop(f);
    let (a, mut a_recalls) = connect(&s, "host-a").await;
    let (b, _) = connect(&s, "host-b").await;
    let lease = granted(map(&a, "vm.raw", 0, MIB, true).await).lease;
    match map(&b, "vm.raw", 0, MIB, true).await {
        Reply::Refused { reason } => assert!(reason.contains("host-a"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let recall = tokio::time::timeout(std::time::Duration::from_secs(5), a_recalls.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recall.lease, lease);
    assert_eq!(
        a.call(Request::Return { lease }).await.unwrap(),
        Reply::Done
    );
    granted(map(&b, "vm.raw", 0, MIB, true).await);
    // Now host A's read is in the way of B's write lease.
    match map(&a, "vm.raw", 0, MIB, false).await {
        Reply::Refused { reason } => assert!(reason.contains("host-b"), "{reason}"),
        other => panic!("{other:?}"),
    }
    drop((a, b));
    assert!(s.server.stop().success());
}

/// Reads `path` through the server's page cache until it holds `want` (the server handles a
/// disconnect on its own time), for at most 5 s.
fn server_reads(path: &std::path::Path, want: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut back = vec![0u8; want.len()];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        if back == want || std::time::Instant::now() > deadline {
            return back == want;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

// Multi-threaded: the client's writer task runs while this test blocks reading files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recalls_name_the_leases_owner_and_returned_write_leases_drop_the_servers_cache() {
    let s = setup_with(Fs::Xfs, "lease_time: 2s\n");
    let img = s.fs.lun.mount_point().join("vm.raw");
    std::fs::write(&img, pattern(55, MIB as usize)).unwrap();
    let dev = device(&s, true);
    let (a, mut a_recalls) = connect(&s, "host-a").await;
    let (b, _) = connect(&s, "host-b").await;
    let beat = std::time::Duration::from_secs(1);
    assert_eq!(
        a.keep_alive(beat).await.unwrap(),
        std::time::Duration::from_secs(2)
    );
    b.keep_alive(beat).await.unwrap();

    // A lease asked for by owner 7 of host A: its recall says so.
    let w = granted(
        a.call_as(
            Some(7),
            Request::GetMap {
                path: "vm.raw".into(),
                offset: 0,
                len: MIB,
                write: true,
            },
        )
        .await
        .unwrap(),
    );
    // The server caches the old bytes; then host A writes directly and gives the lease
    // back without a commit (a disk closing).
    assert!(server_reads(&img, &pattern(55, MIB as usize)));
    let grant = Grant::new(w.spans, s.device_size).unwrap();
    write_under(&grant, &dev, 0, &pattern(56, MIB as usize));
    assert!(matches!(
        map(&b, "vm.raw", 0, MIB, true).await,
        Reply::Refused { .. }
    ));
    let recall = tokio::time::timeout(std::time::Duration::from_secs(5), a_recalls.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((recall.lease, recall.owner), (w.lease, Some(7)));
    a.give_back(w.lease);
    assert!(
        server_reads(&img, &pattern(56, MIB as usize)),
        "the server reads the direct write after the return"
    );

    // The same when the host's connection ends instead, with a lease asked for by nobody.
    let w = granted(map(&b, "vm.raw", 0, MIB, true).await);
    assert!(server_reads(&img, &pattern(56, MIB as usize)));
    let grant = Grant::new(w.spans, s.device_size).unwrap();
    write_under(&grant, &dev, 0, &pattern(57, MIB as usize));
    match map(&a, "vm.raw", 0, MIB, true).await {
        Reply::Refused { reason } => assert!(reason.contains("host-b"), "{reason}"),
        other => panic!("{other:?}"),
    }
    drop(b);
    assert!(
        server_reads(&img, &pattern(57, MIB as usize)),
        "the server reads the direct write after the host left"
    );
    // Host B may not know yet that it is gone: its lease is kept for the lease time and a
    // margin (2s + 0.2s + 1s) before anyone else gets the file.
    let left = std::time::Instant::now();
    match map(&a, "vm.raw", 0, MIB, true).await {
        Reply::Refused { reason } => assert!(reason.contains("host-b"), "{reason}"),
        other => panic!("granted while the lost host's lease was held: {other:?}"),
    }
    loop {
        match map(&a, "vm.raw", 0, MIB, true).await {
            Reply::Map(_) => break,
            Reply::Refused { .. } => {
                assert!(left.elapsed() < std::time::Duration::from_secs(6));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        left.elapsed() >= std::time::Duration::from_millis(3100),
        "granted after {:?}",
        left.elapsed()
    );
    drop(a);
    assert!(s.server.stop().success());
}

#[tokio::test]
async fn a_host_is_known_by_its_key_and_nothing_it_claims_is_logged_before() {
    let mut s = setup(Fs::Ext4);
    let wrong = Key::new(b"not-the-right-key-at-all".to_vec()).unwrap();
    // A forged line in the claimed name would show up as its own log line if logged.
    let forged = "intruder\n2026-12-02T00:00:00Z  INFO host connected host=vmhost-07";
    match MapClient::connect(&s.addr, &wrong, forged).await {
        Err(ProtoError::Auth(m)) => assert!(m.contains("authentication failed"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected with the wrong key"),
    }
    // Host A's own key under host B's name: the key decides who it is, and it is refused.
    match MapClient::connect(&s.addr, &host_key("host-a"), "host-b").await {
        Err(ProtoError::Auth(m)) => assert!(m.contains("authentication failed"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("host-a's key was accepted as host-b"),
    }
    s.server.wait_for_log(
        "presented under another name",
        std::time::Duration::from_secs(5),
    );
    let (_c, _) = connect(&s, "host-c").await;
    s.server.wait_for_log(
        "host connected host=host-c",
        std::time::Duration::from_secs(5),
    );
    let log = s.server.log();
    assert!(
        !log.contains("intruder"),
        "a claimed name was logged: {log}"
    );
    assert!(log.contains("host-a"), "the key's owner is named: {log}");
    for h in twinpath_tests::fileserver::HOSTS {
        let key = std::fs::read_to_string(s.fs.key_file_of(h)).unwrap();
        assert!(!log.contains(key.trim()), "a key in the log");
    }
    assert!(!log.contains("not-the-right-key"));
    assert!(s.server.stop().success());
}

#[test]
fn bad_map_server_configs_name_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "tiny\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open = dir.path().join("open.key");
    std::fs::write(&open, "a-key-long-enough-but-readable-by-all\n").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let host =
        |key: &std::path::Path| format!("hosts: [{{name: h1, key_file: {}}}]\n", key.display());
    for (yaml, code, needle) in [
        (
            format!(
                "listen: 127.0.0.1:1\nexport: /tmp\n{}exprot: x\n",
                host(&short)
            ),
            2,
            "exprot".to_owned(),
        ),
        (
            format!("listen: 127.0.0.1:1\nexport: rel\n{}", host(&short)),
            2,
            "key `export`".to_owned(),
        ),
        (
            format!(
                "listen: 127.0.0.1:1\nexport: /tmp\n{}allocation_chunk: 3M\n",
                host(&short)
            ),
            2,
            "allocation_chunk".to_owned(),
        ),
        (
            "listen: 127.0.0.1:1\nexport: /tmp\nkey_file: /k\n".to_owned(),
            2,
            "own `key_file`".to_owned(),
        ),
        (
            format!("listen: 127.0.0.1:1\nexport: /tmp\n{}", host(&short)),
            1,
            "at least 16".to_owned(),
        ),
        (
            format!("listen: 127.0.0.1:1\nexport: /tmp\n{}", host(&open)),
            1,
            format!("{}: mode 0644", open.display()),
        ),
    ] {
        let cfg = dir.path().join("m.yaml");
        std::fs::write(&cfg, &yaml).unwrap();
        let (status, _, stderr) =
            twinpath_tests::run_twinpath(&["map-server", "--config", cfg.to_str().unwrap()]);
        assert_eq!(status.code(), Some(code), "{yaml}: {stderr}");
        assert!(stderr.contains(&needle), "{yaml}: {stderr}");
    }
}

#[tokio::test]
async fn changes_by_others_recall_leases_but_the_servers_own_writes_do_not() {
    let s = setup(Fs::Xfs);
    let mnt = s.fs.lun.mount_point();
    for name in ["a.raw", "b.raw", "c.raw"] {
        std::fs::write(mnt.join(name), pattern(54, MIB as usize)).unwrap();
    }
    // d.raw is preallocated: a write map makes the server fill it itself (dedupe, unshare).
    let f = File::create(mnt.join("d.raw")).unwrap();
    // SAFETY: fallocate on a file we own.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 8 * MIB as i64) };
    assert_eq!(r, 0);
    drop(f);
    let (c, mut recalls) = connect(&s, "host-a").await;
    let mut leases = std::collections::HashMap::new();
    for (name, write) in [
        ("a.raw", false),
        ("b.raw", false),
        ("c.raw", true),
        ("d.raw", true),
    ] {
        leases.insert(granted(map(&c, name, 0, MIB, write).await).lease, name);
    }
    let next = |recalls: &mut tokio::sync::mpsc::UnboundedReceiver<twinpath_mapproto::Recall>| {
        recalls.try_recv().ok()
    };
    // The server's own filling of d.raw recalled nothing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        next(&mut recalls).is_none(),
        "the server's own writes recall nothing"
    );

    // Another writer, a rename and a delete, each on a leased file.
    let w = OpenOptions::new()
        .write(true)
        .open(mnt.join("a.raw"))
        .unwrap();
    w.write_all_at(b"someone else", 4096).unwrap();
    drop(w);
    std::fs::rename(mnt.join("b.raw"), mnt.join("b-moved.raw")).unwrap();
    std::fs::remove_file(mnt.join("c.raw")).unwrap();
    let mut seen = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_millis(200), recalls.recv()).await {
            Ok(Some(r)) => {
                let name = leases
                    .get(&r.lease)
                    .unwrap_or_else(|| panic!("{r:?} {leases:?}"));
                seen.insert(*name, r.reason);
            }
            _ => continue,
        }
    }
    assert!(seen["a.raw"].contains("written"), "{seen:?}");
    assert!(seen["b.raw"].contains("renamed"), "{seen:?}");
    assert!(seen["c.raw"].contains("deleted"), "{seen:?}");
    assert!(!seen.contains_key("d.raw"), "{seen:?}");
    drop(c);
    assert!(s.server.stop().success());
}
