//! tgtd, the userspace iSCSI target, on loopback: exports a block device (the loop LUN) as
//! LUN 1 of one target, optionally behind CHAP. Started for a test and stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::samba::free_port;

/// The IQN of every test target.
pub const TARGET: &str = "iqn.2026-11.io.twinpath.test:lun";

/// CHAP credentials of targets started with `chap`.
pub const CHAP_USER: &str = "vmhost";
pub const CHAP_PASSWORD: &str = "twinpath-chap-secret";

pub struct Tgtd {
    child: Option<Child>,
    /// tgtd's control port (`-C`), which tgtadm names to reach this instance.
    control: u32,
    pub port: u16,
    device: PathBuf,
    chap: bool,
    log: PathBuf,
}

fn next_control() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Distinct per test process and per target within it.
    100 + (std::process::id() % 500) * 20 + NEXT.fetch_add(1, Ordering::Relaxed) % 20
}

impl Tgtd {
    /// Starts tgtd exporting `device` as LUN 1 on a free loopback port.
    pub fn start(device: &Path, chap: bool, log_dir: &Path) -> Tgtd {
        let mut t = Tgtd {
            child: None,
            control: next_control(),
            port: free_port(),
            device: device.to_path_buf(),
            chap,
            log: log_dir.join("tgtd.log"),
        };
        t.run();
        t
    }

    /// `iscsi://` URL of the LUN (with the CHAP user when there is one).
    pub fn url(&self) -> String {
        let user = if self.chap {
            format!("{CHAP_USER}@")
        } else {
            String::new()
        };
        format!("iscsi://{user}127.0.0.1:{}/{TARGET}/1", self.port)
    }

    /// tgtadm on this instance, for the iSCSI driver's objects (targets, LUNs, accounts).
    fn adm(&self, args: &[&str]) -> Result<(), String> {
        self.tgtadm(&[&["--lld", "iscsi"], args].concat())
    }

    fn tgtadm(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control.to_string()])
            .args(args)
            .output()
            .map_err(|e| format!("tgtadm: {e} (apt install tgt)"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tgtadm {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn run(&mut self) {
        let log = std::fs::File::create(&self.log).expect("tgtd log");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &self.control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tgtd (apt install tgt)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let tid = ["--tid", "1"];
        loop {
            match self.adm(&[
                "--op", "new", "--mode", "target", "--tid", "1", "-T", TARGET,
            ]) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => panic!("tgtd did not come up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let dev = self.device.display().to_string();
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            tid[0],
            tid[1],
            "--lun",
            "1",
            "-b",
            &dev,
            "--bsoflags",
            "direct",
        ])
        .unwrap();
        self.adm(&[
            "--op",
            "bind",
            "--mode",
            "target",
            "--tid",
            "1",
            "-I",
            "127.0.0.1",
        ])
        .unwrap();
        if self.chap {
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                CHAP_USER,
                "--password",
                CHAP_PASSWORD,
            ])
            .unwrap();
            self.adm(&[
                "--op", "bind", "--mode", "account", "--tid", "1", "--user", CHAP_USER,
            ])
            .unwrap();
        }
    }

    /// Stops tgtd (it ignores SIGTERM: taken offline and deleted, then killed by PID if it
    /// lingers).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // System-wide requests take no driver (`--lld`): with one, tgtd refuses them.
        let _ = self.tgtadm(&[
            "--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
        ]);
        // tgtd refuses to delete the system while a target exists; force it (sessions too).
        let _ = self.adm(&[
            "--op", "delete", "--force", "--mode", "target", "--tid", "1",
        ]);
        if self.chap {
            let _ = self.adm(&["--op", "delete", "--mode", "account", "--user", CHAP_USER]);
        }
        if let Err(e) = self.tgtadm(&["--op", "delete", "--mode", "system"]) {
            eprintln!("tgtd did not stop on request ({e}); killing it");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops tgtd and starts it again on the same port with the same LUN.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.stop();
    }
}
