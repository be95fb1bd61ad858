//! `GET /ws/{room}` and `GET /ws`: the upgrade. Validation (RFC 6455, origin, limits),
//! the room's plugin's decision ([`crate::room::Gate`]), the 101, and the session task
//! that takes the socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

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

/// What the upgrade needs of a request, whether hyper parsed it or the server's own
/// head reader did (plain TCP, see [`crate::server::head`]).
pub(crate) struct UpgradeHead<'a> {
    pub(crate) method: &'a Method,
    pub(crate) version: Version,
    pub(crate) path: &'a str,
    pub(crate) query: &'a str,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) remote: SocketAddr,
}

/// An accepted upgrade: what the 101 says, and the session that starts once the
/// connection is handed over.
pub(crate) struct Upgrade {
    accept: String,
    protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` answer (permessage-deflate), if agreed.
    extensions: Option<String>,
    peer: Arc<Peer>,
    room: Option<String>,
    upgrade_request: Option<HandshakeRequest>,
    permit: tokio::sync::OwnedSemaphorePermit,
}

/// `GET /ws/{room}` through hyper: validate, reserve a session slot, answer 101 and
/// hand the socket to a session task once hyper lets go of it.
pub(crate) async fn upgrade(State(shared): State<Arc<Shared>>, mut req: Request) -> Response {
    let Some(info) = req.extensions().get::<ConnInfo>().cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let head = UpgradeHead {
        method: req.method(),
        version: req.version(),
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers: req.headers(),
        remote: info.remote,
    };
    let decided = match check(&shared, &head) {
        Ok((valid, permit)) => decide(&shared, &head, valid, permit).await,
        Err(rejection) => {
            if rejection.status != StatusCode::NOT_FOUND {
                shared.metrics.rejected(rejection.reason);
            }
            return rejection.into_response();
        }
    };
    let upgrade = match decided {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            shared.metrics.rejected(rejection.reason);
            return rejection.into_response();
        }
    };
    let response = upgrade.response();
    let on_upgrade = hyper::upgrade::on(&mut req);
    upgrade.start(&shared, async move {
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
    });
    response
}

/// The protocol checks (RFC 6455, origin), then the server's: not draining, and a
/// session slot free. Nothing is recorded: the caller counts a rejection.
pub(crate) fn check(
    shared: &Shared,
    head: &UpgradeHead<'_>,
) -> Result<(handshake::Valid, tokio::sync::OwnedSemaphorePermit), Rejection> {
    let valid = handshake::validate(
        head.method,
        head.version,
        head.path,
        head.headers,
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

/// After [`check`]: the room's plugin decides (its `handshake` hook, when it has one),
/// and the subprotocol, identity and compression are settled.
pub(crate) async fn decide(
    shared: &Shared,
    head: &UpgradeHead<'_>,
    valid: handshake::Valid,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Upgrade, Rejection> {
    // Room-protocol mode: the host speaks the subprotocol, and the upgrade request is
    // kept to ask each later room's plugin about a join.
    let rooms_mode = valid.protocols.iter().any(|p| p == protocol::SUBPROTOCOL);
    let request = || handshake_request(head, &valid);
    let upgrade_request = rooms_mode.then(request);
    let decided = match &valid.room {
        Some(room) => shared.gate.decide(room, request).await,
        None => Ok(Default::default()),
    };
    let (protocol, identity) = match decided {
        Ok(accepted) if rooms_mode => (Some(protocol::SUBPROTOCOL.to_owned()), accepted.identity),
        Ok(accepted) => (accepted.protocol, accepted.identity),
        Err(rejection) => return Err(rejection),
    };
    let deflate = if shared.rooms.negotiates_compression(valid.room.as_deref()) {
        let offers = head.headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS);
        deflate::negotiate(offers.iter().filter_map(|value| value.to_str().ok()))
    } else {
        None
    };
    let id = shared.next_member.fetch_add(1, Relaxed);
    let peer = Arc::new(Peer::new(
        id,
        shared.config.max_queue_bytes as usize,
        head.query.to_owned(),
        head.remote.to_string(),
        protocol.clone(),
        identity,
        deflate.as_ref().map(|(agreement, _)| *agreement),
    ));
    Ok(Upgrade {
        accept: valid.accept,
        protocol,
        extensions: deflate.map(|(_, answer)| answer),
        peer,
        room: valid.room,
        upgrade_request,
        permit,
    })
}

impl Upgrade {
    /// Spawn the session; it waits for `connection` (the socket after the 101, and the
    /// bytes read past the request) before it joins anything.
    pub(crate) fn start<C>(self, shared: &Shared, connection: C)
    where
        C: Future<Output = Option<(Transport, Bytes)>> + Send + 'static,
    {
        let session = Session {
            connection,
            peer: self.peer,
            room: self.room,
            rooms_mode: self.upgrade_request.map(|upgrade| {
                Box::new(session::RoomProtocol {
                    upgrade,
                    gate: shared.gate.clone(),
                    max_rooms: shared.config.max_rooms_per_connection,
                })
            }),
            context: shared.session_context.clone(),
            permit: self.permit,
        };
        // The session's own future, not one around it: see `Session::connection`.
        shared.tracker.spawn(session.run());
    }

    /// The 101 for hyper to send.
    fn response(&self) -> Response {
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_ACCEPT, &self.accept);
        if let Some(protocol) = &self.protocol {
            response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        if let Some(answer) = &self.extensions {
            response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, answer);
        }
        response.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }

    /// The 101 as bytes on the wire, the same headers as [`Upgrade::response`]'s.
    pub(crate) fn response_head(&self) -> Vec<u8> {
        let mut head = Vec::with_capacity(160);
        head.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n",
        );
        let mut line = |name: &str, value: &str| {
            for part in [name, ": ", value, "\r\n"] {
                head.extend_from_slice(part.as_bytes());
            }
        };
        line("sec-websocket-accept", &self.accept);
        if let Some(protocol) = &self.protocol {
            line("sec-websocket-protocol", protocol);
        }
        if let Some(answer) = &self.extensions {
            line("sec-websocket-extensions", answer);
        }
        head.extend_from_slice(b"\r\n");
        head
    }
}

/// What a plugin's handshake hook sees of an upgrade request.
fn handshake_request(head: &UpgradeHead<'_>, valid: &handshake::Valid) -> HandshakeRequest {
    HandshakeRequest {
        room: valid.room.clone().unwrap_or_default(),
        path: head.path.to_owned(),
        query: head.query.to_owned(),
        headers: head
            .headers
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect(),
        remote_addr: head.remote.to_string(),
        protocols: valid.protocols.clone(),
    }
}
