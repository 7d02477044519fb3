//! The host side of a map connection: requests matched to replies by id, recalls handed to
//! the owner as they arrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::{ConnWriter, Frame, Key, ProtoError, Reply, Request};

/// The server wants a lease back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recall {
    pub lease: u64,
    pub reason: String,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

pub struct MapClient {
    writer: tokio::sync::Mutex<ConnWriter<TcpStream>>,
    pending: Pending,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MapClient {
    /// Connects to the map server at `addr` and authenticates as `host`. Recalls arrive on
    /// the returned channel; it closes when the connection does.
    pub async fn connect(
        addr: &str,
        key: &Key,
        host: &str,
    ) -> Result<(MapClient, mpsc::UnboundedReceiver<Recall>), ProtoError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let conn = crate::connect(stream, key, host).await?;
        let pending: Pending = Arc::default();
        let (recalls, recalled) = mpsc::unbounded_channel();
        let mut reader = conn.reader;
        let replies = pending.clone();
        tokio::spawn(async move {
            loop {
                match reader.recv().await {
                    Ok(Frame::Reply { id, reply }) => {
                        if let Some(waiter) = lock(&replies).remove(&id) {
                            let _ = waiter.send(reply);
                        }
                    }
                    Ok(Frame::Recall { lease, reason }) => {
                        let _ = recalls.send(Recall { lease, reason });
                    }
                    Ok(other) => tracing::warn!("map client: ignored frame {other:?}"),
                    Err(_) => break,
                }
            }
            // Waiters see their sender dropped: the call fails with Closed.
            lock(&replies).clear();
        });
        Ok((
            MapClient {
                writer: tokio::sync::Mutex::new(conn.writer),
                pending,
                next_id: AtomicU64::new(1),
            },
            recalled,
        ))
    }

    /// Sends `request` and waits for its reply.
    pub async fn call(&self, request: Request) -> Result<Reply, ProtoError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let sent = self
            .writer
            .lock()
            .await
            .send(&Frame::Request { id, request })
            .await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        rx.await.map_err(|_| ProtoError::Closed)
    }
}
