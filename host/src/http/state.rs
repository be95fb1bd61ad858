//! The state every connection and handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::room::Rooms;

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// What every session shares: its limits (from `config`), the rooms, the parked
    /// sessions.
    pub(crate) session_context: Arc<crate::session::Context>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rooms: Arc<Rooms>,
    /// One permit per open WebSocket session (`--max-connections`).
    pub(crate) sessions: Arc<Semaphore>,
    /// The rooms' plugins' verdicts on upgrades and joins.
    pub(crate) gate: Arc<crate::room::Gate>,
    /// Session and room tasks; `run` waits for them on shutdown.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when shutdown begins: sessions send 1001, HTTP connections close.
    pub(crate) shutdown: CancellationToken,
    /// Set first on shutdown, so `/healthz` turns 503 before sessions are closed.
    pub(crate) draining: AtomicBool,
    pub(crate) next_member: AtomicU64,
    /// Set when `--tls-cert`/`--tls-key` are: every connection starts with a TLS
    /// handshake, under the same watchdog as the HTTP request.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Signed-in dashboard browsers.
    pub(crate) dashboard: super::dashboard::Sessions,
}
