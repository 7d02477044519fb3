//! Grants (what a host may touch directly) and the guard that enforces them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::SECTOR;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    Read,
    ReadWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpanKind {
    /// The bytes are on the device at `physical`.
    Data { physical: u64 },
    /// The bytes read as zeros (a hole or an unwritten extent); nothing to read on the device
    /// and nothing that may be written there.
    Zero,
}

/// A granted piece of a file: `len` bytes at file offset `logical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub logical: u64,
    pub len: u64,
    pub kind: SpanKind,
    pub access: Access,
}

impl Span {
    fn end(&self) -> u64 {
        self.logical + self.len
    }
}

/// How one direct I/O is carried out, piece by piece, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Device { physical: u64, len: u64 },
    Zero { len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    Empty { span: usize },
    Unaligned { span: usize },
    Overlap { span: usize },
    BeyondDevice { span: usize, device_size: u64 },
    WritableZeros { span: usize },
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantError::Empty { span } => write!(f, "span {span} is empty"),
            GrantError::Unaligned { span } => {
                write!(f, "span {span} is not aligned to {SECTOR}-byte sectors")
            }
            GrantError::Overlap { span } => {
                write!(f, "span {span} overlaps or precedes the span before it")
            }
            GrantError::BeyondDevice { span, device_size } => {
                write!(f, "span {span} lies beyond the {device_size}-byte device")
            }
            GrantError::WritableZeros { span } => {
                write!(
                    f,
                    "span {span} grants writing to a range with no device location"
                )
            }
        }
    }
}

impl std::error::Error for GrantError {}

/// A checked grant: spans sorted by file offset, not overlapping, sector-aligned, inside the
/// device. Gaps are ranges the host was not given; I/O there takes the network path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    spans: Vec<Span>,
}

impl Grant {
    /// Checks `spans` (as received from a map server, so trusted for nothing) against the
    /// device they point into.
    pub fn new(spans: Vec<Span>, device_size: u64) -> Result<Grant, GrantError> {
        let mut prev_end = 0;
        for (i, s) in spans.iter().enumerate() {
            if s.len == 0 {
                return Err(GrantError::Empty { span: i });
            }
            let aligned = |v: u64| v.is_multiple_of(SECTOR);
            if !aligned(s.logical) || !aligned(s.len) {
                return Err(GrantError::Unaligned { span: i });
            }
            let Some(end) = s.logical.checked_add(s.len) else {
                return Err(GrantError::Overlap { span: i });
            };
            if i > 0 && s.logical < prev_end {
                return Err(GrantError::Overlap { span: i });
            }
            prev_end = end;
            match s.kind {
                SpanKind::Zero if s.access == Access::ReadWrite => {
                    return Err(GrantError::WritableZeros { span: i });
                }
                SpanKind::Zero => {}
                SpanKind::Data { physical } => {
                    if !aligned(physical) {
                        return Err(GrantError::Unaligned { span: i });
                    }
                    if physical
                        .checked_add(s.len)
                        .is_none_or(|end| end > device_size)
                    {
                        return Err(GrantError::BeyondDevice {
                            span: i,
                            device_size,
                        });
                    }
                }
            }
        }
        Ok(Grant { spans })
    }

    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The pieces of a direct I/O of `len` bytes at file offset `offset`, or `None` when a
    /// byte of it was not granted with the access it needs (then the whole request goes over
    /// the network: a request is never split between the two paths).
    pub fn resolve(&self, offset: u64, len: u64, write: bool) -> Option<Vec<Piece>> {
        let end = offset.checked_add(len)?;
        let first = self.spans.partition_point(|s| s.end() <= offset);
        let mut pieces = Vec::new();
        let mut at = offset;
        for s in &self.spans[first..] {
            if at >= end {
                break;
            }
            if s.logical > at {
                return None;
            }
            if write && s.access != Access::ReadWrite {
                return None;
            }
            let take = s.end().min(end) - at;
            pieces.push(match s.kind {
                SpanKind::Data { physical } => Piece::Device {
                    physical: physical + (at - s.logical),
                    len: take,
                },
                SpanKind::Zero => Piece::Zero { len: take },
            });
            at += take;
        }
        (at >= end).then_some(pieces)
    }

    /// The guard for device I/O under this grant.
    pub fn guard(&self) -> Guard {
        let ranges = |want: fn(Access) -> bool| {
            let mut r: Vec<(u64, u64)> = self
                .spans
                .iter()
                .filter(|s| want(s.access))
                .filter_map(|s| match s.kind {
                    SpanKind::Data { physical } => Some((physical, physical + s.len)),
                    SpanKind::Zero => None,
                })
                .collect();
            r.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
            for (start, end) in r {
                match merged.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            merged
        };
        Guard {
            readable: ranges(|_| true),
            writable: ranges(|a| a == Access::ReadWrite),
        }
    }
}

/// A device access a [`Guard`] refused: it lies outside what the grant allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device {} of {len} bytes at offset {physical} is outside the granted extents",
    if *write { "write" } else { "read" }
)]
pub struct OutsideGrant {
    pub physical: u64,
    pub len: u64,
    pub write: bool,
}

/// Device ranges a host may touch, built from a [`Grant`]. Every direct I/O asks it first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    readable: Vec<(u64, u64)>,
    writable: Vec<(u64, u64)>,
}

impl Guard {
    /// Ok when `[physical, physical + len)` lies inside device ranges granted for the access.
    pub fn check(&self, physical: u64, len: u64, write: bool) -> Result<(), OutsideGrant> {
        let ranges = if write {
            &self.writable
        } else {
            &self.readable
        };
        let outside = OutsideGrant {
            physical,
            len,
            write,
        };
        // A range that wraps around the end of the address space lies in no grant.
        let end = physical.checked_add(len).ok_or(outside.clone())?;
        let i = ranges.partition_point(|r| r.1 <= physical);
        match ranges.get(i) {
            Some(&(start, stop)) if start <= physical && end <= stop => Ok(()),
            _ => Err(outside),
        }
    }
}

#[cfg(test)]
mod tests;
