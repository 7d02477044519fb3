//! The shared volume as this host reaches it: a local block device (an FC HBA, a kernel iSCSI
//! initiator, multipath) or a LUN on an iSCSI target reached from userspace. Both pass the
//! same identity check (`lun.rs`) and their I/O the same extent guard (`direct.rs`); only how
//! the bytes move differs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use twinpath_blockio::{AnyEngine, Engine, EngineKind, QueueRing, Target};
use twinpath_core::{Error, ErrorKind, GuestBuffers, Permit, Result as IoResult};
use twinpath_filemap::pr::PrError;
use twinpath_filemap::read_direct;
use twinpath_iscsi::{IscsiUrl, Session};

pub trait Volume: Send + Sync {
    /// The device path or the iSCSI URL, for logs (never a password).
    fn describe(&self) -> String;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// `len` bytes at `offset`, for identity checks (superblock, token). Blocks.
    fn read_at(&self, offset: u64, len: usize) -> IoResult<Vec<u8>>;

    /// What reads and writes it at the physical offsets the guard let through; blocking work
    /// goes to `runtime`'s pool.
    fn io(&self, read_only: bool, runtime: &tokio::runtime::Handle) -> IoResult<Arc<dyn LunIo>>;

    /// Registers this host's persistent reservation `key` (replacing any it had), so that it
    /// may write while the map server holds a Registrants Only reservation; `Ok(false)` where
    /// the device has no persistent reservations. Blocks.
    fn register(&self, key: u64) -> IoResult<bool>;
}

/// Direct I/O on the LUN, under the grant's permit. The executor asks the permit before each
/// operation, and the LUN again right before the system call that lets the operation out
/// of this process: one stopped in between (SIGSTOP, a paused process, a throttled cgroup)
/// sends nothing of it when it resumes, if the grant went meanwhile.
/// `queue`: the I/O context of the queue worker the call runs on, if it does.
#[async_trait]
pub trait LunIo: Send + Sync {
    async fn read(
        &self,
        queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()>;
    async fn write(
        &self,
        queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()>;
    async fn flush(&self) -> IoResult<()>;
}

/// A block device's I/O goes to the kernel right after the engine asked the permit: at once
/// off the queue workers, at the worker's submit on them (the kernel then carries it out even
/// while this process is stopped).
struct Kernel(AnyEngine);

#[async_trait]
impl LunIo for Kernel {
    async fn read(
        &self,
        queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()> {
        self.0.read(queue, physical, bufs, Some(permit)).await
    }

    async fn write(
        &self,
        queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()> {
        self.0.write(queue, physical, bufs, Some(permit)).await
    }

    async fn flush(&self) -> IoResult<()> {
        self.0.flush(None).await
    }
}

/// A block device of this host, read with O_DIRECT (its page cache would be stale: the
/// server's filesystem writes the volume, not this host).
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    size: u64,
}

impl BlockDevice {
    pub fn open(path: &Path) -> IoResult<BlockDevice> {
        let at = |e| Error::io(path.display().to_string(), e);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(at)?;
        let size = twinpath_blockio::device_size(&file).map_err(at)?;
        Ok(BlockDevice {
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl Volume for BlockDevice {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        read_direct(&self.file, offset, len).map_err(|e| Error::io(self.describe(), e))
    }

    fn io(&self, read_only: bool, runtime: &tokio::runtime::Handle) -> IoResult<Arc<dyn LunIo>> {
        let target = Target::open(&self.path, read_only, true)?;
        let engine = AnyEngine::new(EngineKind::Auto, Arc::new(target), runtime)?;
        Ok(Arc::new(Kernel(engine)))
    }

    fn register(&self, key: u64) -> IoResult<bool> {
        match twinpath_filemap::pr::register(&self.file, key) {
            Ok(()) => Ok(true),
            Err(PrError::Unsupported) => Ok(false),
            Err(e) => Err(Error::with_source(
                ErrorKind::Io,
                format!("{}: PR REGISTER", self.describe()),
                e,
            )),
        }
    }
}

/// A LUN on an iSCSI target, logged in from userspace (libiscsi).
pub struct IscsiLun(Arc<Session>);

impl IscsiLun {
    /// Logs in as this host (`host_name` makes the initiator IQN), with the CHAP password
    /// read from `password_file` when the URL names a user.
    pub fn connect(
        url: &IscsiUrl,
        password_file: Option<&Path>,
        host_name: &str,
    ) -> IoResult<IscsiLun> {
        let password = password_file
            .map(|p| twinpath_core::read_secret("lun_password_file", p))
            .transpose()?;
        let session = Session::connect(url, password.as_deref(), &initiator_name(host_name))?;
        Ok(IscsiLun(Arc::new(session)))
    }
}

/// The initiator IQN of this host: IQNs allow lowercase letters, digits, `.`, `-` and `:`.
fn initiator_name(host_name: &str) -> String {
    let host: String = host_name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-11.io.twinpath:{host}")
}

impl Volume for IscsiLun {
    fn describe(&self) -> String {
        self.0.url().to_string()
    }

    fn size(&self) -> u64 {
        self.0.capacity()
    }

    fn read_at(&self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        // Whole blocks around the range, as SCSI reads them.
        let bs = u64::from(self.0.block_size());
        let start = offset - offset % bs;
        let end = (offset + len as u64).div_ceil(bs) * bs;
        let (bufs, data) = GuestBuffers::from_vec(vec![0; (end - start) as usize]);
        futures::executor::block_on(self.0.read(start, &bufs))?;
        drop(bufs);
        let data = data.lock().unwrap_or_else(|e| e.into_inner());
        let from = (offset - start) as usize;
        Ok(data[from..from + len].to_vec())
    }

    fn io(&self, _read_only: bool, _runtime: &tokio::runtime::Handle) -> IoResult<Arc<dyn LunIo>> {
        Ok(Arc::new(Iscsi(self.0.clone())))
    }

    fn register(&self, key: u64) -> IoResult<bool> {
        futures::executor::block_on(self.0.pr_register(key)).map(|()| true)
    }
}

/// The session queues commands and the data the target asks for in this process: it asks
/// the permit again before any of it leaves.
struct Iscsi(Arc<Session>);

#[async_trait]
impl LunIo for Iscsi {
    async fn read(
        &self,
        _queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()> {
        self.0.read_under(physical, &bufs, permit).await
    }

    async fn write(
        &self,
        _queue: Option<&QueueRing>,
        physical: u64,
        bufs: GuestBuffers,
        permit: Arc<dyn Permit>,
    ) -> IoResult<()> {
        self.0.write_under(physical, &bufs, permit).await
    }

    async fn flush(&self) -> IoResult<()> {
        self.0.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_names_are_valid_iqns() {
        assert_eq!(
            initiator_name("VMHost_07.lab"),
            "iqn.2026-11.io.twinpath:vmhost-07.lab"
        );
    }
}
