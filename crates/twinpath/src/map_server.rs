//! `twinpath map-server`: the map service, run on the file server over the tree it exports.

use std::path::Path;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use twinpath_mapserver::{MapServer, MapServerConfig};

pub fn run(config: &Path) -> ExitCode {
    let cfg = match MapServerConfig::from_file(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinpath: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match crate::runtime("twinpath-map") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let server = match MapServer::bind(&cfg).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("map server: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        tracing::info!("ready: map server on {}", server.local_addr);
        let stopper = server.stopper();
        tokio::select! {
            () = server.serve() => {}
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        stopper.stopped();
        ExitCode::SUCCESS
    })
}
