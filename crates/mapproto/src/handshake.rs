//! Mutual challenge-response on a pre-shared key, then the switch to sealed frames.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::bounds::hex32;
use crate::key::Transcript;
use crate::{Conn, Frame, HostKeys, Key, ProtoError, Role, MAX_HOST_NAME, PROTOCOL_VERSION};

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS random source");
    n
}

/// Nonces and MACs are checked on receipt already; a peer's input must still not panic here.
fn decode(what: &str, s: &str) -> Result<[u8; 32], ProtoError> {
    hex32(s).ok_or_else(|| ProtoError::Malformed(format!("{what} is not 32 bytes of hex")))
}

fn unexpected(f: &Frame) -> ProtoError {
    let name = serde_json::to_value(f)
        .ok()
        .and_then(|v| v["frame"].as_str().map(str::to_owned))
        .unwrap_or_default();
    ProtoError::Unexpected(name)
}

/// Server side: challenges the host, finds the entry of `keys` whose key the host proves,
/// and proves that key back. Returns the sealed connection and that entry's name.
///
/// Errors never contain the name the host claimed: the server logs them, and before this
/// returns the name is only what the peer typed.
pub async fn accept<S: AsyncRead + AsyncWrite>(
    stream: S,
    keys: &HostKeys,
) -> Result<(Conn<S>, String), ProtoError> {
    let mut conn = Conn::new(stream, Role::Host);
    let ours = nonce();
    conn.send(&Frame::Challenge {
        version: PROTOCOL_VERSION,
        nonce: hex::encode(ours),
    })
    .await?;
    let (version, claimed, theirs, mac) = match conn.recv().await? {
        Frame::Auth {
            version,
            host,
            nonce,
            mac,
        } => (version, host, nonce, mac),
        other => return Err(unexpected(&other)),
    };
    let deny = |reason: String| Frame::Denied { reason };
    if version != PROTOCOL_VERSION {
        conn.send(&deny(format!(
            "protocol version {version} not supported: this map server speaks \
             {PROTOCOL_VERSION}"
        )))
        .await?;
        return Err(ProtoError::Version {
            peer: Role::Host,
            theirs: version,
        });
    }
    let (theirs, host_mac) = (decode("host nonce", &theirs)?, decode("host MAC", &mac)?);
    let parts: [&[u8]; 4] = [b"host", &ours, &theirs, claimed.as_bytes()];
    // Every entry is tried, not only one named like the claim: the key decides who it is.
    let Some((name, key)) = keys
        .entries()
        .iter()
        .find(|(_, key)| key.verify(&parts, &host_mac))
    else {
        conn.send(&deny("authentication failed".into())).await?;
        return Err(ProtoError::Auth(
            "the peer proved none of the host keys".into(),
        ));
    };
    if *name != claimed {
        conn.send(&deny("authentication failed".into())).await?;
        return Err(ProtoError::WrongName {
            key_of: name.clone(),
        });
    }
    let server_mac = key.mac(&[b"server", &theirs, &ours]);
    conn.send(&Frame::Welcome {
        mac: hex::encode(server_mac),
    })
    .await?;
    let session = key.session(&Transcript {
        server_nonce: &ours,
        host_nonce: &theirs,
        host: name,
        host_mac: &host_mac,
        server_mac: &server_mac,
    });
    conn.secure(&session.to_host, &session.to_server);
    Ok((conn, name.clone()))
}

/// Host side: answers the server's challenge as `host` and checks that the server knows the
/// key too. Returns the sealed connection.
pub async fn connect<S: AsyncRead + AsyncWrite>(
    stream: S,
    key: &Key,
    host: &str,
) -> Result<Conn<S>, ProtoError> {
    if host.is_empty() || host.len() > MAX_HOST_NAME {
        return Err(ProtoError::Auth(format!(
            "host name of {} bytes: 1 to {MAX_HOST_NAME} are allowed",
            host.len()
        )));
    }
    let mut conn = Conn::new(stream, Role::MapServer);
    let (version, theirs) = match conn.recv().await? {
        Frame::Challenge { version, nonce } => (version, nonce),
        other => return Err(unexpected(&other)),
    };
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version {
            peer: Role::MapServer,
            theirs: version,
        });
    }
    let theirs = decode("challenge nonce", &theirs)?;
    let ours = nonce();
    let host_mac = key.mac(&[b"host", &theirs, &ours, host.as_bytes()]);
    conn.send(&Frame::Auth {
        version: PROTOCOL_VERSION,
        host: host.to_owned(),
        nonce: hex::encode(ours),
        mac: hex::encode(host_mac),
    })
    .await?;
    let server_mac = match conn.recv().await? {
        Frame::Welcome { mac } => decode("server MAC", &mac)?,
        Frame::Denied { reason } => return Err(ProtoError::Auth(format!("map server: {reason}"))),
        other => return Err(unexpected(&other)),
    };
    if !key.verify(&[b"server", &ours, &theirs], &server_mac) {
        return Err(ProtoError::Auth(
            "the map server did not prove the key".into(),
        ));
    }
    let session = key.session(&Transcript {
        server_nonce: &theirs,
        host_nonce: &ours,
        host,
        host_mac: &host_mac,
        server_mac: &server_mac,
    });
    conn.secure(&session.to_server, &session.to_host);
    Ok(conn)
}
