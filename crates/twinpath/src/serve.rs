//! `twinpath serve`: open every disk, serve each on its socket, reload the config on SIGHUP,
//! drain and stop on SIGINT or SIGTERM.
//!
//! A disk whose backend cannot be opened is reported and left out; the other disks are served.
//! If no disk can be opened at start the daemon exits with status 1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use twinpath_core::{lock, Config, DiskConfig, OpenContext, Registry};
use twinpath_metrics::{DiskSample, PathSample};
use twinpath_vhost_blk::{Disk, DiskServer, DiskSettings};

/// How long stopping a disk waits for accepted requests before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(path: PathBuf, config: Config, registry: Registry) -> ExitCode {
    let runtime = match crate::runtime("twinpath-io") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(serve(path, config, registry))
}

/// A disk being served, with the config entry it was started from.
struct Running {
    server: DiskServer,
    /// What it was started from: a reload compares entries, and restarts a changed disk
    /// from this when its new entry cannot be opened after the disk stopped.
    config: Arc<DiskConfig>,
}

/// An opened backend, not yet on its socket.
struct Opened {
    disk: Arc<Disk>,
    config: Arc<DiskConfig>,
}

/// The image `cfg` locks, if it locks one.
fn locked_image(cfg: &DiskConfig) -> Option<String> {
    cfg.backend.image().filter(|_| cfg.lock)
}

/// Why a disk could not be opened: its name, the message, and whether its image is in use
/// (image locks).
type OpenError = (String, String, bool);

/// Opens a disk's backend; an error comes with the disk's name.
async fn open_disk(ctx: &OpenContext, cfg: &Arc<DiskConfig>) -> Result<Opened, OpenError> {
    let backend = cfg.backend.open(ctx).await.map_err(|e| {
        let in_use = e.kind() == twinpath_core::ErrorKind::InUse;
        let message = e.within(format!("disk `{}`", cfg.name)).to_string();
        (cfg.name.clone(), message, in_use)
    })?;
    let settings = DiskSettings {
        name: cfg.name.clone(),
        num_queues: cfg.num_queues,
        read_only: cfg.read_only,
        serial: cfg.serial.clone(),
        cache: cfg.cache,
        poll_us: cfg.poll_us,
        // Validated to at most 1 GiB.
        max_inflight_bytes: cfg.max_inflight_bytes as u32,
    };
    Ok(Opened {
        disk: Arc::new(Disk::new(settings, backend)),
        config: cfg.clone(),
    })
}

/// Puts an opened disk on its socket; logs either way.
fn start_disk(opened: Opened) -> Option<Running> {
    let name = opened.disk.name().to_owned();
    let socket = &opened.config.socket;
    match DiskServer::start(opened.disk, socket, opened.config.socket_access) {
        Ok(server) => {
            tracing::info!(
                disk = %name,
                socket = %server.socket().display(),
                capacity = server.disk().backend().info().capacity,
                "serving"
            );
            Some(Running {
                server,
                config: opened.config,
            })
        }
        Err(e) => {
            tracing::error!(
                "not serving: disk `{name}`: socket {}: {e}",
                socket.display()
            );
            None
        }
    }
}

/// Opens the disks concurrently and starts the ones that opened.
async fn start_all(
    ctx: &OpenContext,
    disks: Vec<DiskConfig>,
    running: &mut BTreeMap<String, Running>,
) {
    let disks: Vec<Arc<DiskConfig>> = disks.into_iter().map(Arc::new).collect();
    for result in futures::future::join_all(disks.iter().map(|d| open_disk(ctx, d))).await {
        match result {
            Ok(opened) => {
                let name = opened.disk.name().to_owned();
                if let Some(r) = start_disk(opened) {
                    running.insert(name, r);
                }
            }
            Err((_, e, _)) => tracing::error!("not serving: {e}"),
        }
    }
}

/// The disks being served, as the metrics endpoint sees them.
type Served = Arc<Mutex<Vec<Arc<Disk>>>>;

