//! A "shared LUN" on one machine: a loop device over a file on tmpfs, with a real filesystem
//! (xfs or ext4) mounted as the file server's volume. The server side uses the mount; the
//! host side opens the loop device. Needs root, losetup, mkfs.xfs/mkfs.ext4.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Xfs,
    Ext4,
}

pub struct LoopLun {
    dir: tempfile::TempDir,
    device: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl LoopLun {
    /// A `size`-byte loop device holding a fresh `fs`, mounted.
    pub fn new(size: u64, fs: Fs) -> LoopLun {
        let dir = tempfile::Builder::new()
            .prefix("twinpath-lun-")
            .tempdir_in("/dev/shm")
            .expect("lun dir");
        let backing = dir.path().join("lun.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let device = PathBuf::from(run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)));
        let mut lun = LoopLun {
            dir,
            device,
            mounted: false,
        };
        match fs {
            Fs::Xfs => run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&lun.device)),
            Fs::Ext4 => run(Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&lun.device)),
        };
        std::fs::create_dir(lun.mount_point()).expect("mount point");
        run(Command::new("mount")
            .arg(&lun.device)
            .arg(lun.mount_point()));
        lun.mounted = true;
        lun
    }

    /// The loop device: what the VM host opens as its LUN.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Where the server's filesystem is mounted.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            run(Command::new("umount").arg(self.mount_point()));
            self.mounted = false;
        }
    }
}

impl Drop for LoopLun {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mount_point()).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}
