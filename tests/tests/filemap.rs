//! File maps on a real filesystem on a real (loop) block device: what FIEMAP reports is where
//! the bytes are, read back with O_DIRECT from the device the host would open.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use twinpath_filemap::{file_extents, read_direct, ExtentClass, FsType, VolumeId};
use twinpath_tests::lun::{Fs, LoopLun};
use twinpath_tests::pattern;

const MIB: u64 = 1 << 20;

fn maps_point_at_the_data(fs: Fs) {
    let lun = LoopLun::new(512 * MIB, fs);
    let path = lun.mount_point().join("vm.raw");
    let data = pattern(41, 8 * MIB as usize + 12288);
    let mut f = File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    // Not fsynced: FIEMAP_FLAG_SYNC must flush the delayed allocation itself.
    let extents = file_extents(&f).unwrap();
    assert!(!extents.is_empty());
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(lun.device())
        .unwrap();
    // The superblock read from the raw device names the filesystem blkid sees.
    let id = VolumeId::read(&dev).unwrap().expect("a filesystem");
    assert_eq!(
        id.fs_type,
        if fs == Fs::Xfs {
            FsType::Xfs
        } else {
            FsType::Ext4
        }
    );
    let blkid = std::process::Command::new("blkid")
        .args(["-s", "UUID", "-o", "value"])
        .arg(lun.device())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&blkid.stdout)
            .trim()
            .replace('-', ""),
        id.uuid_hex()
    );
    let mut covered = 0;
    // xfs preallocates speculatively past the end of file: unwritten extents there.
    for e in extents.iter().filter(|e| e.logical < data.len() as u64) {
        assert_eq!(e.class, ExtentClass::Written, "{fs:?}: {e:?}");
        let len = e.len.min(data.len() as u64 - e.logical) as usize;
        let on_device = read_direct(&dev, e.physical, e.len as usize).unwrap();
        assert_eq!(
            &on_device[..len],
            &data[e.logical as usize..e.logical as usize + len],
            "{fs:?}: extent {e:?}"
        );
        covered += len;
    }
    assert_eq!(covered, data.len(), "{fs:?}: {extents:?}");

    // Preallocated space is unwritten: granted as zeros, never for device writes.
    let pre = lun.mount_point().join("pre.raw");
    let f = File::create(&pre).unwrap();
    // SAFETY: fallocate on a file we own.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 4 * MIB as i64) };
    assert_eq!(r, 0);
    let extents = file_extents(&f).unwrap();
    assert!(
        !extents.is_empty() && extents.iter().all(|e| e.class == ExtentClass::Unwritten),
        "{fs:?}: {extents:?}"
    );
}

#[test]
fn xfs_maps_point_at_the_data() {
    maps_point_at_the_data(Fs::Xfs);
}

#[test]
fn ext4_maps_point_at_the_data() {
    maps_point_at_the_data(Fs::Ext4);
}
