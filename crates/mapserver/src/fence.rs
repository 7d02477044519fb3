//! Fencing with SCSI-3 persistent reservations: the map server holds an Exclusive Access -
//! Registrants Only reservation on the shared LUN, every host registers its own key
//! ([`twinpath_mapproto::fence_key`]) before it touches the LUN, and a host that lost its
//! connection, went silent or did not return a recalled lease in time is preempted: from then
//! on the LUN refuses its reads and writes (RESERVATION CONFLICT), whatever the host
//! believes, so its leases can go to others at once instead of after the lease time. (Write
//! Exclusive would still let a fenced host read blocks given to another tenant.)

use twinpath_iscsi::{IscsiUrl, Session};
use twinpath_mapproto::fence_key;

use crate::config::FenceConfig;

/// The map server's own initiator name and registration.
const INITIATOR: &str = "iqn.2026-11.io.twinpath:map-server";

/// The map server's reservation key: even, where every host's is odd
/// ([`twinpath_mapproto::fence_key`]), so no host name can give a host the server's key.
const SERVER_KEY: u64 = 0x7477_696e_7061_7468;

/// How long one fencing may take before the server gives up on it (and waits the host's
/// leases out instead).
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Fencer {
    session: Session,
    key: u64,
    url: String,
}

impl Fencer {
    /// Logs in to the LUN, registers the server's key and takes the reservation. Blocking.
    pub fn start(cfg: &FenceConfig) -> Result<Fencer, String> {
        let url = IscsiUrl::parse(&cfg.lun).map_err(|e| format!("fence.lun: {e}"))?;
        let password = match &cfg.password_file {
            Some(p) => Some(
                twinpath_core::read_secret("fence.password_file", p).map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let session = Session::connect(&url, password.as_deref(), INITIATOR)
            .map_err(|e| format!("fence.lun: {e}"))?;
        let key = SERVER_KEY;
        let reserve = async {
            session.pr_register(key).await?;
            match session.pr_reserve(key).await {
                // Held by an earlier run of this server (its connection outlived a crash,
                // registered under the same key): taken over.
                Err(e) if e.kind() == twinpath_core::ErrorKind::Fenced => {
                    tracing::info!("the LUN is reserved already; taking the reservation over");
                    session.pr_preempt(key, key, false).await
                }
                r => r,
            }
        };
        futures::executor::block_on(reserve)
            .map_err(|e| format!("fence.lun: cannot take the reservation: {e}"))?;
        Ok(Fencer {
            session,
            key,
            url: url.to_string(),
        })
    }

    pub fn describe(&self) -> &str {
        &self.url
    }

    /// Removes `host`'s registration and, where the target can, aborts its commands still
    /// in it: its direct writes fail from now on. Then flushes the LUN's cache, so that
    /// every write the host had acknowledged is durable (the host, fenced, can no longer
    /// flush: it counts on this). Done too when the host was not registered (it could not
    /// write under the reservation anyway).
    pub async fn fence(&self, host: &str) -> Result<(), String> {
        tokio::time::timeout(FENCE_TIMEOUT, self.preempt(fence_key(host)))
            .await
            .map_err(|_| format!("the LUN did not answer in {FENCE_TIMEOUT:?}"))?
    }

    async fn preempt(&self, victim: u64) -> Result<(), String> {
        let keys = self
            .session
            .pr_read_keys()
            .await
            .map_err(|e| e.to_string())?;
        if keys.contains(&victim) {
            let aborted = self.session.pr_preempt(self.key, victim, true).await;
            match aborted {
                Ok(()) => {}
                // tgtd, for one, has no PREEMPT AND ABORT.
                Err(e) if e.to_string().contains("ILLEGAL_REQUEST") => {
                    tracing::debug!("PREEMPT AND ABORT refused ({e}); preempting without abort");
                    self.session
                        .pr_preempt(self.key, victim, false)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        self.session.flush().await.map_err(|e| e.to_string())
    }
}
