//! Length-delimited frames on a byte stream: plain JSON during the handshake, sealed with
//! ChaCha20-Poly1305 after it (see the crate documentation for the construction).

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::{bounds, Frame, ProtoError, Role, MAX_FRAME, MAX_HANDSHAKE_FRAME};

/// Bytes the AEAD tag adds to a frame.
const TAG: usize = 16;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_HANDSHAKE_FRAME)
        .new_codec()
}

/// One direction of a session: its cipher and how many frames went that way.
struct Direction {
    cipher: ChaCha20Poly1305,
    seq: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Direction {
        Direction {
            cipher: ChaCha20Poly1305::new(key.into()),
            seq: 0,
        }
    }

    /// The sequence number and nonce of the next frame. Both sides count and the number is
    /// never sent, so a frame out of its place is opened with another nonce and fails.
    fn next(&mut self) -> Result<(u64, Nonce), ProtoError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(ProtoError::Exhausted)?;
        let mut nonce = Nonce::default();
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        Ok((seq, nonce))
    }
}

pub struct ConnReader<S> {
    inner: FramedRead<ReadHalf<S>, LengthDelimitedCodec>,
    /// Who sends the frames read here.
    peer: Role,
    open: Option<Direction>,
    /// After an error the stream's place is lost: nothing more is read from it.
    failed: bool,
}

pub struct ConnWriter<S> {
    inner: FramedWrite<WriteHalf<S>, LengthDelimitedCodec>,
    seal: Option<Direction>,
}

/// Both halves of a framed connection, as [`crate::accept`] and [`crate::connect`] leave it:
/// authenticated, every frame sealed.
pub struct Conn<S> {
    pub reader: ConnReader<S>,
    pub writer: ConnWriter<S>,
}

impl<S: AsyncRead + AsyncWrite> Conn<S> {
    /// A connection in its handshake: plain frames of at most [`MAX_HANDSHAKE_FRAME`] bytes
    /// from `peer`.
    pub(crate) fn new(stream: S, peer: Role) -> Conn<S> {
        let (r, w) = tokio::io::split(stream);
        Conn {
            reader: ConnReader {
                inner: FramedRead::new(r, codec()),
                peer,
                open: None,
                failed: false,
            },
            writer: ConnWriter {
                inner: FramedWrite::new(w, codec()),
                seal: None,
            },
        }
    }

    /// The handshake is done: from the next frame on, frames are sealed with `send` and
    /// opened with `recv`, and may be as large as [`MAX_FRAME`].
    pub(crate) fn secure(&mut self, send: &[u8; 32], recv: &[u8; 32]) {
        self.writer.seal = Some(Direction::new(send));
        self.writer
            .inner
            .encoder_mut()
            .set_max_frame_length(MAX_FRAME);
        self.reader.open = Some(Direction::new(recv));
        self.reader
            .inner
            .decoder_mut()
            .set_max_frame_length(MAX_FRAME);
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        self.writer.send(frame).await
    }

    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        self.reader.recv().await
    }
}

impl<S: AsyncRead> ConnReader<S> {
    /// The next frame, opened and checked against the protocol's bounds;
    /// [`ProtoError::Closed`] at end of stream and after any earlier error.
    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        if self.failed {
            return Err(ProtoError::Closed);
        }
        let r = self.next_frame().await;
        self.failed = r.is_err();
        r
    }

    async fn next_frame(&mut self) -> Result<Frame, ProtoError> {
        let limit = self.inner.decoder().max_frame_length();
        let mut bytes = match self.inner.next().await {
            None => return Err(ProtoError::Closed),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(ProtoError::Malformed(format!(
                    "{e} (frames from the {} are at most {limit} bytes here)",
                    self.peer
                )))
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(bytes)) => bytes,
        };
        if let Some(d) = &mut self.open {
            let (seq, nonce) = d.next()?;
            d.cipher
                .decrypt_in_place(&nonce, b"", &mut bytes)
                .map_err(|_| ProtoError::Tampered {
                    peer: self.peer,
                    seq,
                })?;
        }
        decode(&bytes)
    }
}

/// The frame whose plaintext is `bytes`, checked against the protocol's bounds: what either
/// side makes of what its peer sent.
pub fn decode(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let mut frame: Frame =
        serde_json::from_slice(bytes).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    bounds::check(&mut frame)?;
    Ok(frame)
}

impl<S: AsyncWrite> ConnWriter<S> {
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let mut bytes =
            serde_json::to_vec(frame).map_err(|e| ProtoError::Malformed(e.to_string()))?;
        let limit = self.inner.encoder().max_frame_length();
        let sealed = bytes.len() + if self.seal.is_some() { TAG } else { 0 };
        if sealed > limit {
            return Err(ProtoError::Malformed(format!(
                "frame of {sealed} bytes exceeds {limit}"
            )));
        }
        if let Some(d) = &mut self.seal {
            let (seq, nonce) = d.next()?;
            d.cipher
                .encrypt_in_place(&nonce, b"", &mut bytes)
                .map_err(|_| ProtoError::Malformed(format!("frame {seq} could not be sealed")))?;
        }
        self.inner.send(bytes.as_slice()).await?;
        Ok(())
    }

    /// Flushes and shuts the write side down, so the peer sees the end of the stream even
    /// while the read half is still held.
    pub async fn close(&mut self) -> Result<(), ProtoError> {
        SinkExt::<&[u8]>::close(&mut self.inner).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_sequence_number_is_never_used() {
        let mut d = Direction::new(&[7; 32]);
        assert_eq!(d.next().unwrap().0, 0);
        d.seq = u64::MAX - 1;
        assert_eq!(d.next().unwrap().0, u64::MAX - 1);
        assert!(matches!(d.next(), Err(ProtoError::Exhausted)));
        assert!(matches!(d.next(), Err(ProtoError::Exhausted)));
    }
}
