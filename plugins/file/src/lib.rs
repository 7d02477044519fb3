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

mod io;
mod uring;

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use twinpath_core::{
    parse_options, BackendSpec, BlockBackend, BlockIo, ByteSize, DiskContext, DiskInfo, Error,
    ErrorKind, GuestBuffers, OptionError, Permit, Plugin, QueueLink, Result,
};

pub use crate::io::EngineKind;
use crate::io::{Engine, FileKind};
pub use crate::uring::QueueRing;

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

    async fn open(&self) -> Result<Arc<dyn BlockBackend>> {
        Ok(Arc::new(FileBackend::open(self)?))
    }
}

/// Opens a block device (or file) for direct I/O with O_DIRECT on the chosen engine: how the
/// `san` plugin reads and writes a shared LUN.
pub fn open_direct(
    path: &std::path::Path,
    read_only: bool,
    engine: EngineKind,
) -> Result<DirectDevice> {
    let spec = FileSpec {
        path: path.to_path_buf(),
        direct: true,
        create_size: None,
        read_only,
        engine,
        // A shared LUN: every san disk of the host opens it, by design.
        lock: false,
    };
    Ok(DirectDevice(FileBackend::open(&spec)?))
}

/// A device opened by [`open_direct`]. Its reads and writes go under a permit, asked right
/// before the system call that hands them to the kernel (on a queue worker, at the worker's
/// submit, which may come after the worker was stopped and resumed).
pub struct DirectDevice(FileBackend);

impl DirectDevice {
    /// The I/O context of the queue worker whose eventfd is `notify`, where the engine has
    /// one (its io_uring), to hand to the calls that run on that worker.
    pub fn queue(&self, notify: OwnedFd) -> Option<QueueRing> {
        self.0.engine.queue(notify)
    }

    pub async fn read(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> Result<()> {
        self.0.engine.read(queue, offset, bufs, Some(permit)).await
    }

    pub async fn write(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> Result<()> {
        self.0.engine.write(queue, offset, bufs, Some(permit)).await
    }

    pub async fn flush(&self) -> Result<()> {
        self.0.engine.flush(None).await
    }
}

struct FileBackend {
    engine: Arc<Engine>,
    info: DiskInfo,
    /// The image, while this backend holds QEMU's image locks on it.
    locked: Option<Arc<std::fs::File>>,
}

impl FileBackend {
    fn open(spec: &FileSpec) -> Result<Self> {
        let path = &spec.path;
        let ctx = |what: &str| format!("{what} {}", path.display());
        if !path.exists() {
            match spec.create_size {
                Some(size) => {
                    create_image(path, size.0).map_err(|e| Error::io(ctx("create image"), e))?
                }
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
        let mut opts = OpenOptions::new();
        opts.read(true).write(!spec.read_only);
        let flags = if spec.direct { libc::O_DIRECT } else { 0 };
        // Without O_NOATIME every read updates the inode's access time (for a LUN, a locked
        // update of the device inode per request). Only the owner or CAP_FOWNER may ask.
        let file = match opts
            .clone()
            .custom_flags(flags | libc::O_NOATIME)
            .open(path)
        {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => opts.custom_flags(flags).open(path),
            opened => opened,
        }
        .map_err(|e| Error::io(ctx("open"), e))?;
        if spec.lock {
            twinpath_core::imagelock::lock(&file, path, spec.read_only)
                .map_err(|e| Error::new(ErrorKind::InUse, e))?;
        }
        let meta = file.metadata().map_err(|e| Error::io(ctx("stat"), e))?;
        let (kind, capacity, block_size) = if meta.file_type().is_block_device() {
            let size = twinpath_core::blockdev::size(&file)
                .map_err(|e| Error::io(ctx("BLKGETSIZE64"), e))?;
            let bs = if spec.direct {
                io::block_device_sector_size(&file).map_err(|e| Error::io(ctx("BLKSSZGET"), e))?
            } else {
                512
            };
            (FileKind::BlockDevice, size, bs)
        } else if meta.is_file() {
            let bs = if spec.direct {
                io::direct_io_alignment(&file).unwrap_or(4096).max(512)
            } else {
                512
            };
            (FileKind::Regular, meta.len(), bs)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        let capacity = capacity - capacity % u64::from(block_size);
        if capacity == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is empty", path.display()),
            ));
        }
        tracing::info!(path = %path.display(), capacity, block_size, direct = spec.direct, "opened image");
        let file = Arc::new(file);
        let locked = spec.lock.then(|| file.clone());
        let engine = Arc::new(Engine::new(
            file,
            kind,
            spec.direct,
            path.clone(),
            block_size,
            spec.engine,
        )?);
        tracing::info!(path = %path.display(), engine = engine.engine_name(), "I/O engine");
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
            locked,
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
        if let Some(f) = &self.locked {
            twinpath_core::imagelock::unlock(f);
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
    engine: Arc<Engine>,
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
