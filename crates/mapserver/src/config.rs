//! The map server's YAML config.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use twinpath_core::ByteSize;
use twinpath_mapproto::{MAX_LEASE_TIME_MS, MIN_LEASE_TIME_MS};

use crate::error::{io, Error};

fn default_chunk() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_lease_time() -> Duration {
    Duration::from_secs(30)
}

/// ```yaml
/// listen: 0.0.0.0:7410                 # address VM hosts connect to
/// export: /srv/vmstore                 # the tree whose files are mapped (on the shared LUN)
/// hosts:                               # every VM host, each with its own key
///   - name: vmhost-07
///     key_file: /etc/twinpath/hosts/vmhost-07.key
///     paths: [images/vm1/, images/shared/]   # prefixes under export; omitted = everything
/// allocation_chunk: 64M                # with reflink, holes are filled in chunks this large
/// lease_time: 30s                      # a host that has not renewed for this long stops using
///                                      # its leases; a lost host's leases wait this long (and a
///                                      # margin) before anyone else gets the blocks
/// metrics:
///   listen: 127.0.0.1:9811             # /metrics and /leases
/// fence:                               # optional: SCSI-3 persistent reservations on the LUN
///   lun: iscsi://192.0.2.20/iqn.2026-01.example:vmstore/1   # or a block device: /dev/sdb
///   password_file: /etc/twinpath/chap.pass   # with a CHAP user in the URL
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapServerConfig {
    pub listen: String,
    pub export: PathBuf,
    pub hosts: Vec<HostConfig>,
    #[serde(default = "default_chunk")]
    pub allocation_chunk: ByteSize,
    #[serde(default = "default_lease_time", with = "humantime_serde")]
    pub lease_time: Duration,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub fence: Option<FenceConfig>,
}

