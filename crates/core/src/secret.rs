//! Secrets (passwords) kept in files, so they stay out of configs, command lines and logs.

use std::path::Path;

use crate::{Error, Result};

/// The contents of the secret file `path` without its trailing line end; `key` names the
/// config key that pointed at it, for the error.
pub fn read_secret(key: &str, path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("{key} {}", path.display()), e))?
        .trim_end_matches(['\n', '\r'])
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_end_is_not_part_of_the_secret() {
        let dir = std::env::temp_dir().join(format!("twinpath-secret-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\r\n").unwrap();
        assert_eq!(read_secret("password_file", &dir).unwrap(), "s3cret");
        std::fs::remove_file(&dir).unwrap();
        let e = read_secret("password_file", &dir).unwrap_err().to_string();
        assert!(e.contains("password_file"), "{e}");
    }
}
