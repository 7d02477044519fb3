//! The `san` backend: an image on an SMB share that is also read and written directly on the
//! shared LUN holding the server's volume, at the offsets a map server grants. The SMB path
//! (`twinpath-smb`, as the `smb` plugin uses it) is always open; the direct path is used
//! where it may be and falls back to SMB wherever anything is in doubt, so its failures are
//! never the guest's.
//!
//! ```yaml
//! backend:
//!   type: san
//!   server: 192.0.2.10:445            # every `smb` key: the network path
//!   share: vmstore
//!   path: images/vm1.raw              # also the image's path under the map server's export
//!   user: svc-vmhost
//!   password_file: /etc/twinpath/smb.pass
//!   map_server: 192.0.2.10:7410       # the map service on the file server
//!   map_key_file: /etc/twinpath/map.key
//!   lun: auto                         # or the device path, e.g. /dev/mapper/mpatha, or
//!                                     # iscsi://[user@]host[:port]/iqn/lun (userspace
//!                                     # initiator, libiscsi; no kernel initiator needed)
//!   lun_password_file: /etc/twinpath/chap.pass  # CHAP secret when the iscsi URL has a user
//!   host_name: vmhost-07              # how this host is named to the map server (default:
//!                                     # the system's host name)
//!   map_timeout: 2s                   # each map call waits at most this long; then the
//!                                     # request goes over SMB
//!   throttle:                         # optional, per host (all disks of one map server)
//!     bytes_per_sec: 400M             # direct-path bytes per second
//!     iops: 20000                     # direct-path requests per second
//!     on_exceed: network              # or `delay`
//! ```

mod direct;
mod link;
mod lun;
mod network;
mod state;
mod throttle;
mod volume;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use twinpath_blockio::QueueRing;
use twinpath_core::stats::PathStats;
use twinpath_core::{
    parse_options, split_options, BackendSpec, BlockBackend, BlockIo, DiskContext, DiskInfo,
    GuestBuffers, OpenContext, OptionError, Plugin, QueueLink, Result,
};
use twinpath_mapproto::Key;
use twinpath_smb::{ImageConfig, SmbOptions};

use crate::direct::{Direct, DirectConfig, LunDevice, Outcome};
use crate::link::{Links, MapLink};
use crate::network::NetworkPath;
use crate::state::Lookup;
use crate::throttle::{Throttle, ThrottleConfig, Throttles};
use crate::volume::{BlockDevice, IscsiLun, Volume};
use twinpath_iscsi::IscsiUrl;

fn default_map_timeout() -> Duration {
    Duration::from_secs(2)
}

/// How long setting up the direct path may take before the disk goes on without it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How often a disk whose direct path could not be set up tries again.
const SETUP_RETRY: Duration = Duration::from_secs(10);

pub struct SanPlugin;

/// The plugin, to register in the binary's [`twinpath_core::Registry`].
pub fn plugin() -> Box<dyn Plugin> {
    Box::new(SanPlugin)
}

fn default_lun() -> String {
    "auto".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    map_server: String,
    map_key_file: PathBuf,
    #[serde(default = "default_lun")]
    lun: String,
    #[serde(default)]
    lun_password_file: Option<PathBuf>,
    #[serde(default)]
    host_name: Option<String>,
    #[serde(default = "default_map_timeout", with = "humantime_serde")]
    map_timeout: Duration,
    #[serde(default)]
    throttle: Option<ThrottleConfig>,
}

#[derive(Debug)]
struct SanSpec {
    network: ImageConfig,
    setup: Arc<DirectSetup>,
}

/// Where the shared volume is.
#[derive(Debug, Clone)]
enum LunSpec {
    /// The one local block device that holds it.
    Auto,
    Device(PathBuf),
    Iscsi {
        url: IscsiUrl,
        password_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for LunSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LunSpec::Auto => f.write_str("auto"),
            LunSpec::Device(p) => write!(f, "{}", p.display()),
            LunSpec::Iscsi { url, .. } => write!(f, "{url}"),
        }
    }
}

