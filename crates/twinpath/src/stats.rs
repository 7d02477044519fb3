//! `twinpath stats`: the counters of a running `twinpath serve`, read from its metrics endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use twinpath_core::{Config, Registry};
use twinpath_metrics::DiskSample;

#[derive(clap::Args)]
pub struct StatsArgs {
    /// The daemon's config; its `metrics.listen` says where to ask.
    #[arg(long, short, required_unless_present = "address")]
    config: Option<PathBuf>,
    /// The metrics address to ask instead (host:port).
    #[arg(long, conflicts_with = "config")]
    address: Option<SocketAddr>,
    /// Print the JSON the daemon sent instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatsArgs, registry: &Registry) -> ExitCode {
    let address = match (args.address, &args.config) {
        (Some(a), _) => a,
        (None, Some(path)) => match Config::from_file(path, registry) {
            Ok(Config {
                metrics: Some(m), ..
            }) => reachable(m.listen),
            Ok(_) => {
                eprintln!(
                    "twinpath: {}: no `metrics.listen`; add e.g. `metrics: {{listen: 127.0.0.1:9810}}` and restart the daemon",
                    path.display()
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("twinpath: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => unreachable!("clap requires --config or --address"),
    };
    let url = format!("http://{address}/stats");
    let disks: Vec<DiskSample> = match ureq::get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_json())
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("twinpath: {url}: {e} (is `twinpath serve` running with metrics.listen?)");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&disks).expect("samples serialize")
        );
    } else {
        print!("{}", twinpath_metrics::table(&disks));
    }
    ExitCode::SUCCESS
}

/// A listen address as a client reaches it: the wildcard means this host.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}
