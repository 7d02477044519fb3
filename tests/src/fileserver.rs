//! A file server on this machine, as the direct path needs one: a loop LUN with a filesystem,
//! optionally a private smbd sharing its mount, and `twinpath map-server` over it with a key
//! file. Used by the map-server and san tests, the san benchmark and the demo.

use std::path::PathBuf;

use crate::lun::{Fs, LoopLun};
use crate::samba::{free_port, Samba, PASSWORD, SHARE, USER};
use crate::{scratch, Daemon};

/// The pre-shared key of the test map servers.
pub const MAP_KEY: &str = "twinpath-test-map-key-0123456789";

pub struct FileServer {
    pub lun: LoopLun,
    pub smb: Option<Samba>,
    /// The running map server; take it to stop it, [`FileServer::restart_map`] to start it again.
    pub map: Option<Daemon>,
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
        std::fs::write(dir.path().join("map.key"), format!("{MAP_KEY}\n")).unwrap();
        std::fs::write(dir.path().join("smb.pass"), PASSWORD).unwrap();
        let map_addr = format!("127.0.0.1:{}", free_port());
        let map_config = format!(
            "listen: {map_addr}\nexport: {}\nkey_file: {}\n{map_extra}",
            lun.mount_point().display(),
            dir.path().join("map.key").display()
        );
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

    pub fn samba(&self) -> &Samba {
        self.smb.as_ref().expect("started with smb")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("map.key")
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
                "{{type: san, {smb}, map_server: \"{}\", map_key_file: {}, lun: {lun}}}",
                self.map_addr,
                self.key_file().display()
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
