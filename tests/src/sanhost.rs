//! A host daemon serving one san disk, and what tests ask of the LUN under it: extents,
//! XFS flags, persistent reservation keys.

use std::path::{Path, PathBuf};

use twinpath_filemap::file_extents;

use crate::fileserver::FileServer;
use crate::iscsi::Tgtd;
use crate::relay::HalfCutRelay;
use crate::samba::free_port;
use crate::{sample, scrape, Client, ClientOptions, Daemon};

/// How the host reaches the LUN.
#[derive(Clone, Copy)]
pub enum Lun<'a> {
    /// The loop device itself.
    Device,
    /// Through a tgtd of the host's own on loopback, with the userspace initiator.
    Iscsi,
    /// Through this tgtd.
    Target(&'a Tgtd),
}

/// A host daemon serving one san disk `vm` on `image`, with `extra` keys in its backend,
/// its map server reached at `map_addr`, and metrics on a free port.
pub struct Host {
    pub daemon: Daemon,
    pub sock: PathBuf,
    pub metrics: u16,
    _target: Option<Tgtd>,
}

/// Stops `fs`'s map server and starts one with `lease_time` that fences on `fence_url` (a
/// tgtd's URL, or a relay's in front of it); waits until it holds the reservation. Returns it
/// and its config.
pub fn fencing_map_server(
    fs: &mut FileServer,
    fence_url: &str,
    lease_time: &str,
) -> (Daemon, String) {
    if let Some(map) = fs.map.take() {
        assert!(map.stop().success());
    }
    let config = fs.map_config(
        &fs.lun.mount_point(),
        &[],
        &format!("lease_time: {lease_time}\nfence:\n  lun: \"{fence_url}\"\n"),
    );
    let mut map = Daemon::start_map_server(fs.dir.path(), &config);
    map.wait_for_log("fencing with SCSI-3", std::time::Duration::from_secs(5));
    (map, config)
}

impl Host {
    /// `test-host` serving `vm.raw`, its map connection through a relay that can be cut on
    /// the server's side only (the host hears nothing: a partition).
    pub fn partitionable(fs: &FileServer, lun: Lun) -> (Host, HalfCutRelay) {
        let relay = HalfCutRelay::start(fs.map_addr.parse().unwrap());
        let host = Host::start_as(
            fs,
            "test-host",
            lun,
            "vm.raw",
            &relay.addr(),
            "map_timeout: 1s",
        );
        (host, relay)
    }

    pub fn start(fs: &FileServer, image: &str, map_addr: &str, extra: &str) -> Host {
        Host::start_on(fs, Lun::Device, image, map_addr, extra)
    }

    pub fn start_on(fs: &FileServer, lun: Lun, image: &str, map_addr: &str, extra: &str) -> Host {
        Host::start_as(fs, "test-host", lun, image, map_addr, extra)
    }

    /// As test host `name` (its own key file), in a directory of its own.
    pub fn start_as(
        fs: &FileServer,
        name: &str,
        lun: Lun,
        image: &str,
        map_addr: &str,
        extra: &str,
    ) -> Host {
        let dir = fs.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vm.sock");
        let target = matches!(lun, Lun::Iscsi).then(|| Tgtd::start(fs.lun.device(), false, &dir));
        let lun = match (&target, lun) {
            (Some(t), _) | (None, Lun::Target(t)) => format!("\"{}\"", t.url()),
            _ => fs.lun.device().display().to_string(),
        };
        let backend = fs
            .backend_yaml(image, Some(&lun))
            .replace(&fs.map_addr, map_addr)
            .replace("host_name: test-host", &format!("host_name: {name}"))
            .replace(
                &fs.key_file().display().to_string(),
                &fs.key_file_of(name).display().to_string(),
            )
            .replace("}", &format!(", {extra}}}"));
        let metrics = free_port();
        // The hosts of these tests write one image together or take it over from a frozen
        // host that still has it open: a cluster coordinating itself, so without share modes.
        let daemon = Daemon::start(
            &dir,
            &format!(
                "disks:\n  - name: vm\n    socket: {}\n    lock: false\n    backend: {backend}\nmetrics:\n  listen: 127.0.0.1:{metrics}\n",
                sock.display()
            ),
        );
        Host {
            daemon,
            sock,
            metrics,
            _target: target,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.sock, &ClientOptions::default()).unwrap()
    }

    /// Requests of `op` done on `path` (`direct` or `network`) so far.
    pub fn done(&self, path: &str, op: &str) -> f64 {
        sample(
            &scrape(self.metrics),
            &format!("twinpath_path_requests_total{{disk=\"vm\",path=\"{path}\",op=\"{op}\"}}"),
        )
    }
}

/// Byte ranges `(physical, len)` on the LUN of the bytes of `path` from file offset `from`.
pub fn extents(path: &Path, from: u64) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    file_extents(&f)
        .unwrap()
        .iter()
        .filter(|e| e.logical + e.len > from)
        .map(|e| {
            let skip = from.saturating_sub(e.logical);
            (e.physical + skip, e.len - skip)
        })
        .collect()
}

/// Bytes two lists of ranges have in common.
pub fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let mut n = 0;
    for &(x, xl) in a {
        for &(y, yl) in b {
            n += (x + xl).min(y + yl).saturating_sub(x.max(y));
        }
    }
    n
}

/// `xfs_io -c "lsattr -v"` flags of `path`.
pub fn xflags(path: &Path) -> String {
    let out = std::process::Command::new("xfs_io")
        .args(["-r", "-c", "lsattr -v"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The keys registered on the LUN behind `target`, read by an initiator of the test's own.
pub fn registered(target: &Tgtd) -> Vec<u64> {
    let url = twinpath_iscsi::IscsiUrl::parse(&target.url()).unwrap();
    let s =
        twinpath_iscsi::Session::connect(&url, None, "iqn.2026-11.io.twinpath:observer").unwrap();
    futures::executor::block_on(s.pr_read_keys()).unwrap()
}
