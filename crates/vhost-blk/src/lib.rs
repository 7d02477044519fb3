//! twinpath-vhost-blk: a vhost-user-blk device in front of any [`twinpath_core::BlockBackend`].
//!
//! - [`request`]: parsing and checking descriptor chains from an untrusted guest;
//! - [`device`]: the per-connection device (queues, executor, config space);
//! - `order`: finished requests go into the used ring in the order they came;
//! - [`server`]: the socket, reconnects and graceful shutdown of one disk;
//! - `sigbus`: guest memory shrunk under the device costs its frontend's connection, not
//!   the daemon.

mod config_space;
pub mod device;
mod disk;
mod order;
pub mod request;
pub mod server;
mod sigbus;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use disk::{Disk, DiskSettings};

pub use server::DiskServer;
pub(crate) use twinpath_core::lock;
