//! `twinpath leases`: the lease table of a running `twinpath map-server`, read from its
//! metrics endpoint (`metrics.listen` in map-server.yaml).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use twinpath_mapserver::LeaseInfo;

#[derive(clap::Args)]
pub struct LeasesArgs {
    /// The map server's `metrics.listen` address (host:port).
    #[arg(long)]
    address: SocketAddr,
    /// Print the JSON the map server sent instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LeasesArgs) -> ExitCode {
    let url = format!("http://{}/leases", args.address);
    let leases: Vec<LeaseInfo> = match ureq::get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_json())
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "twinpath: {url}: {e} (is `twinpath map-server` running with metrics.listen?)"
            );
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&leases).expect("leases serialize")
        );
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", table(&leases, now));
    }
    ExitCode::SUCCESS
}

/// One line per lease; `now` (Unix seconds) turns `since` into an age.
fn table(leases: &[LeaseInfo], now: u64) -> String {
    let mut out = format!(
        "{:<40} {:<16} {:<5} {:>20} {:>8}\n",
        "PATH", "HOST", "MODE", "DEV:INO", "AGE"
    );
    for l in leases {
        out += &format!(
            "{:<40} {:<16} {:<5} {:>20} {:>7}s\n",
            l.path.escape_debug().to_string(),
            l.host,
            l.mode,
            format!("{}:{}", l.dev, l.ino),
            now.saturating_sub(l.since)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_lease_with_its_age_and_escaped_path() {
        let l = LeaseInfo {
            path: "images/vm1\n.raw".into(),
            dev: 2049,
            ino: 131,
            host: "vmhost-07".into(),
            mode: "write".into(),
            since: 1000,
        };
        let t = table(&[l], 1042);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[1].contains("images/vm1\\n.raw"), "{t}");
        assert!(
            lines[1].contains("vmhost-07") && lines[1].contains("2049:131"),
            "{t}"
        );
        assert!(lines[1].trim_end().ends_with("42s"), "{t}");
    }
}
