//! Fencing with SCSI-3 persistent reservations: the map server holds an Exclusive Access -
//! Registrants Only reservation on the shared LUN, every host registers its own key
//! ([`twinpath_mapproto::fence_key`]) before it touches the LUN, and a host that lost its
//! connection, went silent or did not return a recalled lease in time is preempted: from then
//! on the LUN refuses its reads and writes (RESERVATION CONFLICT), whatever the host
//! believes, so its leases can go to others at once instead of after the lease time. (Write
//! Exclusive would still let a fenced host read blocks given to another tenant.) Only a
//! preemption that also aborted the host's commands in the target frees its leases at once:
//! without the abort, a write the target had accepted may still land, and the leases are
//! waited out as if there were no fencing.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use twinpath_filemap::pr::{self, PrError};
use twinpath_iscsi::{IscsiUrl, Session};
use twinpath_mapproto::fence_key;

use crate::config::FenceConfig;
use crate::error::{Error, Result};

/// The map server's own initiator name and registration.
const INITIATOR: &str = "iqn.2026-11.io.twinpath:map-server";

/// The map server's reservation key: even, where every host's is odd
/// ([`twinpath_mapproto::fence_key`]), so no host name can give a host the server's key.
const SERVER_KEY: u64 = 0x7477_696e_7061_7468;

/// How long one fencing may take before the server gives up on it (and waits the host's
/// leases out instead).
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the reservation is held: an iSCSI LUN the server logs in to itself, or a block
/// device of the file server (kernel PR ioctls).
enum Lun {
    Iscsi(Session),
    Device { dev: Arc<File>, aborts: bool },
}

/// What a fencing achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// The host's registration is gone and its commands in the target were aborted, by
    /// this very preemption: nothing of it can reach the LUN any more.
    Aborted,
    /// The host's registration is gone, but the target could not abort its commands: those
    /// it had accepted may still complete.
    Preempted,
}

pub struct Fencer {
    lun: Lun,
    key: u64,
    describe: String,
}

impl Fencer {
    /// Takes the reservation on the configured LUN. Blocking.
    pub fn start(cfg: &FenceConfig) -> Result<Fencer> {
        if cfg.lun.starts_with("iscsi://") {
            Fencer::start_iscsi(cfg)
        } else {
            Fencer::start_device(Path::new(&cfg.lun))
        }
    }

    fn start_iscsi(cfg: &FenceConfig) -> Result<Fencer> {
        let url = IscsiUrl::parse(&cfg.lun).map_err(|e| Error::Unfit(format!("fence.lun: {e}")))?;
        let password = match &cfg.password_file {
            Some(p) => Some(
                twinpath_core::read_secret("fence.password_file", p)
                    .map_err(|e| Error::Unfit(e.to_string()))?,
            ),
            None => None,
        };
        let session = Session::connect(&url, password.as_deref(), INITIATOR)
            .map_err(|e| Error::Fence(format!("fence.lun: {e}")))?;
        let key = SERVER_KEY;
        let reserve = async {
            session.pr_register(key).await?;
            match session.pr_reserve(key).await {
                // Held by an earlier run of this server (its connection outlived a crash,
                // registered under the same key): taken over. A holder under another key
                // would instead have removed this registration (the preemption names a key
                // nobody else holds): registering and reserving again tells the two apart,
                // since RESERVE succeeds only for the holder.
                Err(e) if e.kind() == twinpath_core::ErrorKind::Fenced => {
                    tracing::info!("the LUN is reserved already; taking the reservation over");
                    session.pr_preempt(key, key, false).await?;
                    session.pr_register(key).await?;
                    session.pr_reserve(key).await
                }
                r => r,
            }
        };
        futures::executor::block_on(reserve)
            .map_err(|e| Error::Fence(format!("fence.lun: cannot take the reservation: {e}")))?;
        Ok(Fencer {
            lun: Lun::Iscsi(session),
            key,
            describe: url.to_string(),
        })
    }

