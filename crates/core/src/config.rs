//! The YAML config: a list of disks, each with a socket and a backend chosen by plugin name.
//!
//! Parsing happens in two steps so that every error names its disk: first the document into
//! per-disk YAML values, then each disk (common keys here, `backend` by its plugin).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::registry::{parse_options, BackendSpec, DiskContext, OptionError, Registry};

/// Most queues a disk may ask for; each queue gets a worker thread.
pub const MAX_QUEUES: u16 = 64;

/// The longest a queue worker may poll before it sleeps (see `poll_us` in the config).
pub const MAX_POLL_US: u32 = 1000;

/// A queue worker with requests in flight polls this long for more work before it sleeps.
pub const DEFAULT_POLL_US: u32 = 50;
/// Guest data a disk has in flight at most by default (requests beyond it wait).
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// The bounds of `max_inflight_bytes`: one largest segment at least, and what the device's
/// counter holds.
const INFLIGHT_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);
/// virtio-blk serials are at most 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

/// Whether the guest starts with a volatile write cache (it may switch via CONFIG_WCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Writes complete when the backend has them; the guest sends FLUSH for durability.
    #[default]
    Writeback,
    /// Every write is flushed before it completes.
    Writethrough,
}

/// Who may connect to a disk's socket: its mode and group, set before it appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits; the owner (the daemon's user) always has read and write.
    pub mode: u32,
    /// The group the socket belongs to; `None`: the daemon's.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

/// One disk, validated, with its backend parsed but not yet opened.
#[derive(Debug)]
pub struct DiskConfig {
    pub name: String,
    pub socket: PathBuf,
    pub socket_access: SocketAccess,
    /// Whether the disk takes image locks (`lock`, default true).
    pub lock: bool,
    pub num_queues: u16,
    pub read_only: bool,
    pub serial: Option<String>,
    pub cache: CacheMode,
    pub poll_us: u32,
    /// Bytes of guest data the disk has in flight at most; requests beyond wait.
    pub max_inflight_bytes: u64,
    pub backend: Box<dyn BackendSpec>,
    /// The disk's entry as written: a reload leaves a disk whose entry is unchanged alone.
    pub entry: serde_yaml::Value,
}

#[derive(Debug)]
pub struct Config {
    pub disks: Vec<DiskConfig>,
    pub metrics: Option<MetricsConfig>,
}

/// Where the daemon answers metric scrapes (`/metrics`, `/stats`); off when absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// An IP address and port, e.g. `127.0.0.1:9810`.
    pub listen: std::net::SocketAddr,
}

