//! One error type for every backend operation: a kind the device can map to a virtio status,
//! the context the operator needs (disk, file, offset), and the underlying cause.

use std::fmt;

/// What went wrong, coarse enough for the device to choose a status and for tests to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operation reached the backing store and failed there.
    Io,
    /// The request lies (partly) beyond the end of the disk.
    OutOfRange,
    /// A write-class request on a read-only disk.
    ReadOnly,
    /// The backend does not implement this operation.
    Unsupported,
    /// The request or option is malformed.
    InvalidInput,
    /// The backing object does not exist.
    NotFound,
    /// The operation did not finish in time.
    Timeout,
    /// The shared LUN refused this host: another party removed its persistent reservation
    /// (RESERVATION CONFLICT), so it may not write there any more.
    Fenced,
    /// Someone else uses the image in a way this disk may not share (image locks).
    InUse,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Fenced => "fenced",
            ErrorKind::InUse => "in use",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend error: kind, human context, optional cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Source>,
}

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Source>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An OS error, classified by errno so that e.g. ENOENT stays `NotFound`.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            std::io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ if err.raw_os_error() == Some(libc::EROFS) => ErrorKind::ReadOnly,
            _ if err.raw_os_error() == Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, context, err)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Prefixes the context, e.g. with the disk name once the error leaves the backend.
    pub fn within(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) => write!(f, "{}: {src}", self.context),
            None => write!(f, "{}: {}", self.context, self.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_kind_and_context() {
        let e = Error::io("open /x", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = e.within("disk `a`");
        assert!(e.to_string().starts_with("disk `a`: open /x: "), "{e}");
        let e = Error::io("w", std::io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
    }
}
