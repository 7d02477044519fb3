//! The exported tree. A host's path is resolved once, by the kernel, beneath a directory
//! descriptor of the export (openat2 with RESOLVE_BENEATH | RESOLVE_NO_XDEV |
//! RESOLVE_NO_MAGICLINKS), so swapping a directory for a symlink or mounting something
//! inside cannot lead out of it between a check and a use; everything after that acts on the
//! descriptor, never on the name again.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use serde::Serialize;

use crate::Refusal;

/// Longest path a host may name (PATH_MAX).
const MAX_PATH: usize = 4096;

/// A file's identity on the server: leases, watches and internal files are keyed by it, so a
/// hard link or a second name is the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Inode {
    pub dev: u64,
    pub ino: u64,
}

impl Inode {
    pub fn of(file: &File) -> std::io::Result<Inode> {
        let st = rustix::fs::fstat(file)?;
        Ok(Inode {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// An image opened for a host.
pub struct Opened {
    pub file: File,
    pub inode: Inode,
}

pub struct Export {
    root: PathBuf,
    dir: OwnedFd,
    dev: u64,
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_XDEV | ResolveFlags::NO_MAGICLINKS
}

impl Export {
    pub fn new(root: &Path) -> std::io::Result<Export> {
        let root = root.canonicalize()?;
        let dir = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let dev = rustix::fs::fstat(&dir)?.st_dev;
        Ok(Export { root, dir, dev })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the regular file `rel` for a host that may see `prefixes` (`None`: the whole
    /// export), for reading or also writing. Refused: absolute paths, `..`, paths outside
    /// the host's prefixes, anything leaving the prefix directory or the export's filesystem
    /// on the way (symlinks included), and everything but regular files.
    pub fn open(
        &self,
        rel: &str,
        prefixes: Option<&[String]>,
        write: bool,
    ) -> Result<Opened, Refusal> {
        let p = Path::new(rel);
        if rel.is_empty()
            || rel.len() > MAX_PATH
            || rel.contains('\0')
            || !p
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(Refusal::new(
                "bad_path",
                format!("path {rel:?} must be relative, without `..`"),
            ));
        }
        let (base, rest) = match prefixes {
            None => (None, p),
            Some(list) => {
                let Some(prefix) = list.iter().find(|x| p.starts_with(x)) else {
                    return Err(Refusal::new(
                        "not_allowed",
                        format!("path {rel:?} is not under this host's paths"),
                    ));
                };
                let dir = openat2(
                    &self.dir,
                    prefix.as_str(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    resolve_flags(),
                )
                .map_err(|e| Refusal::io(rel, e.into()))?;
                let rest = p.strip_prefix(prefix).unwrap_or(p);
                (Some(dir), rest)
            }
        };
        if rest.as_os_str().is_empty() {
            return Err(Refusal::new(
                "not_regular",
                format!("path {rel:?} is not a regular file"),
            ));
        }
        // The host's prefix is the root it cannot leave: a symlink inside it that points into
        // another host's directory fails like one pointing out of the export.
        let at = base.as_ref().unwrap_or(&self.dir);
        let found = openat2(
            at,
            rest,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| Refusal::io(rel, e.into()))?;
        let st = rustix::fs::fstat(&found).map_err(|e| Refusal::io(rel, e.into()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(Refusal::new(
                "not_regular",
                format!("path {rel:?} is not a regular file"),
            ));
        }
        if st.st_dev != self.dev {
            return Err(Refusal::new(
                "other_filesystem",
                format!("path {rel:?} is not on the exported filesystem"),
            ));
        }
        // Opened for I/O only now that it is known to be a regular file here (opening a
        // device node or FIFO can have effects). The descriptor's own /proc link reopens the
        // very inode checked above, not whatever the name means by now.
        let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let file: File = rustix::fs::open(
            format!("/proc/self/fd/{}", found.as_raw_fd()),
            access | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Refusal::io(rel, e.into()))?
        .into();
        let inode = Inode::of(&file).map_err(|e| Refusal::io(rel, e))?;
        if inode.dev != st.st_dev || inode.ino != st.st_ino {
            return Err(Refusal::new(
                "bad_path",
                format!("path {rel:?} changed while it was opened"),
            ));
        }
        Ok(Opened { file, inode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_export_and_the_hosts_prefixes() {
        let dir = std::env::temp_dir().join(format!("tp-export-{}", std::process::id()));
        let outside = dir.join("outside.raw");
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("img/vm1")).unwrap();
        std::fs::create_dir_all(root.join("img/vm2")).unwrap();
        std::fs::write(root.join("img/vm.raw"), b"x").unwrap();
        std::fs::write(root.join("img/vm1/a.raw"), b"x").unwrap();
        std::fs::write(root.join("img/vm2/b.raw"), b"x").unwrap();
        std::fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape.raw")).unwrap();
        std::os::unix::fs::symlink("vm.raw", root.join("img/alias.raw")).unwrap();
        std::os::unix::fs::symlink("../vm2/b.raw", root.join("img/vm1/peek.raw")).unwrap();
        std::os::unix::fs::symlink("a.raw", root.join("img/vm1/self.raw")).unwrap();
        let e = Export::new(&root).unwrap();
        assert!(e.open("img/vm.raw", None, false).is_ok());
        assert!(
            e.open("img/alias.raw", None, true).is_ok(),
            "a symlink inside is fine"
        );
        for bad in [
            "../outside.raw",
            "/etc/passwd",
            "img/../../outside.raw",
            "img/../img/vm.raw",
            "escape.raw",
            "",
            "img",
        ] {
            assert!(e.open(bad, None, false).is_err(), "{bad}");
        }
        let vm1 = ["img/vm1/".to_owned()];
        assert!(e.open("img/vm1/a.raw", Some(&vm1), true).is_ok());
        assert!(
            e.open("img/vm1/self.raw", Some(&vm1), true).is_ok(),
            "a symlink inside the prefix is fine"
        );
        for bad in ["img/vm2/b.raw", "img/vm.raw", "img/vm1/peek.raw", "img/vm1"] {
            assert!(e.open(bad, Some(&vm1), false).is_err(), "{bad}");
        }
        let a = e.open("img/vm1/a.raw", None, false).unwrap().inode;
        let b = e.open("img/vm1/self.raw", None, false).unwrap().inode;
        assert_eq!(a, b, "one inode, two names");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
