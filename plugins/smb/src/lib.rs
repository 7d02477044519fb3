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
//!
//! The image itself is `twinpath-smb`'s; this plugin runs its requests as tasks on the
//! runtime.

use std::sync::Arc;

use async_trait::async_trait;
use twinpath_core::stats::PathStats;
use twinpath_core::{
    parse_options, BackendSpec, BlockBackend, BlockIo, DiskContext, DiskInfo, GuestBuffers,
    OpenContext, OptionError, Plugin, Result,
};
use twinpath_smb::{ImageConfig, SmbImage, SmbOptions};

pub struct SmbPlugin;

/// The plugin, to register in the binary's [`twinpath_core::Registry`].
pub fn plugin() -> Box<dyn Plugin> {
    Box::new(SmbPlugin)
}

/// An `smb` disk: its image's options, checked.
#[derive(Debug)]
struct SmbSpec(ImageConfig);

impl Plugin for SmbPlugin {
    fn name(&self) -> &'static str {
        "smb"
    }

    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError> {
        let options: SmbOptions = parse_options(options)?;
        Ok(Box::new(SmbSpec(options.check(disk)?)))
    }
}

#[async_trait]
impl BackendSpec for SmbSpec {
    fn describe(&self) -> String {
        self.0.describe()
    }

    fn image(&self) -> Option<String> {
        Some(self.0.image())
    }

    async fn open(&self, ctx: &OpenContext) -> Result<Arc<dyn BlockBackend>> {
        Ok(Arc::new(SmbBackend {
            image: Arc::new(self.0.open(ctx).await?),
            runtime: ctx.runtime().clone(),
        }))
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
