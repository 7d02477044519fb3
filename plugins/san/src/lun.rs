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

/// Why a device is not the server's volume, or none is.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    /// Reading the device failed.
    #[error(transparent)]
    Read(#[from] twinpath_core::Error),
    #[error("{device} holds no xfs or ext4")]
    NoFilesystem { device: String },
    #[error("{device} holds {found}, the server's volume is {want}")]
    OtherFilesystem {
        device: String,
        found: String,
        want: String,
    },
    #[error("{device} is {size} bytes, the server's volume {want}")]
    OtherSize {
        device: String,
        size: u64,
        want: u64,
    },
    #[error("{device}: the session token is not on it (a copy of the volume?)")]
    NoToken { device: String },
    #[error("/sys/block: {0}")]
    Scan(#[source] std::io::Error),
    #[error("no local device holds the server's {fs_type} volume {uuid}")]
    NotFound { fs_type: String, uuid: String },
    #[error("several devices hold the server's volume: {}", .0.join(", "))]
    Several(Vec<String>),
}

/// Checks that `vol` is the volume `id` describes.
pub fn check(vol: &dyn Volume, id: &VolumeIdentity) -> Result<(), LunError> {
    let device = vol.describe();
    let head = vol.read_at(0, 4096)?;
    let Some(found) = VolumeId::parse(&head) else {
        return Err(LunError::NoFilesystem { device });
    };
    if found.fs_type.name() != id.fs_type || found.uuid_hex() != id.uuid {
        return Err(LunError::OtherFilesystem {
            device,
            found: format!("{} {}", found.fs_type.name(), found.uuid_hex()),
            want: format!("{} {}", id.fs_type, id.uuid),
        });
    }
    if vol.size() != id.size {
        return Err(LunError::OtherSize {
            device,
            size: vol.size(),
            want: id.size,
        });
    }
    let token = vol
        .read_at(id.token_offset, id.token_len as usize)
        .map_err(|e| e.within("token"))?;
    if hex::encode(Sha256::digest(&token)) == id.token_sha256 {
        Ok(())
    } else {
        Err(LunError::NoToken { device })
    }
}

/// Scans /sys/block for the one device that passes [`check`]. A device with holders (a
/// multipath or other device-mapper device built on it) is skipped in favour of the holder.
pub fn find(id: &VolumeIdentity) -> Result<BlockDevice, LunError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(LunError::Scan)?;
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
        0 => Err(LunError::NotFound {
            fs_type: id.fs_type.clone(),
            uuid: id.uuid.clone(),
        }),
        _ => Err(LunError::Several(
            found.iter().map(|d| d.describe()).collect(),
        )),
    }
}
