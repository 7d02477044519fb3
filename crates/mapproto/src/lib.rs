//! twinpath-mapproto: how a VM host and the map server talk.
//!
//! One TCP connection per host, kept open; both directions carry length-framed JSON
//! ([`Frame`]), at most [`MAX_FRAME`] bytes each. The connection starts with a mutual
//! challenge-response on a pre-shared key ([`handshake`]): the server proves it knows the key
//! as well as the host, and the key never crosses the wire. After that the host sends
//! [`Request`]s, each with an id its [`Reply`] repeats, and the server may at any time send
//! a [`Frame::Recall`] for a lease it wants back.

mod client;
mod handshake;
mod key;
mod wire;

pub use client::{MapClient, Recall};
pub use handshake::{accept, connect};
pub use key::Key;
pub use wire::{Conn, ConnReader, ConnWriter};

use serde::{Deserialize, Serialize};
use twinpath_filemap::Span;

/// Bumped on any incompatible change; both sides must agree.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (a map of a very fragmented file still fits).
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub enum Frame {
    /// Server, first: who it is and a fresh nonce to prove the key against.
    Challenge {
        version: u32,
        nonce: String,
    },
    /// Host: its name, its own nonce, and HMAC(key, "host", server nonce, host nonce, name).
    Auth {
        version: u32,
        host: String,
        nonce: String,
        mac: String,
    },
    /// Server: HMAC(key, "server", host nonce, server nonce): the server knows the key too.
    Welcome {
        mac: String,
    },
    /// Server: the handshake failed; the connection closes.
    Denied {
        reason: String,
    },
    Request {
        id: u64,
        request: Request,
    },
    Reply {
        id: u64,
        reply: Reply,
    },
    /// Server: give lease `lease` back (stop direct I/O under it, then [`Request::Return`]).
    Recall {
        lease: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Which volume the server's files live on, and a token to find it among local devices.
    Identity,
    /// Extents of `path` covering `[offset, offset + len)`; for writing, a lease on the file.
    GetMap {
        path: String,
        offset: u64,
        len: u64,
        write: bool,
    },
    /// Make `[offset, offset + len)` of `path` allocated and written (zeros where it was a
    /// hole or unwritten), in the server's allocation chunks, so later write maps need no
    /// allocation. Never changes the file's size. Refused where the server's filesystem
    /// cannot fill holes without risking a concurrent write (no reflink).
    Allocate { path: String, offset: u64, len: u64 },
    /// Direct writes under `lease` are done and durable on the device; `size` is the file's
    /// size as the host sees it.
    Commit { lease: u64, size: u64 },
    /// The host no longer uses `lease`.
    Return { lease: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Identity(VolumeIdentity),
    Map(MapGrant),
    /// The range now allocated (chunk-aligned, within the file).
    Allocated {
        offset: u64,
        len: u64,
    },
    Done,
    /// The server will not do it; the host uses the network path.
    Refused {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeIdentity {
    /// `xfs` or `ext4`.
    pub fs_type: String,
    /// The filesystem UUID as 32 hex digits, as its superblock stores it.
    pub uuid: String,
    /// Size of the volume in bytes.
    pub size: u64,
    /// A file the server wrote for this session: where its bytes are on the volume and
    /// their SHA-256. Only the real volume (not a stale clone) holds them.
    pub token_offset: u64,
    pub token_len: u64,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapGrant {
    pub lease: u64,
    pub file_size: u64,
    pub spans: Vec<Span>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("map connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("map connection closed")]
    Closed,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol version {theirs} not supported (this side speaks {PROTOCOL_VERSION})")]
    Version { theirs: u32 },
}
