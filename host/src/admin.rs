//! The admin API: plugins, rooms, and publishing to a room from a backend.
//!
//! Off unless an admin token is configured (every route then answers 404). Each
//! request must carry `Authorization: Bearer TOKEN`; a missing or wrong token gets 401
//! with `WWW-Authenticate: Bearer`. Tokens are compared in constant time and never
//! logged.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::handshake::valid_room_name;
use crate::plugin::Payload;
use crate::reload::rfc3339;
use crate::room::RoomEvent;
use crate::server::Shared;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/admin/plugins", get(plugins))
        .route("/admin/rooms", get(rooms))
        .route("/admin/rooms/{room}/publish", post(publish))
}

/// Whether `a == b`, taking time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Why an admin request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No admin token is configured: the admin API does not exist (404).
    Off,
    /// The request's bearer token is missing or wrong (401).
    Unauthorized,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Off => {
                (StatusCode::NOT_FOUND, "the admin API is off: set an admin token\n").into_response()
            }
            Denied::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"roomcast\"")],
                "a valid admin token is required\n",
            )
                .into_response(),
        }
    }
}

/// An authorised admin request. Extracting it checks the bearer token first, so a
/// refused request's body is never read.
#[derive(Debug)]
pub(crate) struct Admin;

impl FromRequestParts<Arc<Shared>> for Admin {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> Result<Self, Denied> {
        authorize(shared, &parts.headers).map(|()| Admin)
    }
}

/// Why a request body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyRefused {
    /// Larger than the route allows, by its `Content-Length` or as it arrived (413).
    TooLarge,
    /// The body broke off (400).
    Broken,
}

impl IntoResponse for BodyRefused {
    fn into_response(self) -> Response {
        match self {
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response(),
            Self::Broken => (StatusCode::BAD_REQUEST, "request body incomplete\n").into_response(),
        }
    }
}

/// Read a request body of at most `limit` bytes: a `Content-Length` over it is refused
/// before a byte is read, and a body without one is cut off when it passes it. The
/// connection's deadline (see [`crate::watchdog`]) bounds how long this can wait.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyRefused> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(BodyRefused::TooLarge);
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large { BodyRefused::TooLarge } else { BodyRefused::Broken }
    })
}

/// Whether the request carries the admin token.
pub(crate) fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), Denied> {
    let Some(token) = shared.config.admin_token.as_deref() else {
        return Err(Denied::Off);
    };
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(offered.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Denied::Unauthorized)
    }
}

/// The plugins, as `GET /admin/plugins` shows them.
pub(crate) fn plugins_json(shared: &Shared) -> Value {
    let live = shared.rooms.plugins();
    let rooms = shared.rooms.list_with_plugins();
    let list: Vec<Value> = live
        .records()
        .into_iter()
        .map(|(name, record)| {
            let current = record.current.as_ref().map(|(plugin, _)| plugin);
            json!({
                "name": name,
                "file": current.map(|p| p.file().display().to_string()),
                "sha256": current.map(|p| p.sha256()),
                "describe": current.map(|p| format!("{} {}", p.info().name, p.info().version)),
                "loaded_at": current.map(|p| rfc3339(p.loaded_at())),
                "version": record.current.as_ref().map(|(_, v)| v),
                "versions": record.versions,
                "rooms": rooms
                    .iter()
                    .filter(|r| r.plugin.as_ref().is_some_and(|(p, _)| *p == name))
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>(),
                "last_error": record.last_error.as_ref().map(|(_, e)| e),
                "last_error_at": record.last_error.as_ref().map(|(t, _)| rfc3339(*t)),
            })
        })
        .collect();
    Value::Array(list)
}

/// This node's rooms, one JSON object each.
fn local_rooms(shared: &Shared) -> Vec<Value> {
    shared
        .rooms
        .list_with_plugins()
        .into_iter()
        .map(|room| {
            json!({
                "name": room.name,
                "members": room.members,
                "plugin": room.plugin.as_ref().map(|(p, _)| p),
                "version": room.plugin.as_ref().map(|(_, v)| v),
            })
        })
        .collect()
}

async fn plugins(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(plugins_json(&shared)).into_response()
}

async fn rooms(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(rooms_listing(&shared).await).into_response()
}

/// The rooms as `GET /admin/rooms` and the dashboard show them: this node's, or in
/// cluster mode the whole cluster's.
pub(crate) async fn rooms_listing(shared: &Shared) -> Vec<Value> {
    let mut list = local_rooms(shared);
    if let Some(cluster) = shared.rooms.cluster() {
        cluster_rooms(cluster, &mut list).await;
    }
    list
}

/// Cluster mode: every room of the cluster with its cluster-wide members. Each entry
/// gains `owner` (node id), `local_members` (this node's count) and `nodes` (member ids
/// per node); `members` becomes the cluster-wide count. Without Redis the list stays
/// this node's, with `"cluster": "unreachable"` on each entry.
async fn cluster_rooms(cluster: &crate::cluster::Cluster, rooms: &mut Vec<Value>) {
    let Some(overview) = cluster.overview().await else {
        for room in rooms.iter_mut() {
            room["cluster"] = json!("unreachable");
        }
        return;
    };
    let mut index = std::collections::HashMap::with_capacity(rooms.len());
    for (i, room) in rooms.iter_mut().enumerate() {
        room["local_members"] = room["members"].clone();
        index.insert(room["name"].as_str().unwrap_or_default().to_owned(), i);
    }
    for entry in overview {
        let total: usize = entry.members.iter().map(|(_, ids)| ids.len()).sum();
        let nodes: serde_json::Map<String, Value> =
            entry.members.into_iter().map(|(node, ids)| (node, json!(ids))).collect();
        let i = *index.entry(entry.name.clone()).or_insert_with(|| {
            rooms.push(json!({
                "name": entry.name,
                // Its owner elsewhere runs the plugin.
                "plugin": Value::Null,
                "local_members": 0,
            }));
            rooms.len() - 1
        });
        let room = &mut rooms[i];
        room["members"] = json!(total);
        room["owner"] = json!(entry.owner);
        room["nodes"] = Value::Object(nodes);
    }
    rooms.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
}

/// `POST /admin/rooms/{room}/publish`: the body goes to every member of the room, as
/// text for a UTF-8 body sent with `Content-Type: text/*`, as binary otherwise.
async fn publish(
    _: Admin,
    State(shared): State<Arc<Shared>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !valid_room_name(&room) {
        return (StatusCode::BAD_REQUEST, "invalid room name\n").into_response();
    }
    let body = match read_body(&headers, body, shared.config.max_message_bytes as usize).await {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let is_text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/"));
    let payload = if is_text && std::str::from_utf8(&body).is_ok() {
        Payload::Text(body)
    } else {
        Payload::Binary(body)
    };
    let Some(live) = shared.rooms.get(&room) else {
        // Cluster mode: the room may live on other nodes; its owner delivers it.
        if let Some(cluster) = shared.rooms.cluster()
            && cluster.room_known(&room)
        {
            if !cluster.publish_remote(&room, payload) {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    "Redis is unreachable; retry\n",
                )
                    .into_response();
            }
            return (StatusCode::ACCEPTED, axum::Json(json!({ "room": room }))).into_response();
        }
        return (StatusCode::NOT_FOUND, "no such room: it has no members\n").into_response();
    };
    let members = live.member_count();
    if !live.try_send(RoomEvent::Publish(payload)) {
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "the room is busy; retry\n")
            .into_response();
    }
    (StatusCode::ACCEPTED, axum::Json(json!({ "room": room, "members": members }))).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret!"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
