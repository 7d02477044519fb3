//! What the map server has done and holds, for operators: OpenMetrics on `/metrics`, the
//! lease table as JSON on `/leases` (`twinpath leases` prints it).

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use twinpath_core::lock;

use crate::State;

type Labels = Vec<(&'static str, &'static str)>;

/// Counters, labelled by a fixed set of reasons (never by anything a peer sends).
#[derive(Default)]
pub struct Metrics {
    grants: Family<Labels, Counter>,
    recalls: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    auth_failures: Family<Labels, Counter>,
}

fn mode(write: bool) -> Labels {
    vec![("mode", if write { "write" } else { "read" })]
}

impl Metrics {
    pub fn granted(&self, write: bool) {
        self.grants.get_or_create(&mode(write)).inc();
    }

    pub fn recalled(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.recalls
                .get_or_create(&vec![("reason", reason)])
                .inc_by(n);
        }
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn render(state: &State) -> String {
    let m = &state.metrics;
    let mut registry = Registry::with_prefix("twinpath_map");
    // Both read off the lease table, which knows every authenticated connection's outbox.
    let (connected, (read, write)) = {
        let l = lock(&state.leases);
        (l.connected(), l.counts())
    };
    let hosts = Gauge::<i64>::default();
    hosts.set(connected as i64);
    registry.register("hosts_connected", "authenticated host connections", hosts);
    let leases = Family::<Labels, Gauge>::default();
    leases.get_or_create(&mode(false)).set(read as i64);
    leases.get_or_create(&mode(true)).set(write as i64);
    registry.register("leases", "leases held now, by mode", leases);
    registry.register("grants", "maps granted, by mode", m.grants.clone());
    registry.register("recalls", "leases recalled, by reason", m.recalls.clone());
    registry.register(
        "refusals",
        "requests refused, by reason",
        m.refusals.clone(),
    );
    registry.register(
        "auth_failures",
        "connections refused before or during authentication, by reason",
        m.auth_failures.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Answers on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let metrics = {
        let state = state.clone();
        move || async move { ([(CONTENT_TYPE, OPENMETRICS)], render(&state)) }
    };
    let leases = move || async move { axum::Json(lock(&state.leases).list()) };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/leases", get(leases));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
