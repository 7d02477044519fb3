//! Fuzzes the check of a map server's grant (trusted for nothing) and what the host does
//! with it: the pieces of a direct I/O and the guard on device ranges.
//! Input: [device size u32, in MiB-ish units][span count][spans: logical u16, len u8,
//! kind+access u8, physical u16 (all in sectors)][queries: offset u16, len u8, write u8].
//! Invariants: every device piece of a resolved I/O lies inside the device and passes the
//! guard; a write never resolves to zeros; pieces add up to the request; anything the guard
//! lets through is covered by spans granting that access.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinpath_filemap::{Access, Grant, Piece, Span, SpanKind};

const SECTOR: u64 = 512;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let device_size = u64::from(u32::from_le_bytes(data[0..4].try_into().unwrap())) * SECTOR;
    let count = usize::from(data[4] % 32);
    let mut rest = &data[5..];
    let mut spans = Vec::new();
    for _ in 0..count {
        if rest.len() < 6 {
            break;
        }
        let logical = u64::from(u16::from_le_bytes([rest[0], rest[1]])) * SECTOR;
        // Mostly whole sectors, sometimes not.
        let unit = if rest[3] & 0x80 != 0 { 1 } else { SECTOR };
        let len = u64::from(rest[2]) * unit;
        let physical = u64::from(u16::from_le_bytes([rest[4], rest[5]])) * unit;
        let kind = if rest[3] & 1 != 0 {
            SpanKind::Zero
        } else {
            SpanKind::Data { physical }
        };
        let access = if rest[3] & 2 != 0 {
            Access::ReadWrite
        } else {
            Access::Read
        };
        spans.push(Span {
            logical,
            len,
            kind,
            access,
        });
        rest = &rest[6..];
    }
    let Ok(grant) = Grant::new(spans.clone(), device_size) else {
        return;
    };
    let guard = grant.guard();
    for q in rest.chunks_exact(4) {
        let offset = u64::from(u16::from_le_bytes([q[0], q[1]])) * SECTOR;
        let len = u64::from(q[2]) * SECTOR;
        let write = q[3] & 1 != 0;
        if let Some(pieces) = grant.resolve(offset, len, write) {
            let mut total = 0;
            for p in pieces {
                match p {
                    Piece::Device { physical, len } => {
                        assert!(physical + len <= device_size, "piece beyond the device");
                        guard
                            .check(physical, len, write)
                            .expect("a resolved piece passes");
                        total += len;
                    }
                    Piece::Zero { len } => {
                        assert!(!write, "a write resolved to zeros");
                        total += len;
                    }
                }
            }
            assert_eq!(total, len);
        }
        // Whatever the guard allows is inside spans with that access.
        let physical = u64::from(u16::from_le_bytes([q[0], q[1]])) * SECTOR;
        if guard.check(physical, len, write).is_ok() {
            let mut covered = physical;
            let mut ranges: Vec<(u64, u64)> = spans
                .iter()
                .filter(|s| !write || s.access == Access::ReadWrite)
                .filter_map(|s| match s.kind {
                    SpanKind::Data { physical } => Some((physical, physical + s.len)),
                    SpanKind::Zero => None,
                })
                .collect();
            ranges.sort_unstable();
            for (start, end) in ranges {
                if start <= covered && end > covered {
                    covered = end;
                }
            }
            assert!(
                covered >= physical + len,
                "the guard let through ungranted blocks"
            );
        }
    }
});
