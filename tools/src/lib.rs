//! twinpath-tools: the programs that measure and show twinpath rather than test it, on the
//! harnesses of `twinpath-tests` (real smbd, tgtd, map server, loop LUNs, QEMU guests).
//!
//! - `bench-smb`, `bench-san`, `bench-map`: benchmark runners against their peers, writing
//!   their sections of docs/benchmarks.md (scripts/bench-*.sh);
//! - `guest-fio`: fio inside QEMU guests on twinpath disks and qemu-storage-daemon, with a
//!   report and a chart (scripts/guest-fio.sh);
//! - `demo-san`: the san part of scripts/demo.sh.

pub mod bench;
pub mod guestfio;
