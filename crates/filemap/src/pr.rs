//! SCSI-3 persistent reservations on a block device through the kernel's generic ioctls
//! (linux/pr.h; sd, NVMe and dm-multipath implement them, loop devices and virtio-blk do
//! not). Hosts register their key with these; a map server fencing on a block device holds
//! the reservation and preempts with them.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct pr_registration` of linux/pr.h.
#[repr(C)]
struct PrRegistration {
    old_key: u64,
    new_key: u64,
    flags: u32,
    pad: u32,
}

/// `struct pr_reservation`.
#[repr(C)]
struct PrReservation {
    key: u64,
    kind: u32,
    flags: u32,
}

/// `struct pr_preempt`: `old_key` is the caller's key, `new_key` the one preempted.
#[repr(C)]
struct PrPreempt {
    old_key: u64,
    new_key: u64,
    kind: u32,
    flags: u32,
}

/// `_IOW('p', nr, size)` as the kernel encodes it on this architecture.
const fn iow(nr: u64, size: usize) -> libc::c_ulong {
    const WRITE: u64 = if cfg!(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )) {
        4 << 29
    } else {
        1 << 30
    };
    (WRITE | ((size as u64) << 16) | ((b'p' as u64) << 8) | nr) as libc::c_ulong
}

const IOC_PR_REGISTER: libc::c_ulong = iow(200, size_of::<PrRegistration>());
const IOC_PR_RESERVE: libc::c_ulong = iow(201, size_of::<PrReservation>());
const IOC_PR_PREEMPT: libc::c_ulong = iow(203, size_of::<PrPreempt>());
const IOC_PR_PREEMPT_ABORT: libc::c_ulong = iow(204, size_of::<PrPreempt>());
/// Register whatever key the nexus had before.
const PR_FL_IGNORE_KEY: u32 = 1;
/// `PR_EXCLUSIVE_ACCESS_REG_ONLY` of `enum pr_type`: only registered initiators may read or
/// write (Write Exclusive would let a fenced host go on reading blocks given to another).
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u32 = 4;
/// The SAM status sd returns as the ioctl's value (every kernel version).
const RESERVATION_CONFLICT: i32 = 0x18;

#[derive(Debug, thiserror::Error)]
pub enum PrError {
    /// The device has no persistent reservations (a loop device, a virtual disk).
    #[error("the device has no persistent reservations")]
    Unsupported,
    /// The device refused the command as such (a field it does not support: PREEMPT AND
    /// ABORT on some targets, persistence through power loss on others).
    #[error("the device rejected the command (EINVAL)")]
    Rejected,
    /// RESERVATION CONFLICT: someone else holds the reservation, or the key named is not
    /// registered.
    #[error("reservation conflict")]
    Conflict,
    #[error("{0}")]
    Io(std::io::Error),
}

/// Runs one PR ioctl with `arg` on `dev`.
fn pr_ioctl<T>(dev: &File, request: libc::c_ulong, arg: &T) -> Result<(), PrError> {
    // SAFETY: every PR ioctl only reads the struct of linux/pr.h it is defined with, which is
    // what `arg` is at each call site below; `dev` is an open descriptor.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), request, arg as *const T) };
    match r {
        0 => Ok(()),
        RESERVATION_CONFLICT => Err(PrError::Conflict),
        // Other SCSI or NVMe statuses (older kernels pass them through) and path failures.
        r if r > 0 => Err(PrError::Io(std::io::Error::other(format!(
            "device status {r:#x}"
        )))),
        _ => {
            let e = std::io::Error::last_os_error();
            Err(match e.raw_os_error() {
                Some(libc::ENOTTY | libc::EOPNOTSUPP) => PrError::Unsupported,
                Some(libc::EINVAL) => PrError::Rejected,
                _ => PrError::Io(e),
            })
        }
    }
}

/// Registers `key` for this host's path to `dev`, replacing whatever it had registered.
pub fn register(dev: &File, key: u64) -> Result<(), PrError> {
    let reg = PrRegistration {
        old_key: 0,
        new_key: key,
        flags: PR_FL_IGNORE_KEY,
        pad: 0,
    };
    pr_ioctl(dev, IOC_PR_REGISTER, &reg)
}

/// Takes the Exclusive Access - Registrants Only reservation under `key` (registered).
pub fn reserve(dev: &File, key: u64) -> Result<(), PrError> {
    let res = PrReservation {
        key,
        kind: EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        flags: 0,
    };
    pr_ioctl(dev, IOC_PR_RESERVE, &res)
}

/// Removes `victim`'s registrations (and takes the reservation over where `victim` held it)
/// as the holder of `key`; with `abort`, the commands `victim` has in the device are
/// aborted too (PREEMPT AND ABORT).
pub fn preempt(dev: &File, key: u64, victim: u64, abort: bool) -> Result<(), PrError> {
    let p = PrPreempt {
        old_key: key,
        new_key: victim,
        kind: EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        flags: 0,
    };
    let request = if abort {
        IOC_PR_PREEMPT_ABORT
    } else {
        IOC_PR_PREEMPT
    };
    pr_ioctl(dev, request, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernels() {
        // As linux/pr.h defines them on x86_64 (checked with a C program against the
        // machine's header).
        if cfg!(target_arch = "x86_64") {
            assert_eq!(IOC_PR_REGISTER, 0x4018_70c8);
            assert_eq!(IOC_PR_RESERVE, 0x4010_70c9);
            assert_eq!(IOC_PR_PREEMPT, 0x4018_70cb);
            assert_eq!(IOC_PR_PREEMPT_ABORT, 0x4018_70cc);
        }
    }

    #[test]
    fn a_file_has_no_reservations() {
        let f = File::open("/proc/self/exe").unwrap();
        assert!(matches!(register(&f, 1), Err(PrError::Unsupported)));
        assert!(matches!(reserve(&f, 1), Err(PrError::Unsupported)));
        assert!(matches!(preempt(&f, 2, 1, true), Err(PrError::Unsupported)));
    }
}
