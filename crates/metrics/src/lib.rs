//! twinpath-metrics: what the daemon counts, for monitoring and for people.
//!
//! The counters live where the work happens (the device per disk, each backend per path, see
//! [`twinpath_core::stats`]); a scrape takes a [`DiskSample`] of every disk served at that
//! moment and renders it as Prometheus (OpenMetrics) text on `/metrics`, as JSON on `/stats`
//! (read by `twinpath stats`), or as a [`table`].

mod http;
mod prometheus;
mod table;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twinpath_core::stats::{IoSnapshot, PathSnapshot};

pub use http::serve;
pub use prometheus::render;
pub use table::table;

/// One disk's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSample {
    pub disk: String,
    /// What the guests asked of the disk.
    pub io: IoSnapshot,
    /// Requests the device refused as malformed (a broken or hostile driver).
    #[serde(default)]
    pub rejected: u64,
    /// The backend's paths (`network`, `direct`); none for a local file.
    pub paths: Vec<PathSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathSample {
    pub path: String,
    #[serde(flatten)]
    pub stats: PathSnapshot,
}

/// Takes a sample of every disk served right now.
pub type Source = Arc<dyn Fn() -> Vec<DiskSample> + Send + Sync>;
