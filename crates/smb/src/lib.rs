//! twinpath-smb: a raw image on an SMB2/3 share, read and written through the pipeline
//! engine (many sections outstanding on one connection and one handle). The network path of
//! the `smb` plugin, and of the `san` plugin beside its direct path.
//!
//! - [`SmbOptions`]: the options that name and tune an image (the `smb` plugin's, and the
//!   network half of the `san` plugin's), checked into an [`ImageConfig`];
//! - [`ImageConfig::open`]: logs in (or joins the session another disk opened to the same
//!   server, share and user) and opens the image as an [`SmbImage`];
//! - [`SmbImage`]: its reads, writes, flushes and zeroing, run in the calling task (on the
//!   tokio runtime), counted in its [`PathStats`](twinpath_core::stats::PathStats).

mod error;
mod file;
mod image;
mod options;
mod session;

pub use image::SmbImage;
pub use options::{ImageConfig, SmbOptions};

/// The reply handling the fuzz targets (`fuzz/`) drive; built only with `--cfg fuzzing`.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The data a READ reply body carries for a read of `asked` bytes, or why it is refused.
    pub fn read_payload(body: Vec<u8>, asked: usize) -> twinpath_core::Result<Vec<u8>> {
        crate::file::read_payload(body, asked).map(|d| d.as_slice().to_vec())
    }
}