/// A config error. `disk` and `key` say where, so an operator can find the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub disk: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn new(disk: Option<&str>, key: Option<String>, message: impl Into<String>) -> Self {
        ConfigError {
            disk: disk.map(str::to_owned),
            key,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.disk {
            write!(f, "disk `{d}`: ")?;
        }
        if let Some(k) = &self.key {
            write!(f, "key `{k}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    disks: Vec<serde_yaml::Value>,
    #[serde(default)]
    metrics: Option<serde_yaml::Value>,
    /// Defaults for every disk's `socket_group` and `socket_mode`.
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    socket_mode: Option<String>,
}

fn default_queues() -> u16 {
    1
}

fn default_poll_us() -> u32 {
    DEFAULT_POLL_US
}

fn default_lock() -> bool {
    true
}

fn default_max_inflight_bytes() -> crate::ByteSize {
    crate::ByteSize(DEFAULT_MAX_INFLIGHT_BYTES)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    socket: PathBuf,
    #[serde(default = "default_queues")]
    num_queues: u16,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    cache: CacheMode,
    #[serde(default = "default_poll_us")]
    poll_us: u32,
    #[serde(default = "default_max_inflight_bytes")]
    max_inflight_bytes: crate::ByteSize,
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    socket_mode: Option<String>,
    #[serde(default = "default_lock")]
    lock: bool,
    backend: serde_yaml::Mapping,
}

impl Config {
    pub fn from_file(path: &Path, registry: &Registry) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(None, None, format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text, registry)
    }

    pub fn parse(text: &str, registry: &Registry) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            serde_yaml::from_str(text).map_err(|e| ConfigError::new(None, None, e.to_string()))?;
        if raw.disks.is_empty() {
            return Err(ConfigError::new(
                None,
                Some("disks".into()),
                "no disks configured",
            ));
        }
        let metrics = raw
            .metrics
            .map(|m| {
                parse_options::<MetricsConfig>(m)
                    .map_err(|e| option_error(None, Some("metrics"), e))
            })
            .transpose()?;
        let defaults = (raw.socket_group, raw.socket_mode);
        socket_access(&defaults, (None, None))
            .map_err(|(key, e)| ConfigError::new(None, Some(key.into()), e))?;
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        // Image -> (disk, read-only) of the disks that lock it.
        let mut images: std::collections::HashMap<String, (String, bool)> = Default::default();
        let mut disks = Vec::with_capacity(raw.disks.len());
        for (index, value) in raw.disks.into_iter().enumerate() {
            let disk = parse_disk(index, value, registry, &defaults)?;
            if !names.insert(disk.name.clone()) {
                return Err(ConfigError::new(
                    Some(&disk.name),
                    Some("name".into()),
                    "duplicate disk name",
                ));
            }
            if !sockets.insert(disk.socket.clone()) {
                return Err(ConfigError::new(
                    Some(&disk.name),
                    Some("socket".into()),
                    format!("socket {} is used by another disk", disk.socket.display()),
                ));
            }
            if let Some(image) = disk.backend.image().filter(|_| disk.lock) {
                match images.get(&image) {
                    Some((other, other_ro)) if !(disk.read_only && *other_ro) => {
                        return Err(ConfigError::new(
                            Some(&disk.name),
                            Some("backend".into()),
                            format!(
                                "image {image} is disk `{other}`'s too, and one of them writes \
                                 it: two users of one image need `lock: false` on both (for \
                                 shared-disk clusters that coordinate themselves)"
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        images.insert(image, (disk.name.clone(), disk.read_only));
                    }
                }
            }
            disks.push(disk);
        }
        Ok(Config { disks, metrics })
    }
}

/// A socket's access from a disk's `socket_group`/`socket_mode`, else the config's defaults;
/// an error names the key.
fn socket_access(
    defaults: &(Option<String>, Option<String>),
    disk: (Option<&String>, Option<&String>),
) -> Result<SocketAccess, (&'static str, String)> {
    let mode = match disk.1.or(defaults.1.as_ref()) {
        None => 0o600,
        Some(m) => {
            let bits = u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
                (
                    "socket_mode",
                    format!("`{m}` is not an octal mode like 0660"),
                )
            })?;
            if bits & !0o777 != 0 || bits & 0o600 != 0o600 {
                return Err((
                    "socket_mode",
                    format!("{m}: permission bits only, with read and write for the owner"),
                ));
            }
            if bits & 0o007 != 0 {
                return Err((
                    "socket_mode",
                    format!(
                        "{m} lets every user of the host connect (and so read and write the \
                         disk): give the frontend's group `socket_group` and mode 0660"
                    ),
                ));
            }
            bits
        }
    };
    let group = match disk.0.or(defaults.0.as_ref()) {
        None => None,
        Some(g) => Some(crate::group_id(g).map_err(|e| ("socket_group", e.to_string()))?),
    };
    Ok(SocketAccess { mode, group })
}

fn parse_disk(
    index: usize,
    value: serde_yaml::Value,
    registry: &Registry,
    defaults: &(Option<String>, Option<String>),
) -> Result<DiskConfig, ConfigError> {
    // Name the disk in errors even when a later key is wrong; fall back to its position.
    let label = value
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("#{}", index + 1));
    let entry = value.clone();
    let raw: RawDisk = parse_options(value).map_err(|e| option_error(Some(&label), None, e))?;

    let at = |key: &str, message: String| ConfigError::new(Some(&label), Some(key.into()), message);
    if raw.name.is_empty() || raw.name.contains(['/', '\0']) || raw.name.len() > 64 {
        return Err(at("name", "must be 1-64 characters without `/`".into()));
    }
    if !(1..=MAX_QUEUES).contains(&raw.num_queues) {
        return Err(at(
            "num_queues",
            format!("must be between 1 and {MAX_QUEUES}"),
        ));
    }
    if raw.poll_us > MAX_POLL_US {
        return Err(at(
            "poll_us",
            format!("must be between 0 (no polling) and {MAX_POLL_US}"),
        ));
    }
    if !INFLIGHT_BYTES_RANGE.contains(&raw.max_inflight_bytes.0) {
        return Err(at("max_inflight_bytes", "must be between 1M and 1G".into()));
    }
    let socket_access = socket_access(
        defaults,
        (raw.socket_group.as_ref(), raw.socket_mode.as_ref()),
    )
    .map_err(|(key, e)| at(key, e))?;
    if raw.socket.as_os_str().is_empty() || raw.socket.as_os_str().len() > 107 {
        return Err(at(
            "socket",
            "must be a path of 1-107 bytes (a unix socket address)".into(),
        ));
    }
    if let Some(serial) = &raw.serial {
        if serial.len() > MAX_SERIAL_LEN {
            return Err(at("serial", format!("longer than {MAX_SERIAL_LEN} bytes")));
        }
    }

    let mut options = raw.backend;
    let plugin_name = match options.remove("type") {
        Some(serde_yaml::Value::String(s)) => s,
        Some(_) => return Err(at("backend.type", "must be a string".into())),
        None => return Err(at("backend.type", "missing: name a backend plugin".into())),
    };
    let plugin = registry.get(&plugin_name).ok_or_else(|| {
        at(
            "backend.type",
            format!(
                "unknown backend `{plugin_name}` (built with: {})",
                registry.names().join(", ")
            ),
        )
    })?;
    let ctx = DiskContext {
        name: raw.name.clone(),
        read_only: raw.read_only,
        lock: raw.lock,
    };
    let backend = plugin
        .parse(&ctx, serde_yaml::Value::Mapping(options))
        .map_err(|e| option_error(Some(&label), Some("backend"), e))?;

    Ok(DiskConfig {
        name: raw.name,
        socket: raw.socket,
        socket_access,
        lock: raw.lock,
        num_queues: raw.num_queues,
        read_only: raw.read_only,
        serial: raw.serial,
        cache: raw.cache,
        poll_us: raw.poll_us,
        max_inflight_bytes: raw.max_inflight_bytes.0,
        backend,
        entry,
    })
}

