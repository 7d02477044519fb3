//! twinpath-core: what the device and every backend plugin share.
//!
//! - [`BlockBackend`] / [`BlockIo`]: the async backend traits the vhost-user-blk device drives,
//!   with a queue's own I/O path ([`QueueLink`]);
//! - [`GuestBuffers`]: zero-copy scatter-gather views of guest memory;
//! - [`Error`]: one error type with a kind, context and source;
//! - [`Registry`] / [`Plugin`]: backends register a name and parse their own options;
//! - [`Config`]: the YAML disk list;
//! - [`OpenContext`]: what `open` is given: the runtime and what disks share;
//! - [`stats`]: lock-free I/O counters per disk and per path, for metrics.

mod backend;
mod buffers;
pub mod config;
mod context;
mod error;
mod group;
pub mod imagelock;
mod registry;
mod secret;
mod size;
pub mod stats;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use backend::{BlockBackend, BlockIo, DiskInfo, Permit, QueueLink};
pub use buffers::{GuestBuffers, IoVecs};
pub use config::{CacheMode, Config, ConfigError, DiskConfig, MetricsConfig, SocketAccess};
pub use context::{OpenContext, WeakMap};
pub use error::{Error, ErrorKind, Result};
pub use group::{group_id, GroupError};
pub use registry::{
    parse_options, split_options, BackendSpec, DiskContext, OptionError, Plugin, Registry,
};
pub use secret::{read_secret, read_secret_bytes};
pub use size::{ByteSize, NotASize};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the mutexes of
/// twinpath guard state that stays consistent between statements.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuses `[offset, offset + len)` unless it lies within `capacity` bytes, with an
/// [`ErrorKind::OutOfRange`] error whose context `what` names (the operation and the object):
/// a backend never writes past the end of its store, whatever the device let through.
pub fn within(capacity: u64, offset: u64, len: u64, what: impl FnOnce() -> String) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfRange,
            format!("{}: {len} bytes at {offset} of {capacity}", what()),
        )),
    }
}

/// Waits until `done` holds or `timeout` passes, looking every millisecond; returns whether it
/// holds. For state other threads change without telling anyone (counters, flags).
pub fn wait_until(timeout: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Runs `task` on `runtime` and waits for it from any thread: for backends whose I/O needs
/// the runtime (network connections, timers) while the device polls them on its queue
/// threads. A task that panics or is cancelled is an I/O error named `what`.
pub async fn run_on<F>(runtime: &tokio::runtime::Handle, what: &str, task: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    runtime
        .spawn(task)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, format!("{what} task failed"), e))?
}
