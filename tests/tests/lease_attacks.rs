//! Attacks on lease time (protocol 3): a map server that stalls, then resumes with its sweep
//! and a host's queued requests ready at the same moment; a network that hides the server's
//! close from the host. Promise 2: a host never uses blocks the server no longer grants it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinpath_mapproto::{clock, MapClient, MapGrant, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tests::{pattern, signal};

const MIB: u64 = 1 << 20;

/// A relay that forwards bytes both ways but never passes a close on: when one side ends,
/// the other stays open and hears nothing more (an on-path attacker dropping FIN/RST, or a
/// partition that starts right after the last frame got through).
pub struct HideCloseRelay {
    pub addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl HideCloseRelay {
    pub fn start(target: SocketAddr) -> HideCloseRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let keep = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => return, // the close is not passed on
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
                keep.lock().unwrap().extend([client, server]);
            }
        });
        HideCloseRelay { addr, open }
    }
}

impl Drop for HideCloseRelay {
    fn drop(&mut self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn granted(reply: Reply) -> MapGrant {
    match reply {
        Reply::Map(m) => m,
        other => panic!("expected a map, got {other:?}"),
    }
}

fn get_map(write: bool) -> Request {
    Request::GetMap {
        path: "vm.raw".into(),
        offset: 0,
        len: MIB,
        write,
    }
}

/// What one trial saw.
#[derive(Debug)]
struct Trial {
    /// Host A's leases still valid (by its own Validity) when host B got its write map.
    a_valid_when_b_granted: Option<Duration>,
}

/// One trial: host A holds a write lease, the map server is stopped past the hold with a
/// renewal of A's queued in its socket, and resumed; then host B asks for a write map of
/// the same file.
async fn trial(fs: &FileServer, a_addr: &str) -> Trial {
    let lease_time = Duration::from_secs(2); // hold = 2 + 0.2 + 1 = 3.2 s
    let (a, _a_recalls) = MapClient::connect(a_addr, &host_key("host-a"), "host-a")
        .await
        .unwrap();
    // Learn the lease time with one renewal (no heartbeat task: the renewals are ours).
    assert!(matches!(
        a.call(Request::Renew).await.unwrap(),
        Reply::Renewed { .. }
    ));
    let m = granted(a.call(get_map(true)).await.unwrap());
    let map_pid = fs.map.as_ref().unwrap().pid();
    signal(map_pid, libc::SIGSTOP);
    let stopped = Instant::now();
    // A renewal goes out while the server is stopped, shortly before the hold is over.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let a = Arc::new(a);
    let renewal = {
        let a = a.clone();
        tokio::spawn(async move {
            a.call_within(Duration::from_secs(3), None, Request::Renew)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(3700) - stopped.elapsed()).await;
    signal(map_pid, libc::SIGCONT);
    let renewed = matches!(renewal.await.unwrap(), Ok(Reply::Renewed { .. }));
    // Host B wants the file now.
    let (b, _) = MapClient::connect(&fs.map_addr, &host_key("host-b"), "host-b")
        .await
        .unwrap();
    let mut a_valid_when_b_granted = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Reply::Map(bm) = b.call(get_map(true)).await.unwrap() {
            let now = clock::now();
            let v = a.validity();
            if v.valid_at(now) {
                a_valid_when_b_granted = Some(v.until() - now);
                eprintln!(
                    "host B holds write lease {} on vm.raw while host A's write lease {} is valid for another {:?}",
                    bm.lease,
                    m.lease,
                    v.until() - now
                );
            }
            let _ = b.call(Request::Return { lease: bm.lease }).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    let _ = lease_time;
    eprintln!("renewal answered: {renewed}");
    Trial {
        a_valid_when_b_granted,
    }
}

/// The map server's sweep takes a silent host's leases back and closes its connection; if a
/// renewal from that host is waiting in the socket at the same moment (the server was
/// stopped, paused or starved past the hold), the server may still read and answer it: the
/// connection loop picks between "hang up" and "read the next frame" at random. The answer
/// renews the host's leases by its own clock, although the server gave them up. With the
/// close hidden from the host (relay), host B is granted the file's write lease while host
/// A's own Validity says its write lease has more than a second to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_answered_after_the_sweep_never_revives_taken_back_leases() {
    let fs = FileServer::start(512 * MIB, Fs::Xfs, false, "lease_time: 2s\n");
    std::fs::write(
        fs.lun.mount_point().join("vm.raw"),
        pattern(3, 4 * MIB as usize),
    )
    .unwrap();
    let relay = HideCloseRelay::start(fs.map_addr.parse().unwrap());
    let a_addr = relay.addr.to_string();
    let mut seen = Vec::new();
    for i in 0..3 {
        let t = trial(&fs, &a_addr).await;
        eprintln!("trial {i}: {t:?}");
        let broken = t.a_valid_when_b_granted.is_some();
        seen.push(t);
        if broken {
            break;
        }
        // Whatever A still holds runs out before the next trial.
        tokio::time::sleep(Duration::from_millis(3500)).await;
    }
    let log = std::fs::read_to_string(fs.dir.path().join("map-server.log")).unwrap();
    let broken: Vec<_> = seen
        .iter()
        .filter_map(|t| t.a_valid_when_b_granted)
        .collect();
    assert!(
        broken.is_empty(),
        "two writers: host B got a write map while host A's leases were still valid for {broken:?} \
         (trials: {seen:?})\n{}",
        log.lines()
            .filter(|l| l.contains("taken back") || l.contains("closing a host"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Waits for `needle` in the map server's log (after `from` bytes of it), at most `timeout`.
fn wait_log(fs: &FileServer, from: usize, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(fs.dir.path().join("map-server.log")).unwrap();
        if log.get(from..).is_some_and(|l| l.contains(needle)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_len(fs: &FileServer) -> usize {
    std::fs::read_to_string(fs.dir.path().join("map-server.log"))
        .unwrap()
        .len()
}

fn freeze(fs: &FileServer, on: bool) {
    let st = std::process::Command::new("fsfreeze")
        .arg(if on { "-f" } else { "-u" })
        .arg(fs.lun.mount_point())
        .status()
        .unwrap();
    assert!(st.success());
}

/// The map server handles one request of a connection at a time. While it is busy with one
/// of host A's requests for longer than the hold (a write map whose hole filling waits on a
/// frozen filesystem: a snapshot, a slow LUN), its sweep takes A's other leases back and
/// "closes" A's connection, but the close is only a notification the connection loop sees
/// at its next `select!`, which picks at random between it and the next request already
/// waiting in the socket. A renewal read there is answered: host A's Validity (for every
/// grant of the connection, including the lease taken back) runs again, while the server
/// gives that file to host B. With the close hidden from A (relay), A and B both hold valid
/// write grants on the same blocks for about a lease time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_leases_were_taken_back_while_a_request_was_in_hand_is_never_renewed() {
    let fs = FileServer::start(
        512 * MIB,
        Fs::Xfs,
        false,
        "lease_time: 2s\nallocation_chunk: 4M\n",
    );
    let mnt = fs.lun.mount_point();
    std::fs::write(mnt.join("vm.raw"), pattern(3, 4 * MIB as usize)).unwrap();
    let relay = HideCloseRelay::start(fs.map_addr.parse().unwrap());
    let mut broken = None;
    let mut renewed_after = 0;
    for i in 0..3 {
        // A file with a hole: its write map needs filling, which a frozen filesystem stalls.
        let other = format!("other{i}.raw");
        let f = std::fs::File::create(mnt.join(&other)).unwrap();
        f.set_len(8 * MIB).unwrap();
        drop(f);
        let (a, _a_recalls) =
            MapClient::connect(&relay.addr.to_string(), &host_key("host-a"), "host-a")
                .await
                .unwrap();
        assert!(matches!(
            a.call(Request::Renew).await.unwrap(),
            Reply::Renewed { .. }
        ));
        let l1 = granted(a.call(get_map(true)).await.unwrap());
        let a = Arc::new(a);
        let from = log_len(&fs);
        freeze(&fs, true);
        let stalled = {
            let a = a.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = a
                    .call_within(
                        Duration::from_secs(8),
                        None,
                        Request::GetMap {
                            path: other,
                            offset: 0,
                            len: MIB,
                            write: true,
                        },
                    )
                    .await;
                eprintln!("stalled map answered after {:?}: {r:?}", t.elapsed());
                r
            })
        };
        // The sweep takes vm.raw's lease back while the map of the other file is in hand.
        let frozen = Instant::now();
        let taken = wait_log(&fs, from, "lease taken back", Duration::from_secs(4));
        eprintln!("taken back {taken} after {:?} frozen", frozen.elapsed());
        // A renewal waits in the socket; then the filesystem thaws.
        let renewal = {
            let a = a.clone();
            tokio::spawn(async move {
                a.call_within(Duration::from_secs(3), None, Request::Renew)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        freeze(&fs, false);
        let _ = stalled.await;
        let renewed = matches!(renewal.await.unwrap(), Ok(Reply::Renewed { .. }));
        let now = clock::now();
        let v = a.validity();
        eprintln!(
            "trial {i}: vm.raw lease {} taken back: {taken}; renewal answered after it: {renewed}; \
             host A's grants valid for {:?}",
            l1.lease,
            v.until().saturating_sub(now)
        );
        if renewed && taken {
            renewed_after += 1;
        }
        // Host B asks for vm.raw.
        let (b, _) = MapClient::connect(&fs.map_addr, &host_key("host-b"), "host-b")
            .await
            .unwrap();
        let reply = b
            .call_within(Duration::from_secs(5), None, get_map(true))
            .await
            .unwrap();
        let now = clock::now();
        if let Reply::Map(bm) = &reply {
            if a.validity().valid_at(now) {
                broken = Some(format!(
                    "trial {i}: host B granted write lease {} on vm.raw while host A's write lease {} \
                     (taken back) is valid by A's clock for another {:?}",
                    bm.lease,
                    l1.lease,
                    a.validity().until() - now
                ));
            }
            let _ = b.call(Request::Return { lease: bm.lease }).await;
        }
        drop(b);
        if broken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    eprintln!("renewals answered after a take-back: {renewed_after}");
    assert!(broken.is_none(), "{}", broken.unwrap());
}
