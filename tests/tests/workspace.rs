//! The workspace's own rules, read from `cargo metadata`: which crate may depend on which
//! (docs/architecture.md), and a `rust-version` that is true of the dependencies.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What a workspace crate is, by where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// crates/core: what everything shares; depends on no other twinpath crate.
    Core,
    /// crates/vhost-blk: the device, which knows backends only through core's traits.
    Device,
    /// Any other crate under crates/ but the binary: depends on core and other libraries.
    Library,
    /// plugins/*: depends on core and libraries, never on another plugin or the device.
    Plugin,
    /// crates/twinpath and tests/: put everything together.
    Assembly,
    /// tools/: benchmark, report and demo programs, on the test harnesses; nothing uses them.
    Tools,
}

fn kind(root: &Path, manifest: &str) -> Kind {
    let rel = Path::new(manifest).strip_prefix(root).unwrap();
    let dir = rel.parent().unwrap().to_str().unwrap();
    match dir {
        "crates/core" => Kind::Core,
        "crates/vhost-blk" => Kind::Device,
        "crates/twinpath" | "tests" => Kind::Assembly,
        "tools" => Kind::Tools,
        d if d.starts_with("plugins/") => Kind::Plugin,
        d if d.starts_with("crates/") => Kind::Library,
        d => panic!("{d}: a crate in no known place"),
    }
}

fn may_depend(from: Kind, to: Kind) -> bool {
    match from {
        Kind::Core => false,
        Kind::Device => to == Kind::Core,
        Kind::Library | Kind::Plugin => matches!(to, Kind::Core | Kind::Library),
        Kind::Assembly => !matches!(to, Kind::Assembly | Kind::Tools),
        Kind::Tools => to != Kind::Tools,
    }
}

fn metadata(no_deps: bool) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["metadata", "--format-version", "1"])
        .current_dir(root);
    if no_deps {
        cmd.arg("--no-deps");
    }
    let out = cmd.output().expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn crates_depend_only_on_what_their_kind_may() {
    let m = metadata(true);
    let root = Path::new(m["workspace_root"].as_str().unwrap());
    let kinds: BTreeMap<&str, Kind> = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let manifest = p["manifest_path"].as_str().unwrap();
            (p["name"].as_str().unwrap(), kind(root, manifest))
        })
        .collect();
    let mut broken = Vec::new();
    for p in m["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        for d in p["dependencies"].as_array().unwrap() {
            let dep = d["name"].as_str().unwrap();
            if let Some(&to) = kinds.get(dep) {
                if !may_depend(kinds[name], to) {
                    broken.push(format!("{name} ({:?}) -> {dep} ({to:?})", kinds[name]));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependencies against the rules: {broken:#?}"
    );
    // The rules must have something to judge.
    assert!(kinds.values().filter(|k| **k == Kind::Plugin).count() >= 3);
    assert!(kinds.values().filter(|k| **k == Kind::Library).count() >= 5);
}

fn version(v: &str) -> (u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn rust_version_is_at_least_what_every_dependency_asks() {
    let m = metadata(false);
    let packages = m["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "twinpath-core")
        .and_then(|p| p["rust_version"].as_str())
        .expect("the workspace sets rust-version");
    let newest = packages
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    assert!(
        version(ours) >= newest.0,
        "rust-version {ours}, but {} asks for {:?}",
        newest.1,
        newest.0
    );
}
