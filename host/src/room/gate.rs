//! Who may be in a room: the room's plugin decides, through its `handshake` hook, for
//! an upgrade to `/ws/{room}` and for a join in room-protocol mode alike. A room whose
//! plugin exists but never loaded is closed to both (fail closed).

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

    /// Ask the room's plugin, if it has one, whether `request` may enter
    /// `request.room`. Runs on a blocking thread: the call may take up to the plugin's
    /// deadline. `Ok` carries the subprotocol the plugin chose.
    pub async fn decide(&self, request: HandshakeRequest) -> Result<Option<String>, Rejection> {
        match self.plugin_for(&request.room)? {
            Some(plugin) => self.ask(plugin, request).await,
            None => Ok(None),
        }
    }

    /// Ask `room`'s plugin whether the connection that made `upgrade` may join it (in
    /// room-protocol mode): the plugin sees the upgrade request with the joined room's
    /// path and name. The request is copied only when there is a plugin to see it.
    pub async fn decide_join(&self, upgrade: &HandshakeRequest, room: &str) -> Result<(), Rejection> {
        let Some(plugin) = self.plugin_for(room)? else { return Ok(()) };
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
    async fn ask(&self, plugin: Arc<Plugin>, request: HandshakeRequest) -> Result<Option<String>, Rejection> {
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
            Ok(Ok(HandshakeDecision::Accept { protocol })) => {
                calls.ok();
                Ok(protocol)
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

/// How many plugin handshake calls may run at once: twice the cores, at least 4.
fn handshake_concurrency() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2).max(4)
}
