//! The options of an image on a share, and opening it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use twinpath_core::{ByteSize, DiskContext, DiskInfo, OpenContext, OptionError, Result};
use twinpath_pipeline::PipelineConfig;

use crate::file::{ImageSpec, SmbFile};
use crate::image::SmbImage;
use crate::session::{Login, Server, Sessions};

fn default_in_flight() -> usize {
    64
}

/// A 1 MiB guest request goes out as two sections, which the server works on at once: measured
/// ~1.3x over whole-request sections at queue depth 1, no change at depth (docs/benchmarks.md).
const DEFAULT_SECTION: usize = 512 << 10;

fn default_timeout() -> u64 {
    30
}

/// The options that name and tune an image on a share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmbOptions {
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

/// An image's options, checked, with what the disk says about it: [`ImageConfig::open`]
/// opens it.
#[derive(Debug)]
pub struct ImageConfig {
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

impl SmbOptions {
    /// Checks the options for `disk`; an error names the key.
    pub fn check(self, disk: &DiskContext) -> std::result::Result<ImageConfig, OptionError> {
        let o = self;
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
        Ok(ImageConfig {
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
}

impl ImageConfig {
    /// One line for `twinpath check`.
    pub fn describe(&self) -> String {
        let who = self.user.as_deref().unwrap_or("guest");
        format!(
            "smb //{}/{}/{} as {who}",
            self.server, self.share, self.path
        )
    }

    /// The image's path inside the share.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The image as `//server/share/path`, in the case the server compares names in.
    pub fn image(&self) -> String {
        format!(
            "//{}/{}/{}",
            self.server,
            self.share.to_lowercase(),
            self.path.to_lowercase()
        )
    }

    /// Logs in (or joins the session another disk of `ctx` has with the server, share and
    /// user) and opens the image. Its operations run in the calling task, which must be on
    /// `ctx`'s runtime.
    pub async fn open(&self, ctx: &OpenContext) -> Result<SmbImage> {
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
        let sessions = ctx.shared::<Sessions>();
        let file = async {
            let server = Server::join(&sessions, login).await?;
            SmbFile::open(server, image, section_len).await
        }
        .await
        .map_err(|e| e.within(&target))?;
        let mut info = DiskInfo::new(file.size());
        info.read_only = self.read_only;
        info.discard = true;
        info.write_zeroes = true;
        Ok(SmbImage::new(file, self.pipeline, target, info))
    }
}