fn option_error(disk: Option<&str>, prefix: Option<&str>, e: OptionError) -> ConfigError {
    let key = match (prefix, e.key) {
        (Some(p), Some(k)) => Some(format!("{p}.{k}")),
        (Some(p), None) => Some(p.to_owned()),
        (None, k) => k,
    };
    ConfigError::new(disk, key, e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(Box::new(crate::testing::MemPlugin));
        r
    }

    fn err(yaml: &str) -> ConfigError {
        Config::parse(yaml, &registry()).unwrap_err()
    }

    #[test]
    fn socket_access_takes_the_global_default_and_per_disk_overrides() {
        let c = Config::parse(
            "socket_group: root\nsocket_mode: \"0660\"\ndisks:\n  - name: a\n    socket: /a\n    backend: {type: memory, size: 4}\n  - name: b\n    socket: /b\n    socket_mode: \"0640\"\n    socket_group: \"7\"\n    backend: {type: memory, size: 4}\n",
            &registry(),
        )
        .unwrap();
        let access: Vec<SocketAccess> = c.disks.iter().map(|d| d.socket_access).collect();
        assert_eq!(
            access,
            vec![
                SocketAccess {
                    mode: 0o660,
                    group: Some(0)
                },
                SocketAccess {
                    mode: 0o640,
                    group: Some(7)
                }
            ]
        );
    }

    #[test]
    fn parses_defaults() {
        let c = Config::parse(
            "disks:\n  - name: a\n    socket: /tmp/a.sock\n    backend: {type: memory, size: 4}\n",
            &registry(),
        )
        .unwrap();
        let d = &c.disks[0];
        assert_eq!(
            (
                d.num_queues,
                d.read_only,
                d.cache,
                d.poll_us,
                d.max_inflight_bytes
            ),
            (
                1,
                false,
                CacheMode::Writeback,
                DEFAULT_POLL_US,
                DEFAULT_MAX_INFLIGHT_BYTES
            )
        );
        assert_eq!(d.backend.describe(), "memory, 4 B");
        assert_eq!(d.socket_access, SocketAccess::default());
    }

    #[test]
    fn metrics_listen_is_optional_and_checked() {
        let disks = "disks:\n  - name: a\n    socket: /s\n    backend: {type: memory, size: 1}\n";
        assert_eq!(Config::parse(disks, &registry()).unwrap().metrics, None);
        let c = Config::parse(
            &format!("{disks}metrics: {{listen: '127.0.0.1:9810'}}\n"),
            &registry(),
        )
        .unwrap();
        assert_eq!(c.metrics.unwrap().listen.port(), 9810);
        let e = err(&format!("{disks}metrics: {{listen: 'localhost'}}\n"));
        assert_eq!(
            (e.disk.as_deref(), e.key.as_deref()),
            (None, Some("metrics.listen")),
            "{e:?}"
        );
        let e = err(&format!("{disks}metrics: {{port: 1}}\n"));
        assert!(e.to_string().contains("unknown field `port`"), "{e}");
    }

    #[test]
    fn errors_name_disk_and_key() {
        let e = err("disks:\n  - name: a\n    socket: /s\n    bogus: 1\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.disk.as_deref(), Some("a"));
        assert!(e.message.contains("unknown field `bogus`"), "{e}");

        let e = err("disks:\n  - name: a\n    socket: /s\n    num_queues: many\n    backend: {type: memory, size: 1}\n");
        assert_eq!(
            (e.disk.as_deref(), e.key.as_deref()),
            (Some("a"), Some("num_queues"))
        );

        let e = err("disks:\n  - name: a\n    socket: /s\n    num_queues: 0\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.key.as_deref(), Some("num_queues"));

        let e = err("disks:\n  - name: a\n    socket: /s\n    poll_us: 5000\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.key.as_deref(), Some("poll_us"), "{e}");
        let e = err("disks:\n  - name: a\n    socket: /s\n    max_inflight_bytes: 4K\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.key.as_deref(), Some("max_inflight_bytes"), "{e}");
        for (lines, key, says) in [
            ("    socket_mode: \"0666\"\n", "socket_mode", "every user"),
            ("    socket_mode: \"0460\"\n", "socket_mode", "owner"),
            ("    socket_mode: rw\n", "socket_mode", "octal"),
            (
                "    socket_group: no-such-group-here\n",
                "socket_group",
                "no group",
            ),
        ] {
            let e = err(&format!(
                "disks:\n  - name: a\n    socket: /s\n{lines}    backend: {{type: memory, size: 1}}\n"
            ));
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }

        let e = err("disks:\n  - name: a\n    socket: /s\n    backend: {type: memory, size: x}\n");
        assert_eq!(e.key.as_deref(), Some("backend.size"), "{e}");

        let e = err(
            "disks:\n  - name: a\n    socket: /s\n    backend: {type: memory, size: 1, path: p}\n",
        );
        assert_eq!(e.key.as_deref(), Some("backend.path"), "{e}");
        assert!(e.to_string().contains("unknown field `path`"), "{e}");

        let e = err("disks:\n  - name: a\n    socket: /s\n    backend: {type: smb2}\n");
        assert_eq!(e.key.as_deref(), Some("backend.type"));
        assert!(e.message.contains("unknown backend `smb2`"), "{e}");

        let e = err("disks:\n  - socket: /s\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.disk.as_deref(), Some("#1"));
        assert!(e.message.contains("missing field `name`"), "{e}");
    }

    #[test]
    fn rejects_duplicates_and_bad_values() {
        let two = "disks:\n  - name: a\n    socket: /s\n    backend: {type: memory, size: 1}\n  - name: a\n    socket: /t\n    backend: {type: memory, size: 1}\n";
        assert_eq!(err(two).key.as_deref(), Some("name"));
        let two = "disks:\n  - name: a\n    socket: /s\n    backend: {type: memory, size: 1}\n  - name: b\n    socket: /s\n    backend: {type: memory, size: 1}\n";
        assert_eq!(err(two).key.as_deref(), Some("socket"));
        let e = err("disks:\n  - name: a\n    socket: /s\n    serial: 012345678901234567890\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.key.as_deref(), Some("serial"));
        let e = err("disks:\n  - name: a\n    socket: /s\n    cache: none\n    backend: {type: memory, size: 1}\n");
        assert_eq!(e.key.as_deref(), Some("cache"), "{e}");
        assert!(err("disks: []\n").message.contains("no disks"));
        assert!(err("disk: []\n").message.contains("unknown field `disk`"));
    }
}
