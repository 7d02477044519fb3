//! Limits on what a peer may send, checked on receipt before anything acts on a frame: a
//! peer that breaks one ends the connection, like one that tampers.

use crate::{
    Frame, ProtoError, Reply, Request, MAX_HOST_NAME, MAX_LEASE_TIME_MS, MAX_PATH, MAX_REASON,
    MAX_SPANS, MAX_TOKEN, MIN_LEASE_TIME_MS,
};

/// `xfs` and `ext4` are the names in use; anything much longer is not a filesystem type.
const MAX_FS_TYPE: usize = 16;

/// Exactly 32 bytes as 64 hex digits (nonces and MACs).
pub(crate) fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn is_hex(s: &str, bytes: usize) -> bool {
    s.len() == 2 * bytes && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reasons end up in logs: control characters could forge log lines, and only the start of a
/// long one is worth showing.
fn tame(reason: &mut String) {
    reason.retain(|c| !c.is_control());
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
}

fn exact32(what: &str, s: &str) -> Result<(), ProtoError> {
    match hex32(s) {
        Some(_) => Ok(()),
        None => Err(ProtoError::Malformed(format!(
            "{what} is not 32 bytes of hex"
        ))),
    }
}

fn at_most(what: &str, len: u64, max: u64) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::Malformed(format!(
            "{what} is {len}, at most {max} is allowed"
        )));
    }
    Ok(())
}

/// Checks `frame` against the protocol's bounds, and tames its reasons.
pub(crate) fn check(frame: &mut Frame) -> Result<(), ProtoError> {
    match frame {
        Frame::Challenge { nonce, .. } => exact32("challenge nonce", nonce),
        Frame::Auth {
            host, nonce, mac, ..
        } => {
            if host.is_empty() {
                return Err(ProtoError::Malformed("empty host name".into()));
            }
            at_most("host name length", host.len() as u64, MAX_HOST_NAME as u64)?;
            exact32("host nonce", nonce)?;
            exact32("host MAC", mac)
        }
        Frame::Welcome { mac } => exact32("server MAC", mac),
        Frame::Denied { reason } | Frame::Recall { reason, .. } => {
            tame(reason);
            Ok(())
        }
        Frame::Request { request, .. } => match request {
            Request::GetMap { path, .. } => {
                at_most("path length", path.len() as u64, MAX_PATH as u64)
            }
            Request::Identity
            | Request::Allocate { .. }
            | Request::Commit { .. }
            | Request::Return { .. }
            | Request::Renew => Ok(()),
        },
        Frame::Reply { reply, .. } => match reply {
            Reply::Identity(id) => {
                at_most(
                    "identity fs_type length",
                    id.fs_type.len() as u64,
                    MAX_FS_TYPE as u64,
                )?;
                if !is_hex(&id.uuid, 16) {
                    return Err(ProtoError::Malformed(
                        "identity uuid is not 32 hex digits".into(),
                    ));
                }
                if !is_hex(&id.token_sha256, 32) {
                    return Err(ProtoError::Malformed(
                        "identity token_sha256 is not 64 hex digits".into(),
                    ));
                }
                if id.token_len == 0 {
                    return Err(ProtoError::Malformed("identity token_len is 0".into()));
                }
                at_most("identity token_len", id.token_len, MAX_TOKEN)
            }
            Reply::Map(m) => at_most("map span count", m.spans.len() as u64, MAX_SPANS as u64),
            Reply::Refused { reason } => {
                tame(reason);
                Ok(())
            }
            Reply::Renewed { lease_time_ms } => {
                if *lease_time_ms < MIN_LEASE_TIME_MS {
                    return Err(ProtoError::Malformed(format!(
                        "lease time {lease_time_ms} ms is below {MIN_LEASE_TIME_MS} ms"
                    )));
                }
                at_most("lease time (ms)", *lease_time_ms, MAX_LEASE_TIME_MS)
            }
            Reply::Allocated { .. } | Reply::Done => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_lose_control_characters_and_are_cut_on_a_char_boundary() {
        let mut r = format!("a\nb\u{1b}[31m{}", "é".repeat(MAX_REASON));
        tame(&mut r);
        assert!(r.starts_with("ab[31m"));
        assert!(r.len() <= MAX_REASON && r.len() >= MAX_REASON - 1);
        assert!(!r.contains('\n') && !r.contains('\u{1b}'));
    }
}
