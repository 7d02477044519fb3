//! SMB failures as twinpath errors.

use smb2::types::status::NtStatus;
use twinpath_core::{Error, ErrorKind};

pub(crate) fn smb_error(what: &str, e: smb2::Error) -> Error {
    let kind = match e.kind() {
        smb2::ErrorKind::NotFound => ErrorKind::NotFound,
        smb2::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Io,
    };
    Error::with_source(kind, what.to_owned(), e)
}

pub(crate) fn status_error(what: &str, status: NtStatus) -> Error {
    let kind = if status == NtStatus::OBJECT_NAME_NOT_FOUND {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("{what}: server answered {status}"))
}
