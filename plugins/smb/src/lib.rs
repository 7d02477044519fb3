//! The `smb` backend: a raw image on an SMB2/3 share, read and written through the pipeline
//! engine (many sections outstanding on one connection and one handle).
//!
//! ```yaml
//! backend:
//!   type: smb
//!   server: 127.0.0.1:445
//!   share: vmstore
//!   path: images/vm1-root.raw
//!   user: svc-vmhost               # omit for guest
//!   password_file: /etc/twinpath/smb.pass
//!   create_size: 20G               # create the image if missing
//!   section_size: 512K             # default; capped by the server's MaxRead/MaxWrite
//!   max_in_flight: 64              # sections outstanding per request
//!   timeout: 30                    # seconds per request
//! ```

mod file;
mod session;

/// The reply handling the fuzz targets (`fuzz/`) drive; built only with `--cfg fuzzing`.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The data a READ reply body carries for a read of `asked` bytes, or why it is refused.
    pub fn read_payload(body: Vec<u8>, asked: usize) -> Result<Vec<u8>, String> {
        crate::file::read_payload(body, asked)
            .map(|d| d.as_slice().to_vec())
            .map_err(|e| e.to_string())
    }
}

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use twinpath_core::stats::{Op, PathStats};
use twinpath_core::{
    parse_options, BackendSpec, BlockBackend, BlockIo, ByteSize, DiskContext, DiskInfo, Error,
    ErrorKind, GuestBuffers, OptionError, Plugin, Result,
};
use twinpath_pipeline::{Pipeline, PipelineConfig};

use crate::file::{ImageSpec, SmbFile};
use crate::session::{Login, Server};

pub struct SmbPlugin;

/// The plugin, to register in the binary's [`twinpath_core::Registry`].
pub fn plugin() -> Box<dyn Plugin> {
    Box::new(SmbPlugin)
}

fn default_in_flight() -> usize {
    64
}

/// A 1 MiB guest request goes out as two sections, which the server works on at once: measured
/// ~1.3x over whole-request sections at queue depth 1, no change at depth (docs/benchmarks.md).
const DEFAULT_SECTION: usize = 512 << 10;

fn default_timeout() -> u64 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    server: String,
    share: String,
    path: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    create_size: Option<ByteSize>,
    #[serde(default)]
    section_size: Option<ByteSize>,
    #[serde(default = "default_in_flight")]
    max_in_flight: usize,
    #[serde(default = "default_timeout")]
    timeout: u64,
}

/// An `smb` disk's options, parsed: [`SmbSpec::open_image`] opens its image.
#[derive(Debug)]
pub struct SmbSpec {
    server: String,
    share: String,
    path: String,
    user: Option<String>,
    password_file: Option<PathBuf>,
    create_size: Option<u64>,
    read_only: bool,
    /// Share the image only with readers (the disk's `lock`).
    lock: bool,
    pipeline: PipelineConfig,
}

impl Plugin for SmbPlugin {
    fn name(&self) -> &'static str {
        "smb"
    }

    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError> {
        Ok(Box::new(parse_spec(disk, options)?))
    }
}

/// Parses an `smb` disk's options (for plugins that build on an SMB image).
pub fn parse_spec(
    disk: &DiskContext,
    options: serde_yaml::Value,
) -> std::result::Result<SmbSpec, OptionError> {
    let o: Options = parse_options(options)?;
    if !o.server.contains(':') {
        return Err(OptionError::new(
            "server",
            "must be host:port, e.g. 127.0.0.1:445",
        ));
    }
    if o.path.is_empty()
        || o.path.starts_with(['/', '\\'])
        || o.path.split(['/', '\\']).any(|c| c == "..")
    {
        return Err(OptionError::new(
            "path",
            "must be a path inside the share, without `..`",
        ));
    }
    if o.user.is_some() != o.password_file.is_some() {
        return Err(OptionError::new(
            "password_file",
            "give both user and password_file, or neither (guest)",
        ));
    }
    if o.create_size.is_some() && disk.read_only {
        return Err(OptionError::new(
            "create_size",
            "cannot create an image for a read-only disk",
        ));
    }
    if !(1..=1024).contains(&o.max_in_flight) {
        return Err(OptionError::new(
            "max_in_flight",
            "must be between 1 and 1024",
        ));
    }
    if o.section_size
        .is_some_and(|s| !(4096..=64 << 20).contains(&s.0))
    {
        return Err(OptionError::new(
            "section_size",
            "must be between 4K and 64M (the server's maximum caps it further)",
        ));
    }
    if o.timeout == 0 {
        return Err(OptionError::new("timeout", "must be at least 1 second"));
    }
    Ok(SmbSpec {
        server: o.server,
        share: o.share,
        path: o.path,
        user: o.user,
        password_file: o.password_file,
        create_size: o.create_size.map(|s| s.0),
        read_only: disk.read_only,
        lock: disk.lock,
        pipeline: PipelineConfig {
            section_len: Some(o.section_size.map_or(DEFAULT_SECTION, |s| s.0 as usize)),
            max_in_flight: o.max_in_flight,
            timeout: Duration::from_secs(o.timeout),
        },
    })
}

