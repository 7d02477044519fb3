//! The handshake and framing over an in-memory stream pair.

use tokio::io::{duplex, AsyncWriteExt};
use twinpath_mapproto::{accept, connect, Conn, Frame, Key, ProtoError, Request};

fn key(s: &str) -> Key {
    Key::new(s.as_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn both_sides_prove_the_key_and_frames_flow() {
    let (a, b) = duplex(1 << 16);
    let k = key("sixteen-byte-key-0001");
    let server = tokio::spawn({
        let k = k.clone();
        async move { accept(a, &k).await }
    });
    let mut host = connect(b, &k, "host-a").await.unwrap();
    let (mut srv, name) = server.await.unwrap().unwrap();
    assert_eq!(name, "host-a");
    host.send(&Frame::Request {
        id: 7,
        request: Request::Identity,
    })
    .await
    .unwrap();
    assert_eq!(
        srv.recv().await.unwrap(),
        Frame::Request {
            id: 7,
            request: Request::Identity
        }
    );
}

#[tokio::test]
async fn a_wrong_key_is_denied_on_both_sides() {
    let (a, b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &key("the-servers-key-000")).await });
    let host = connect(b, &key("the-hosts-wrong-key"), "host-a").await;
    assert!(
        matches!(&host, Err(ProtoError::Auth(m)) if m.contains("authentication failed")),
        "{:?}",
        host.err()
    );
    let srv = server.await.unwrap();
    assert!(matches!(srv, Err(ProtoError::Auth(m)) if m.contains("host-a")));
}

#[tokio::test]
async fn a_server_without_the_key_is_not_trusted() {
    // A fake server that echoes a Welcome with a made-up MAC.
    let (a, b) = duplex(1 << 16);
    tokio::spawn(async move {
        let mut c = Conn::new(a);
        c.send(&Frame::Challenge {
            version: 1,
            nonce: "00".repeat(32),
        })
        .await
        .unwrap();
        let _auth = c.recv().await.unwrap();
        c.send(&Frame::Welcome {
            mac: "11".repeat(32),
        })
        .await
        .unwrap();
        let _ = c.recv().await;
    });
    let host = connect(b, &key("sixteen-byte-key-0001"), "h").await;
    assert!(matches!(host, Err(ProtoError::Auth(m)) if m.contains("did not prove")));
}

#[tokio::test]
async fn version_mismatch_and_garbage_are_clear_errors() {
    let (a, b) = duplex(1 << 16);
    tokio::spawn(async move {
        let mut c = Conn::new(a);
        c.send(&Frame::Challenge {
            version: 99,
            nonce: "00".repeat(32),
        })
        .await
        .unwrap();
    });
    let r = connect(b, &key("sixteen-byte-key-0001"), "h").await;
    assert!(matches!(r, Err(ProtoError::Version { theirs: 99 })));

    // Not JSON, then a length prefix beyond the limit.
    let (mut a, b) = duplex(1 << 16);
    a.write_all(&[0, 0, 0, 3, b'x', b'y', b'z']).await.unwrap();
    a.write_all(&[0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    let mut c = Conn::new(b);
    assert!(matches!(c.recv().await, Err(ProtoError::Malformed(_))));
    let big = c.recv().await;
    assert!(
        matches!(&big, Err(ProtoError::Malformed(m)) if m.contains("at most")),
        "{:?}",
        big.err()
    );
}

#[test]
fn short_keys_are_refused_and_keys_never_print() {
    assert!(Key::new(b"short".to_vec()).is_err());
    let k = key("a-secret-value-123");
    assert_eq!(format!("{k:?}"), "Key(<redacted>)");
}
