//! FIEMAP on the file server, and what each extent may be used for.

use std::fs::File;

use fiemap::{Fiemap, FiemapExtentFlags, FiemapFlags};

/// One extent of a file as the filesystem reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub class: ExtentClass,
}

/// What a host may do with an extent directly on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentClass {
    /// Data at `physical`: may be read and written on the device.
    Written,
    /// Allocated but never written: reads as zeros. A device write here stays invisible to
    /// the filesystem (the extent stays unwritten), so it is granted for reading only, as
    /// zeros, until the server has written it through the file.
    Unwritten,
    /// Location pending, unknown, shared with another file, encoded, inline or unaligned:
    /// never used directly.
    Refused,
}

impl ExtentClass {
    fn of(flags: FiemapExtentFlags) -> ExtentClass {
        let refused = FiemapExtentFlags::UNKNOWN
            | FiemapExtentFlags::DELALLOC
            | FiemapExtentFlags::ENCODED
            | FiemapExtentFlags::DATA_ENCRYPTED
            | FiemapExtentFlags::NOT_ALIGNED
            | FiemapExtentFlags::DATA_INLINE
            | FiemapExtentFlags::DATA_TAIL
            | FiemapExtentFlags::SHARED;
        if flags.intersects(refused) {
            ExtentClass::Refused
        } else if flags.contains(FiemapExtentFlags::UNWRITTEN) {
            ExtentClass::Unwritten
        } else {
            ExtentClass::Written
        }
    }
}

/// The extents of `file`, in logical order, after the kernel synced its dirty data
/// (FIEMAP_FLAG_SYNC: without it, delayed allocations show up as DELALLOC at physical 0).
pub fn file_extents(file: &File) -> std::io::Result<Vec<FileExtent>> {
    Fiemap::with_flags(file, FiemapFlags::SYNC)
        .map(|e| {
            e.map(|e| FileExtent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                len: e.fe_length,
                class: ExtentClass::of(e.fe_flags),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_decide_the_class() {
        assert_eq!(
            ExtentClass::of(FiemapExtentFlags::LAST),
            ExtentClass::Written
        );
        assert_eq!(
            ExtentClass::of(FiemapExtentFlags::UNWRITTEN | FiemapExtentFlags::LAST),
            ExtentClass::Unwritten
        );
        for bad in [
            FiemapExtentFlags::UNKNOWN,
            FiemapExtentFlags::DELALLOC | FiemapExtentFlags::UNKNOWN,
            FiemapExtentFlags::SHARED,
            FiemapExtentFlags::ENCODED,
            FiemapExtentFlags::DATA_INLINE | FiemapExtentFlags::NOT_ALIGNED,
            FiemapExtentFlags::UNWRITTEN | FiemapExtentFlags::SHARED,
        ] {
            assert_eq!(ExtentClass::of(bad), ExtentClass::Refused, "{bad:?}");
        }
    }
}
