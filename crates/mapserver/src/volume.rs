//! The volume the export lives on: its device, identity, and this session's token file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use twinpath_filemap::{file_extents, ExtentClass, VolumeId};
use twinpath_mapproto::VolumeIdentity;

use crate::error::{io, Error, Result};
use crate::export::Inode;

/// Name of the token file in the export's root.
pub const TOKEN_FILE: &str = ".twinpath-token";
const TOKEN_LEN: usize = 4096;

/// The block device holding the filesystem `path` is on (from its st_dev, via sysfs).
pub fn device_of(path: &Path) -> Result<PathBuf> {
    let dev = std::fs::metadata(path).map_err(io(path.display()))?.dev();
    // SAFETY: major/minor only split the number.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let uevent = format!("/sys/dev/block/{major}:{minor}/uevent");
    let text = std::fs::read_to_string(&uevent).map_err(|e| {
        Error::Unfit(format!(
            "{} is not on a block device ({uevent}: {e})",
            path.display()
        ))
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| Error::Unfit(format!("{uevent} names no device")))
}

/// Identifies the volume under `export` and writes a fresh token file for this session.
/// Returns the identity and the token file's inode (never to be mapped for a host).
pub fn identify(export: &Path) -> Result<(VolumeIdentity, Inode)> {
    let device = device_of(export)?;
    let dev = File::open(&device).map_err(io(device.display()))?;
    let id = VolumeId::read(&dev)
        .map_err(io(device.display()))?
        .ok_or_else(|| Error::Unfit(format!("{} holds neither xfs nor ext4", device.display())))?;
    let size = twinpath_blockio::device_size(&dev)
        .map_err(io(format_args!("{}: size", device.display())))?;

    let mut token = vec![0u8; TOKEN_LEN];
    getrandom::fill(&mut token).map_err(|e| Error::Unfit(format!("random token: {e}")))?;
    let path = export.join(TOKEN_FILE);
    let mut f = File::create(&path).map_err(io(path.display()))?;
    f.write_all(&token)
        .and_then(|()| f.sync_all())
        .map_err(io(path.display()))?;
    let extents = file_extents(&f).map_err(io(format_args!("{}: FIEMAP", path.display())))?;
    let first = extents
        .first()
        .filter(|e| e.logical == 0 && e.len >= TOKEN_LEN as u64 && e.class == ExtentClass::Written)
        .ok_or_else(|| {
            Error::Unfit(format!(
                "{}: token not in one written extent: {extents:?}",
                path.display()
            ))
        })?;
    tracing::info!(
        device = %device.display(),
        fs = id.fs_type.name(),
        uuid = id.uuid_hex(),
        size,
        "volume identified"
    );
    let inode = Inode::of(&f).map_err(io(path.display()))?;
    Ok((
        VolumeIdentity {
            fs_type: id.fs_type.name().to_owned(),
            uuid: id.uuid_hex(),
            size,
            token_offset: first.physical,
            token_len: TOKEN_LEN as u64,
            token_sha256: hex::encode(Sha256::digest(&token)),
        },
        inode,
    ))
}
