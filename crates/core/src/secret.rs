//! Secrets (passwords, keys) kept in files, so they stay out of configs, command lines and
//! logs. A secret file that its group or others may access is refused: a secret anyone on
//! the host can read is no secret, and failing loudly beats running on it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::{Error, ErrorKind, Result};

/// The bytes of the secret file `path` without a trailing line end; `key` names the config
/// key that pointed at it, for the error.
pub fn read_secret_bytes(key: &str, path: &Path) -> Result<Vec<u8>> {
    let what = || format!("{key} {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(what(), e))?;
    let mode = file
        .metadata()
        .map_err(|e| Error::io(what(), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: mode {:04o} gives group or others access to a secret; \
                 `chmod 600 {}` (or 400)",
                what(),
                mode & 0o7777,
                path.display()
            ),
        ));
    }
    let mut raw = Vec::new();
    file.read_to_end(&mut raw)
        .map_err(|e| Error::io(what(), e))?;
    let end = raw
        .strip_suffix(b"\n")
        .map(|r| r.strip_suffix(b"\r").unwrap_or(r).len())
        .unwrap_or(raw.len());
    raw.truncate(end);
    Ok(raw)
}

/// [`read_secret_bytes`] for text secrets (passwords).
pub fn read_secret(key: &str, path: &Path) -> Result<String> {
    String::from_utf8(read_secret_bytes(key, path)?).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{key} {}: not UTF-8 text", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, contents: &str, mode: u32) {
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_line_end_is_not_part_of_the_secret() {
        let dir = std::env::temp_dir().join(format!("twinpath-secret-{}", std::process::id()));
        write(&dir, "s3cret\r\n", 0o600);
        assert_eq!(read_secret("password_file", &dir).unwrap(), "s3cret");
        write(&dir, "s3cret", 0o400);
        assert_eq!(read_secret_bytes("map_key_file", &dir).unwrap(), b"s3cret");
        std::fs::remove_file(&dir).unwrap();
        let e = read_secret("password_file", &dir).unwrap_err().to_string();
        assert!(e.contains("password_file"), "{e}");
    }

    #[test]
    fn secrets_others_can_read_are_refused_naming_file_and_mode() {
        let path =
            std::env::temp_dir().join(format!("twinpath-secret-mode-{}", std::process::id()));
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            write(&path, "s3cret\n", mode);
            let e = read_secret("password_file", &path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(&format!("mode {mode:04o}")),
                "{e}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
