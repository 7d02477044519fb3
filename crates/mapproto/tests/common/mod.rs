//! Frames as raw bytes, for peers that do not follow the protocol (old, forged, oversized).

#![allow(dead_code)] // each test file uses its own part of these

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use twinpath_mapproto::{Frame, Key};

pub fn key(s: &str) -> Key {
    Key::new(s.as_bytes().to_vec()).unwrap()
}

pub async fn write_raw(s: &mut (impl AsyncWrite + Unpin), payload: &[u8]) {
    s.write_all(&(payload.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(payload).await.unwrap();
}

pub async fn write_json(s: &mut (impl AsyncWrite + Unpin), frame: &Frame) {
    write_raw(s, &serde_json::to_vec(frame).unwrap()).await;
}

/// One frame's payload; `None` at end of stream.
pub async fn read_raw(s: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).await.ok()?;
    Some(payload)
}

pub async fn read_json(s: &mut (impl AsyncRead + Unpin)) -> Frame {
    serde_json::from_slice(&read_raw(s).await.unwrap()).unwrap()
}