/// Where the map server fences hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceConfig {
    /// The shared LUN: an `iscsi://` URL, or the path of a block device of the file server
    /// with persistent reservations (sd, NVMe, dm-multipath).
    pub lun: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The name the host gives as its `host_name`; it must come with this entry's key.
    pub name: String,
    pub key_file: PathBuf,
    /// Prefixes (directories) under the export whose files the host may map; `None` is all.
    #[serde(default)]
    pub paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// Host names go into logs and metric labels: keep them short and printable.
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A path prefix is relative and goes down only: `images/vm1/`, `images`.
fn valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl MapServerConfig {
    pub fn from_file(path: &Path) -> Result<MapServerConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(io(path.display()))?;
        let bad = |key: &str, why: &str| Error::Config {
            file: path.to_owned(),
            key: key.to_owned(),
            reason: why.to_owned(),
        };
        // One key for all hosts was protocol 1; say what replaces it instead of "unknown key".
        if let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str(&text) {
            if m.contains_key("key_file") {
                return Err(bad(
                    "key_file",
                    "one key shared by every host is gone: list each host under `hosts:` with \
                     its own `key_file` (docs/san.md, \"Per-host keys\")",
                ));
            }
        }
        let de = serde_yaml::Deserializer::from_str(&text);
        let cfg: MapServerConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| bad(&e.path().to_string(), &e.inner().to_string()))?;
        let chunk = cfg.allocation_chunk.0;
        if chunk < 4096 || !chunk.is_power_of_two() {
            return Err(bad(
                "allocation_chunk",
                "must be a power of two, at least 4K",
            ));
        }
        let lease_ms = cfg.lease_time.as_millis();
        if !(u128::from(MIN_LEASE_TIME_MS)..=u128::from(MAX_LEASE_TIME_MS)).contains(&lease_ms) {
            return Err(bad("lease_time", "must be between 1s and 1h"));
        }
        if let Some(f) = &cfg.fence {
            let chap_user = if f.lun.starts_with('/') {
                false
            } else {
                let url = twinpath_iscsi::IscsiUrl::parse(&f.lun).map_err(|e| {
                    bad(
                        "fence.lun",
                        &format!("{e} (an iscsi:// URL or a block device's absolute path)"),
                    )
                })?;
                url.user.is_some()
            };
            if chap_user != f.password_file.is_some() {
                return Err(bad(
                    "fence.password_file",
                    "give it exactly when the LUN is an iscsi:// URL naming a CHAP user",
                ));
            }
        }
        if !cfg.export.is_absolute() {
            return Err(bad("export", "must be an absolute path"));
        }
        if cfg.hosts.is_empty() {
            return Err(bad("hosts", "list at least one host"));
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for (i, h) in cfg.hosts.iter().enumerate() {
            let at = |k: &str| format!("hosts[{i}].{k}");
            if !valid_host_name(&h.name) {
                return Err(bad(
                    &at("name"),
                    "1 to 64 characters of letters, digits, `-`, `_` and `.`",
                ));
            }
            if !names.insert(h.name.as_str()) {
                return Err(bad(
                    &at("name"),
                    &format!("host `{}` is listed twice", h.name),
                ));
            }
            if !keys.insert(&h.key_file) {
                return Err(bad(
                    &at("key_file"),
                    "each host needs its own key file (a key identifies its host)",
                ));
            }
            for p in h.paths.iter().flatten() {
                if !valid_prefix(p) {
                    return Err(bad(
                        &at("paths"),
                        &format!("`{p}` must be relative to the export, without `..`"),
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/map-server.yaml");
        let cfg = MapServerConfig::from_file(&path).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:7410");
        assert_eq!(cfg.export, Path::new("/srv/vmstore"));
        assert_eq!(cfg.allocation_chunk.0, 64 << 20);
        assert_eq!(cfg.lease_time, Duration::from_secs(30));
        assert_eq!(cfg.hosts[0].name, "vmhost-07");
        assert_eq!(
            cfg.hosts[0].paths.as_deref(),
            Some(&["images/vm1/".to_owned(), "images/shared/".to_owned()][..])
        );
        assert!(cfg.metrics.is_some());
    }

    #[test]
    fn bad_host_lists_name_the_key() {
        let dir = std::env::temp_dir().join(format!("tp-mapcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("m.yaml");
        let head = "listen: 127.0.0.1:1\nexport: /srv\n";
        for (body, needle) in [
            ("key_file: /k\nhosts: []\n", "`hosts:`"),
            ("hosts: []\n", "key `hosts`"),
            (
                "hosts: [{name: a, key_file: /k}, {name: a, key_file: /j}]\n",
                "hosts[1].name",
            ),
            (
                "hosts: [{name: a, key_file: /k}, {name: b, key_file: /k}]\n",
                "hosts[1].key_file",
            ),
            (
                "hosts: [{name: \"a\\nb\", key_file: /k}]\n",
                "hosts[0].name",
            ),
            (
                "hosts: [{name: a, key_file: /k, paths: [../x]}]\n",
                "hosts[0].paths",
            ),
            (
                "hosts: [{name: a, key_file: /k, paths: [/abs]}]\n",
                "hosts[0].paths",
            ),
            ("hosts: [{name: a, key_fiel: /k}]\n", "key_fiel"),
            (
                "hosts: [{name: a, key_file: /k}]\nlease_time: 500ms\n",
                "key `lease_time`: must be between",
            ),
            (
                "hosts: [{name: a, key_file: /k}]\nlease_time: thirty\n",
                "lease_time",
            ),
            (
                "hosts: [{name: a, key_file: /k}]\nfence: {lun: sdb}\n",
                "key `fence.lun`",
            ),
            (
                "hosts: [{name: a, key_file: /k}]\nfence: {lun: /dev/sdb, password_file: /p}\n",
                "fence.password_file",
            ),
            (
                "hosts: [{name: a, key_file: /k}]\nfence: {lun: 'iscsi://u@h/iqn.x:y/1'}\n",
                "fence.password_file",
            ),
        ] {
            std::fs::write(&cfg, format!("{head}{body}")).unwrap();
            let e = MapServerConfig::from_file(&cfg).unwrap_err();
            assert!(
                matches!(e, Error::Config { .. }) && e.to_string().contains(needle),
                "{body}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
