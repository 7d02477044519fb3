//! twinpath-mapproto: how a VM host and the map server talk (protocol version 2).
//!
//! One TCP connection per host, kept open. Both directions carry length-delimited frames
//! whose plaintext is JSON ([`Frame`]).
//!
//! # Handshake
//! Mutual challenge-response on a pre-shared key, one key per host ([`connect`] on the host,
//! [`accept`] on the server), in plain frames of at most [`MAX_HANDSHAKE_FRAME`] bytes:
//! 1. server: [`Frame::Challenge`] (version, 32-byte server nonce);
//! 2. host: [`Frame::Auth`] (version, its name, 32-byte host nonce,
//!    HMAC-SHA256(key, "host", server nonce, host nonce, name));
//! 3. server: [`Frame::Welcome`] (HMAC-SHA256(key, "server", host nonce, server nonce)), or
//!    [`Frame::Denied`] and the connection closes.
//!
//! The server holds a [`HostKeys`] ring and knows the host by the entry whose key verifies
//! the MAC, never by the name the host claims: a host presenting its own key under another
//! host's name is denied. The key never crosses the wire and is never logged.
//!
//! # Session keys
//! HKDF-SHA256 (RFC 5869) with the key as input key material, salt = server nonce || host
//! nonce, and info = a label, the direction, [`PROTOCOL_VERSION`], the (length-prefixed) host
//! name and both handshake MACs, gives one 32-byte key per direction. Fresh nonces on both
//! sides make every session's keys new, whichever side is replaying old handshakes.
//!
//! # Record layer
//! Every frame after the handshake, both ways, is sealed with ChaCha20-Poly1305 under its
//! direction's key; the 96-bit nonce is 32 zero bits and the frame's 64-bit big-endian
//! sequence number in that direction (starting at 0, never sent). A frame that was altered,
//! replayed, reordered or injected, or that follows a dropped one, fails to open: the receiver
//! reports [`ProtoError::Tampered`] and the connection ends. This is TLS 1.3's record
//! protection with the key schedule cut down to one PSK.
//!
//! # Bounds
//! A sealed frame is at most [`MAX_FRAME`] bytes. Every received frame is checked before
//! anyone acts on it: handshake nonces and MACs are exactly 32 bytes, host names at most
//! [`MAX_HOST_NAME`] bytes, paths at most [`MAX_PATH`], a volume token at most [`MAX_TOKEN`]
//! bytes, a map at most [`MAX_SPANS`] spans; reasons are cut to [`MAX_REASON`] bytes without
//! control characters. A frame out of bounds is [`ProtoError::Malformed`] and, like a tampered
//! one, ends the connection.
//!
//! After the handshake the host sends [`Request`]s, each with an id its [`Reply`] repeats, and
//! the server may at any time send a [`Frame::Recall`] for a lease it wants back.

mod bounds;
mod client;
pub mod clock;
mod handshake;
mod key;
mod wire;

pub use client::{MapClient, Recall, Validity};
pub use handshake::{accept, connect};
pub use key::{HostKeys, Key, KeyError};
pub use wire::{decode, Conn, ConnReader, ConnWriter};

use serde::{Deserialize, Serialize};
use twinpath_filemap::Span;

/// Bumped on any incompatible change; both sides must agree. 2: per-host keys, sealed frames.
/// 3: lease time and renewals.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame either side accepts before the handshake is done: a peer that has not proven
/// the key cannot make the other side buffer more.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Largest sealed frame (JSON plus the 16-byte tag) either side accepts. The largest frame is
/// a map of [`MAX_SPANS`] spans of at most 131 bytes of JSON each (8.6 MB with every number at
/// `u64::MAX`, checked by a test), so 12 MiB holds it with room to spare.
pub const MAX_FRAME: usize = 12 << 20;

/// Most spans in one map. The host asks for 64 MiB windows; a filesystem with 1 KiB blocks
/// alternating between data and holes gives 65536 spans there, and no valid map has more.
pub const MAX_SPANS: usize = 65536;

