//! The samples as a table for people (`twinpath stats`).

use std::fmt::Write;

use twinpath_core::stats::{EventCount, IoSnapshot};

use crate::DiskSample;

/// One row per disk (path `guest`: what its guests asked) and one per backend path.
pub fn table(disks: &[DiskSample]) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>6} {:>5} {:>8} {:>8}  EVENTS\n",
        "DISK",
        "PATH",
        "READS",
        "WRITES",
        "OTHER",
        "READ",
        "WRITTEN",
        "ERRORS",
        "INFL",
        "P50",
        "P99"
    );
    for d in disks {
        row(&mut out, &d.disk, "guest", &d.io, &[]);
        for p in &d.paths {
            row(&mut out, "", &p.path, &p.stats.io, &p.stats.events);
        }
    }
    out
}

/// One row; the path's events as `name=count`, `-` where it counts none.
fn row(out: &mut String, disk: &str, path: &str, io: &IoSnapshot, events: &[EventCount]) {
    let events = if events.is_empty() {
        "-".to_owned()
    } else {
        events
            .iter()
            .map(|e| format!("{}={}", e.name, e.count))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "{disk:<16} {path:<8} {:>10} {:>10} {:>8} {:>10} {:>10} {:>6} {:>5} {:>8} {:>8}  {events}",
        io.reads,
        io.writes,
        io.others,
        bytes(io.read_bytes),
        bytes(io.written_bytes),
        io.errors,
        io.in_flight,
        latency(io.quantile_us(0.5)),
        latency(io.quantile_us(0.99)),
    );
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A quantile as the bound of its bucket: "<=64us", "<=2ms".
fn latency(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000 => format!("<={us}us"),
        Some(us) if us < 1_000_000 => format!("<={}ms", us.div_ceil(1000)),
        Some(us) => format!("<={}s", us.div_ceil(1_000_000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PathSample;
    use twinpath_core::stats::{EventCount, IoStats, Op, PathSnapshot};

    #[test]
    fn rows_for_the_disk_and_each_path() {
        let s = IoStats::default();
        s.begin().end(Op::Write, 3 << 20, true);
        let t = table(&[DiskSample {
            disk: "vm1".into(),
            io: s.snapshot(),
            rejected: 0,
            paths: vec![PathSample {
                path: "network".into(),
                stats: PathSnapshot {
                    events: vec![EventCount {
                        name: "fallbacks".into(),
                        help: String::new(),
                        count: 7,
                    }],
                    ..Default::default()
                },
            }],
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].starts_with("vm1") && lines[1].contains("3.0 MiB"),
            "{t}"
        );
        assert!(
            lines[1].contains("<=16us") || lines[1].contains("us"),
            "{t}"
        );
        assert!(
            lines[2].contains("network") && lines[2].ends_with("fallbacks=7"),
            "{t}"
        );
        assert!(lines[1].ends_with(" -"), "{t}");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(latency(Some(2048)), "<=3ms");
    }
}
