//! `twinpath serve`: open every disk, serve each on its socket, drain and stop on a signal.
//!
//! A disk whose backend cannot be opened is reported and left out; the other disks are served.
//! If no disk can be opened the daemon exits with status 1.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use twinpath_core::{Config, DiskConfig};
use twinpath_vhost_blk::{Disk, DiskServer, DiskSettings};

/// How long shutdown waits for accepted requests before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(config: Config) -> ExitCode {
    let runtime = match crate::runtime("twinpath-io") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(serve(config))
}

async fn open_disk(cfg: DiskConfig) -> Result<DiskServer, String> {
    let backend = cfg
        .backend
        .open()
        .await
        .map_err(|e| e.within(format!("disk `{}`", cfg.name)).to_string())?;
    let settings = DiskSettings {
        name: cfg.name.clone(),
        num_queues: cfg.num_queues,
        read_only: cfg.read_only,
        serial: cfg.serial.clone(),
        cache: cfg.cache,
        poll_us: cfg.poll_us,
    };
    let disk = Arc::new(Disk::new(settings, backend));
    DiskServer::start(disk, &cfg.socket)
        .map_err(|e| format!("disk `{}`: socket {}: {e}", cfg.name, cfg.socket.display()))
}

async fn serve(config: Config) -> ExitCode {
    let total = config.disks.len();
    let mut servers = Vec::new();
    let opened = futures::future::join_all(config.disks.into_iter().map(open_disk)).await;
    for result in opened {
        match result {
            Ok(server) => {
                tracing::info!(
                    disk = %server.disk().name(),
                    socket = %server.socket().display(),
                    capacity = server.disk().backend().info().capacity,
                    "serving"
                );
                servers.push(server);
            }
            Err(e) => tracing::error!("not serving: {e}"),
        }
    }
    if servers.is_empty() {
        tracing::error!("no disk could be opened; exiting");
        return ExitCode::FAILURE;
    }
    tracing::info!("ready: {} of {total} disks served", servers.len());

    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }

    let rt = tokio::runtime::Handle::current();
    let stops = servers.into_iter().map(|server| {
        let rt = rt.clone();
        tokio::task::spawn_blocking(move || shutdown_disk(server, &rt))
    });
    let clean = futures::future::join_all(stops)
        .await
        .into_iter()
        .all(|r| r.unwrap_or(false));
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Drain, flush, disconnect, remove the socket. Returns whether nothing was lost.
fn shutdown_disk(server: DiskServer, rt: &tokio::runtime::Handle) -> bool {
    let name = server.disk().name().to_owned();
    let mut clean = true;
    let left = server.drain(DRAIN_TIMEOUT);
    if left > 0 {
        tracing::error!(disk = %name, "{left} requests did not finish within {DRAIN_TIMEOUT:?}");
        clean = false;
    }
    if let Err(e) = rt.block_on(server.disk().backend().flush()) {
        tracing::error!(disk = %name, "final flush failed: {e}");
        clean = false;
    }
    server.stop();
    tracing::info!(disk = %name, "stopped");
    clean
}