/// What it takes to bring up the direct path, at open and again later if it failed then.
#[derive(Debug)]
struct DirectSetup {
    path: String,
    map_server: String,
    map_key_file: PathBuf,
    lun: LunSpec,
    host_name: String,
    map_timeout: Duration,
    throttle: Option<ThrottleConfig>,
    read_only: bool,
}

fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "twinpath-host".into())
}

impl Plugin for SanPlugin {
    fn name(&self) -> &'static str {
        "san"
    }

    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError> {
        // This plugin's own keys; every other key names and tunes the image on the share.
        let (own, network) = split_options::<Options>(options)?;
        let o: Options = parse_options(own)?;
        let network: SmbOptions = parse_options(network)?;
        if !o.map_server.contains(':') {
            return Err(OptionError::new(
                "map_server",
                "must be host:port, e.g. 192.0.2.10:7410",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&o.map_timeout) {
            return Err(OptionError::new(
                "map_timeout",
                "must be between 100ms and 60s",
            ));
        }
        if let Some(t) = &o.throttle {
            if t.bytes_per_sec.is_none() && t.iops.is_none() {
                return Err(OptionError::new(
                    "throttle",
                    "give bytes_per_sec, iops or both",
                ));
            }
            if t.bytes_per_sec.is_some_and(|b| b.0 == 0) || t.iops == Some(0) {
                return Err(OptionError::new("throttle", "limits must be above zero"));
            }
        }
        let lun = match o.lun.as_str() {
            "auto" => LunSpec::Auto,
            p if p.starts_with('/') => LunSpec::Device(PathBuf::from(p)),
            u if u.starts_with("iscsi://") => {
                let url = IscsiUrl::parse(u).map_err(|e| OptionError::new("lun", e.to_string()))?;
                if url.user.is_some() && o.lun_password_file.is_none() {
                    return Err(OptionError::new(
                        "lun_password_file",
                        "the iscsi URL names a CHAP user: give the password in a file",
                    ));
                }
                LunSpec::Iscsi {
                    url,
                    password_file: o.lun_password_file.clone(),
                }
            }
            _ => {
                return Err(OptionError::new(
                    "lun",
                    "must be `auto`, an absolute device path or an iscsi:// URL",
                ))
            }
        };
        let chap_user = matches!(&lun, LunSpec::Iscsi { url, .. } if url.user.is_some());
        if o.lun_password_file.is_some() && !chap_user {
            return Err(OptionError::new(
                "lun_password_file",
                "only for an iscsi URL with a CHAP user (iscsi://user@host/...)",
            ));
        }
        let network = network.check(disk)?;
        let path = network.path().to_owned();
        Ok(Box::new(SanSpec {
            network,
            setup: Arc::new(DirectSetup {
                path,
                map_server: o.map_server,
                map_key_file: o.map_key_file,
                lun,
                host_name: o.host_name.unwrap_or_else(system_host_name),
                map_timeout: o.map_timeout,
                throttle: o.throttle,
                read_only: disk.read_only,
            }),
        }))
    }
}

/// Why the direct path is not up: the disk serves over SMB meanwhile and tries again.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    /// The key file, the LUN's device or session, or its engine.
    #[error(transparent)]
    Io(#[from] twinpath_core::Error),
    #[error(transparent)]
    Dial(#[from] link::DialError),
    #[error(transparent)]
    Lun(#[from] lun::LunError),
    #[error("setup timed out after {0:?}")]
    TimedOut(Duration),
}

impl DirectSetup {
    /// This host's map key. A key file that cannot be used fails the disk's open, like a bad
    /// SMB password file: an operator must hear of it, not find the disk silently on SMB.
    fn key(&self) -> Result<Key> {
        let bytes = twinpath_core::read_secret_bytes("map_key_file", &self.map_key_file)?;
        Key::new(bytes).map_err(|e| {
            twinpath_core::Error::new(
                twinpath_core::ErrorKind::InvalidInput,
                format!("map_key_file {}: {e}", self.map_key_file.display()),
            )
        })
    }

    /// Joins this host's connection to the map server, finds the LUN and opens it for
    /// direct I/O.
    async fn open(
        &self,
        ctx: &OpenContext,
        stats: Arc<PathStats>,
    ) -> std::result::Result<Arc<Direct>, SetupError> {
        let key = self.key()?;
        let links = ctx.shared::<Links>();
        let link = MapLink::shared(&links, &self.map_server, key, &self.host_name);
        let member = link.join();
        let connected = link.connect(self.map_timeout).await?;
        let id = connected.identity;
        let (lun, checked, host) = (self.lun.clone(), id.clone(), self.host_name.clone());
        let fence_key = twinpath_mapproto::fence_key(&self.host_name);
        let (volume, registered) = ctx
            .runtime()
            .spawn_blocking(move || -> std::result::Result<_, SetupError> {
                let volume: Arc<dyn Volume> = match lun {
                    LunSpec::Auto => Arc::new(lun::find(&checked)?),
                    LunSpec::Device(p) => Arc::new(BlockDevice::open(&p)?),
                    LunSpec::Iscsi { url, password_file } => {
                        Arc::new(IscsiLun::connect(&url, password_file.as_deref(), &host)?)
                    }
                };
                // Before anything is read: a LUN the map server reserves answers only
                // registered hosts.
                let registered = volume.register(fence_key);
                lun::check(&*volume, &checked)?;
                Ok((volume, registered))
            })
            .await
            .map_err(|e| {
                twinpath_core::Error::new(twinpath_core::ErrorKind::Io, format!("LUN setup: {e}"))
            })??;
        let backend = volume.io(self.read_only, ctx.runtime())?;
        match registered {
            Ok(true) => tracing::info!(image = self.path, "registered on the LUN for fencing"),
            Ok(false) => tracing::info!(
                image = self.path,
                "the LUN has no persistent reservations: the map server cannot fence this host"
            ),
            Err(e) => tracing::warn!(image = self.path, "registering on the LUN: {e}"),
        }
        tracing::info!(
            image = self.path,
            device = %volume.describe(),
            fs = id.fs_type,
            "direct path ready"
        );
        let config = DirectConfig {
            path: self.path.clone(),
            throttle: self
                .throttle
                .map(|t| Throttle::shared(&ctx.shared::<Throttles>(), &self.map_server, t)),
            map_timeout: self.map_timeout,
            fence_key,
        };
        Ok(Direct::new(
            member,
            connected.generation,
            config,
            LunDevice {
                volume,
                io: backend,
            },
            stats,
        ))
    }
}

#[async_trait]
impl BackendSpec for SanSpec {
    fn describe(&self) -> String {
        let lun = &self.setup.lun;
        format!(
            "san: {}, direct on LUN {lun} via map server {}",
            self.network.describe(),
            self.setup.map_server
        )
    }

    fn image(&self) -> Option<String> {
        Some(self.network.image())
    }

    async fn open(&self, ctx: &OpenContext) -> Result<Arc<dyn BlockBackend>> {
        self.setup.key()?;
        let network: Arc<dyn NetworkPath> = Arc::new(self.network.open(ctx).await?);
        let direct = Arc::new(OnceLock::new());
        let stats = Arc::new(PathStats::with_events(&direct::EVENTS));
        let failed =
            match tokio::time::timeout(SETUP_TIMEOUT, self.setup.open(ctx, stats.clone())).await {
                Ok(Ok(d)) => {
                    let _ = direct.set(d);
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(_) => Some(SetupError::TimedOut(SETUP_TIMEOUT)),
            };
        if let Some(failed) = failed {
            let why = failed.to_string();
            tracing::warn!(
                image = self.setup.path,
                "direct path unavailable, serving over SMB (trying again every {SETUP_RETRY:?}): {why}"
            );
            retry_later(
                ctx.clone(),
                self.setup.clone(),
                Arc::downgrade(&direct),
                stats.clone(),
                why,
            );
        }
        Ok(Arc::new(SanBackend {
            network,
            direct,
            runtime: ctx.runtime().clone(),
            stats,
        }))
    }
}

/// Tries to bring the direct path up until it comes up or the disk goes away; a reason seen
/// before is not logged again.
fn retry_later(
    ctx: OpenContext,
    setup: Arc<DirectSetup>,
    slot: Weak<OnceLock<Arc<Direct>>>,
    stats: Arc<PathStats>,
    mut last: String,
) {
    ctx.runtime().clone().spawn(async move {
        loop {
            tokio::time::sleep(SETUP_RETRY).await;
            let Some(slot) = slot.upgrade() else { return };
            let failed =
                match tokio::time::timeout(SETUP_TIMEOUT, setup.open(&ctx, stats.clone())).await {
                    Ok(Ok(d)) => {
                        let _ = slot.set(d);
                        return;
                    }
                    Ok(Err(e)) => e,
                    Err(_) => SetupError::TimedOut(SETUP_TIMEOUT),
                };
            let why = failed.to_string();
            if why != last {
                tracing::warn!(image = setup.path, "direct path still unavailable: {why}");
                last = why;
            }
        }
    });
}

/// Each request tries the direct path, then the network path. A request whose grant is at
/// hand runs on the queue's thread; any other is one task on the tokio runtime (where the map
/// connection and timers live), which fetches the map, waits for the throttle, or does the
/// network request itself.
#[derive(Clone)]
struct SanBackend {
    network: Arc<dyn NetworkPath>,
    /// Set once the direct path is up (at open, or later by [`retry_later`]).
    direct: Arc<OnceLock<Arc<Direct>>>,
    runtime: tokio::runtime::Handle,
    /// The direct path's counters, kept here so they exist before the direct path is up.
    stats: Arc<PathStats>,
}

impl SanBackend {
    fn direct(&self) -> Option<Arc<Direct>> {
        self.direct.get().cloned()
    }

    async fn run<F>(&self, what: &'static str, task: F) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        twinpath_core::run_on(&self.runtime, what, task).await
    }

    /// `queue`: the I/O context of the queue worker this runs on, if it does.
    async fn data(
        &self,
        queue: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        write: bool,
    ) -> Result<()> {
        let len = bufs.len() as u64;
        // Beyond the image there is no grant and no file to grow.
        self.network
            .within(if write { "write" } else { "read" }, offset, len)?;
        let direct = self.direct();
        // The one look at the direct path's state; the common case (grant at hand, small,
        // unthrottled) stays on the queue's thread.
        let lookup = match direct.as_ref().map(|d| (d, d.lookup(offset, len, write))) {
            Some((d, Lookup::Direct(t))) if d.inline(&t) => match d.run(queue, t, &bufs).await {
                Ok(Outcome::Done) => return Ok(()),
                Ok(Outcome::Network) => Lookup::Network,
                Err(e) => {
                    tracing::warn!("direct I/O failed, retrying over SMB: {e}");
                    Lookup::Network
                }
            },
            Some((_, l)) => l,
            None => Lookup::Network,
        };
        let network = self.network.clone();
        let stats = self.stats.clone();
        self.run(if write { "write" } else { "read" }, async move {
            if let Some(d) = &direct {
                match d.io(lookup, offset, &bufs, write).await {
                    Ok(Outcome::Done) => return Ok(()),
                    Ok(Outcome::Network) => {}
                    Err(e) => tracing::warn!("direct I/O failed, retrying over SMB: {e}"),
                }
                d.before_network(offset, len, write).await;
            }
            stats.count(direct::FALLBACKS);
            if write {
                network.write(offset, &bufs).await
            } else {
                network.read(offset, &bufs).await
            }
        })
        .await
    }

    /// Metadata-changing requests (discard, write-zeroes) go over SMB; the grants they touch
    /// are retired first, since the server may deallocate there.
    async fn metadata(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        self.network.within(what, offset, len)?;
        let direct = self.direct();
        let network = self.network.clone();
        self.run(what, async move {
            if let Some(d) = &direct {
                d.before_network(offset, len, true).await;
            }
            network.write_zeroes(offset, len).await
        })
        .await
    }
}

#[async_trait]
impl BlockIo for SanBackend {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.data(None, offset, bufs, false).await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.data(None, offset, bufs, true).await
    }

    /// Device flush and commits, then the SMB flush, in one task; a map server that does not
    /// answer costs each commit at most the map timeout.
    async fn flush(&self) -> Result<()> {
        let direct = self.direct();
        let network = self.network.clone();
        self.run("flush", async move {
            if let Some(d) = &direct {
                d.flush().await?;
            }
            network.flush().await
        })
        .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.metadata("discard", offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.metadata("write-zeroes", offset, len).await
    }
}

#[async_trait]
impl BlockBackend for SanBackend {
    fn info(&self) -> DiskInfo {
        self.network.info()
    }

    /// A queue's direct I/O on a block device goes to its worker's own ring; the rest of
    /// its requests go where any other's do.
    fn queue(&self, link: QueueLink) -> Result<Option<Arc<dyn BlockIo>>> {
        Ok(Some(Arc::new(SanQueue {
            san: self.clone(),
            ring: QueueRing::new(link.notify),
        })))
    }

    /// Closes the image's SMB handle, which holds the share modes another host waits for.
    async fn release(&self) {
        let network = self.network.clone();
        let _ = self
            .run("close", async move {
                network.close().await;
                Ok(())
            })
            .await;
    }

    /// The network path's counters come from the SMB image; fallbacks count the data
    /// requests it served for this disk (the direct path was down, had no grant, was
    /// throttled, ran out of lease time, or failed).
    fn paths(&self) -> Vec<(&'static str, Arc<PathStats>)> {
        vec![
            ("network", self.network.stats()),
            ("direct", self.stats.clone()),
        ]
    }
}

/// One queue of a san disk.
struct SanQueue {
    san: SanBackend,
    ring: QueueRing,
}

#[async_trait]
impl BlockIo for SanQueue {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.san.data(Some(&self.ring), offset, bufs, false).await
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> Result<()> {
        self.san.data(Some(&self.ring), offset, bufs, true).await
    }

    async fn flush(&self) -> Result<()> {
        self.san.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.san.discard(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.san.write_zeroes(offset, len, unmap).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> std::result::Result<String, String> {
        let mut options: serde_yaml::Mapping = serde_yaml::from_str(
            "{server: '127.0.0.1:445', share: vmstore, path: vm.raw, \
             map_server: '127.0.0.1:7410', map_key_file: /k}",
        )
        .unwrap();
        options.extend(serde_yaml::from_str::<serde_yaml::Mapping>(extra).unwrap());
        let disk = DiskContext {
            name: "vm".into(),
            read_only: false,
            lock: true,
        };
        SanPlugin
            .parse(&disk, serde_yaml::Value::Mapping(options))
            .map(|spec| spec.describe())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn own_keys_here_smb_keys_there() {
        let d = parse("{lun: /dev/sdb}").unwrap();
        assert!(
            d.contains("//127.0.0.1:445/vmstore/vm.raw") && d.contains("/dev/sdb"),
            "{d}"
        );
        let d =
            parse("{lun: 'iscsi://vmhost@127.0.0.1/iqn.x:y/1', lun_password_file: /p}").unwrap();
        assert!(d.contains("iscsi://vmhost@127.0.0.1:3260/iqn.x:y/1"), "{d}");
        for (extra, key) in [
            ("{map_server: nohost}", "map_server"),
            ("{lun: sdb}", "lun"),
            ("{max_in_flight: 0}", "max_in_flight"),
            ("{mapserver: x}", "mapserver"),
            ("{lun: 'iscsi://h/iqn'}", "lun"),
            ("{lun: 'iscsi://u@h/iqn/1'}", "lun_password_file"),
            (
                "{lun: /dev/sdb, lun_password_file: /p}",
                "lun_password_file",
            ),
            (
                "{lun: 'iscsi://h/iqn/1', lun_password_file: /p}",
                "lun_password_file",
            ),
            ("{server: nas}", "server"),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
