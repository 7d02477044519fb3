//! Fuzzes what either side of the map protocol makes of its peer's bytes: a frame's plaintext
//! (as both sides decode it after opening it), and a whole handshake against a peer that sends
//! anything (host side and server side). Input: [mode][bytes].
//! Invariants: a decoded frame is within the protocol's bounds (decoding it again after
//! encoding it gives the same frame), and a handshake with a peer that does not know the key
//! never succeeds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use twinpath_mapproto::{accept, connect, decode, HostKeys, Key};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(frame) = decode(bytes) {
                let again = serde_json::to_vec(&frame).expect("a decoded frame encodes");
                assert_eq!(decode(&again).expect("and decodes again"), frame);
            }
        }
        side => handshake(side == 1, bytes),
    }
});

/// One handshake whose peer sends `bytes` and closes.
fn handshake(host_side: bool, bytes: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let peer = async {
            let _ = theirs.write_all(bytes).await;
            let _ = theirs.shutdown().await;
            // Keep reading what our side sends, so that it never blocks on a full pipe.
            let _ = tokio::io::copy(&mut theirs, &mut tokio::io::sink()).await;
        };
        let key = Key::new(vec![7; 32]).unwrap();
        let ok = if host_side {
            let (ok, ()) = tokio::join!(
                async { connect(ours, &key, "fuzz-host").await.is_ok() },
                peer
            );
            ok
        } else {
            let keys = HostKeys::new(vec![("fuzz-host".into(), key)]).unwrap();
            let (ok, ()) = tokio::join!(async { accept(ours, &keys).await.is_ok() }, peer);
            ok
        };
        assert!(
            !ok,
            "a handshake succeeded with a peer that does not know the key"
        );
    });
}
