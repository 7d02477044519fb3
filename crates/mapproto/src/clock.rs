//! The clock leases are measured on: CLOCK_BOOTTIME, which, unlike CLOCK_MONOTONIC (Rust's
//! `Instant`), goes on counting while the host is suspended. A host that wakes from a
//! suspend or a long freeze must see that its leases ran out meanwhile.

use std::time::Duration;

/// Time since boot.
pub fn now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_BOOTTIME exists on every
    // Linux since 2.6.39.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_BOOTTIME)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
