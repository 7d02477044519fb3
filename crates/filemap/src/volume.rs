//! Recognising a filesystem volume from its raw device: type and UUID from the superblock,
//! read with O_DIRECT so a host never trusts a stale page cache of a shared LUN.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use twinpath_blockio::AlignedBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Xfs,
    Ext4,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// A filesystem's type and UUID, as its superblock stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeId {
    pub fs_type: FsType,
    pub uuid: [u8; 16],
}

impl VolumeId {
    /// The UUID as 32 lowercase hex digits.
    pub fn uuid_hex(&self) -> String {
        self.uuid.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads the superblock of the device or image open as `dev`; `None` when it holds
    /// neither xfs nor ext4.
    pub fn read(dev: &File) -> io::Result<Option<VolumeId>> {
        let head = read_direct(dev, 0, 4096)?;
        Ok(Self::parse(&head))
    }

    /// The filesystem whose first 4096 bytes are `head`, if xfs or ext4.
    /// xfs: magic `XFSB` at 0, UUID at 32..48. ext2/3/4: magic 0xEF53 at 1080, UUID at
    /// 1128..1144 (the superblock starts at 1024).
    pub fn parse(head: &[u8]) -> Option<VolumeId> {
        let uuid = |at: usize| -> [u8; 16] { head[at..at + 16].try_into().unwrap() };
        if head.len() >= 48 && &head[..4] == b"XFSB" {
            return Some(VolumeId {
                fs_type: FsType::Xfs,
                uuid: uuid(32),
            });
        }
        if head.len() >= 1144 && head[1080..1082] == [0x53, 0xef] {
            return Some(VolumeId {
                fs_type: FsType::Ext4,
                uuid: uuid(1128),
            });
        }
        None
    }
}

/// Reads `len` bytes at `offset` with a 4096-aligned bounce buffer, as O_DIRECT demands
/// (the caller opened `dev` with O_DIRECT, or not: both work).
pub fn read_direct(dev: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    const ALIGN: usize = 4096;
    let start = offset - offset % ALIGN as u64;
    let span = (offset - start) as usize + len;
    let padded = span.div_ceil(ALIGN) * ALIGN;
    let mut buf = AlignedBuf::zeroed(padded, ALIGN)?;
    let bytes = buf.as_mut_slice();
    let mut got = 0;
    while got < padded {
        match dev.read_at(&mut bytes[got..padded], start + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    let from = (offset - start) as usize;
    if got < from + len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("device ends before {len} bytes at offset {offset}"),
        ));
    }
    Ok(bytes[from..from + len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblocks_are_recognised() {
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&[7; 16]);
        assert_eq!(
            VolumeId::parse(&xfs),
            Some(VolumeId {
                fs_type: FsType::Xfs,
                uuid: [7; 16]
            })
        );
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        ext[1128..1144].copy_from_slice(&[9; 16]);
        let id = VolumeId::parse(&ext).unwrap();
        assert_eq!(id.fs_type, FsType::Ext4);
        assert_eq!(id.uuid_hex(), "09".repeat(16));
        assert_eq!(VolumeId::parse(&[0u8; 4096]), None);
    }
}
