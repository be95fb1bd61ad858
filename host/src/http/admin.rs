//! The admin API: plugins, rooms, and publishing to a room from a backend.
//!
//! Off unless an admin token is configured (every route then answers 404). Each
//! request must carry `Authorization: Bearer TOKEN`; a missing or wrong token gets 401
//! with `WWW-Authenticate: Bearer`. Tokens are compared in constant time and never
//! logged.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::Shared;
use super::auth::{Admin, read_body};
use super::views::{plugins_json, rooms_listing};
use crate::plugin::Payload;
use crate::room::RoomEvent;
use crate::types::valid_room_name;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/admin/plugins", get(plugins))
        .route("/admin/rooms", get(rooms))
        .route("/admin/rooms/{room}/publish", post(publish))
}

async fn plugins(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(plugins_json(&shared)).into_response()
}

async fn rooms(_: Admin, State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(rooms_listing(&shared).await).into_response()
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