    fn start_device(path: &Path) -> Result<Fencer> {
        let what = || format!("fence.lun: {}", path.display());
        let unfit = |why: &str| Error::Unfit(format!("{}: {why}", what()));
        let io = |source| Error::Io {
            what: what(),
            source,
        };
        // Read-only: the PR ioctls need CAP_SYS_ADMIN or a writable descriptor, and a
        // writable open of a mounted device fails where the kernel forbids writing to it
        // (BLK_DEV_WRITE_MOUNTED=n), or would make the file server's own mount fail.
        let dev = File::open(path).map_err(io)?;
        let meta = dev.metadata().map_err(io)?;
        if !meta.file_type().is_block_device() {
            return Err(unfit("not a block device"));
        }
        // Device-mapper passes PREEMPT AND ABORT down as a plain PREEMPT on some kernels
        // ("dm: Start pr_preempt from the same starting path", 2022) and still reports
        // success: on dm the abort cannot be counted on.
        let rdev = meta.rdev();
        let dm = Path::new(&format!(
            "/sys/dev/block/{}:{}/dm",
            libc::major(rdev),
            libc::minor(rdev)
        ))
        .exists();
        let key = SERVER_KEY;
        let taken = pr::register(&dev, key).and_then(|()| match pr::reserve(&dev, key) {
            // Held by an earlier run of this server: taken over (see the iSCSI case).
            Err(PrError::Conflict) => {
                tracing::info!("the LUN is reserved already; taking the reservation over");
                pr::preempt(&dev, key, key, false)?;
                pr::register(&dev, key)?;
                pr::reserve(&dev, key)
            }
            r => r,
        });
        match taken {
            Ok(()) => {}
            Err(PrError::Unsupported) => {
                return Err(unfit(
                    "the device has no persistent reservations (a loop device or a virtual \
                     disk?); fence on the LUN's iSCSI URL, or remove `fence:` to wait lost \
                     hosts' leases out instead",
                ))
            }
            Err(PrError::Conflict) => {
                return Err(Error::Fence(format!(
                    "{}: another initiator holds a reservation on the device; release it \
                     (sg_persist --out --release) or run one map server per LUN",
                    what()
                )))
            }
            Err(e) => {
                return Err(Error::Fence(format!(
                    "{}: cannot take the reservation: {e}",
                    what()
                )))
            }
        }
        Ok(Fencer {
            lun: Lun::Device {
                dev: Arc::new(dev),
                aborts: !dm,
            },
            key,
            describe: path.display().to_string(),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Removes `host`'s registration and, where the target can, aborts its commands still
    /// in it: its direct writes fail from now on. Then flushes the LUN's cache, so that
    /// every write the host had acknowledged is durable (the host, fenced, can no longer
    /// flush: it counts on this). Done too when the host is not registered any more, which
    /// counts as [`Fenced::Preempted`].
    pub async fn fence(&self, host: &str) -> Result<Fenced> {
        let victim = fence_key(host);
        let fenced = async {
            match &self.lun {
                Lun::Iscsi(session) => self.preempt_iscsi(session, victim).await,
                Lun::Device { dev, aborts } => {
                    let (dev, key, aborts) = (dev.clone(), self.key, *aborts);
                    tokio::task::spawn_blocking(move || preempt_device(&dev, key, victim, aborts))
                        .await
                        .map_err(|e| Error::Fence(e.to_string()))?
                }
            }
        };
        tokio::time::timeout(FENCE_TIMEOUT, fenced)
            .await
            .map_err(|_| Error::Fence(format!("the LUN did not answer in {FENCE_TIMEOUT:?}")))?
    }

    async fn preempt_iscsi(&self, session: &Session, victim: u64) -> Result<Fenced> {
        let fence = |e: twinpath_core::Error| Error::Fence(e.to_string());
        let keys = session.pr_read_keys().await.map_err(fence)?;
        // A key already gone may have been preempted by an attempt of ours that did not
        // finish (its flush timed out) or that could not abort: nothing says the host's
        // commands were aborted, so it counts as preempted only.
        let mut fenced = Fenced::Preempted;
        if keys.contains(&victim) {
            fenced = Fenced::Aborted;
            let aborted = session.pr_preempt(self.key, victim, true).await;
            match aborted {
                Ok(()) => {}
                // tgtd, for one, has no PREEMPT AND ABORT.
                Err(e) if e.to_string().contains("ILLEGAL_REQUEST") => {
                    tracing::debug!("PREEMPT AND ABORT refused ({e}); preempting without abort");
                    session
                        .pr_preempt(self.key, victim, false)
                        .await
                        .map_err(fence)?;
                    fenced = Fenced::Preempted;
                }
                Err(e) => return Err(fence(e)),
            }
        }
        session.flush().await.map_err(fence)?;
        Ok(fenced)
    }
}

/// [`Fencer::fence`] on a block device. Before Linux 6.19 the kernel has no READ KEYS
/// ioctl: a victim that is not registered makes the preemption fail with a conflict, which
/// counts as a failed fencing (its leases are waited out: slower, never unsafe). The LUN is
/// flushed whatever the preemption did: a host that was preempted meanwhile counts on it.
fn preempt_device(dev: &File, key: u64, victim: u64, aborts: bool) -> Result<Fenced> {
    let preempted = match pr::preempt(dev, key, victim, true) {
        Ok(()) if aborts => Ok(Fenced::Aborted),
        Ok(()) => Ok(Fenced::Preempted),
        Err(PrError::Rejected | PrError::Unsupported) => {
            tracing::debug!("PREEMPT AND ABORT refused; preempting without abort");
            pr::preempt(dev, key, victim, false)
                .map(|()| Fenced::Preempted)
                .map_err(|e| Error::Fence(format!("PREEMPT: {e}")))
        }
        Err(PrError::Conflict) => Err(Error::Fence(
            "PREEMPT AND ABORT: reservation conflict (the host is not registered, or this \
             server lost its registration)"
                .into(),
        )),
        Err(e) => Err(Error::Fence(format!("PREEMPT AND ABORT: {e}"))),
    };
    // fdatasync of a block device is a cache flush (SYNCHRONIZE CACHE).
    dev.sync_data().map_err(|source| Error::Io {
        what: "flush".into(),
        source,
    })?;
    preempted
}
