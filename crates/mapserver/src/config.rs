//! The map server's YAML config.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use twinpath_core::ByteSize;

fn default_chunk() -> ByteSize {
    ByteSize(64 << 20)
}

/// ```yaml
/// listen: 0.0.0.0:7410                 # address VM hosts connect to
/// export: /srv/vmstore                 # the tree whose files are mapped (on the shared LUN)
/// key_file: /etc/twinpath/map.key      # pre-shared key, at least 16 bytes
/// allocation_chunk: 64M                # with reflink, holes are filled in chunks this large (default)
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapServerConfig {
    pub listen: String,
    pub export: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_chunk")]
    pub allocation_chunk: ByteSize,
}

impl MapServerConfig {
    pub fn from_file(path: &Path) -> Result<MapServerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let de = serde_yaml::Deserializer::from_str(&text);
        let cfg: MapServerConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            format!("{}: key `{key}`: {}", path.display(), e.inner())
        })?;
        let chunk = cfg.allocation_chunk.0;
        if chunk < 4096 || !chunk.is_power_of_two() {
            return Err(format!(
                "{}: key `allocation_chunk`: must be a power of two, at least 4K",
                path.display()
            ));
        }
        if !cfg.export.is_absolute() {
            return Err(format!(
                "{}: key `export`: must be an absolute path",
                path.display()
            ));
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
    }
}
