//! The lease record: what a map server that starts needs to know about the leases of the run
//! before it. A server that crashed, or was restarted while a partitioned host had not
//! noticed, starts with an empty lease table while hosts may still write under leases of the
//! earlier run; granting at once would give their blocks to a second writer. Like an NFS
//! server's grace period, the new run then answers no maps until those leases have run out.
//!
//! The record is a file in the export's root, on the shared volume itself (it goes where
//! the volume goes): `outstanding` from the first grant of a run on, replaced by
//! `until <unix seconds>` (the hold from the moment of a clean stop, when hosts were still
//! connected) or `none` (nothing granted, or everything returned) when the run stops cleanly.
//! A run that never wrote it, or a missing file, means no earlier leases.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{io, Result};

/// Name of the record in the export's root.
pub const RECORD_FILE: &str = ".twinpath-leases";

pub struct LeaseRecord {
    path: PathBuf,
}

impl LeaseRecord {
    pub fn new(export_root: &Path) -> LeaseRecord {
        LeaseRecord {
            path: export_root.join(RECORD_FILE),
        }
    }

    /// How long this run must answer no maps: leases of an earlier run may be in use that
    /// long (at most `hold`, the longest a lease outlives its host's last renewal).
    pub fn grace(&self, hold: Duration) -> Duration {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Duration::ZERO,
            Err(e) => {
                tracing::warn!(
                    "{}: {e}; assuming leases are outstanding",
                    self.path.display()
                );
                return hold;
            }
        };
        match text.split_whitespace().collect::<Vec<_>>()[..] {
            ["none"] => Duration::ZERO,
            ["until", secs] => match secs.parse::<u64>() {
                // A clock that went back counts as the whole hold, never more.
                Ok(secs) => (UNIX_EPOCH + Duration::from_secs(secs))
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(hold),
                Err(_) => hold,
            },
            _ => hold,
        }
    }

    /// This run has granted (or is about to grant) a lease: a crash from now on leaves it
    /// for the next run to wait out. Durable before the grant goes out.
    pub fn outstanding(&self) -> Result<()> {
        self.write("outstanding")
    }

    /// A clean stop: leases still held (`held`) may be used for `hold` from now.
    pub fn stopped(&self, held: bool, hold: Duration) -> Result<()> {
        if !held {
            return self.write("none");
        }
        let until = SystemTime::now() + hold + Duration::from_secs(1);
        let secs = until
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.write(&format!("until {secs}"))
    }

    /// Creates the record (`none`) if there is none, so that it has an inode to keep from
    /// hosts' maps; returns that inode.
    pub fn create(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        if !self.path.exists() {
            self.write("none")?;
        }
        let m = std::fs::metadata(&self.path).map_err(io(self.path.display()))?;
        Ok((m.dev(), m.ino()))
    }

    /// Rewrites the record in place (same inode, one sector: a crash leaves the old or the
    /// new text), durably.
    fn write(&self, text: &str) -> Result<()> {
        use std::io::Write;
        let at = |e| io(self.path.display())(e);
        let mut padded = format!("{text}\n").into_bytes();
        padded.resize(64, b' ');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(at)?;
        f.write_all(&padded).map_err(at)?;
        f.sync_all().map_err(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_or_a_stop_with_leases_held_means_a_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let r = LeaseRecord::new(dir.path());
        let hold = Duration::from_secs(34);
        assert_eq!(r.grace(hold), Duration::ZERO, "first run");
        r.outstanding().unwrap();
        assert_eq!(r.grace(hold), hold, "after a crash");
        r.stopped(true, Duration::from_secs(10)).unwrap();
        let g = r.grace(hold);
        assert!(
            g > Duration::from_secs(9) && g <= Duration::from_secs(11),
            "{g:?}"
        );
        r.stopped(false, hold).unwrap();
        assert_eq!(r.grace(hold), Duration::ZERO, "clean stop, nothing held");
        std::fs::write(dir.path().join(RECORD_FILE), "garbage").unwrap();
        assert_eq!(r.grace(hold), hold);
        std::fs::write(dir.path().join(RECORD_FILE), "until 99999999999").unwrap();
        assert_eq!(r.grace(hold), hold, "never more than the hold");
    }
}
