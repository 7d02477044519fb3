//! Fencing with SCSI-3 persistent reservations: the map server holds a Write Exclusive -
//! Registrants Only reservation on the shared LUN, every host registers its own key
//! ([`twinpath_mapproto::fence_key`]) before it writes directly, and a host that lost its
//! connection, went silent or did not return a recalled lease in time is preempted: from then
//! on the LUN refuses its writes (RESERVATION CONFLICT), whatever the host believes, so its
//! leases can go to others at once instead of after the lease time.

use twinpath_iscsi::{IscsiUrl, Session};
use twinpath_mapproto::fence_key;

use crate::config::FenceConfig;

/// The map server's own initiator name and registration.
const INITIATOR: &str = "iqn.2026-11.io.twinpath:map-server";

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
        let key = fence_key("twinpath map server");
        let reserve = async {
            session.pr_register(key).await?;
            session.pr_reserve(key).await
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
        let victim = fence_key(host);
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
