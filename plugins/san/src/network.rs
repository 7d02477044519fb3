//! The network path of a san disk: what a request falls back to, and what allocation,
//! metadata and anything in doubt always take. An image over SMB ([`SmbImage`]); the direct
//! path's tests put a file in memory there.

use std::sync::Arc;

use async_trait::async_trait;
use twinpath_core::stats::PathStats;
use twinpath_core::{DiskInfo, GuestBuffers, Result};
use twinpath_smb::SmbImage;

#[async_trait]
pub(crate) trait NetworkPath: Send + Sync + 'static {
    /// The disk as the image describes it (its size is the disk's).
    fn info(&self) -> DiskInfo;

    /// The counters of every request through this path.
    fn stats(&self) -> Arc<PathStats>;

    /// Refuses `[offset, offset + len)` unless it lies within the image.
    fn within(&self, what: &str, offset: u64, len: u64) -> Result<()>;

    async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()>;

    async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()>;

    async fn flush(&self) -> Result<()>;

    /// Zeros `[offset, offset + len)` (discard and write-zeroes alike).
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Lets go of the image on the server; the path is not used again.
    async fn close(&self);
}

#[async_trait]
impl NetworkPath for SmbImage {
    fn info(&self) -> DiskInfo {
        SmbImage::info(self)
    }

    fn stats(&self) -> Arc<PathStats> {
        SmbImage::stats(self)
    }

    fn within(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        SmbImage::within(self, what, offset, len)
    }

    async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        SmbImage::read(self, offset, bufs).await
    }

    async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        SmbImage::write(self, offset, bufs).await
    }

    async fn flush(&self) -> Result<()> {
        SmbImage::flush(self).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        SmbImage::write_zeroes(self, offset, len).await
    }

    async fn close(&self) {
        SmbImage::close(self).await
    }
}
