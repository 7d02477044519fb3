//! `iscsi://[user@]host[:port]/target-iqn/lun`, as QEMU and libiscsi spell a LUN, except that
//! a CHAP password is never part of it (it would end up in configs and logs): it comes from a
//! file.

use std::fmt;

/// The iSCSI port when the URL names none.
pub const DEFAULT_PORT: u16 = 3260;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    /// `host:port` (IPv6 hosts in brackets), as libiscsi takes a portal.
    pub portal: String,
    pub target: String,
    pub lun: u16,
    /// CHAP user name, if the target wants one.
    pub user: Option<String>,
}

/// A text that is not an iSCSI URL twinpath can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}`: {why} (expected iscsi://[user@]host[:port]/iqn/lun)")]
pub struct BadUrl {
    /// The text, without a user part that may hold a password.
    pub shown: String,
    pub why: &'static str,
}

impl IscsiUrl {
    pub fn parse(url: &str) -> Result<IscsiUrl, BadUrl> {
        // A URL that carries a password anyway is shown without its user part.
        let shown = match url.split_once("://").and_then(|(_, r)| r.split_once('@')) {
            Some((user, host)) if user.contains(['%', ':']) => format!("iscsi://<user>@{host}"),
            _ => url.to_owned(),
        };
        let bad = |why: &'static str| BadUrl {
            shown: shown.clone(),
            why,
        };
        let rest = url
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("not an iscsi:// URL"))?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no target"))?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, _)) if user.contains('%') || user.contains(':') => {
                return Err(bad(
                    "a CHAP password does not go in the URL; give it in a password file",
                ))
            }
            Some(("", _)) => return Err(bad("empty user name")),
            Some((user, host)) => (Some(user.to_owned()), host),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            (format!("[{host}]"), after.strip_prefix(':'))
        } else {
            match hostport.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (hostport.to_owned(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
            None => DEFAULT_PORT,
        };
        let (target, lun) = path.rsplit_once('/').ok_or_else(|| bad("no LUN number"))?;
        if target.is_empty() || target.contains('/') {
            return Err(bad("the target must be one path segment (its IQN)"));
        }
        let lun = lun
            .parse::<u16>()
            .ok()
            .filter(|l| *l < 16384)
            .ok_or_else(|| bad("the LUN must be a number below 16384"))?;
        Ok(IscsiUrl {
            portal: format!("{host}:{port}"),
            target: target.to_owned(),
            lun,
            user,
        })
    }
}

impl fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("iscsi://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        write!(f, "{}/{}/{}", self.portal, self.target, self.lun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_and_libiscsi_accept() {
        let u = IscsiUrl::parse("iscsi://127.0.0.1/iqn.2026-01.test:lun1/1").unwrap();
        assert_eq!(u.portal, "127.0.0.1:3260");
        assert_eq!(
            (u.target.as_str(), u.lun, u.user.as_deref()),
            ("iqn.2026-01.test:lun1", 1, None)
        );
        let u = IscsiUrl::parse("iscsi://vmhost@[fd00::1]:3261/iqn.x:y/0").unwrap();
        assert_eq!(
            (u.portal.as_str(), u.user.as_deref()),
            ("[fd00::1]:3261", Some("vmhost"))
        );
        assert_eq!(u.to_string(), "iscsi://vmhost@[fd00::1]:3261/iqn.x:y/0");
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_why() {
        for (url, why) in [
            ("http://h/iqn/1", "not an iscsi"),
            ("iscsi://h", "no target"),
            ("iscsi://h/iqn", "no LUN"),
            ("iscsi://h/iqn/x", "LUN must be"),
            ("iscsi://h/iqn/20000", "LUN must be"),
            ("iscsi://h:99999/iqn/1", "bad port"),
            ("iscsi://u%secret@h/iqn/1", "password"),
            ("iscsi://u:secret@h/iqn/1", "password"),
            ("iscsi:///iqn/1", "no host"),
            ("iscsi://h/a/b/1", "one path segment"),
        ] {
            let e = IscsiUrl::parse(url).unwrap_err();
            assert!(e.why.contains(why), "{url}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
