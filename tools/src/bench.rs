//! Shared pieces of the benchmark runners (`src/bin/bench-*.rs`): results with medians,
//! `twinpath bench` on a socket, and replacing a marked section of docs/benchmarks.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use twinpath_tests::twinpath_bin;

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
        self.try_median(target, test)
            .unwrap_or_else(|| panic!("no result for {target} {test}"))
    }

    /// The median, if `target` ran `test` at all.
    pub fn try_median(&self, target: &str, test: &str) -> Option<f64> {
        let mut v = self.0.get(&(target.to_owned(), test.to_owned()))?.clone();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// CPU time used while something runs: the whole machine's, and optionally one process's
/// (all its threads, including those that ended meanwhile).
pub struct CpuMeter {
    process: Option<u32>,
    machine: u64,
    idle: u64,
    process_ticks: u64,
}

/// Busy and idle clock ticks of the whole machine, from the first line of /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().sum::<u64>() - idle, idle)
}

/// User plus system ticks of process `pid`.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) state ...`: the comm may hold spaces, so count fields after its `)`;
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

impl CpuMeter {
    pub fn start(process: Option<u32>) -> CpuMeter {
        let (machine, idle) = machine_ticks();
        CpuMeter {
            process,
            machine,
            idle,
            process_ticks: process.map_or(0, process_ticks),
        }
    }

    /// CPUs busy on average since `start`: the machine's, and the process's.
    pub fn stop(self) -> (f64, f64) {
        let (busy, idle) = machine_ticks();
        let (busy, idle) = (busy - self.machine, idle - self.idle);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let elapsed = (busy + idle).max(1) as f64 / cpus;
        let process = self.process.map_or(0, |pid| {
            process_ticks(pid).saturating_sub(self.process_ticks)
        });
        (busy as f64 / elapsed, process as f64 / elapsed)
    }
}

/// The key under which a test's median machine CPU use is kept.
pub fn cpu(test: &str) -> String {
    format!("{test}/cpu")
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
