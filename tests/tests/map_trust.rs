//! The map server as something hosts and attackers push against: concurrent write-map races
//! between hosts (through hard links too), directories swapped for symlinks while maps are
//! asked for, filesystems mounted inside the export, hosts reaching outside their paths, and
//! floods of unauthenticated connections. Real map server, real xfs on a loop LUN.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use twinpath_mapproto::{Key, MapClient, MapGrant, Recall, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tests::samba::free_port;
use twinpath_tests::{pattern, Daemon};

const MIB: u64 = 1 << 20;

type Recalls = tokio::sync::mpsc::UnboundedReceiver<Recall>;

async fn connect(addr: &str, host: &str) -> (MapClient, Recalls) {
    MapClient::connect(addr, &host_key(host), host)
        .await
        .unwrap_or_else(|e| panic!("{host}: {e}"))
}

async fn get_map(c: &MapClient, path: &str, write: bool) -> Reply {
    c.call(Request::GetMap {
        path: path.into(),
        offset: 0,
        len: MIB,
        write,
    })
    .await
    .expect("the connection holds")
}

fn granted(r: &Reply) -> Option<&MapGrant> {
    match r {
        Reply::Map(m) => Some(m),
        _ => None,
    }
}

/// `GET http://addr/path` as text.
fn http_get(addr: SocketAddr, path: &str) -> String {
    ureq::get(&format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// Waits `d` without giving up the task's turn for a timer tick (the races need
/// sub-millisecond offsets; tokio's timers tick in milliseconds).
async fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_map_races_never_give_two_hosts_a_lease_even_through_a_hard_link() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let fs = FileServer::start(
        512 * MIB,
        Fs::Xfs,
        false,
        &format!("metrics: {{listen: \"{metrics}\"}}\n"),
    );
    let mnt = fs.lun.mount_point();
    std::fs::write(mnt.join("vm.raw"), pattern(1, 4 * MIB as usize)).unwrap();
    std::fs::hard_link(mnt.join("vm.raw"), mnt.join("link.raw")).unwrap();
    let (a, mut a_recalls) = connect(&fs.map_addr, "host-a").await;
    let (b, mut b_recalls) = connect(&fs.map_addr, "host-b").await;
    let (mut both, mut one, mut none, mut grants) = (0, 0, 0, 0u64);
    const RACES: u64 = 1000;
    for i in 0..RACES {
        // Half the races reach the same inode through its second name.
        let b_path = if i % 2 == 0 { "vm.raw" } else { "link.raw" };
        // B's request trails A's by 0 to 1.5 ms, so races end every way.
        let lag = Duration::from_micros(i * 37 % 1500);
        let (ra, rb) = tokio::join!(get_map(&a, "vm.raw", true), async {
            spin(lag).await;
            get_map(&b, b_path, true).await
        });
        let held: Vec<(&MapClient, u64)> = [(&a, &ra), (&b, &rb)]
            .into_iter()
            .filter_map(|(c, r)| granted(r).map(|m| (c, m.lease)))
            .collect();
        grants += held.len() as u64;
        match held.len() {
            2 => both += 1,
            1 => one += 1,
            _ => none += 1,
        }
        // The server's own view while the winner still holds its lease.
        if i % 100 == 0 && !held.is_empty() {
            let leases: Vec<serde_json::Value> = serde_json::from_str(
                &tokio::task::spawn_blocking(move || http_get(metrics, "/leases"))
                    .await
                    .unwrap(),
            )
            .unwrap();
            let mut per_inode: HashMap<(u64, u64), usize> = HashMap::new();
            for l in &leases {
                assert_eq!(l["mode"], "write", "{leases:?}");
                *per_inode
                    .entry((l["dev"].as_u64().unwrap(), l["ino"].as_u64().unwrap()))
                    .or_default() += 1;
            }
            assert!(per_inode.values().all(|&n| n == 1), "{leases:?}");
        }
        for (c, lease) in held {
            assert_eq!(
                c.call(Request::Return { lease }).await.unwrap(),
                Reply::Done
            );
        }
        while a_recalls.try_recv().is_ok() || b_recalls.try_recv().is_ok() {}
    }
    println!("{RACES} races: {one} with one winner, {none} with none, {both} with two");
    assert_eq!(both, 0, "two hosts held write leases on one file at once");
    assert!(
        one >= RACES / 10,
        "only {one} of {RACES} races had a winner: the test would prove nothing"
    );
    let m = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert!(
        m.contains(&format!(
            "twinpath_map_grants_total{{mode=\"write\"}} {grants}"
        )),
        "the server counts exactly the grants the hosts got ({grants}):\n{m}"
    );
    assert!(
        m.contains("twinpath_map_refusals_total{reason=\"conflict\"}"),
        "{m}"
    );
    assert!(m.contains("twinpath_map_hosts_connected 2"), "{m}");

    // What an operator sees: the lease table, by the inode both names share.
    let lease = granted(&get_map(&a, "link.raw", true).await)
        .expect("nobody else holds it")
        .lease;
    let wrong = Key::new(b"not-the-key-of-anyone-here".to_vec()).unwrap();
    assert!(MapClient::connect(&fs.map_addr, &wrong, "host-a")
        .await
        .is_err());
    let (status, out, err) =
        twinpath_tests::run_twinpath(&["leases", "--address", &metrics.to_string()]);
    assert!(status.success(), "{err}");
    let ino = std::fs::metadata(mnt.join("vm.raw")).unwrap();
    let row = out
        .lines()
        .find(|l| l.contains("link.raw"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("host-a") && row.contains("write"), "{out}");
    assert!(
        row.contains(&format!("{}", std::os::unix::fs::MetadataExt::ino(&ino))),
        "{out}"
    );
    let m = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
        .await
        .unwrap();
    assert!(
        m.contains("twinpath_map_auth_failures_total{reason=\"bad_key\"} 1"),
        "{m}"
    );
    assert!(m.contains("twinpath_map_leases{mode=\"write\"} 1"), "{m}");
    assert_eq!(
        a.call(Request::Return { lease }).await.unwrap(),
        Reply::Done
    );
    drop((a, b));
    let mut fs = fs;
    assert!(fs.map.take().unwrap().stop().success());
}

/// Swaps `dir` for a symlink to `target` and back until `stop`; returns how many swaps.
fn swap_loop(dir: &Path, target: &Path, stop: &AtomicBool) -> u64 {
    let real = dir.with_extension("real");
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        std::fs::rename(dir, &real).unwrap();
        std::os::unix::fs::symlink(target, dir).unwrap();
        std::thread::yield_now();
        std::fs::remove_file(dir).unwrap();
        std::fs::rename(&real, dir).unwrap();
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_resolve_once_beneath_the_export_and_the_hosts_paths() {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, false, "");
    drop(fs.map.take());
    // The export is a directory of the volume; `outside` is on the same filesystem but not
    // exported, with a file of another size where a swapped path would lead.
    let mnt = fs.lun.mount_point();
    let export = mnt.join("export");
    for d in ["images/vm1", "images/vm2"] {
        std::fs::create_dir_all(export.join(d)).unwrap();
    }
    std::fs::create_dir_all(mnt.join("outside/vm1")).unwrap();
    std::fs::write(
        export.join("images/vm1/a.raw"),
        pattern(2, 4 * MIB as usize),
    )
    .unwrap();
    std::fs::write(
        export.join("images/vm2/b.raw"),
        pattern(3, 4 * MIB as usize),
    )
    .unwrap();
    std::fs::write(mnt.join("outside/vm1/a.raw"), pattern(4, 2 * MIB as usize)).unwrap();
    std::os::unix::fs::symlink("../vm2/b.raw", export.join("images/vm1/peek.raw")).unwrap();
    let server = Daemon::start_map_server(
        fs.dir.path(),
        &fs.map_config(&export, &[("host-c", "[images/vm1/]")], ""),
    );
    let (a, _ra) = connect(&fs.map_addr, "host-a").await;
    let (c, _rc) = connect(&fs.map_addr, "host-c").await;

    // A directory swapped for a symlink out of the export, over and over, while both hosts
    // ask for a file in it: a map of the outside file (2 MiB) would be an escape.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, dir, target) = (
            stop.clone(),
            export.join("images/vm1"),
            mnt.join("outside/vm1"),
        );
        std::thread::spawn(move || swap_loop(&dir, &target, &stop))
    };
    let (mut escapes, mut maps, mut refusals) = (0, 0, 0);
    for i in 0..1000 {
        let host = if i % 2 == 0 { &a } else { &c };
        match get_map(host, "images/vm1/a.raw", false).await {
            Reply::Map(m) => {
                maps += 1;
                if m.file_size != 4 * MIB {
                    escapes += 1;
                }
                host.give_back(m.lease);
            }
            Reply::Refused { .. } => refusals += 1,
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    println!("1000 tries during {swaps} swaps: {maps} maps, {refusals} refused, {escapes} escapes");
    assert_eq!(escapes, 0, "a map of a file outside the export");
    assert!(
        refusals > 0 && swaps > 100,
        "the swap never got in the way: the test proves nothing"
    );

    let refused = |r: Reply| match r {
        Reply::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // A filesystem mounted inside the export is not the exported one.
    let inner = export.join("images/vm1/mnt");
    std::fs::create_dir(&inner).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&inner)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(inner.join("x.raw"), pattern(5, MIB as usize)).unwrap();
    let r = refused(get_map(&a, "images/vm1/mnt/x.raw", false).await);
    std::process::Command::new("umount")
        .arg(&inner)
        .status()
        .unwrap();
    assert!(r.contains("x.raw"), "{r}");

    // The server's own files, by any name.
    std::fs::hard_link(
        export.join(twinpath_mapserver_token()),
        export.join("images/vm1/token.raw"),
    )
    .unwrap();
    for p in [twinpath_mapserver_token(), "images/vm1/token.raw"] {
        let r = refused(get_map(&a, p, false).await);
        assert!(r.contains("own file"), "{p}: {r}");
    }

    // A host limited to images/vm1/ reaches nothing else, not even through a symlink there.
    assert!(granted(&get_map(&c, "images/vm1/a.raw", false).await).is_some());
    for p in ["images/vm2/b.raw", "images/vm1/peek.raw", "images/vm1"] {
        refused(get_map(&c, p, false).await);
    }
    // Allocate and commit act on a write lease of the asking host only.
    let read = granted(&get_map(&a, "images/vm2/b.raw", false).await)
        .unwrap()
        .lease;
    let write = granted(&get_map(&c, "images/vm1/a.raw", true).await)
        .expect("host-c's own file")
        .lease;
    for (host, lease) in [(&a, write), (&a, read)] {
        refused(host.call(Request::Commit { lease, size: 0 }).await.unwrap());
        refused(
            host.call(Request::Allocate {
                lease,
                offset: 0,
                len: MIB,
            })
            .await
            .unwrap(),
        );
    }
    assert_eq!(
        c.call(Request::Commit {
            lease: write,
            size: 0
        })
        .await
        .unwrap(),
        Reply::Done
    );
    drop((a, c));
    assert!(server.stop().success());
}

fn twinpath_mapserver_token() -> &'static str {
    ".twinpath-token"
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A peer without a key, for `secs` seconds: connects from `source`, announces a frame of
/// almost 16 MiB, sends what it can of it, and connects again.
fn flood_one(source: std::net::IpAddr, to: SocketAddr, secs: u64) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        oversized_frame(source, to);
    }
}

