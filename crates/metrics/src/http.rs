//! The metrics endpoint: `/metrics` for Prometheus, `/stats` (JSON) for `twinpath stats`.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::Source;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers scrapes on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, source: Source) {
    let metrics = {
        let source = source.clone();
        move || async move { ([(CONTENT_TYPE, OPENMETRICS)], crate::render(&source)) }
    };
    let stats = move || async move { axum::Json(source()).into_response() };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/stats", get(stats));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
