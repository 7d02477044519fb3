//! An open image on a share.

use std::sync::Arc;
use std::time::Duration;

use twinpath_core::stats::{Op, PathStats};
use twinpath_core::{DiskInfo, Error, ErrorKind, GuestBuffers, Result};
use twinpath_pipeline::{Pipeline, PipelineConfig};

use crate::file::SmbFile;

/// An open image on a share: its requests, run in the calling task, counted in its stats.
pub struct SmbImage {
    file: SmbFile,
    pipeline: Pipeline,
    /// Bounds the requests the pipeline does not (flush, zeroing).
    timeout: Duration,
    target: String,
    info: DiskInfo,
    stats: Arc<PathStats>,
    /// One write-zeroes fallback at a time: each holds a buffer of zeros and its frames.
    zeroing: tokio::sync::Mutex<()>,
}

/// The most one piece of the write-zeroes fallback writes: a guest may ask for a gigabyte of
/// zeros, which must not cost the daemon a gigabyte.
const ZERO_PIECE: u64 = 4 << 20;

impl SmbImage {
    pub(crate) fn new(
        file: SmbFile,
        pipeline: PipelineConfig,
        target: String,
        info: DiskInfo,
    ) -> SmbImage {
        SmbImage {
            file,
            pipeline: Pipeline::new(pipeline),
            timeout: pipeline.timeout,
            target,
            info,
            stats: Arc::default(),
            zeroing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    /// The counters of every request made through this image.
    pub fn stats(&self) -> Arc<PathStats> {
        self.stats.clone()
    }

    /// Refuses `[offset, offset + len)` unless it lies within the image: a write past its end
    /// would grow the file on the server.
    pub fn within(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        twinpath_core::within(self.info.capacity, offset, len, || {
            format!("{what} {}", self.target)
        })
    }

    /// Runs `op` of kind `kind` moving `bytes`, counted and with the image named in its error.
    async fn counted(
        &self,
        (kind, bytes): (Op, u64),
        op: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let timer = self.stats.io.begin();
        let result = op.await.map_err(|e| e.within(&self.target));
        timer.end(kind, bytes, result.is_ok());
        result
    }

    pub async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let len = bufs.len() as u64;
        self.within("read", offset, len)?;
        self.counted(
            (Op::Read, len),
            self.pipeline.read(&self.file, offset, bufs),
        )
        .await
    }

    pub async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let len = bufs.len() as u64;
        self.within("write", offset, len)?;
        self.counted(
            (Op::Write, len),
            self.pipeline.write(&self.file, offset, bufs),
        )
        .await
    }

    pub async fn flush(&self) -> Result<()> {
        self.counted(
            (Op::Other, 0),
            self.within_timeout("flush", self.file.flush()),
        )
        .await
    }

    /// Closes the image on the server (within the disk's timeout); it is not used again.
    pub async fn close(&self) {
        if tokio::time::timeout(self.timeout, self.file.close())
            .await
            .is_err()
        {
            tracing::warn!(image = self.target, "closing the image timed out");
        }
    }

    /// Zeros `[offset, offset + len)` (discard and write-zeroes alike).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.within("write-zeroes", offset, len)?;
        self.counted((Op::Other, 0), self.zero(offset, len)).await
    }

    async fn within_timeout(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!("{what} not done after {:?}", self.timeout),
                ))
            })
    }

    /// FSCTL_SET_ZERO_DATA, or zeros written through the pipeline where the server refuses it.
    async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let zeroed = self.within_timeout("set zero data", self.file.zero_range(offset, len));
        match zeroed.await {
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                tracing::debug!("{}: {e}; writing zeros", self.target);
                let _one = self.zeroing.lock().await;
                let (zeros, _) = GuestBuffers::from_vec(vec![0; len.min(ZERO_PIECE) as usize]);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_PIECE);
                    let piece = zeros.slice(0, n as usize);
                    self.pipeline
                        .write(&self.file, offset + done, &piece)
                        .await?;
                    done += n;
                }
                Ok(())
            }
            r => r,
        }
    }
}