fn oversized_frame(source: std::net::IpAddr, to: SocketAddr) {
    let socket = match to {
        SocketAddr::V4(_) => {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        }
        SocketAddr::V6(_) => {
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
        }
    }
    .unwrap();
    socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
    if socket.connect(&to.into()).is_err() {
        return;
    }
    let mut s: TcpStream = socket.into();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(&((16u32 << 20) - 1).to_be_bytes());
    let junk = vec![0x7bu8; 1 << 20];
    for _ in 0..8 {
        if s.write_all(&junk).is_err() {
            return;
        }
    }
}

#[test]
fn unauthenticated_floods_cost_little_memory_and_hosts_keep_their_maps() {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, false, "");
    std::fs::write(
        fs.lun.mount_point().join("vm.raw"),
        pattern(6, 4 * MIB as usize),
    )
    .unwrap();
    let server = fs.map.take().unwrap();
    let pid = server.pid();
    let to: SocketAddr = fs.map_addr.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (host, _r) = rt.block_on(connect(&fs.map_addr, "host-a"));
    assert!(granted(&rt.block_on(get_map(&host, "vm.raw", false))).is_some());
    let before = rss(pid);

    // 200 peers from four addresses, none of which other hosts use.
    let done = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..200u8)
        .map(|i| {
            let source = std::net::IpAddr::from([127, 0, 0, 2 + i % 4]);
            std::thread::spawn(move || flood_one(source, to, 3))
        })
        .collect();
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    // Meanwhile the host that was connected keeps getting maps, and a host connecting now
    // (from its own address) gets in.
    let t = Instant::now();
    let mut answered = 0;
    while flood.iter().any(|f| !f.is_finished()) && t.elapsed() < Duration::from_secs(30) {
        let started = Instant::now();
        let r = rt.block_on(get_map(&host, "vm.raw", false));
        let m = granted(&r).unwrap_or_else(|| panic!("refused during the flood: {r:?}"));
        host.give_back(m.lease);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a map took {:?}",
            started.elapsed()
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let (late, _) = rt.block_on(connect(&fs.map_addr, "host-b"));
    assert!(granted(&rt.block_on(get_map(&late, "vm.raw", false))).is_some());
    for f in flood {
        f.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let grew = peak.saturating_sub(before);
    println!(
        "map server RSS {} MB before, {} MB at the peak of the flood; {answered} maps meanwhile",
        before >> 20,
        peak >> 20
    );
    assert!(grew < 64 * MIB, "the flood took {} MB", grew >> 20);
    assert!(answered > 20, "only {answered} maps during the flood");
    drop((host, late));
    assert!(server.stop().success());
}
