//! Pre-shared keys, the server's ring of them, and the session keys derived from one.

use std::fmt;

use hkdf::Hkdf;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::{MAX_HOST_NAME, PROTOCOL_VERSION};

type HmacSha256 = hmac::Hmac<Sha256>;

/// A pre-shared key, read from a file. Its bytes are never printed or logged, and are wiped
/// from memory when it is dropped.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Vec<u8>);

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why a key or the ring of host keys was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is {0} bytes; at least {min} are needed", min = Key::MIN_LEN)]
    TooShort(usize),
    #[error("no host keys")]
    NoHosts,
    #[error("host name `{0}`: 1 to {MAX_HOST_NAME} bytes are allowed")]
    BadName(String),
    #[error("host `{0}` has two keys")]
    TwoKeys(String),
    #[error("hosts `{0}` and `{1}` have the same key")]
    SharedKey(String, String),
}

impl Key {
    /// Keys shorter than this are refused: they could be guessed.
    pub const MIN_LEN: usize = 16;

    /// A key from its bytes (callers read key files with twinpath_core::read_secret_bytes,
    /// which refuses files others may read).
    pub fn new(bytes: Vec<u8>) -> Result<Key, KeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Key(bytes))
    }

    /// HMAC-SHA256 over the parts, each length-prefixed so no two inputs collide.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Constant-time comparison of `mac` with the MAC of `parts`.
    pub(crate) fn verify(&self, parts: &[&[u8]], mac: &[u8]) -> bool {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.verify_slice(mac).is_ok()
    }
}

/// What both sides of one handshake saw; the session keys are bound to all of it.
pub(crate) struct Transcript<'a> {
    pub server_nonce: &'a [u8; 32],
    pub host_nonce: &'a [u8; 32],
    /// The host's name, as the server verified it.
    pub host: &'a str,
    pub host_mac: &'a [u8; 32],
    pub server_mac: &'a [u8; 32],
}

/// One session's record keys, one per direction.
pub(crate) struct SessionKeys {
    pub to_host: Zeroizing<[u8; 32]>,
    pub to_server: Zeroizing<[u8; 32]>,
}

impl Key {
    /// HKDF-SHA256: extract with both nonces as salt, expand once per direction. Distinct
    /// directions get distinct keys, so a frame reflected back to its sender does not open.
    pub(crate) fn session(&self, t: &Transcript<'_>) -> SessionKeys {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(t.server_nonce);
        salt[32..].copy_from_slice(t.host_nonce);
        let hk = Hkdf::<Sha256>::new(Some(&salt), &self.0);
        let host_len = (t.host.len() as u64).to_le_bytes();
        let version = PROTOCOL_VERSION.to_le_bytes();
        let expand = |direction: &[u8]| {
            let mut k = Zeroizing::new([0u8; 32]);
            // Every part but the host name has a fixed length, and that one is prefixed by
            // its length: no two transcripts give the same info.
            hk.expand_multi_info(
                &[
                    b"twinpath map session",
                    direction,
                    &version,
                    &host_len,
                    t.host.as_bytes(),
                    t.host_mac,
                    t.server_mac,
                ],
                &mut *k,
            )
            .expect("32 bytes is a valid HKDF-SHA256 output length");
            k
        };
        SessionKeys {
            to_host: expand(b"server to host"),
            to_server: expand(b"host to server"),
        }
    }
}

/// The map server's keys, one per host. A host is known by the entry whose key it proves,
/// so names and keys are both unique.
#[derive(Debug)]
pub struct HostKeys(Vec<(String, Key)>);

impl HostKeys {
    /// Refuses an empty ring, empty or overlong names, and any name or key given twice
    /// (a key shared by two names would let either host act as the other).
    pub fn new(entries: Vec<(String, Key)>) -> Result<HostKeys, KeyError> {
        if entries.is_empty() {
            return Err(KeyError::NoHosts);
        }
        for (i, (name, key)) in entries.iter().enumerate() {
            if name.is_empty() || name.len() > MAX_HOST_NAME {
                return Err(KeyError::BadName(name.clone()));
            }
            for (other, other_key) in &entries[..i] {
                if other == name {
                    return Err(KeyError::TwoKeys(name.clone()));
                }
                if other_key == key {
                    return Err(KeyError::SharedKey(other.clone(), name.clone()));
                }
            }
        }
        Ok(HostKeys(entries))
    }

    pub(crate) fn entries(&self) -> &[(String, Key)] {
        &self.0
    }
}
