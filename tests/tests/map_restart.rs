//! A map server that crashes and is started again has an empty lease table; hosts that held
//! leases from the earlier run and have not noticed the crash (a partition: their end of the
//! connection stays open) may go on writing directly until their lease time runs out. The new
//! run answers no maps until then (its grace period, from the lease record of the earlier run),
//! so no second writer gets those blocks. (Found by review of 817f324: the restarted server
//! granted the image's write lease to another host within 0.1 s.)

use std::time::{Duration, Instant};

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::sanhost::{fencing_map_server, Host, Lun};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_restarted_map_server_grants_nothing_while_a_partitioned_host_may_still_write() {
    restarted(false);
}

/// The same with `fence:` on tgtd: the restarted server takes its reservation over and knows
/// no host to fence; host A stays registered.
#[test]
fn a_restarted_fencing_map_server_grants_nothing_while_a_partitioned_host_may_still_write() {
    restarted(true);
}

fn restarted(fencing: bool) {
    let mut fs = FileServer::start(512 * MIB, Fs::Xfs, true, "lease_time: 30s\n");
    let mnt = fs.lun.mount_point();
    std::fs::write(mnt.join("vm.raw"), pattern(1, 64 * MIB as usize)).unwrap();
    let target = fencing.then(|| Tgtd::start(fs.lun.device(), false, fs.dir.path()));
    let fenced = target
        .as_ref()
        .map(|t| fencing_map_server(&mut fs, &t.url(), "30s"));
    let lun = target.as_ref().map_or(Lun::Device, Lun::Target);

    // Host A writes directly, through a relay that will keep its end open and silent.
    let (a, relay) = Host::partitionable(&fs, lun);
    let mut ca = a.client();
    ca.write(0, 0, &pattern(2, MIB as usize)).unwrap();
    ca.flush(0).unwrap();
    let a_direct0 = a.done("direct", "write");
    assert!(
        a_direct0 >= 1.0,
        "A's write not direct:\n{}",
        a.daemon.log()
    );

    // The map server crashes (kill -9) and is started again at once (same config, address).
    let (map, config) = match fenced {
        Some(f) => (f.0, Some(f.1)),
        None => (fs.map.take().unwrap(), None),
    };
    signal(map.pid(), libc::SIGKILL);
    let _ = map.wait_exit(Duration::from_secs(5));
    relay.cut_server_side();
    let restarted = Instant::now();
    let map = match &config {
        Some(config) => {
            let dir = fs.dir.path().join("second");
            std::fs::create_dir_all(&dir).unwrap();
            Daemon::start_map_server(&dir, config)
        }
        None => {
            fs.restart_map();
            fs.map.take().unwrap()
        }
    };
    assert!(
        map.log().contains("no maps until they have run out"),
        "{}",
        map.log()
    );

    // Host B asks the new server for the image and writes, for up to 20 s.
    let b = Host::start_as(
        &fs,
        "host-a",
        lun,
        "vm.raw",
        &fs.map_addr,
        "map_timeout: 1s",
    );
    let mut cb = b.client();
    let b_data = pattern(3, MIB as usize);
    let mut b_direct = 0.0;
    while b_direct < 1.0 && restarted.elapsed() < Duration::from_secs(20) {
        cb.write(0, 0, &b_data).unwrap();
        b_direct = b.done("direct", "write");
    }
    cb.flush(0).unwrap();
    let granted_after = restarted.elapsed();

    // A, still within its lease time from the earlier run, writes the same blocks.
    let a_data = pattern(4, MIB as usize);
    ca.write(0, 0, &a_data).unwrap();
    ca.flush(0).unwrap();
    let a_direct1 = a.done("direct", "write");
    let seen_by_b = cb.read(0, 0, MIB as usize).unwrap();
    eprintln!(
        "B direct writes {b_direct} ({granted_after:?} after the restart); A direct writes \
         {a_direct0} -> {a_direct1}; B reads its own data: {}",
        seen_by_b == b_data
    );
    assert!(
        !(b_direct >= 1.0 && a_direct1 > a_direct0),
        "host A wrote the LUN directly after the restarted map server had given the image's \
         write lease to host B ({granted_after:?} after the restart); B reads A's data: {}\n{}",
        seen_by_b == a_data,
        map.log()
    );
}
