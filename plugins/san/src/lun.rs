//! Finding and checking the shared volume the file server's filesystem lives on.
//!
//! A volume must carry the filesystem the map server named (magic and UUID from its
//! superblock), have the same size, and hold this session's token at the offset the server
//! gave, with the same SHA-256: a clone or snapshot of the LUN has the UUID but not the token.

use std::path::Path;

use sha2::{Digest, Sha256};
use twinpath_filemap::VolumeId;
use twinpath_mapproto::VolumeIdentity;

use crate::volume::{BlockDevice, Volume};

/// Checks that `vol` is the volume `id` describes.
pub fn check(vol: &dyn Volume, id: &VolumeIdentity) -> Result<(), String> {
    let name = vol.describe();
    let head = vol.read_at(0, 4096)?;
    let found = VolumeId::parse(&head).ok_or_else(|| format!("{name} holds no xfs or ext4"))?;
    if found.fs_type.name() != id.fs_type || found.uuid_hex() != id.uuid {
        return Err(format!(
            "{name} holds {} {}, the server's volume is {} {}",
            found.fs_type.name(),
            found.uuid_hex(),
            id.fs_type,
            id.uuid
        ));
    }
    if vol.size() != id.size {
        return Err(format!(
            "{name} is {} bytes, the server's volume {}",
            vol.size(),
            id.size
        ));
    }
    let token = vol
        .read_at(id.token_offset, id.token_len as usize)
        .map_err(|e| format!("token: {e}"))?;
    if hex::encode(Sha256::digest(&token)) == id.token_sha256 {
        Ok(())
    } else {
        Err(format!(
            "{name}: the session token is not on it (a copy of the volume?)"
        ))
    }
}

/// Scans /sys/block for the one device that passes [`check`]. A device with holders (a
/// multipath or other device-mapper device built on it) is skipped in favour of the holder.
pub fn find(id: &VolumeIdentity) -> Result<BlockDevice, String> {
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
        let Ok(dev) = BlockDevice::open(&Path::new("/dev").join(&name)) else {
            continue;
        };
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
                .map(|d| d.describe())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}
