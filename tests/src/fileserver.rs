//! A file server on this machine, as the direct path needs one: a loop LUN with a filesystem,
//! optionally a private smbd sharing its mount, and `twinpath map-server` over it with a key
//! file. Used by the map-server and san tests, the san benchmark and the demo.

use std::path::{Path, PathBuf};

use crate::lun::{Fs, LoopLun};
use crate::samba::{free_port, Samba, PASSWORD, SHARE, USER};
use crate::{scratch, Daemon};

/// The hosts every test map server knows, each with its own key ([`host_key`]). San disks
/// started by the tests are `test-host`; tests acting as other hosts use the rest.
pub const HOSTS: [&str; 4] = ["test-host", "host-a", "host-b", "host-c"];

/// The key of test host `name` (what its key file holds).
pub fn host_key(name: &str) -> twinpath_mapproto::Key {
    twinpath_mapproto::Key::new(key_text(name).into_bytes()).expect("a long key")
}

fn key_text(name: &str) -> String {
    format!("twinpath-test-map-key-{name}-0123456789")
}

fn map_config(
    keys: &Path,
    addr: &str,
    export: &Path,
    host_paths: &[(&str, &str)],
    extra: &str,
) -> String {
    let mut hosts = String::from("hosts:\n");
    for h in HOSTS {
        let key = keys.join(format!("{h}.key"));
        let paths = host_paths
            .iter()
            .find(|(name, _)| *name == h)
            .map(|(_, p)| format!(", paths: {p}"))
            .unwrap_or_default();
        hosts += &format!("  - {{name: {h}, key_file: {}{paths}}}\n", key.display());
    }
    format!(
        "listen: {addr}\nexport: {}\n{hosts}{extra}",
        export.display()
    )
}

/// Fields drop in order: the map server and smbd stop before the LUN is unmounted.
pub struct FileServer {
    /// The running map server; take it to stop it, [`FileServer::restart_map`] to start it again.
    pub map: Option<Daemon>,
    pub smb: Option<Samba>,
    pub lun: LoopLun,
    pub map_addr: String,
    /// Scratch space for the host side: key and password files, sockets, logs.
    pub dir: tempfile::TempDir,
    map_config: String,
}

impl FileServer {
    /// A `lun_size`-byte LUN holding `fs`, shared by smbd when `smb`, and a map server on it;
    /// `map_extra` adds lines to the map server's config.
    pub fn start(lun_size: u64, fs: Fs, smb: bool, map_extra: &str) -> FileServer {
        let lun = LoopLun::new(lun_size, fs);
        let smb = smb.then(|| Samba::start_sharing(Some(&lun.mount_point())));
        let dir = scratch();
        for h in HOSTS {
            crate::write_secret(
                &dir.path().join(format!("{h}.key")),
                &format!("{}\n", key_text(h)),
            );
        }
        crate::write_secret(&dir.path().join("smb.pass"), PASSWORD);
        let map_addr = format!("127.0.0.1:{}", free_port());
        let map_config = map_config(dir.path(), &map_addr, &lun.mount_point(), &[], map_extra);
        let map = Daemon::start_map_server(dir.path(), &map_config);
        FileServer {
            lun,
            smb,
            map: Some(map),
            map_addr,
            dir,
            map_config,
        }
    }

    /// A map server config on this server's address for `export`, with every test host;
    /// `host_paths` restricts hosts to prefixes, e.g. `("host-c", "[images/vm1/]")`.
    pub fn map_config(&self, export: &Path, host_paths: &[(&str, &str)], extra: &str) -> String {
        map_config(self.dir.path(), &self.map_addr, export, host_paths, extra)
    }

    pub fn samba(&self) -> &Samba {
        self.smb.as_ref().expect("started with smb")
    }

    /// The key file of `test-host`, the host the tests' san disks say they are.
    pub fn key_file(&self) -> PathBuf {
        self.key_file_of(HOSTS[0])
    }

    pub fn key_file_of(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("{host}.key"))
    }

    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("smb.pass")
    }

    /// A disk's `backend:` mapping (flow style) for `image` on this server: `san` on `lun`
    /// when given, else `smb`.
    pub fn backend_yaml(&self, image: &str, lun: Option<&str>) -> String {
        let smb = format!(
            "server: \"{}\", share: {SHARE}, path: {image}, user: {USER}, password_file: {}",
            self.samba().addr(),
            self.password_file().display()
        );
        match lun {
            Some(lun) => format!(
                "{{type: san, {smb}, map_server: \"{}\", map_key_file: {}, lun: {lun}, host_name: {}}}",
                self.map_addr,
                self.key_file().display(),
                HOSTS[0]
            ),
            None => format!("{{type: smb, {smb}}}"),
        }
    }

    /// Starts the map server again, same address and config, after it was taken and stopped.
    pub fn restart_map(&mut self) {
        assert!(self.map.is_none(), "map server running");
        self.map = Some(Daemon::start_map_server(self.dir.path(), &self.map_config));
    }
}
