//! `GET /ws/{room}`: the upgrade. Validation (RFC 6455, origin, limits), the room's
//! plugin's handshake decision, the 101, and the session task that takes the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::metrics::RejectReason;
use crate::plugin::{HandshakeDecision, HandshakeRequest};
use crate::room::Peer;
use crate::session::{self, Session};
use crate::ws::handshake::{self, Rejection};
use crate::ws::transport::Transport;

/// Per-connection facts the handshake handler needs.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
}

/// `GET /ws/{room}`: validate, reserve a session slot, answer 101 and hand the socket to
/// a session task.
pub(crate) async fn upgrade(State(shared): State<Arc<Shared>>, mut req: Request) -> Response {
    let result = validate(&shared, &req);
    let (valid, permit) = match result {
        Ok(ok) => ok,
        Err(rejection) => {
            if rejection.status != StatusCode::NOT_FOUND {
                shared.metrics.rejected(rejection.reason);
            }
            return rejection.into_response();
        }
    };
    let Some(info) = req.extensions().get::<ConnInfo>().cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let request = handshake_request(&req, &valid, &query, info.remote);
    let protocol = match plugin_decision(&shared, request).await {
        Ok(protocol) => protocol,
        Err(rejection) => {
            shared.metrics.rejected(rejection.reason);
            return rejection.into_response();
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);

    let id = shared.next_member.fetch_add(1, Relaxed);
    let peer = Arc::new(Peer::new(
        id,
        shared.config.max_queue_bytes as usize,
        query,
        info.remote.to_string(),
        protocol.clone(),
    ));
    let task_shared = shared.clone();
    shared.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        let Ok((transport, read_ahead)) = Transport::from_upgraded(upgraded) else {
            tracing::error!("upgraded connection is neither TCP nor TLS over TCP");
            return;
        };
        let config = &task_shared.config;
        Session {
            transport,
            read_ahead,
            peer,
            room: valid.room,
            rooms: task_shared.rooms.clone(),
            metrics: task_shared.metrics.clone(),
            limits: session::Limits {
                heartbeat_interval: config.heartbeat_interval,
                pong_timeout: config.pong_timeout,
                max_message_bytes: config.max_message_bytes as usize,
            },
            shutdown: task_shared.shutdown.clone(),
            permit,
        }
        .run()
        .await;
    });

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, valid.accept);
    if let Some(protocol) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Ask the room's plugin, if it has one, whether to accept the upgrade. Runs on a
/// blocking thread: the call may take up to the plugin's deadline. `Ok` carries the
/// subprotocol the plugin chose.
async fn plugin_decision(shared: &Shared, request: HandshakeRequest) -> Result<Option<String>, Rejection> {
    let Some(plugin) = shared.rooms.plugins().for_room(&request.room) else {
        if let Some(failed) = shared.rooms.plugins().failed_for(&request.room) {
            // Fail closed: the room's plugin exists but could not be loaded.
            return Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                RejectReason::Plugin,
                format!("the room's plugin `{failed}` failed to load"),
            ));
        }
        return Ok(None);
    };
    let room = request.room.clone();
    let calls = shared.metrics.plugin_calls(plugin.name());
    let Ok(_turn) = shared.handshake_calls.acquire().await else {
        return Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, RejectReason::Capacity, "shutting down"));
    };
    let decided = tokio::task::spawn_blocking(move || plugin.handshake(&request)).await;
    let failed = |detail: String| {
        tracing::warn!(%room, %detail, "handshake refused: plugin failed");
        Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, RejectReason::Plugin, "the room's plugin failed")
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

/// How many plugin handshake calls may run at once: twice the cores, at least 4.
pub(crate) fn handshake_concurrency() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2).max(4)
}

/// What a plugin's handshake hook sees of an upgrade request.
fn handshake_request(
    req: &Request,
    valid: &handshake::Valid,
    query: &str,
    remote: SocketAddr,
) -> HandshakeRequest {
    HandshakeRequest {
        room: valid.room.clone(),
        path: req.uri().path().to_owned(),
        query: query.to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect(),
        remote_addr: remote.to_string(),
        protocols: valid.protocols.clone(),
    }
}

fn validate(
    shared: &Shared,
    req: &Request,
) -> Result<(handshake::Valid, tokio::sync::OwnedSemaphorePermit), Rejection> {
    let valid = handshake::validate(
        req.method(),
        req.version(),
        req.uri().path(),
        req.headers(),
        &shared.config.allowed_origins,
    )?;
    if shared.draining.load(Relaxed) {
        return Err(Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            RejectReason::Capacity,
            "server is shutting down",
        ));
    }
    let permit = shared.sessions.clone().try_acquire_owned().map_err(|_| {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            RejectReason::Capacity,
            "server is at its connection limit",
        )
    })?;
    Ok((valid, permit))
}
