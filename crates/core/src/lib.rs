//! twinpath-core: what the device and every backend plugin share.
//!
//! - [`BlockBackend`]: the async backend trait the vhost-user-blk device drives;
//! - [`GuestBuffers`]: zero-copy scatter-gather views of guest memory;
//! - [`Error`]: one error type with a kind, context and source;
//! - [`Registry`] / [`Plugin`]: backends register a name and parse their own options;
//! - [`Config`]: the YAML disk list.

mod backend;
pub mod blockdev;
mod buffers;
pub mod config;
mod error;
mod registry;
mod size;

pub use backend::{BlockBackend, DiskInfo};
pub use buffers::{GuestBuffers, IoVecs};
pub use config::{CacheMode, Config, ConfigError, DiskConfig};
pub use error::{Error, ErrorKind, Result};
pub use registry::{parse_options, BackendSpec, DiskContext, OptionError, Plugin, Registry};
pub use size::ByteSize;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the mutexes of
/// twinpath guard state that stays consistent between statements.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
