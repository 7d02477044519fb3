//! The sealed session against an on-path relay, and bounds on what a server may send, with a
//! real `MapClient` and a real `accept` over TCP on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{key, read_raw, write_raw};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twinpath_filemap::{Access, Span, SpanKind};
use twinpath_mapproto::{
    accept, Frame, HostKeys, MapClient, MapGrant, ProtoError, Reply, Request, Role, VolumeIdentity,
    MAX_REASON, MAX_SPANS,
};

const HOST: &str = "host-a";
const KEY: &str = "key-of-host-a-0001";

fn ring() -> HostKeys {
    HostKeys::new(vec![(HOST.into(), key(KEY))]).unwrap()
}

fn identity() -> VolumeIdentity {
    VolumeIdentity {
        fs_type: "xfs".into(),
        uuid: "09".repeat(16),
        size: 1 << 40,
        token_offset: 1 << 20,
        token_len: 4096,
        token_sha256: "ab".repeat(32),
    }
}

/// Physical offset of every extent the honest server grants.
const HONEST: u64 = 1 << 30;

fn grant(offset: u64, len: u64, physical: u64) -> Reply {
    Reply::Map(MapGrant {
        lease: 1,
        file_size: 1 << 30,
        spans: vec![Span {
            logical: offset,
            len,
            kind: SpanKind::Data { physical },
            access: Access::ReadWrite,
        }],
    })
}

fn get_map() -> Request {
    Request::GetMap {
        path: "images/tenant-a.raw".into(),
        offset: 0,
        len: 1 << 20,
        write: true,
    }
}

/// A map server answering every request honestly; how each connection ended arrives on the
/// channel.
async fn server() -> (SocketAddr, mpsc::UnboundedReceiver<ProtoError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, endings) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let keys = ring();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut conn = match accept(stream, &keys).await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    let _ = ended.send(e);
                    continue;
                }
            };
            let ended = ended.clone();
            tokio::spawn(async move {
                loop {
                    let (id, request) = match conn.recv().await {
                        Ok(Frame::Request { id, request }) => (id, request),
                        Ok(other) => panic!("server got {other:?}"),
                        Err(e) => {
                            let _ = ended.send(e);
                            return;
                        }
                    };
                    let reply = match request {
                        Request::Identity => Reply::Identity(identity()),
                        Request::GetMap { offset, len, .. } => grant(offset, len, HONEST),
                        _ => Reply::Done,
                    };
                    if conn.send(&Frame::Reply { id, reply }).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, endings)
}

/// What the relay does with the n-th frame after the handshake in one direction: the frames
/// it forwards instead.
type Tamper = Box<dyn FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send>;

fn pass() -> Tamper {
    Box::new(|_, f| vec![f])
}

/// Copies frames from `from` to `to`, the first `handshake` of them untouched.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    handshake: usize,
    mut tamper: Tamper,
) {
    let mut n = 0;
    while let Some(f) = read_raw(&mut from).await {
        let out = if n < handshake {
            vec![f]
        } else {
            tamper(n - handshake, f)
        };
        n += 1;
        for f in out {
            write_raw(&mut to, &f).await;
        }
    }
}

/// An on-path relay without the key in front of `server`: the handshake (Challenge and
/// Welcome to the host, Auth to the server) passes untouched, later frames go through the
/// tamper functions.
async fn relay(server: SocketAddr, to_host: Tamper, to_server: Tamper) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (host, _) = listener.accept().await.unwrap();
        let upstream = TcpStream::connect(server).await.unwrap();
        let (host_r, host_w) = host.into_split();
        let (up_r, up_w) = upstream.into_split();
        tokio::spawn(pump(up_r, host_w, 2, to_host));
        tokio::spawn(pump(host_r, up_w, 1, to_server));
    });
    addr
}

async fn client_via(to_host: Tamper, to_server: Tamper) -> MapClient {
    let (srv, _) = server().await;
    let addr = relay(srv, to_host, to_server).await;
    let (client, _recalls) = MapClient::connect(&addr.to_string(), &key(KEY), HOST)
        .await
        .unwrap();
    client
}

fn assert_tampered(r: Result<Reply, ProtoError>) {
    match r {
        Err(ProtoError::Lost(m)) => assert!(
            m.contains("from the map server failed authentication"),
            "{m}"
        ),
        other => panic!("the altered reply reached the caller: {other:?}"),
    }
}

#[tokio::test]
async fn an_honest_relay_changes_nothing_and_sees_no_plaintext() {
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (up, down) = (seen.clone(), seen.clone());
    let client = client_via(
        Box::new(move |_, f| {
            down.lock().unwrap().extend_from_slice(&f);
            vec![f]
        }),
        Box::new(move |_, f| {
            up.lock().unwrap().extend_from_slice(&f);
            vec![f]
        }),
    )
    .await;
    assert_eq!(
        client.call(Request::Identity).await.unwrap(),
        Reply::Identity(identity())
    );
    assert_eq!(
        client.call(get_map()).await.unwrap(),
        grant(0, 1 << 20, HONEST)
    );
    let seen = seen.lock().unwrap();
    for plain in [&b"tenant-a"[..], b"get_map", b"physical", b"xfs"] {
        assert!(!seen.windows(plain.len()).any(|w| w == plain));
    }
}

