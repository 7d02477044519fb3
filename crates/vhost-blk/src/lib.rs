//! twinpath-vhost-blk: a vhost-user-blk device in front of any [`twinpath_core::BlockBackend`].
//!
//! - [`request`]: parsing and checking descriptor chains from an untrusted guest;
//! - [`device`]: the per-connection device (queues, executor, config space);
//! - [`server`]: the socket, reconnects and graceful shutdown of one disk.

mod config_space;
pub mod device;
mod disk;
pub mod request;
pub mod server;

pub use disk::{Disk, DiskSettings};

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every mutex here
/// guards state that stays consistent between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub use server::DiskServer;
