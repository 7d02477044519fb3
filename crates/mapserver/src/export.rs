//! The exported tree: paths from hosts are resolved inside it or refused.

use std::path::{Component, Path, PathBuf};

pub struct Export {
    root: PathBuf,
}

impl Export {
    pub fn new(root: &Path) -> std::io::Result<Export> {
        Ok(Export {
            root: root.canonicalize()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file `rel` names inside the export. Refused: absolute paths, `..`, empty paths,
    /// and anything whose real location (after symlinks) is outside the export.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, String> {
        let p = Path::new(rel);
        if rel.is_empty()
            || !p
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!("path `{rel}` must be relative, without `..`"));
        }
        let real = self
            .root
            .join(p)
            .canonicalize()
            .map_err(|e| format!("path `{rel}`: {e}"))?;
        if !real.starts_with(&self.root) {
            return Err(format!("path `{rel}` leads outside the export"));
        }
        if !real.is_file() {
            return Err(format!("path `{rel}` is not a regular file"));
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_export() {
        let dir = std::env::temp_dir().join(format!("tp-export-{}", std::process::id()));
        let outside = dir.join("outside.raw");
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("img")).unwrap();
        std::fs::write(root.join("img/vm.raw"), b"x").unwrap();
        std::fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape.raw")).unwrap();
        std::os::unix::fs::symlink("vm.raw", root.join("img/alias.raw")).unwrap();
        let e = Export::new(&root).unwrap();
        assert!(e.resolve("img/vm.raw").is_ok());
        assert!(
            e.resolve("img/alias.raw").is_ok(),
            "a symlink inside is fine"
        );
        for bad in [
            "../outside.raw",
            "/etc/passwd",
            "img/../../outside.raw",
            "escape.raw",
            "",
            "img",
        ] {
            assert!(e.resolve(bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
