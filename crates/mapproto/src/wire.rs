//! Length-delimited JSON frames on a byte stream.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::{Frame, ProtoError, MAX_FRAME};

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

pub struct ConnReader<S> {
    inner: FramedRead<ReadHalf<S>, LengthDelimitedCodec>,
}

pub struct ConnWriter<S> {
    inner: FramedWrite<WriteHalf<S>, LengthDelimitedCodec>,
}

/// Both halves of a framed connection.
pub struct Conn<S> {
    pub reader: ConnReader<S>,
    pub writer: ConnWriter<S>,
}

impl<S: AsyncRead + AsyncWrite> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        let (r, w) = tokio::io::split(stream);
        Conn {
            reader: ConnReader {
                inner: FramedRead::new(r, codec()),
            },
            writer: ConnWriter {
                inner: FramedWrite::new(w, codec()),
            },
        }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        self.writer.send(frame).await
    }

    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        self.reader.recv().await
    }
}

impl<S: AsyncRead> ConnReader<S> {
    /// The next frame; [`ProtoError::Closed`] at end of stream.
    pub async fn recv(&mut self) -> Result<Frame, ProtoError> {
        match self.inner.next().await {
            None => Err(ProtoError::Closed),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(
                ProtoError::Malformed(format!("{e} (frames are at most {MAX_FRAME} bytes)")),
            ),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| ProtoError::Malformed(e.to_string()))
            }
        }
    }
}

impl<S: AsyncWrite> ConnWriter<S> {
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let bytes = serde_json::to_vec(frame).map_err(|e| ProtoError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_FRAME {
            return Err(ProtoError::Malformed(format!(
                "frame of {} bytes exceeds {MAX_FRAME}",
                bytes.len()
            )));
        }
        self.inner.send(bytes.as_slice()).await?;
        Ok(())
    }
}

impl<S: AsyncWrite> ConnWriter<S> {
    /// Flushes and shuts the write side down, so the peer sees the end of the stream even
    /// while the read half is still held.
    pub async fn close(&mut self) -> Result<(), ProtoError> {
        SinkExt::<&[u8]>::close(&mut self.inner).await?;
        Ok(())
    }
}
