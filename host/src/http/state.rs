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
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rooms: Arc<Rooms>,
    /// One permit per open WebSocket session (`--max-connections`).
    pub(crate) sessions: Arc<Semaphore>,
    /// Plugin handshake calls running at once. Each holds an instance of up to its
    /// plugin's memory cap, and clients without a token can ask for them; more than the
    /// machine has cores only wait for a CPU, so the rest wait here, within their
    /// request's deadline.
    pub(crate) handshake_calls: Semaphore,
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