#[async_trait]
impl BackendSpec for SmbSpec {
    fn describe(&self) -> String {
        let who = self.user.as_deref().unwrap_or("guest");
        format!(
            "smb //{}/{}/{} as {who}",
            self.server, self.share, self.path
        )
    }

    fn image(&self) -> Option<String> {
        Some(format!(
            "//{}/{}/{}",
            self.server,
            self.share.to_lowercase(),
            self.path.to_lowercase()
        ))
    }

    async fn open(&self) -> Result<Arc<dyn BlockBackend>> {
        Ok(Arc::new(SmbBackend {
            image: Arc::new(self.open_image().await?),
            runtime: tokio::runtime::Handle::current(),
        }))
    }
}

impl SmbSpec {
    pub fn describe(&self) -> String {
        BackendSpec::describe(self)
    }

    /// Logs in (or joins the server's session) and opens the image. Its operations run in
    /// the calling task, which must be on the tokio runtime.
    pub async fn open_image(&self) -> Result<SmbImage> {
        let password = match &self.password_file {
            Some(p) => twinpath_core::read_secret("password_file", p)?,
            None => String::new(),
        };
        let target = format!("//{}/{}/{}", self.server, self.share, self.path);
        let login = Login {
            server: self.server.clone(),
            share: self.share.clone(),
            user: self.user.clone().unwrap_or_default(),
            password,
        };
        let image = ImageSpec {
            path: self.path.clone(),
            read_only: self.read_only,
            create_size: self.create_size,
            exclusive: self.lock,
        };
        let section_len = self.pipeline.section_len;
        let file = async { SmbFile::open(Server::join(login).await?, image, section_len).await }
            .await
            .map_err(|e| e.within(&target))?;
        let mut info = DiskInfo::new(file.size());
        info.read_only = self.read_only;
        info.discard = true;
        info.write_zeroes = true;
        Ok(SmbImage {
            file,
            pipeline: Pipeline::new(self.pipeline),
            timeout: self.pipeline.timeout,
            target,
            info,
            stats: Arc::default(),
            zeroing: tokio::sync::Mutex::new(()),
        })
    }
}

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
    pub fn info(&self) -> DiskInfo {
        self.info.clone()
    }

    /// The counters of every request made through this image.
    pub fn stats(&self) -> Arc<PathStats> {
        self.stats.clone()
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
        self.counted(
            (Op::Read, len),
            self.pipeline.read(&self.file, offset, bufs),
        )
        .await
    }

    pub async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let len = bufs.len() as u64;
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

/// Requests run as tasks on the tokio runtime (the SMB connection and the pipeline's timers
/// live there); the device awaits their join handles from its queue threads.
struct SmbBackend {
    image: Arc<SmbImage>,
    runtime: tokio::runtime::Handle,
}

impl SmbBackend {
    async fn spawn<F>(
        &self,
        what: &'static str,
        task: impl FnOnce(Arc<SmbImage>) -> F,
    ) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        twinpath_core::run_on(&self.runtime, what, task(self.image.clone())).await
    }
}

#[async_trait]
impl BlockBackend for SmbBackend {
    fn info(&self) -> DiskInfo {
        self.image.info()
    }

    async fn release(&self) {
        let _ = self
            .spawn("close", |i| async move {
                i.close().await;
                Ok(())
            })
            .await;
    }

    fn paths(&self) -> Vec<(&'static str, Arc<PathStats>)> {
        vec![("network", self.image.stats())]
    }
}

#[async_trait]
impl BlockIo for SmbBackend {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.spawn("read", |i| async move { i.read(offset, &bufs).await })
            .await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.spawn("write", |i| async move { i.write(offset, &bufs).await })
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.spawn("flush", |i| async move { i.flush().await })
            .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.spawn("write-zeroes", |i| async move {
            i.write_zeroes(offset, len).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the base options with `extra` (a YAML mapping) laid over them.
    fn parse(extra: &str, read_only: bool) -> std::result::Result<String, String> {
        let mut options: serde_yaml::Mapping =
            serde_yaml::from_str("{server: '127.0.0.1:445', share: vmstore, path: a/vm.raw}")
                .unwrap();
        let extra: serde_yaml::Mapping = serde_yaml::from_str(extra).unwrap();
        options.extend(extra);
        let disk = DiskContext {
            name: "vm".into(),
            read_only,
            lock: true,
        };
        SmbPlugin
            .parse(&disk, serde_yaml::Value::Mapping(options))
            .map(|spec| spec.describe())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn good_options_parse_with_defaults() {
        assert_eq!(
            parse("{}", false).unwrap(),
            "smb //127.0.0.1:445/vmstore/a/vm.raw as guest"
        );
        assert!(parse("{user: svc, password_file: /p, section_size: 64K}", false).is_ok());
    }

    #[test]
    fn bad_options_name_the_key() {
        for (extra, read_only, key) in [
            ("{server: nas}", false, "server"),
            ("{path: ../etc/passwd}", false, "path"),
            ("{path: /abs.raw}", false, "path"),
            ("{user: svc}", false, "password_file"),
            ("{create_size: 1G}", true, "create_size"),
            ("{max_in_flight: 0}", false, "max_in_flight"),
            ("{section_size: 1K}", false, "section_size"),
            ("{timeout: 0}", false, "timeout"),
            ("{sektion_size: 1M}", false, "sektion_size"),
        ] {
            let e = parse(extra, read_only).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
