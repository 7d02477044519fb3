//! The file plugin keeps the backend contract (`twinpath_core::testing::conformance`) with
//! every engine, through the page cache and with O_DIRECT, through the backend and through a
//! queue's own path (the uring engine's queue ring).

use std::path::Path;

use twinpath_core::testing::{conformance, CONFORMANCE_MIN_CAPACITY};
use twinpath_core::{DiskContext, OpenContext, Plugin};
use twinpath_plugin_file::FilePlugin;

fn check(dir: &Path, engine: &str, direct: bool) {
    let image = dir.join(format!("{engine}-{direct}.raw"));
    std::fs::write(&image, vec![0u8; 2 * CONFORMANCE_MIN_CAPACITY as usize]).unwrap();
    let options = serde_yaml::from_str(&format!(
        "{{path: {}, engine: {engine}, direct: {direct}}}",
        image.display()
    ))
    .unwrap();
    let disk = DiskContext {
        name: "conformance".into(),
        read_only: false,
        lock: true,
    };
    let spec = FilePlugin.parse(&disk, options).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctx = OpenContext::new(rt.handle().clone());
    conformance(|| rt.block_on(spec.open(&ctx)));
}

#[test]
fn every_engine_keeps_the_backend_contract_through_the_page_cache() {
    // tmpfs: fast, and what the benchmarks use.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    for engine in ["inline", "uring", "threads"] {
        check(dir.path(), engine, false);
    }
}

#[test]
fn every_engine_keeps_the_backend_contract_with_o_direct() {
    // A disk filesystem: tmpfs may refuse O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for engine in ["inline", "uring", "threads"] {
        check(dir.path(), engine, true);
    }
}
