//! Building maps of files on the server's filesystem (blocking; run off the async threads).
//!
//! The order of operations is what keeps the host's direct I/O and the server's page cache
//! from overwriting each other: the file is fsynced before a map is taken (no dirty server
//! pages can be written back over a host's direct write later), its cached pages are dropped
//! (the server's next read goes to the device), and ranges granted for writing are made
//! written first where that can be done without overwriting anyone ([`Filler`]); elsewhere
//! they stay out of write grants (a device write into an unwritten extent would stay
//! invisible).

use std::fs::File;
use std::os::fd::AsRawFd;

use twinpath_filemap::{file_extents, Access, ExtentClass, FileExtent, Span, SpanKind, SECTOR};

use crate::error::{io, Error, Result};
use crate::fill::Filler;

fn drop_cache(file: &File) {
    // SAFETY: advice on a file we hold open; failure only costs coherency we re-check later.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Ranges of `[start, end)` that are holes or unwritten in `extents`. Refused extents hold
/// data (shared, encoded, ...) and are never among them.
fn unwritten_ranges(extents: &[FileExtent], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    for e in extents {
        let (lo, hi) = (e.logical.max(start), (e.logical + e.len).min(end));
        if lo >= hi {
            continue;
        }
        if lo > at {
            out.push((at, lo));
        }
        if e.class == ExtentClass::Unwritten {
            out.push((lo, hi));
        }
        at = hi;
    }
    if at < end {
        out.push((at, end));
    }
    out
}

/// `[offset, offset + len)` widened to whole chunks, within a file of `size` bytes.
fn chunks(offset: u64, len: u64, chunk: u64, size: u64) -> (u64, u64) {
    (
        (offset - offset % chunk).min(size),
        offset
            .saturating_add(len)
            .div_ceil(chunk)
            .saturating_mul(chunk)
            .min(size),
    )
}

/// The map of `[offset, offset + len)` of `file` (clipped to the file), for reading or
/// writing. Extents that may not be used directly are left out, and so are holes and
/// unwritten ranges from write access: the host takes the network path there. For a write
/// map, `fill` first makes the holes of the surrounding chunks (`chunk` bytes each) written
/// where it safely can. `file` must be open for writing when `write`.
pub fn get_map(
    file: &File,
    offset: u64,
    len: u64,
    write: bool,
    chunk: u64,
    fill: &Filler,
) -> Result<(u64, Vec<Span>)> {
    file.sync_all().map_err(io("fsync"))?;
    let size = file.metadata().map_err(io("stat"))?.len();
    let start = offset - offset % SECTOR;
    let end = offset.saturating_add(len).min(size) / SECTOR * SECTOR;
    if start >= end {
        return Ok((size, Vec::new()));
    }
    let mut extents = file_extents(file).map_err(io("FIEMAP"))?;
    if write && fill.fills() {
        let (lo, hi) = chunks(start, end - start, chunk, size);
        let holes = unwritten_ranges(&extents, lo, hi);
        // Refused extents may be shared ones that unsharing makes grantable; a range all
        // written and private needs neither filling nor unsharing (the common case: a
        // written image mapped again).
        let refused = extents
            .iter()
            .any(|e| e.class == ExtentClass::Refused && e.logical < hi && e.logical + e.len > lo);
        if !holes.is_empty() || refused {
            fill.make_written(file, &holes, lo, hi)
                .map_err(|e| e.context(format_args!("filling holes of [{lo}, {hi})")))?;
            extents = file_extents(file).map_err(io("FIEMAP"))?;
        }
    }
    drop_cache(file);
    Ok((size, spans(&extents, start, end, write)))
}

/// Spans for `[start, end)`: written extents as data, holes and unwritten extents as zeros
/// (for reading only), refused extents left out.
fn spans(extents: &[FileExtent], start: u64, end: u64, write: bool) -> Vec<Span> {
    let access = if write {
        Access::ReadWrite
    } else {
        Access::Read
    };
    let mut out = Vec::new();
    let mut at = start;
    let zero = |lo: u64, hi: u64| Span {
        logical: lo,
        len: hi - lo,
        kind: SpanKind::Zero,
        access: Access::Read,
    };
    for e in extents {
        let (lo, hi) = (e.logical.max(start), (e.logical + e.len).min(end));
        if lo >= hi {
            continue;
        }
        if lo > at {
            out.push(zero(at, lo));
        }
        match e.class {
            ExtentClass::Written => out.push(Span {
                logical: lo,
                len: hi - lo,
                kind: SpanKind::Data {
                    physical: e.physical + (lo - e.logical),
                },
                access,
            }),
            ExtentClass::Unwritten => out.push(zero(lo, hi)),
            ExtentClass::Refused => {}
        }
        at = hi;
    }
    if at < end {
        out.push(zero(at, end));
    }
    out
}

/// Makes `[offset, offset + len)` (widened to whole chunks, within the file) written, where
/// the filesystem can do that without overwriting anyone (see [`Filler`]); refused elsewhere.
/// `file` must be open for writing.
pub fn allocate(
    file: &File,
    offset: u64,
    len: u64,
    chunk: u64,
    fill: &Filler,
) -> Result<(u64, u64)> {
    if !fill.fills() {
        return Err(Error::Unfit(
            "no reflink on this filesystem: holes stay on the network path".into(),
        ));
    }
    let size = file.metadata().map_err(io("stat"))?.len();
    let (lo, hi) = chunks(offset, len, chunk, size);
    let extents = file_extents(file).map_err(io("FIEMAP"))?;
    fill.make_written(file, &unwritten_ranges(&extents, lo, hi), lo, hi)
        .map_err(|e| e.context(format_args!("filling holes of [{lo}, {hi})")))?;
    drop_cache(file);
    Ok((lo, hi - lo))
}

/// After direct writes: the server's cached pages of the file are stale; drop them.
pub fn commit(file: &File) {
    drop_cache(file);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, len: u64, physical: u64, class: ExtentClass) -> FileExtent {
        FileExtent {
            logical,
            physical,
            len,
            class,
        }
    }

    #[test]
    fn spans_cover_the_range_and_leave_refused_extents_out() {
        let extents = [
            ext(0, 8192, 100_000, ExtentClass::Written),
            ext(16384, 4096, 200_000, ExtentClass::Unwritten),
            ext(20480, 4096, 300_000, ExtentClass::Refused),
        ];
        let s = spans(&extents, 4096, 28672, false);
        let kinds: Vec<_> = s.iter().map(|s| (s.logical, s.len, s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (4096, 4096, SpanKind::Data { physical: 104_096 }),
                (8192, 8192, SpanKind::Zero),
                (16384, 4096, SpanKind::Zero),
                (24576, 4096, SpanKind::Zero),
            ]
        );
        assert_eq!(
            unwritten_ranges(&extents, 0, 28672),
            vec![(8192, 16384), (16384, 20480), (24576, 28672)],
            "the refused extent holds data and is never overwritten"
        );
    }
}
