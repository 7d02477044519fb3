//! The guest fio runner (`guest-fio`) end to end: real QEMU guests, fio inside, the report.

use std::path::Path;
use std::process::Command;

use twinpath_tests::{guest_dir, scratch, twinpath_bin};

/// The guest fio runner end to end, in its short form: a twinpath `file` disk and an `smb`
/// disk against qemu-storage-daemon on the file disk's image, three jobs from configs/fio
/// (one of them verifying data), a report and a chart.
#[test]
#[ignore = "boots QEMU guests; scripts/test.sh runs it"]
fn guest_fio_runner_reports_every_disk_against_the_peer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = scratch();
    let jobs = ["randread-4k-qd32", "write-128k", "verify-crc32c"];
    let run = Command::new(env!("CARGO_BIN_EXE_guest-fio"))
        .current_dir(root)
        .env("TWINPATH_BIN", twinpath_bin())
        .args([
            "--local",
            "--jobs",
            &jobs.join(","),
            "--runtime",
            "2",
            "--ramp",
            "0",
        ])
        .args(["--size", "32m", "--out"])
        .arg(out.path())
        .arg("--guest-dir")
        .arg(guest_dir())
        .output()
        .expect("guest-fio");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stdout}\n{stderr}");
    // Progress while it ran, per disk and job.
    for target in ["twinpath file", "twinpath smb", "qemu-storage-daemon"] {
        assert!(
            stderr.contains(&format!("{target}: job 3/3 verify-crc32c")),
            "{stderr}"
        );
    }
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert_eq!(report, stdout, "the report printed is the one written");
    assert!(
        report.contains("| job | twinpath file | p99 | vs peer | twinpath smb | p99 | vs peer | qemu-storage-daemon | p99 |"),
        "{report}"
    );
    for job in jobs {
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {job} |")))
            .unwrap_or_else(|| panic!("no row for {job}:\n{report}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // job, then per twinpath disk: figure, p99, ratio; the peer: figure, p99.
        for figure in [cells[2], cells[5], cells[8]] {
            let value: f64 = figure
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{job}: `{figure}` in {row}"));
            assert!(value > 0.0, "{row}");
        }
        assert!(cells[4].ends_with('x') && cells[7].ends_with('x'), "{row}");
        // fio's own JSON is kept per disk, and fio saw no error (verify included).
        for dir in ["twinpath-file", "twinpath-smb", "qemu-storage-daemon"] {
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.path().join(dir).join(format!("{job}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(json["jobs"][0]["error"], 0, "{dir}/{job}");
        }
    }
    let svg = std::fs::read_to_string(out.path().join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for label in jobs.iter().chain(&["twinpath smb", "qemu-storage-daemon"]) {
        assert!(svg.contains(label), "{label} missing from the chart");
    }
}