fn publish(running: &BTreeMap<String, Running>, served: &Served) {
    *lock(served) = running.values().map(|r| r.server.disk().clone()).collect();
}

fn sample(disk: &Disk) -> DiskSample {
    DiskSample {
        disk: disk.name().to_owned(),
        io: disk.io_stats(),
        rejected: disk.rejected_count(),
        paths: disk
            .backend()
            .paths()
            .into_iter()
            .map(|(path, stats)| PathSample {
                path: path.to_owned(),
                stats: stats.snapshot(),
            })
            .collect(),
    }
}

/// Starts the metrics endpoint; a failure is logged and the disks are served without it.
async fn start_metrics(listen: SocketAddr, served: Served) {
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            tracing::info!("metrics on http://{listen}/metrics (JSON: /stats)");
            let source: twinpath_metrics::Source =
                Arc::new(move || lock(&served).iter().map(|d| sample(d)).collect());
            tokio::spawn(twinpath_metrics::serve(listener, source));
        }
        Err(e) => tracing::error!("metrics.listen {listen}: {e}; serving without metrics"),
    }
}

async fn serve(path: PathBuf, config: Config, registry: Registry) -> ExitCode {
    // Before anything starts: SIGHUP's default action would end the daemon.
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let total = config.disks.len();
    let metrics = config.metrics;
    let mut running = BTreeMap::new();
    // What the disks share (SMB sessions, map connections, throttles), for as long as the
    // daemon runs: reloads open their disks with it too.
    let ctx = OpenContext::new(tokio::runtime::Handle::current());
    start_all(&ctx, config.disks, &mut running).await;
    if running.is_empty() {
        tracing::error!("no disk could be opened; exiting");
        return ExitCode::FAILURE;
    }
    let served = Served::default();
    publish(&running, &served);
    if let Some(m) = &metrics {
        start_metrics(m.listen, served.clone()).await;
    }
    tracing::info!("ready: {} of {total} disks served", running.len());

    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: draining");
                break;
            }
            _ = hup.recv() => {
                if let Some(new) = reload(&ctx, &path, &registry, &mut running).await {
                    if new.metrics != metrics {
                        tracing::warn!("SIGHUP: a change of `metrics` takes effect on restart");
                    }
                }
                publish(&running, &served);
            }
        }
    }
    lock(&served).clear();

    if stop_all(running.into_values().map(|r| r.server).collect()).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Brings the served disks in line with the config file: disks whose entry is unchanged are
