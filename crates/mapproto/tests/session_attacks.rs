//! The session against an on-path attacker who knows no key: a sealed frame reflected to its
//! sender, an old Auth replayed to a new Challenge, deeply nested JSON before authentication.

mod common;

use common::{key, read_json, read_raw, write_raw};
use tokio::io::duplex;
use twinpath_mapproto::{accept, connect, Frame, HostKeys, ProtoError, Request};

fn ring() -> HostKeys {
    HostKeys::new(vec![("host-a".into(), key("key-of-host-a-0001"))]).unwrap()
}

/// A relay between host and server that, once the handshake is through, sends the host's
/// first sealed frame back to the host as if the server had sent it.
#[tokio::test]
async fn a_sealed_frame_reflected_to_its_sender_does_not_open() {
    let (h, mut rh) = duplex(1 << 16);
    let (mut rs, s) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(s, &ring()).await });
    let relay = tokio::spawn(async move {
        let challenge = read_raw(&mut rs).await.unwrap();
        write_raw(&mut rh, &challenge).await;
        let auth = read_raw(&mut rh).await.unwrap();
        write_raw(&mut rs, &auth).await;
        let welcome = read_raw(&mut rs).await.unwrap();
        write_raw(&mut rh, &welcome).await;
        let sealed = read_raw(&mut rh).await.unwrap();
        write_raw(&mut rh, &sealed).await; // back to the host
        write_raw(&mut rs, &sealed).await; // and on to the server, reflected back later
        (rh, rs)
    });
    let mut host = connect(h, &key("key-of-host-a-0001"), "host-a")
        .await
        .unwrap();
    let (_srv, _) = server.await.unwrap().unwrap();
    host.send(&Frame::Request {
        id: 1,
        request: Request::Identity,
    })
    .await
    .unwrap();
    let got = host.recv().await;
    assert!(
        matches!(got, Err(ProtoError::Tampered { .. })),
        "reflected frame: {got:?}"
    );
    drop(relay);
}

/// An Auth recorded from one handshake, replayed to a fresh Challenge, is denied.
#[tokio::test]
async fn an_old_auth_replayed_to_a_new_challenge_is_denied() {
    let (a, b) = duplex(1 << 16);
    let (mut rh, h) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    // Record an honest Auth against the first server.
    let mut b = b;
    let challenge = read_raw(&mut b).await.unwrap();
    write_raw(&mut rh, &challenge).await;
    let hostside =
        tokio::spawn(async move { connect(h, &key("key-of-host-a-0001"), "host-a").await });
    let auth = read_raw(&mut rh).await.unwrap();
    write_raw(&mut b, &auth).await;
    let _ = server.await.unwrap().unwrap();
    drop(hostside);
    // Replay it to a second server.
    let (a2, mut b2) = duplex(1 << 16);
    let server2 = tokio::spawn(async move { accept(a2, &ring()).await });
    let _ = read_json(&mut b2).await;
    write_raw(&mut b2, &auth).await;
    let r = server2.await.unwrap();
    assert!(matches!(r, Err(ProtoError::Auth(_))), "{:?}", r.err());
}

/// 4 KiB of nesting before authentication: an error, not a stack overflow.
#[tokio::test]
async fn deeply_nested_json_before_authentication_is_a_plain_error() {
    let (a, mut b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let _ = read_json(&mut b).await;
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    write_raw(&mut b, deep.as_bytes()).await;
    let r = server.await.unwrap();
    assert!(matches!(r, Err(ProtoError::Malformed(_))), "{:?}", r.err());
}
