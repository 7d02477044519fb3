//! Finding the local block device that is the file server's volume.
//!
//! A candidate must carry the filesystem the map server named (magic and UUID from its
//! superblock), have the same size, and hold this session's token at the offset the server
//! gave, with the same SHA-256: a clone or snapshot of the LUN has the UUID but not the token.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use twinpath_filemap::{read_direct, VolumeId};
use twinpath_mapproto::VolumeIdentity;

/// Checks that `device` is the volume `id` describes.
pub fn check(device: &Path, id: &VolumeIdentity) -> Result<(), String> {
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| format!("{}: {e}", device.display()))?;
    let vol = VolumeId::read(&dev)
        .map_err(|e| format!("{}: {e}", device.display()))?
        .ok_or_else(|| format!("{} holds no xfs or ext4", device.display()))?;
    if vol.fs_type.name() != id.fs_type || vol.uuid_hex() != id.uuid {
        return Err(format!(
            "{} holds {} {}, the server's volume is {} {}",
            device.display(),
            vol.fs_type.name(),
            vol.uuid_hex(),
            id.fs_type,
            id.uuid
        ));
    }
    let size = twinpath_core::blockdev::size(&dev)
        .map_err(|e| format!("{}: size: {e}", device.display()))?;
    if size != id.size {
        return Err(format!(
            "{} is {size} bytes, the server's volume {}",
            device.display(),
            id.size
        ));
    }
    token_matches(&dev, id).map_err(|e| format!("{}: {e}", device.display()))
}

fn token_matches(dev: &File, id: &VolumeIdentity) -> Result<(), String> {
    let token = read_direct(dev, id.token_offset, id.token_len as usize)
        .map_err(|e| format!("token: {e}"))?;
    if hex::encode(Sha256::digest(&token)) == id.token_sha256 {
        Ok(())
    } else {
        Err("the session token is not on it (a copy of the volume?)".into())
    }
}

/// Scans /sys/block for the one device that passes [`check`]. A device with holders (a
/// multipath or other device-mapper device built on it) is skipped in favour of the holder.
pub fn find(id: &VolumeIdentity) -> Result<PathBuf, String> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let holders = std::fs::read_dir(entry.path().join("holders"))
            .map(|d| d.count())
            .unwrap_or(0);
        if holders > 0 {
            continue;
        }
        let dev = Path::new("/dev").join(&name);
        if check(&dev, id).is_ok() {
            found.push(dev);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "no local device holds the server's {} volume {}",
            id.fs_type, id.uuid
        )),
        _ => Err(format!(
            "several devices hold the server's volume: {}",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
