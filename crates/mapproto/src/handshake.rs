//! Mutual challenge-response on the pre-shared key.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{Conn, Frame, Key, ProtoError, PROTOCOL_VERSION};

fn nonce() -> String {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS random source");
    hex::encode(n)
}

fn unhex(what: &str, s: &str) -> Result<Vec<u8>, ProtoError> {
    hex::decode(s).map_err(|_| ProtoError::Malformed(format!("{what} is not hex")))
}

fn unexpected(f: &Frame) -> ProtoError {
    let name = serde_json::to_value(f)
        .ok()
        .and_then(|v| v["frame"].as_str().map(str::to_owned))
        .unwrap_or_default();
    ProtoError::Unexpected(name)
}

/// Server side: challenges the host and checks its answer. Returns the connection and the
/// host's name.
pub async fn accept<S: AsyncRead + AsyncWrite>(
    stream: S,
    key: &Key,
) -> Result<(Conn<S>, String), ProtoError> {
    let mut conn = Conn::new(stream);
    let ours = nonce();
    conn.send(&Frame::Challenge {
        version: PROTOCOL_VERSION,
        nonce: ours.clone(),
    })
    .await?;
    let (version, host, theirs, mac) = match conn.recv().await? {
        Frame::Auth {
            version,
            host,
            nonce,
            mac,
        } => (version, host, nonce, mac),
        other => return Err(unexpected(&other)),
    };
    let deny = |reason: &str| Frame::Denied {
        reason: reason.to_owned(),
    };
    if version != PROTOCOL_VERSION {
        conn.send(&deny("protocol version not supported")).await?;
        return Err(ProtoError::Version { theirs: version });
    }
    let (ours_b, theirs_b) = (unhex("nonce", &ours)?, unhex("nonce", &theirs)?);
    let parts: [&[u8]; 4] = [b"host", &ours_b, &theirs_b, host.as_bytes()];
    if theirs_b.len() != 32 || !key.verify(&parts, &unhex("mac", &mac)?) {
        conn.send(&deny("authentication failed")).await?;
        return Err(ProtoError::Auth(format!(
            "host `{host}` did not prove the key"
        )));
    }
    conn.send(&Frame::Welcome {
        mac: hex::encode(key.mac(&[b"server", &theirs_b, &ours_b])),
    })
    .await?;
    Ok((conn, host))
}

/// Host side: answers the server's challenge as `host` and checks that the server knows the
/// key too.
pub async fn connect<S: AsyncRead + AsyncWrite>(
    stream: S,
    key: &Key,
    host: &str,
) -> Result<Conn<S>, ProtoError> {
    let mut conn = Conn::new(stream);
    let (version, theirs) = match conn.recv().await? {
        Frame::Challenge { version, nonce } => (version, nonce),
        other => return Err(unexpected(&other)),
    };
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { theirs: version });
    }
    let theirs_b = unhex("nonce", &theirs)?;
    let ours = nonce();
    let ours_b = unhex("nonce", &ours)?;
    conn.send(&Frame::Auth {
        version: PROTOCOL_VERSION,
        host: host.to_owned(),
        nonce: ours,
        mac: hex::encode(key.mac(&[b"host", &theirs_b, &ours_b, host.as_bytes()])),
    })
    .await?;
    match conn.recv().await? {
        Frame::Welcome { mac } => {
            if key.verify(&[b"server", &ours_b, &theirs_b], &unhex("mac", &mac)?) {
                Ok(conn)
            } else {
                Err(ProtoError::Auth(
                    "the map server did not prove the key".into(),
                ))
            }
        }
        Frame::Denied { reason } => Err(ProtoError::Auth(format!("map server: {reason}"))),
        other => Err(unexpected(&other)),
    }
}