/// not touched; removed disks drain and stop; added disks start; a changed disk is opened
/// anew first and replaces the running one only if that worked. A config that does not parse
/// changes nothing. Returns the rest of the new config.
async fn reload(
    ctx: &OpenContext,
    path: &Path,
    registry: &Registry,
    running: &mut BTreeMap<String, Running>,
) -> Option<Config> {
    let mut config = match Config::from_file(path, registry) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "SIGHUP: {}: {e}; keeping the {} running disks as they are",
                path.display(),
                running.len()
            );
            return None;
        }
    };
    let mut wanted: BTreeMap<String, Arc<DiskConfig>> = std::mem::take(&mut config.disks)
        .into_iter()
        .map(|d| (d.name.clone(), Arc::new(d)))
        .collect();

    let mut unchanged = 0;
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (name, r) in running.iter() {
        match wanted.get(name) {
            Some(d) if d.entry == r.config.entry => {
                wanted.remove(name);
                unchanged += 1;
            }
            Some(_) => changed.push(name.clone()),
            None => removed.push(name.clone()),
        }
    }
    // Disks whose image a disk that is about to stop still locks (its old self, or a
    // removed disk renamed): opened once the stopping ones have stopped. Known ones are not
    // even tried before (an SMB server refuses them only after a while); others show up as
    // refused opens.
    let held: std::collections::BTreeSet<String> = changed
        .iter()
        .chain(&removed)
        .filter_map(|n| locked_image(&running[n].config))
        .collect();
    let (later, open_now): (Vec<&Arc<DiskConfig>>, Vec<&Arc<DiskConfig>>) = wanted
        .values()
        .partition(|d| locked_image(d).is_some_and(|i| held.contains(&i)));
    let mut after_stop: Vec<String> = later.iter().map(|d| d.name.clone()).collect();
    // Open the new and changed disks before anything stops, so a changed disk whose new
    // backend cannot be opened keeps running on its old one.
    let opened = futures::future::join_all(open_now.into_iter().map(|d| open_disk(ctx, d))).await;
    let mut to_start = Vec::new();
    let stopping = !changed.is_empty() || !removed.is_empty();
    for result in opened {
        match result {
            Ok(o) => to_start.push(o),
            Err((name, _, true)) if stopping => after_stop.push(name),
            Err((name, e, _)) => {
                tracing::error!("SIGHUP: not serving: {e}");
                changed.retain(|n| *n != name);
            }
        }
    }
    let mut stopped = BTreeMap::new();
    let mut servers = Vec::new();
    for (name, r) in removed
        .iter()
        .chain(&changed)
        .filter_map(|n| Some((n, running.remove(n)?)))
    {
        servers.push(r.server);
        stopped.insert(name.clone(), r.config);
    }
    stop_all(servers).await;
    // A stopped disk has released its image locks (`BlockBackend::release`).
    for name in after_stop {
        match open_disk(ctx, &wanted[&name]).await {
            Ok(o) => to_start.push(o),
            Err((_, e, _)) => {
                tracing::error!("SIGHUP: not serving: {e}");
                // A changed disk whose new entry cannot be opened comes back as it was.
                let Some(old) = stopped.get(&name).filter(|_| changed.contains(&name)) else {
                    continue;
                };
                match open_disk(ctx, old).await {
                    Ok(o) => {
                        tracing::warn!(disk = %name, "SIGHUP: serving the disk as it was");
                        to_start.push(o);
                    }
                    Err((_, e, _)) => tracing::error!("SIGHUP: not serving: {e}"),
                }
            }
        }
    }
    let (mut added, mut replaced) = (0, 0);
    for o in to_start {
        let name = o.disk.name().to_owned();
        // Binding replaces a socket file, so never bind over one a kept disk still serves.
        if let Some(owner) = running
            .values()
            .find(|r| r.server.socket() == o.config.socket)
        {
            tracing::error!(
                "SIGHUP: not serving: disk `{name}`: socket {} belongs to disk `{}`",
                o.config.socket.display(),
                owner.server.disk().name()
            );
            continue;
        }
        let restored = stopped
            .get(&name)
            .is_some_and(|old| Arc::ptr_eq(old, &o.config));
        if let Some(r) = start_disk(o) {
            if restored {
                unchanged += 1;
            } else if changed.contains(&name) {
                replaced += 1;
            } else {
                added += 1;
            }
            running.insert(name, r);
        }
    }
    tracing::info!(
        "reloaded {}: {unchanged} unchanged, {} removed, {replaced} replaced, {added} added; {} disks served",
        path.display(),
        removed.len(),
        running.len()
    );
    Some(config)
}

/// Stops the disks concurrently; true when none of them lost anything.
async fn stop_all(servers: Vec<DiskServer>) -> bool {
    let rt = tokio::runtime::Handle::current();
    let stops = servers.into_iter().map(|server| {
        let rt = rt.clone();
        tokio::task::spawn_blocking(move || shutdown_disk(server, &rt))
    });
    futures::future::join_all(stops)
        .await
        .into_iter()
        .all(|r| r.unwrap_or(false))
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
    let backend = server.disk().backend().clone();
    let working = server.disk().working();
    server.stop();
    // Work still running may write the image: its locks stay until the backend is gone.
    if working == 0 {
        rt.block_on(backend.release());
    }
    tracing::info!(disk = %name, "stopped");
    clean
}
