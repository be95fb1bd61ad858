//! `GET /ws/{room}` and `GET /ws`: the upgrade. Validation (RFC 6455, origin, limits),
//! the room's plugin's decision ([`crate::room::Gate`]), the 101, and the session task
//! that takes the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::metrics::RejectReason;
use crate::plugin::HandshakeRequest;
use crate::protocol;
use crate::room::Peer;
use crate::session::{self, Session};
use crate::ws::deflate;
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
    // Room-protocol mode: the host speaks the subprotocol, and the upgrade request is
    // kept to ask each later room's plugin about a join.
    let rooms_mode = valid.protocols.iter().any(|p| p == protocol::SUBPROTOCOL);
    let upgrade_request = rooms_mode.then(|| request.clone());
    let decided = match valid.room {
        Some(_) => shared.gate.decide(request).await,
        None => Ok(Default::default()),
    };
    let (protocol, identity) = match decided {
        Ok(accepted) if rooms_mode => (Some(protocol::SUBPROTOCOL.to_owned()), accepted.identity),
        Ok(accepted) => (accepted.protocol, accepted.identity),
        Err(rejection) => {
            shared.metrics.rejected(rejection.reason);
            return rejection.into_response();
        }
    };
    let deflate = if shared.rooms.negotiates_compression(valid.room.as_deref()) {
        let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS);
        deflate::negotiate(offers.iter().filter_map(|value| value.to_str().ok()))
    } else {
        None
    };
    let on_upgrade = hyper::upgrade::on(&mut req);

    let id = shared.next_member.fetch_add(1, Relaxed);
    let peer = Arc::new(Peer::new(
        id,
        shared.config.max_queue_bytes as usize,
        query,
        info.remote.to_string(),
        protocol.clone(),
        identity,
        deflate.as_ref().map(|(agreement, _)| *agreement),
    ));
    let connection = async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return None;
            }
        };
        let Ok(connection) = Transport::from_upgraded(upgraded) else {
            tracing::error!("upgraded connection is neither TCP nor TLS over TCP");
            return None;
        };
        Some(connection)
    };
    let session = Session {
        connection,
        peer,
        room: valid.room,
        rooms_mode: upgrade_request.map(|upgrade| {
            Box::new(session::RoomProtocol {
                upgrade,
                gate: shared.gate.clone(),
                max_rooms: shared.config.max_rooms_per_connection,
            })
        }),
        context: shared.session_context.clone(),
        permit,
    };
    // The session's own future, not one around it: see `Session::connection`.
    shared.tracker.spawn(session.run());

    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, valid.accept);
    if let Some(protocol) = protocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    if let Some((_, answer)) = deflate {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    response.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// What a plugin's handshake hook sees of an upgrade request.
fn handshake_request(
    req: &Request,
    valid: &handshake::Valid,
    query: &str,
    remote: SocketAddr,
) -> HandshakeRequest {
    HandshakeRequest {
        room: valid.room.clone().unwrap_or_default(),
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
