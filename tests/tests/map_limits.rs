//! Resource attacks by an authenticated host on the map server that every host shares. Every
//! lease needs its file open; were that one descriptor per lease, one host holding many
//! leases (as a host with a large image does, one per 64 MiB window) would reach the
//! process's descriptor limit, and then no host would get a map or even connect. Leases of
//! one inode share one open file.

use std::time::Duration;

use twinpath_mapproto::{MapClient, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tests::pattern;

const MIB: u64 = 1 << 20;

/// The map server runs with the soft descriptor limit systemd gives services (1024). Host A,
/// allowed one small file, asks for 1100 read maps of it and returns none (a legitimate host
/// does the same with one 64 GiB image: one lease per 64 MiB window). Host B then asks for a
/// map of its own image, and host C tries to connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hosts_many_leases_do_not_take_the_servers_descriptors() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, false, "allocation_chunk: 4M\n");
    let pid = fs.map.as_ref().unwrap().pid();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:"])
        .status()
        .unwrap();
    assert!(st.success());
    let mnt = fs.lun.mount_point();
    std::fs::write(mnt.join("a.raw"), pattern(1, MIB as usize)).unwrap();
    std::fs::write(mnt.join("b.raw"), pattern(2, MIB as usize)).unwrap();

    let (a, _ra) = MapClient::connect(&fs.map_addr, &host_key("host-a"), "host-a")
        .await
        .unwrap();
    let mut held = 0;
    for _ in 0..1100 {
        match a
            .call(Request::GetMap {
                path: "a.raw".into(),
                offset: 0,
                len: MIB,
                write: false,
            })
            .await
            .unwrap()
        {
            Reply::Map(_) => held += 1,
            Reply::Refused { reason } => {
                println!("host A refused after {held} leases: {reason}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    println!("host A holds {held} read leases on one 1 MiB file");

    let (b, _rb) = MapClient::connect(&fs.map_addr, &host_key("host-b"), "host-b")
        .await
        .expect("host B connects");
    let reply = b
        .call(Request::GetMap {
            path: "b.raw".into(),
            offset: 0,
            len: MIB,
            write: false,
        })
        .await
        .unwrap();
    let c = tokio::time::timeout(
        Duration::from_secs(6),
        MapClient::connect(&fs.map_addr, &host_key("host-c"), "host-c"),
    )
    .await;
    println!(
        "host B: {reply:?}\nhost C connect: {:?}",
        c.as_ref().map(|r| r.is_ok())
    );
    assert!(
        matches!(reply, Reply::Map(_)),
        "host A's {held} leases took host B's map away: {reply:?}"
    );
    assert!(matches!(c, Ok(Ok(_))), "host C cannot even connect");
}
