//! The handshake: keys, names, versions and bounds, over in-memory streams.

mod common;

use common::{key, read_json, write_json, write_raw};
use tokio::io::duplex;
use twinpath_filemap::{Access, Span, SpanKind};
use twinpath_mapproto::{
    accept, connect, Frame, HostKeys, KeyError, MapGrant, ProtoError, Reply, Request, Role,
    MAX_FRAME, MAX_HANDSHAKE_FRAME, MAX_SPANS, PROTOCOL_VERSION,
};

fn ring() -> HostKeys {
    HostKeys::new(vec![
        ("host-a".into(), key("key-of-host-a-0001")),
        ("host-b".into(), key("key-of-host-b-0002")),
    ])
    .unwrap()
}

#[tokio::test]
async fn both_sides_prove_the_key_and_sealed_frames_flow() {
    let (a, b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let mut host = connect(b, &key("key-of-host-b-0002"), "host-b")
        .await
        .unwrap();
    let (mut srv, name) = server.await.unwrap().unwrap();
    assert_eq!(name, "host-b");
    for id in 0..3 {
        let request = Frame::Request {
            id,
            request: Request::Identity,
        };
        host.send(&request).await.unwrap();
        assert_eq!(srv.recv().await.unwrap(), request);
        let reply = Frame::Reply {
            id,
            reply: Reply::Done,
        };
        srv.send(&reply).await.unwrap();
        assert_eq!(host.recv().await.unwrap(), reply);
    }
}

#[tokio::test]
async fn a_wrong_key_is_denied_on_both_sides_and_the_claimed_name_is_not_repeated() {
    let (a, b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let host = connect(b, &key("not-anyones-key-0003"), "claimed-name").await;
    assert!(
        matches!(&host, Err(ProtoError::Auth(m)) if m.contains("authentication failed")),
        "{:?}",
        host.err()
    );
    let srv = server.await.unwrap().err().unwrap();
    assert!(matches!(srv, ProtoError::Auth(_)), "{srv:?}");
    assert!(!srv.to_string().contains("claimed-name"), "{srv}");
}

#[tokio::test]
async fn a_hosts_key_under_another_name_is_denied() {
    for claimed in ["host-b", "nobody\nhost-b connected"] {
        let (a, b) = duplex(1 << 16);
        let server = tokio::spawn(async move { accept(a, &ring()).await });
        let host = connect(b, &key("key-of-host-a-0001"), claimed).await;
        assert!(
            matches!(&host, Err(ProtoError::Auth(m)) if m.contains("authentication failed")),
            "{:?}",
            host.err()
        );
        let srv = server.await.unwrap().err().unwrap().to_string();
        assert_eq!(
            srv,
            "authentication failed: the key of host `host-a` was presented under another name"
        );
    }
}

#[tokio::test]
async fn a_server_without_the_key_is_not_trusted() {
    // A fake server that answers with a made-up MAC.
    let (mut a, b) = duplex(1 << 16);
    tokio::spawn(async move {
        write_json(
            &mut a,
            &Frame::Challenge {
                version: PROTOCOL_VERSION,
                nonce: "00".repeat(32),
            },
        )
        .await;
        let _auth = read_json(&mut a).await;
        write_json(
            &mut a,
            &Frame::Welcome {
                mac: "11".repeat(32),
            },
        )
        .await;
        let _ = common::read_raw(&mut a).await;
    });
    let host = connect(b, &key("key-of-host-a-0001"), "host-a").await;
    assert!(matches!(host, Err(ProtoError::Auth(m)) if m.contains("did not prove")));
}

/// Host `host-a` answering a fake server that sends this challenge and then only listens.
async fn against_challenge(
    version: u32,
    nonce: String,
) -> Result<twinpath_mapproto::Conn<tokio::io::DuplexStream>, ProtoError> {
    let (mut a, b) = duplex(1 << 16);
    tokio::spawn(async move {
        write_json(&mut a, &Frame::Challenge { version, nonce }).await;
        let _ = common::read_raw(&mut a).await;
    });
    connect(b, &key("key-of-host-a-0001"), "host-a").await
}

#[tokio::test]
async fn a_version_1_server_is_named_with_both_versions() {
    let e = against_challenge(1, "00".repeat(32)).await.err().unwrap();
    assert!(matches!(
        e,
        ProtoError::Version {
            peer: Role::MapServer,
            theirs: 1
        }
    ));
    assert_eq!(
        e.to_string(),
        format!("map server speaks protocol version 1, this host speaks {PROTOCOL_VERSION}")
    );
}

#[tokio::test]
async fn a_version_1_host_is_denied_with_both_versions() {
    let (a, mut b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let Frame::Challenge { version, .. } = read_json(&mut b).await else {
        panic!("no challenge")
    };
    assert_eq!(version, PROTOCOL_VERSION);
    write_json(
        &mut b,
        &Frame::Auth {
            version: 1,
            host: "host-a".into(),
            nonce: "22".repeat(32),
            mac: "33".repeat(32),
        },
    )
    .await;
    let Frame::Denied { reason } = read_json(&mut b).await else {
        panic!("not denied")
    };
    assert!(
        reason.contains("version 1") && reason.contains(&format!("speaks {PROTOCOL_VERSION}")),
        "{reason}"
    );
    let e = server.await.unwrap().err().unwrap();
    assert!(matches!(
        e,
        ProtoError::Version {
            peer: Role::Host,
            theirs: 1
        }
    ));
    assert_eq!(
        e.to_string(),
        format!("host speaks protocol version 1, this map server speaks {PROTOCOL_VERSION}")
    );
}

#[tokio::test]
async fn frames_over_4_kib_before_authentication_are_refused_by_both_sides() {
    let big = vec![b' '; 5000];
    let limit = MAX_HANDSHAKE_FRAME.to_string();

    let (mut a, b) = duplex(1 << 16);
    let frame = big.clone();
    tokio::spawn(async move {
        write_raw(&mut a, &frame).await;
        let _ = common::read_raw(&mut a).await;
    });
    let host = connect(b, &key("key-of-host-a-0001"), "host-a").await;
    assert!(
        matches!(&host, Err(ProtoError::Malformed(m)) if m.contains(&limit)),
        "{:?}",
        host.err()
    );

    let (a, mut b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let _challenge = read_json(&mut b).await;
    write_raw(&mut b, &big).await;
    let srv = server.await.unwrap();
    assert!(
        matches!(&srv, Err(ProtoError::Malformed(m)) if m.contains(&limit)),
        "{:?}",
        srv.err()
    );
}

#[tokio::test]
async fn handshake_fields_of_the_wrong_size_and_garbage_are_clear_errors() {
    let (mut a, b) = duplex(1 << 16);
    tokio::spawn(async move {
        write_raw(&mut a, b"xyz").await;
        let _ = common::read_raw(&mut a).await;
    });
    let r = connect(b, &key("key-of-host-a-0001"), "host-a").await;
    assert!(matches!(r, Err(ProtoError::Malformed(_))), "{:?}", r.err());

    let r = against_challenge(2, "00".repeat(31)).await;
    assert!(
        matches!(&r, Err(ProtoError::Malformed(m)) if m.contains("challenge nonce")),
        "{:?}",
        r.err()
    );

    for (host, mac, what) in [
        ("h".repeat(256), "33".repeat(32), "host name"),
        ("host-a".into(), "33".repeat(33), "host MAC"),
    ] {
        let (a, mut b) = duplex(1 << 16);
        let server = tokio::spawn(async move { accept(a, &ring()).await });
        let _challenge = read_json(&mut b).await;
        write_json(
            &mut b,
            &Frame::Auth {
                version: 2,
                host,
                nonce: "22".repeat(32),
                mac,
            },
        )
        .await;
        let srv = server.await.unwrap();
        assert!(
            matches!(&srv, Err(ProtoError::Malformed(m)) if m.contains(what)),
            "{:?}",
            srv.err()
        );
    }
}

#[tokio::test]
async fn the_largest_map_fits_in_a_sealed_frame() {
    let (a, b) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(a, &ring()).await });
    let mut host = connect(b, &key("key-of-host-a-0001"), "host-a")
        .await
        .unwrap();
    let (mut srv, _) = server.await.unwrap().unwrap();
    let widest = Span {
        logical: u64::MAX,
        len: u64::MAX,
        kind: SpanKind::Data { physical: u64::MAX },
        access: Access::ReadWrite,
    };
    let frame = Frame::Reply {
        id: u64::MAX,
        reply: Reply::Map(MapGrant {
            lease: u64::MAX,
            file_size: u64::MAX,
            spans: vec![widest; MAX_SPANS],
        }),
    };
    let json = serde_json::to_vec(&frame).unwrap().len();
    assert!(json + 16 <= MAX_FRAME, "{json} bytes of JSON");
    let sent = frame.clone();
    tokio::spawn(async move { srv.send(&sent).await.unwrap() });
    assert_eq!(host.recv().await.unwrap(), frame);
}

#[test]
fn host_keys_are_unique_by_name_and_by_key() {
    let k = |s: &str| key(s);
    assert_eq!(HostKeys::new(vec![]).unwrap_err(), KeyError::NoHosts);
    let twice = HostKeys::new(vec![
        ("a".into(), k("key-number-one-0001")),
        ("a".into(), k("key-number-two-0002")),
    ]);
    assert_eq!(twice.unwrap_err(), KeyError::TwoKeys("a".into()));
    assert_eq!(
        KeyError::TwoKeys("a".into()).to_string(),
        "host `a` has two keys"
    );
    let shared = HostKeys::new(vec![
        ("a".into(), k("key-number-one-0001")),
        ("b".into(), k("key-number-one-0001")),
    ]);
    assert_eq!(
        shared.unwrap_err(),
        KeyError::SharedKey("a".into(), "b".into())
    );
    assert_eq!(
        HostKeys::new(vec![(String::new(), k("key-number-one-0001"))]).unwrap_err(),
        KeyError::BadName(String::new())
    );
    assert!(matches!(
        HostKeys::new(vec![("h".repeat(256), k("key-number-one-0001"))]),
        Err(KeyError::BadName(_))
    ));
}

#[test]
fn short_keys_are_refused_and_keys_never_print() {
    assert_eq!(
        twinpath_mapproto::Key::new(b"short".to_vec()).unwrap_err(),
        KeyError::TooShort(5)
    );
    let k = key("a-secret-value-123");
    assert_eq!(format!("{k:?}"), "Key(<redacted>)");
    assert!(!format!("{:?}", ring()).contains("key-of-host"));
}
