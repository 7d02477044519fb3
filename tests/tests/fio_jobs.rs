//! The fio job set in configs/fio: every job the issue names is there, each parses, runs a
//! second against a file with JSON output and moves data, and the verify job checks crc32c.

use std::path::{Path, PathBuf};
use std::process::Command;

use twinpath_tests::scratch;

fn jobs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/fio")
}

/// Runs `job` against `file` for a short while (its size, run and ramp times cut down: a job
/// file's own settings win over fio's command line); the parsed JSON report.
fn run(job: &Path, file: &Path, scratch: &Path) -> serde_json::Value {
    let short: String = std::fs::read_to_string(job)
        .unwrap()
        .lines()
        .map(|l| match l.split_once('=').map(|(k, _)| k) {
            Some("size") => "size=16m",
            Some("runtime") => "runtime=1",
            Some("ramp_time") => "ramp_time=0",
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let short_job = scratch.join(job.file_name().unwrap());
    std::fs::write(&short_job, short).unwrap();
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg(format!("--filename={}", file.display()))
        .arg(&short_job)
        .output()
        .expect("fio (apt install fio)");
    assert!(
        out.status.success(),
        "{}: {}",
        job.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').expect("JSON output")..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{}: {e}", job.display()))
}

#[test]
fn every_job_runs_with_direct_io_and_reports_json() {
    let mut names: Vec<String> = std::fs::read_dir(jobs_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fio"))
        .collect();
    names.sort();
    for want in [
        "randread-4k-qd1.fio",
        "randread-4k-qd32.fio",
        "randwrite-4k-qd1.fio",
        "randwrite-4k-qd32.fio",
        "read-128k.fio",
        "write-128k.fio",
        "read-1m.fio",
        "write-1m.fio",
        "randrw-4k-70-30.fio",
        "verify-crc32c.fio",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    let dir = scratch();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    for name in &names {
        let text = std::fs::read_to_string(jobs_dir().join(name)).unwrap();
        assert!(text.contains("direct=1"), "{name}: not direct");
        let report = run(&jobs_dir().join(name), &file, dir.path());
        let job = &report["jobs"][0];
        assert_eq!(job["error"], 0, "{name}: {job}");
        let bytes = job["read"]["io_bytes"].as_u64().unwrap_or(0)
            + job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "{name} moved no data");
        if name.starts_with("verify") {
            assert_eq!(
                job["read"]["io_bytes"], job["write"]["io_bytes"],
                "{name}: every block written is read back and checked"
            );
        }
        if name.starts_with("randrw") {
            assert!(
                job["read"]["io_bytes"].as_u64() > job["write"]["io_bytes"].as_u64(),
                "{name}: mostly reads"
            );
        }
    }
}
