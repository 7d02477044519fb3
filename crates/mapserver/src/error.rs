//! What the map server could not do, and why.

use std::fmt::Display;
use std::path::PathBuf;

use twinpath_mapproto::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key of the configuration file is missing, unknown or out of range.
    #[error("{}: key `{key}`: {reason}", file.display())]
    Config {
        file: PathBuf,
        key: String,
        reason: String,
    },
    /// A system call failed; `what` names the file, device, socket or step.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A host's key, or the set of them, was refused.
    #[error("{what}: {source}")]
    Key { what: String, source: KeyError },
    /// The volume, its filesystem or the fencing LUN cannot do what the server needs.
    #[error("{0}")]
    Unfit(String),
    /// The fencing LUN refused a reservation command or did not answer.
    #[error("{0}")]
    Fence(String),
}

impl Error {
    /// The same error, with `step` (what it happened in) in front of its message.
    pub(crate) fn context(self, step: impl Display) -> Error {
        match self {
            Error::Io { what, source } => Error::Io {
                what: format!("{step}: {what}"),
                source,
            },
            Error::Key { what, source } => Error::Key {
                what: format!("{step}: {what}"),
                source,
            },
            Error::Unfit(m) => Error::Unfit(format!("{step}: {m}")),
            Error::Fence(m) => Error::Fence(format!("{step}: {m}")),
            // It names its file and key already.
            config @ Error::Config { .. } => config,
        }
    }
}

/// An [`Error::Io`] of `what`, for `map_err`.
pub(crate) fn io(what: impl Display) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
