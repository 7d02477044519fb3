//! twinpath-blockio: how twinpath moves bytes to and from a file or a block device, for the
//! file plugin's images and the san plugin's shared LUN alike.
//!
//! - [`Target`]: an open image file or block device with its kind, capacity and block size;
//! - [`Engine`]: one way of issuing I/O, one type per engine: [`Inline`] (in the calling
//!   thread), [`Uring`] (io_uring: on a queue worker its own [`QueueRing`], elsewhere a ring
//!   reaped by a task), [`Threads`] (`RWF_NOWAIT`, then a thread pool); [`AnyEngine`] is the
//!   one an [`EngineKind`] picks;
//! - [`AlignedBuf`]: memory O_DIRECT accepts, which the engines bounce through (at most
//!   1 MiB at a time) where a guest's buffers are not aligned;
//! - block device queries the libc crate lacks: [`device_size`], [`sector_size`].
//!
//! Every call takes the queue ring of the worker it runs on, or `None`: which ring an
//! operation goes to is the caller's choice, never the thread's.

mod buf;
mod engine;
mod sys;
mod target;
mod transfer;
mod uring;

pub use buf::AlignedBuf;
pub use engine::{AnyEngine, Engine, EngineKind, Inline, RangeOp, Threads, Uring};
pub use sys::{device_size, sector_size};
pub use target::{FileKind, Target};
pub use uring::QueueRing;

#[cfg(test)]
mod tests;
