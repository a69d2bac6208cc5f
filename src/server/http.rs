//! The HTTP listener (axum): `GET /metrics` (Prometheus text format),
//! `GET /healthz` (the process is up) and `GET /readyz` (it serves gRPC:
//! state restored and not shutting down), plus the web view and HTTP API
//! of [`super::web`]. `/metrics` requires its own bearer token when
//! `--metrics-token-file` is set (Prometheus' `authorization` setting).
//!
//! Owns routes and status codes only; what `/metrics` contains is
//! `export`'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use tokio::sync::watch;

use super::daemon::Daemon;
use crate::auth::RequireToken;

/// What the handlers read.
#[derive(Clone, Debug)]
pub(crate) struct HttpState {
    pub(crate) daemon: Arc<Daemon>,
    /// True while gRPC is served; false once shutdown began.
    pub(crate) ready: Arc<AtomicBool>,
    /// The token the web view and API require (the gRPC one).
    pub(crate) auth: RequireToken,
    /// The token `/metrics` requires (`--metrics-token-file`; none: open).
    pub(crate) metrics_auth: RequireToken,
    /// Becomes `true` when shutdown begins (ends the event streams).
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// The router of the probes, `/metrics` and the web view.
pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(super::web::router(&state))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    if let Err(err) = state.metrics_auth.check(presented) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{err} (--metrics-token-file)\n"),
        )
            .into_response();
    }
    match state.daemon.telemetry().render() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}
