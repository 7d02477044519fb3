//! The `file` backend: a raw image file or a block device on this host.
//!
//! ```yaml
//! backend:
//!   type: file
//!   path: /var/lib/twinpath/vm1.raw   # image file or block device
//!   direct: false                     # O_DIRECT: bypass the host page cache
//!   create_size: 8G                   # create a sparse image of this size if missing
//!
//!   engine: auto                      # auto | inline | uring | threads
//! ```
//!
//! I/O engines: `inline` runs each request to completion in its queue thread, the fastest
//! choice where I/O never waits for a device (tmpfs, ramfs). `uring` gives each queue thread its own io_uring; requests the kernel can
//! finish at once (page cache, tmpfs) complete inside the submitting call, the rest complete
//! asynchronously. `threads` tries each request inline with `RWF_NOWAIT` and hands what would
//! block to a thread pool. `auto` picks `inline` for memory-backed images, else `uring` where
//! the kernel allows it, else `threads`.
//! docs/benchmarks.md has the measurements behind the default.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use twinpath_blockio::{AnyEngine, Engine, EngineKind, QueueRing, Target};
use twinpath_core::imagelock::{self, LockError};
use twinpath_core::{
    parse_options, BackendSpec, BlockBackend, BlockIo, ByteSize, DiskContext, DiskInfo, Error,
    ErrorKind, GuestBuffers, OpenContext, OptionError, Plugin, QueueLink, Result,
};

pub struct FilePlugin;

/// The plugin, to register in the binary's [`twinpath_core::Registry`].
pub fn plugin() -> Box<dyn Plugin> {
    Box::new(FilePlugin)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    path: PathBuf,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    create_size: Option<ByteSize>,
    #[serde(default)]
    engine: EngineKind,
}

#[derive(Debug)]
struct FileSpec {
    path: PathBuf,
    direct: bool,
    create_size: Option<ByteSize>,
    engine: EngineKind,
    read_only: bool,
    /// QEMU's image locks, so no other disk, daemon or QEMU writes the image meanwhile.
    lock: bool,
}

impl Plugin for FilePlugin {
    fn name(&self) -> &'static str {
        "file"
    }

    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError> {
        let o: Options = parse_options(options)?;
        if !o.path.is_absolute() {
            return Err(OptionError::new("path", "must be an absolute path"));
        }
        if let Some(size) = o.create_size {
            if size.0 == 0 || size.0 % 512 != 0 {
                return Err(OptionError::new(
                    "create_size",
                    "must be a positive multiple of 512 bytes",
                ));
            }
            if disk.read_only {
                return Err(OptionError::new(
                    "create_size",
                    "cannot create an image for a read-only disk",
                ));
            }
        }
        Ok(Box::new(FileSpec {
            path: o.path,
            direct: o.direct,
            create_size: o.create_size,
            engine: o.engine,
            read_only: disk.read_only,
            lock: disk.lock,
        }))
    }
}

#[async_trait]
impl BackendSpec for FileSpec {
    fn image(&self) -> Option<String> {
        let path = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        Some(path.display().to_string())
    }

    fn describe(&self) -> String {
        let mut s = format!("file {}", self.path.display());
        if self.direct {
            s.push_str(", O_DIRECT");
        }
        if let Some(size) = self.create_size {
            s.push_str(&format!(", created as {size} if missing"));
        }
        s
    }

    async fn open(&self, ctx: &OpenContext) -> Result<Arc<dyn BlockBackend>> {
        let target = Arc::new(open_image(self)?);
        if self.lock {
            lock_image(&target, self).await?;
        }
        Ok(Arc::new(FileBackend::new(self, target, ctx.runtime())?))
    }
}

