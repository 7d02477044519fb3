//! One logged-in connection per (server, share, user), shared by every disk that names it, and
//! brought back after the server restarts.
//!
//! A session that died (the server went away, the socket closed) is not revived in place:
//! the next request that needs it dials a new connection, logs in again announcing the old
//! session id (so the server drops what the old one still held) and connects the share. Each
//! disk then reopens its image on the new session. While the server stays down, redials are
//! spaced by [`REDIAL_PAUSE`] and requests in between fail at once, so a dead server costs
//! the guest an I/O error, never a hang.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smb2::client::connection::Connection;
use smb2::client::tree::Tree;
use smb2::types::SessionId;
use smb2::{ClientConfig, SmbClient};
use twinpath_core::{Error, ErrorKind, Result, WeakMap};

use crate::error::smb_error;

/// How long a failed redial stands before the next request may try again.
const REDIAL_PAUSE: Duration = Duration::from_secs(1);

/// One credit pays for 64 KiB of payload (MS-SMB2 3.1.5.2).
pub(crate) const CREDIT_UNIT: usize = 65536;

/// Who logs in where. Disks with equal logins share a connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Login {
    pub server: String,
    pub share: String,
    pub user: String,
    pub password: String,
}

/// A live session: connection, share and the sizes the server negotiated.
pub(crate) struct Session {
    // Owns the session; `conn` is a clone sharing its transport and credits.
    client: SmbClient,
    pub conn: Connection,
    pub tree: Tree,
    /// Counts sessions of one [`Server`]; a handle opened on an older one is stale.
    pub generation: u64,
    pub max_read: usize,
    pub max_write: usize,
}

impl Session {
    async fn dial(login: &Login, previous: Option<SessionId>, generation: u64) -> Result<Session> {
        let config = ClientConfig {
            addr: login.server.clone(),
            username: login.user.clone(),
            password: login.password.clone(),
            // Guest disk data rarely compresses and the CPU is better spent moving it.
            compression: false,
            // Images are addressed on the share itself; a referral elsewhere is a config
            // error, not something to follow silently.
            dfs_enabled: false,
            previous_session_id: previous,
            ..ClientConfig::default()
        };
        let mut client = SmbClient::connect(config)
            .await
            .map_err(|e| smb_error("connect and log in", e))?;
        let tree = client
            .connect_share(&login.share)
            .await
            .map_err(|e| smb_error(&format!("share `{}`", login.share), e))?;
        let conn = client
            .connection_for(&tree)
            .map_err(|e| smb_error("connection", e))?;
        let params = conn.params();
        let max_read = params
            .as_ref()
            .map_or(CREDIT_UNIT, |p| p.max_read_size as usize);
        let max_write = params
            .as_ref()
            .map_or(CREDIT_UNIT, |p| p.max_write_size as usize);
        Ok(Session {
            client,
            conn,
            tree,
            generation,
            max_read,
            max_write,
        })
    }

    /// The largest section the server takes both ways.
    pub fn max_section(&self) -> usize {
        self.max_read.min(self.max_write)
    }

    pub fn is_alive(&self) -> bool {
        !self.conn.is_disconnected()
    }
}

struct Link {
    current: Option<Arc<Session>>,
    /// When the last redial failed, and why.
    failed: Option<(Instant, String)>,
    generation: u64,
    previous: Option<SessionId>,
}

/// The shared connection to one server share, for as long as a disk uses it.
pub(crate) struct Server {
    login: Login,
    link: tokio::sync::Mutex<Link>,
    /// Generation of the live session, 0 while there is none; lets requests check their
    /// handle without taking the lock.
    live: AtomicU64,
    disks: AtomicUsize,
    /// Credits charged by requests of all disks outstanding on the connection.
    in_flight: AtomicUsize,
}

/// The servers the disks of one daemon share, by login (kept in its open context).
pub(crate) type Sessions = WeakMap<Login, Server>;

