//! twinpath-filemap: where a file's bytes live on the shared volume, and the rules for using
//! that knowledge.
//!
//! - [`file_extents`] reads a file's extent map on the file server (FIEMAP with SYNC) and
//!   classifies every extent: may it be read directly, written directly, or neither.
//! - [`Grant`] is what the map server hands a host: a covered logical range of one file, each
//!   piece either data at a physical offset (read-only or read-write) or zeros (holes and
//!   unwritten extents: no device I/O at all).
//! - [`Guard`] is the last check before any direct device I/O: a write outside the extents
//!   granted for writing is refused, whatever the code above it computed.
//! - [`VolumeId`] recognises the server's filesystem on a raw device (type and UUID).
//! - [`pr`] registers, reserves and preempts on a block device (SCSI-3 persistent
//!   reservations), for fencing.

mod fiemap_io;
mod grant;
pub mod pr;
mod volume;

pub use fiemap_io::{file_extents, ExtentClass, FileExtent};
pub use grant::{Access, Grant, GrantError, Guard, OutsideGrant, Piece, Span, SpanKind};
pub use volume::{read_direct, FsType, VolumeId};

/// Device offsets and lengths of direct I/O must be multiples of this (the logical sector
/// size every LUN and filesystem here supports).
pub const SECTOR: u64 = 512;