/// How long an image's locks are waited for while their holder is a process that ended.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Takes QEMU's image locks on `target`. A daemon killed with writes of the image still in
/// the kernel holds its locks until those have landed (its open image is closed only then):
/// the image is this disk's once they have, so that none of them lands after a write of
/// this disk; a daemon started again at once waits for that (up to [`LOCK_WAIT`]). Any other
/// holder is refused at once.
async fn lock_image(target: &Target, spec: &FileSpec) -> Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        let e = match imagelock::lock(target.file(), &spec.path, spec.read_only) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let kind = match &e {
            LockError::InUse {
                exiting: true,
                holder,
                ..
            } if Instant::now() < deadline => {
                if !told {
                    tracing::warn!(path = %spec.path.display(), "image locked by {holder}, which has ended: waiting for its last I/O on the image to land");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            LockError::InUse { .. } => ErrorKind::InUse,
            LockError::Fcntl { .. } => ErrorKind::Io,
        };
        return Err(Error::new(kind, e.to_string()));
    }
}

/// Opens the image, creating it first where the spec says so.
fn open_image(spec: &FileSpec) -> Result<Target> {
    let path = &spec.path;
    if !path.exists() {
        match spec.create_size {
            Some(size) => create_image(path, size.0)
                .map_err(|e| Error::io(format!("create image {}", path.display()), e))?,
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "image {} does not exist (set create_size to create it)",
                        path.display()
                    ),
                ))
            }
        }
    }
    Target::open(path, spec.read_only, spec.direct)
}

struct FileBackend {
    engine: Arc<AnyEngine>,
    info: DiskInfo,
    /// Whether this backend holds QEMU's image locks on the image.
    locked: bool,
}

impl FileBackend {
    /// The disk on the open (and, where it takes them, locked) image `target`; the engine's
    /// blocking work goes to `runtime`'s pool.
    fn new(spec: &FileSpec, target: Arc<Target>, runtime: &tokio::runtime::Handle) -> Result<Self> {
        let path = &spec.path;
        let (capacity, block_size) = (target.capacity(), target.block_size());
        tracing::info!(path = %path.display(), capacity, block_size, direct = spec.direct, "opened image");
        let engine = Arc::new(AnyEngine::new(spec.engine, target, runtime)?);
        tracing::info!(path = %path.display(), engine = engine.name(), "I/O engine");
        let info = DiskInfo {
            capacity,
            block_size,
            read_only: spec.read_only,
            volatile_cache: true,
            discard: true,
            write_zeroes: true,
            serial: None,
        };
        Ok(FileBackend {
            engine,
            info,
            locked: spec.lock,
        })
    }
}

fn create_image(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(size)?;
    file.sync_all()?;
    Ok(())
}

#[async_trait]
impl BlockBackend for FileBackend {
    fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    /// A queue of a uring engine submits to its worker's own ring; the other engines serve
    /// every queue alike.
    fn queue(&self, link: QueueLink) -> Result<Option<Arc<dyn BlockIo>>> {
        Ok(self.engine.queue(link.notify).map(|ring| {
            Arc::new(FileQueue {
                engine: self.engine.clone(),
                ring,
            }) as Arc<dyn BlockIo>
        }))
    }

    async fn release(&self) {
        if self.locked {
            twinpath_core::imagelock::unlock(self.engine.target().file());
        }
    }
}

#[async_trait]
impl BlockIo for FileBackend {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.engine.read(None, offset, bufs, None).await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.engine.write(None, offset, bufs, None).await
    }

    async fn flush(&self) -> Result<()> {
        self.engine.flush(None).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.engine.discard(None, offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.engine.write_zeroes(None, offset, len, unmap).await
    }
}

/// One queue of a file disk on the uring engine: its operations go to the worker's own ring.
struct FileQueue {
    engine: Arc<AnyEngine>,
    ring: QueueRing,
}

#[async_trait]
impl BlockIo for FileQueue {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.engine.read(Some(&self.ring), offset, bufs, None).await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.engine
            .write(Some(&self.ring), offset, bufs, None)
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.engine.flush(Some(&self.ring)).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.engine.discard(Some(&self.ring), offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.engine
            .write_zeroes(Some(&self.ring), offset, len, unmap)
            .await
    }

    fn reap(&self) {
        self.ring.reap();
    }

    fn submit(&self) {
        self.ring.submit();
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    fn finish(&self) {
        self.ring.finish();
    }
}
