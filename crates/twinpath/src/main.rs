//! `twinpath`: serve virtual disks to VM guests over vhost-user-blk.

mod bench;
mod leases;
mod map_server;
mod serve;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twinpath_core::{Config, Registry};

#[derive(Parser)]
#[command(
    name = "twinpath",
    version,
    about = "Serve virtual disks to QEMU and cloud-hypervisor guests over vhost-user-blk",
    long_about = "Serve virtual disks to QEMU and cloud-hypervisor guests over vhost-user-blk.\n\n\
        Each disk in the YAML config gets its own unix socket; attach a guest with\n\
        `-chardev socket,id=c0,path=SOCKET -device vhost-user-blk-pci,chardev=c0` (QEMU) or\n\
        `--disk vhost_user=true,socket=SOCKET` (cloud-hypervisor). See README.md."
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive). RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every disk of the config until SIGINT or SIGTERM; SIGHUP reloads it.
    ///
    /// SIGHUP re-reads the config: added disks start, removed disks drain and stop, a disk
    /// whose entry changed is replaced, and disks whose entry is unchanged are not touched
    /// (a changed password file alone does not count: edit the entry or restart). A config
    /// that no longer parses is reported and changes nothing.
    Serve {
        /// YAML config listing the disks.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and print its disks, without opening anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Measure a vhost-user-blk socket (twinpath's or any other) like a guest would.
    ///
    /// Write tests overwrite the disk's data: point it at scratch disks only.
    Bench(bench::BenchArgs),
    /// Run the map service on a file server: hand VM hosts the extent maps of the images
    /// under an exported directory that lives on a shared LUN (the direct path).
    ///
    /// Each VM host listed under `hosts:` authenticates with its own key and may map only
    /// files under its `paths`. See docs/san.md.
    MapServer {
        /// YAML config: listen, export, hosts (name, key_file, paths), allocation_chunk,
        /// metrics.listen.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the counters of a running `twinpath serve` as a table.
    ///
    /// Per disk (what its guests asked) and per backend path (network, direct): requests,
    /// bytes, errors, in flight, latency quantiles, and the events a path counts (the direct
    /// path's fallbacks, recalls, throttled, expired). Needs
    /// `metrics.listen` in the config; Prometheus scrapes the same counters from
    /// http://LISTEN/metrics.
    Stats(stats::StatsArgs),
    /// Print the leases a running `twinpath map-server` holds, as a table.
    ///
    /// One line per lease: the path the host asked for, the host, read or write, the file's
    /// device and inode, and how long it has been held. Needs `metrics.listen` in
    /// map-server.yaml; Prometheus scrapes the server's counters from http://LISTEN/metrics.
    Leases(leases::LeasesArgs),
    /// List the backend plugins this binary was built with.
    Plugins,
}

fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut registry = Registry::new();
    #[cfg(feature = "file")]
    registry.register(twinpath_plugin_file::plugin());
    #[cfg(feature = "smb")]
    registry.register(twinpath_plugin_smb::plugin());
    #[cfg(feature = "san")]
    registry.register(twinpath_plugin_san::plugin());
    registry
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Network backends allocate a buffer per section (up to 8 MiB). Above glibc's mmap threshold
/// each one would be a fresh mmap, page-faulted in and unmapped again: a third of the CPU at
/// 1 MiB reads. Keep such buffers in the heap so freed ones are reused.
fn keep_large_buffers_in_heap() {
    const LIMIT: libc::c_int = 64 << 20;
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * LIMIT);
    }
}

/// The multi-threaded runtime a command runs on; its threads are named `name`.
fn runtime(name: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| {
            tracing::error!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn main() -> ExitCode {
    keep_large_buffers_in_heap();
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let registry = registry();
    match cli.command {
        Command::Serve { config } => match Config::from_file(&config, &registry) {
            Ok(cfg) => serve::run(config, cfg, registry),
            Err(e) => {
                eprintln!("twinpath: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Check { config } => match Config::from_file(&config, &registry) {
            Ok(cfg) => {
                print_disks(&cfg);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("twinpath: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Bench(args) => bench::run(args),
        Command::MapServer { config } => map_server::run(&config),
        Command::Stats(args) => stats::run(args, &registry),
        Command::Leases(args) => leases::run(args),
        Command::Plugins => {
            for name in registry.names() {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn print_disks(cfg: &Config) {
    println!(
        "{:<16} {:<40} {:>6} {:<4} BACKEND",
        "DISK", "SOCKET", "QUEUES", "MODE"
    );
    for d in &cfg.disks {
        println!(
            "{:<16} {:<40} {:>6} {:<4} {}",
            d.name,
            d.socket.display(),
            d.num_queues,
            if d.read_only { "ro" } else { "rw" },
            d.backend.describe()
        );
    }
}
