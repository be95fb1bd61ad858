//! The HTTP surface: the shared state, the router, the admin API and its auth, the
//! dashboard, the static pages, and the WebSocket upgrade. [`crate::server`] accepts
//! connections and serves this router on them.

mod admin;
mod assets;
mod auth;
mod dashboard;
mod state;
pub(crate) mod upgrade;
mod views;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub(crate) use state::Shared;

/// Marks a response whose body may stream for as long as its sign-in session lasts
/// (the dashboard's event stream): the server's watchdog takes it off the clock.
#[derive(Debug, Clone, Copy)]
pub struct LongLived;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(admin::routes())
        .merge(assets::routes())
        .merge(dashboard::routes())
        .fallback(upgrade::upgrade)
        .with_state(shared)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.draining.load(Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], shared.metrics.render()).into_response()
}
