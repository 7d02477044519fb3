//! The pre-shared key.

use std::fmt;
use std::path::Path;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// A pre-shared key, read from a file. Its bytes are never printed or logged.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Keys shorter than this are refused: they could be guessed.
    pub const MIN_LEN: usize = 16;

    /// The file's contents without a trailing newline.
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let raw = std::fs::read(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
        let trimmed = raw
            .strip_suffix(b"\n")
            .map(|r| r.strip_suffix(b"\r").unwrap_or(r))
            .unwrap_or(&raw);
        Key::new(trimmed.to_vec()).map_err(|e| format!("key file {}: {e}", path.display()))
    }

    pub fn new(bytes: Vec<u8>) -> Result<Key, String> {
        if bytes.len() < Self::MIN_LEN {
            return Err(format!(
                "key is {} bytes; at least {} are needed",
                bytes.len(),
                Self::MIN_LEN
            ));
        }
        Ok(Key(bytes))
    }

    /// HMAC-SHA256 over the parts, each length-prefixed so no two inputs collide.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().to_vec()
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