#[tokio::test]
async fn a_flipped_bit_in_a_reply_drops_the_connection() {
    let client = client_via(
        Box::new(|_, mut f| {
            f[10] ^= 1;
            vec![f]
        }),
        pass(),
    )
    .await;
    assert_tampered(client.call(get_map()).await);
    assert!(client.is_closed());
    assert!(matches!(
        client.call(Request::Identity).await,
        Err(ProtoError::Lost(_))
    ));
}

#[tokio::test]
async fn a_replayed_reply_drops_the_connection() {
    let mut first = None;
    let client = client_via(
        Box::new(move |n, f| match n {
            0 => {
                first = Some(f.clone());
                vec![f]
            }
            _ => vec![first.clone().unwrap(), f],
        }),
        pass(),
    )
    .await;
    assert_eq!(
        client.call(get_map()).await.unwrap(),
        grant(0, 1 << 20, HONEST)
    );
    assert_tampered(client.call(get_map()).await);
    assert!(client.is_closed());
}

/// Two calls in flight on a connection the relay breaks: both fail as tampered.
async fn two_calls_fail_as_tampered(client: &MapClient) {
    let (a, b) = tokio::join!(client.call(get_map()), client.call(Request::Identity));
    assert_tampered(a);
    assert_tampered(b);
}

#[tokio::test]
async fn swapped_replies_drop_the_connection() {
    let mut held = None;
    let client = client_via(
        Box::new(move |n, f| match n {
            0 => {
                held = Some(f);
                vec![]
            }
            _ => vec![f, held.take().unwrap()],
        }),
        pass(),
    )
    .await;
    two_calls_fail_as_tampered(&client).await;
}

#[tokio::test]
async fn a_dropped_reply_drops_the_connection() {
    let client = client_via(
        Box::new(|n, f| if n == 0 { vec![] } else { vec![f] }),
        pass(),
    )
    .await;
    two_calls_fail_as_tampered(&client).await;
}

#[tokio::test]
async fn an_injected_map_with_rewritten_offsets_never_reaches_the_caller() {
    let forged = serde_json::to_vec(&Frame::Reply {
        id: 1,
        reply: grant(0, 1 << 20, 7 << 30),
    })
    .unwrap();
    let client = client_via(
        Box::new(move |n, f| {
            if n == 0 {
                vec![forged.clone(), f]
            } else {
                vec![f]
            }
        }),
        pass(),
    )
    .await;
    assert_tampered(client.call(get_map()).await);
}

#[tokio::test]
async fn a_tampered_request_makes_the_server_drop_the_connection() {
    let (srv, mut endings) = server().await;
    let addr = relay(
        srv,
        pass(),
        Box::new(|_, mut f| {
            f[3] ^= 0x80;
            vec![f]
        }),
    )
    .await;
    let (client, _recalls) = MapClient::connect(&addr.to_string(), &key(KEY), HOST)
        .await
        .unwrap();
    let r = client.call(get_map()).await;
    assert!(
        matches!(&r, Err(ProtoError::Lost(m)) if m.contains("closed")),
        "{r:?}"
    );
    let e = endings.recv().await.unwrap();
    assert!(
        matches!(
            e,
            ProtoError::Tampered {
                peer: Role::Host,
                seq: 0
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("failed authentication"), "{e}");
}

/// A map server that knows the key but answers the first request with `reply`; whether the
/// host then dropped the connection arrives on the channel.
async fn server_answering(reply: Reply) -> (SocketAddr, mpsc::UnboundedReceiver<ProtoError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, endings) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut conn, _) = accept(stream, &ring()).await.unwrap();
        let Ok(Frame::Request { id, .. }) = conn.recv().await else {
            panic!("no request")
        };
        conn.send(&Frame::Reply { id, reply }).await.unwrap();
        let _ = ended.send(conn.recv().await.err().unwrap());
    });
    (addr, endings)
}

async fn rejected(reply: Reply, why: &str) {
    let (addr, mut endings) = server_answering(reply).await;
    let (client, _recalls) = MapClient::connect(&addr.to_string(), &key(KEY), HOST)
        .await
        .unwrap();
    let r = client.call(Request::Identity).await;
    assert!(
        matches!(&r, Err(ProtoError::Lost(m)) if m.contains(why)),
        "{r:?}"
    );
    assert!(client.is_closed());
    // The host hung up on the server.
    assert!(matches!(endings.recv().await, Some(ProtoError::Closed)));
}

#[tokio::test]
async fn a_huge_token_length_is_rejected_before_use() {
    let mut id = identity();
    id.token_len = 1 << 40;
    rejected(
        Reply::Identity(id),
        "token_len is 1099511627776, at most 4096",
    )
    .await;
}

#[tokio::test]
async fn a_map_of_too_many_spans_is_rejected() {
    let span = Span {
        logical: 0,
        len: 4096,
        kind: SpanKind::Zero,
        access: Access::Read,
    };
    let map = Reply::Map(MapGrant {
        lease: 1,
        file_size: 1 << 30,
        spans: vec![span; MAX_SPANS + 1],
    });
    rejected(map, "span count is 65537, at most 65536").await;
}

#[tokio::test]
async fn a_long_reason_is_cut_and_loses_its_control_characters() {
    let (addr, _) = server_answering(Reply::Refused {
        reason: "no\n".repeat(50_000),
    })
    .await;
    let (client, _recalls) = MapClient::connect(&addr.to_string(), &key(KEY), HOST)
        .await
        .unwrap();
    let Reply::Refused { reason } = client.call(Request::Identity).await.unwrap() else {
        panic!("not refused")
    };
    assert_eq!(reason, "no".repeat(MAX_REASON / 2));
}