impl Server {
    /// The shared server for `login`, logging in if no disk has yet. The caller counts as a
    /// user of the credit window until it calls [`Server::leave`].
    pub async fn join(sessions: &Sessions, login: Login) -> Result<Arc<Server>> {
        let server = match sessions.get(&login) {
            Some(s) => s,
            None => {
                let session = Session::dial(&login, None, 1).await?;
                let server = Arc::new(Server {
                    login: login.clone(),
                    link: tokio::sync::Mutex::new(Link {
                        current: Some(Arc::new(session)),
                        failed: None,
                        generation: 1,
                        previous: None,
                    }),
                    live: AtomicU64::new(1),
                    disks: AtomicUsize::new(0),
                    in_flight: AtomicUsize::new(0),
                });
                // Two disks may have dialed at once; the first one kept wins and the other
                // connection is dropped.
                sessions.get_or_insert_with(login, || server).0
            }
        };
        server.disks.fetch_add(1, Ordering::Relaxed);
        Ok(server)
    }

    pub fn leave(&self) {
        self.disks.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn describe(&self) -> String {
        format!("//{}/{}", self.login.server, self.login.share)
    }

    /// One disk's fair part of the connection's credit window (the credits on hand plus those
    /// held by outstanding requests), split evenly among the disks that use it.
    pub fn credit_share(&self, session: &Session) -> usize {
        let window = usize::from(session.conn.credits()) + self.in_flight.load(Ordering::Relaxed);
        fair_share(window, self.disks.load(Ordering::Relaxed))
    }

    /// The counter of outstanding credits that [`Server::credit_share`] adds in.
    pub fn in_flight(&self) -> &AtomicUsize {
        &self.in_flight
    }

    /// True while `generation` is the live session.
    pub fn is_current(&self, generation: u64) -> bool {
        self.live.load(Ordering::Acquire) == generation
    }

    /// The live session, redialing if the last one died.
    pub async fn session(&self) -> Result<Arc<Session>> {
        let mut link = self.link.lock().await;
        if let Some(s) = &link.current {
            if s.is_alive() {
                return Ok(s.clone());
            }
            self.retire(&mut link);
        }
        if let Some((at, why)) = &link.failed {
            if at.elapsed() < REDIAL_PAUSE {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{} is unreachable ({why})", self.describe()),
                ));
            }
        }
        let generation = link.generation + 1;
        match Session::dial(&self.login, link.previous, generation).await {
            Ok(s) => {
                let s = Arc::new(s);
                tracing::info!(server = %self.describe(), generation, "reconnected");
                link.generation = generation;
                link.current = Some(s.clone());
                link.failed = None;
                self.live.store(generation, Ordering::Release);
                Ok(s)
            }
            Err(e) => {
                tracing::warn!(server = %self.describe(), "reconnect failed: {e}");
                link.failed = Some((Instant::now(), e.to_string()));
                Err(e.within(format!("reconnect to {}", self.describe())))
            }
        }
    }

    /// Called when a request on session `generation` saw the connection die: the next
    /// request redials instead of using it.
    pub async fn lost(&self, generation: u64) {
        let mut link = self.link.lock().await;
        if link
            .current
            .as_ref()
            .is_some_and(|s| s.generation == generation)
        {
            self.retire(&mut link);
        }
    }

    fn retire(&self, link: &mut Link) {
        if let Some(old) = link.current.take() {
            tracing::warn!(server = %self.describe(), "connection lost");
            link.previous = Some(old.client.session_id());
            old.conn.mark_dead();
        }
        self.live.store(0, Ordering::Release);
    }
}

fn fair_share(credits: usize, disks: usize) -> usize {
    (credits / disks.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn credits_are_split_evenly_and_never_to_zero() {
        assert_eq!(fair_share(512, 1), 512);
        assert_eq!(fair_share(512, 3), 170);
        assert_eq!(fair_share(2, 8), 1);
        assert_eq!(fair_share(100, 0), 100);
    }
}