/// Most bytes of the volume token the host reads from its device.
pub const MAX_TOKEN: u64 = 4096;

/// Longest host name (a DNS name is at most 253).
pub const MAX_HOST_NAME: usize = 255;

/// Longest path in a request (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Reasons (refusals, recalls, denials) are only shown to people: longer ones are cut.
pub const MAX_REASON: usize = 1024;

/// Shortest lease time a server may announce: a host renews every third of it.
pub const MIN_LEASE_TIME_MS: u64 = 1000;

/// Longest lease time a server may announce (an hour): what a lost host's leases may cost.
pub const MAX_LEASE_TIME_MS: u64 = 3_600_000;

/// The SCSI-3 persistent reservation key of host `host` on the shared LUN: the host
/// registers it before it writes directly, and the map server preempts it to fence the host.
/// Both sides derive it from the host's name, so nothing needs configuring; never zero (a
/// zero key means "no key" to SCSI).
pub fn fence_key(host: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"twinpath fence key\0")
        .chain_update(host.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) | 1
}

/// Which end of a map connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Host,
    MapServer,
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::Host => Role::MapServer,
            Role::MapServer => Role::Host,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::MapServer => "map server",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub enum Frame {
    /// Server, first: who it is and a fresh nonce to prove the key against.
    Challenge {
        version: u32,
        nonce: String,
    },
    /// Host: its name, its own nonce, and HMAC(key, "host", server nonce, host nonce, name).
    /// The name is only a claim: the server knows the host by the key that verifies `mac`.
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
    /// Make `[offset, offset + len)` of the file under write lease `lease` (granted to this
    /// connection by [`Request::GetMap`]) allocated and written (zeros where it was a hole or
    /// unwritten), in the server's allocation chunks, so later write maps need no
    /// allocation. Never changes the file's size. Refused where the server's filesystem
    /// cannot fill holes without risking a concurrent write (no reflink).
    Allocate { lease: u64, offset: u64, len: u64 },
    /// Direct writes under `lease` are done and durable on the device; `size` is the file's
    /// size as the host sees it.
    Commit { lease: u64, size: u64 },
    /// The host no longer uses `lease`.
    Return { lease: u64 },
    /// The host is alive and keeps every lease it holds: see [`Reply::Renewed`].
    Renew,
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
    /// Every lease of this connection stays the host's for `lease_time_ms` after the host
    /// *sent* the renewal (the server counts from when it received it, which is later), unless
    /// recalled; a host that cannot renew in that time must stop using them. The server, for
    /// its part, gives a silent or lost host's leases to nobody before that time (and a
    /// margin) has passed since it last heard from the host, or since it recalled them.
    Renewed {
        lease_time_ms: u64,
    },
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
    /// At most [`MAX_TOKEN`].
    pub token_len: u64,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapGrant {
    pub lease: u64,
    pub file_size: u64,
    /// At most [`MAX_SPANS`].
    pub spans: Vec<Span>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("map connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("map connection closed")]
    Closed,
    #[error("no answer from the map server in {0:?}")]
    TimedOut(std::time::Duration),
    /// A call could not be answered because the connection ended, for this reason.
    #[error("map connection lost: {0}")]
    Lost(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A peer proved a configured host's key under another host's name: it holds a real key,
    /// so this is worth an operator's attention every time.
    #[error("authentication failed: the key of host `{key_of}` was presented under another name")]
    WrongName { key_of: String },
    #[error("{peer} speaks protocol version {theirs}, this {} speaks {PROTOCOL_VERSION}", .peer.other())]
    Version { peer: Role, theirs: u32 },
    /// A sealed frame did not open with the key and sequence number it should have.
    #[error(
        "frame {seq} from the {peer} failed authentication: it was altered, replayed, \
         reordered or injected on the way, or a frame before it was dropped"
    )]
    Tampered { peer: Role, seq: u64 },
    /// 2^64 - 1 frames went one way: a nonce would repeat, so the session cannot go on.
    #[error("sequence numbers of the map session exhausted; connect again")]
    Exhausted,
}
