//! Who may be in a room: the room's plugin decides, through its `handshake` hook, for
//! an upgrade to `/ws/{room}` (and attaches the connection's identity), and through its
//! `join` hook for every join (see the room's actor). A plugin built for
//! `roomcast:plugin@0.1.0`, whose `join` cannot refuse, decides room-protocol joins
//! with its `handshake` hook instead. A room whose plugin exists but never loaded is
//! closed to upgrades and joins alike (fail closed).

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::Semaphore;

use crate::metrics::{Metrics, RejectReason};
use crate::plugin::reload::LivePlugins;
use crate::plugin::{HandshakeDecision, HandshakeRequest, Plugin};
use crate::ws::handshake::Rejection;

/// The plugins' verdicts on who may enter their rooms.
#[derive(Debug)]
pub struct Gate {
    plugins: Arc<LivePlugins>,
    metrics: Arc<Metrics>,
    /// Plugin handshake calls running at once. Each holds an instance of up to its
    /// plugin's memory cap, and clients without a token can ask for them; more than the
    /// machine has cores only wait for a CPU, so the rest wait here, within their
    /// request's deadline.
    calls: Semaphore,
}

impl Gate {
    pub fn new(plugins: Arc<LivePlugins>, metrics: Arc<Metrics>) -> Self {
        Self { plugins, metrics, calls: Semaphore::new(handshake_concurrency()) }
    }

    /// Ask `room`'s plugin, if it has one, whether the upgrade `request` builds may
    /// enter it (built only then: a room without a plugin copies no headers). Runs on a
    /// blocking thread: the call may take up to the plugin's deadline.
    pub async fn decide(
        &self,
        room: &str,
        request: impl FnOnce() -> HandshakeRequest,
    ) -> Result<Accepted, Rejection> {
        match self.plugin_for(room)? {
            Some(plugin) => self.ask(plugin, request()).await,
            None => Ok(Accepted::default()),
        }
    }

    /// Before a room-protocol join of `room`: refuse it when the room's plugin never
    /// loaded, and ask a `roomcast:plugin@0.1.0` plugin's `handshake` hook (with the
    /// upgrade request, its path and room changed to the joined room's). A plugin of
    /// today's contract decides in its `join` hook instead, so this calls nothing.
    pub async fn decide_join(&self, upgrade: &HandshakeRequest, room: &str) -> Result<(), Rejection> {
        let Some(plugin) = self.plugin_for(room)?.filter(|plugin| plugin.legacy()) else { return Ok(()) };
        let mut request = upgrade.clone();
        request.path = format!("/ws/{room}");
        room.clone_into(&mut request.room);
        self.ask(plugin, request).await.map(drop)
    }

    /// The plugin that decides for `room`; an error when its plugin exists but never
    /// loaded (fail closed).
    fn plugin_for(&self, room: &str) -> Result<Option<Arc<Plugin>>, Rejection> {
        if let Some(plugin) = self.plugins.for_room(room) {
            return Ok(Some(plugin));
        }
        match self.plugins.failed_for(room) {
            Some(failed) => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RejectReason::Plugin,
                format!("the room's plugin `{failed}` failed to load"),
            )),
            None => Ok(None),
        }
    }

    /// Call `plugin`'s `handshake` hook on a blocking thread, within the gate's
    /// concurrency.
    async fn ask(&self, plugin: Arc<Plugin>, request: HandshakeRequest) -> Result<Accepted, Rejection> {
        let room = request.room.clone();
        let calls = self.metrics.plugin_calls(plugin.name());
        let Ok(_turn) = self.calls.acquire().await else {
            return Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RejectReason::Capacity,
                "shutting down",
            ));
        };
        let decided = tokio::task::spawn_blocking(move || plugin.handshake(&request)).await;
        let failed = |detail: String| {
            tracing::warn!(%room, %detail, "handshake refused: plugin failed");
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                RejectReason::Plugin,
                "the room's plugin failed",
            )
        };
        match decided {
            Ok(Ok(HandshakeDecision::Accept { protocol, identity })) => {
                calls.ok();
                Ok(Accepted { protocol, identity: identity.map(Arc::from) })
            }
            Ok(Ok(HandshakeDecision::Reject { status, reason })) => {
                calls.ok();
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                Err(Rejection::new(status, RejectReason::Plugin, reason))
            }
            Ok(Err(error)) => {
                calls.count(error.kind.outcome());
                Err(failed(error.to_string()))
            }
            Err(join) => Err(failed(join.to_string())),
        }
    }
}

/// What an accepted handshake agreed on.
#[derive(Debug, Default)]
pub struct Accepted {
    /// The subprotocol the plugin chose.
    pub protocol: Option<String>,
    /// What the plugin attached to the connection (JSON text).
    pub identity: Option<Arc<str>>,
}

/// How many plugin handshake calls may run at once: twice the cores, at least 4.
fn handshake_concurrency() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2).max(4)
}
