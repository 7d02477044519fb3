//! Shared pieces of the benchmark runners (`src/bin/bench-*.rs`): results with medians,
//! `twinpath bench` on a socket, and replacing a marked section of docs/benchmarks.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::twinpath_bin;

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Figures per (target, test) over rounds: MB/s for large blocks, IOPS for 4k.
#[derive(Default)]
pub struct Results(BTreeMap<(String, String), Vec<f64>>);

impl Results {
    pub fn add(&mut self, target: &str, test: &str, value: f64) {
        self.0
            .entry((target.to_owned(), test.to_owned()))
            .or_default()
            .push(value);
    }

    pub fn median(&self, target: &str, test: &str) -> f64 {
        let mut v = self
            .0
            .get(&(target.to_owned(), test.to_owned()))
            .unwrap_or_else(|| panic!("no result for {target} {test}"))
            .clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// The key under which a test's median p50 latency (us) is kept.
pub fn p50(test: &str) -> String {
    format!("{test}/p50")
}

/// Whether a test's figure is IOPS (small blocks) rather than MB/s.
pub fn is_iops(test: &str) -> bool {
    test.contains("4k")
}

/// Runs `twinpath bench` on `sock` and adds its figures (and p50s) under `target`.
pub fn bench_disk(sock: &Path, tests: &str, runtime: u64, results: &mut Results, target: &str) {
    let out = Command::new(twinpath_bin())
        .arg("bench")
        .arg("--socket")
        .arg(sock)
        .args(["--runtime", &runtime.to_string(), "--tests", tests])
        .args(["--json", "--quiet"])
        .output()
        .expect("twinpath bench");
    assert!(
        out.status.success(),
        "twinpath bench on {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bench JSON");
    for row in rows {
        let test = row["test"].as_str().unwrap();
        let key = if is_iops(test) { "iops" } else { "mb_per_s" };
        results.add(target, test, row[key].as_f64().unwrap());
        results.add(target, &p50(test), row["lat_p50_us"].as_f64().unwrap());
    }
}

/// Replaces the text between `<!-- {name}:start -->` and `<!-- {name}:end -->` in
/// docs/benchmarks.md (appending the section if it is not there).
pub fn update_doc(name: &str, report: &str) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let text = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Benchmarks\n".into());
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let section = format!("{start}\n{report}\n{end}");
    let text = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(&doc, text).unwrap();
}
