//! The live dashboard: the token form that trades the admin token for a session
//! cookie, the sessions behind those cookies, and the server-sent event stream that
//! pushes a snapshot of the server to the page every second.
//!
//! Off (404) without an admin token, like the admin API. Browsers cannot put a bearer
//! header on an event stream, so `POST /dashboard/login` compares the token in
//! constant time and answers with an `HttpOnly; SameSite=Strict; Path=/` cookie that
//! holds a random session id, never the token. The server keeps only the SHA-256 of
//! each id, with its expiry, in a bounded table. `GET /dashboard/events` accepts that
//! cookie or an `Authorization: Bearer` header.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::Shared;
use super::assets::{self, Asset};
use super::auth::{Denied, authorize, constant_time_eq, read_body};
use super::views::{plugins_json, rooms_listing};
use crate::config::OriginPolicy;
use crate::metrics::RejectReason;
use crate::plugin::reload::rfc3339;
use crate::types::CloseReason;
use crate::ws::handshake::{origin_allowed, percent_decode};

/// The session cookie's name.
const COOKIE: &str = "roomcast_dashboard";
/// How long a dashboard session lasts after the token was given.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; past it, the one closest to expiry makes room.
const MAX_SESSIONS: usize = 256;
/// The sign-in form's body: a token and its field name, with room to spare.
const LOGIN_BODY_LIMIT: usize = 4 << 10;
/// How often the event stream pushes a snapshot.
const PUSH_EVERY: Duration = Duration::from_secs(1);
/// Rooms listed in a snapshot, and members listed per room (the totals are exact).
const MAX_ROOMS: usize = 200;
const MAX_MEMBERS: usize = 50;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/events", get(events))
}

/// Dashboard sessions: SHA-256 of the cookie's id → when the session expires.
#[derive(Debug)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Instant>>,
    started: SystemTime,
}

impl Default for Sessions {
    fn default() -> Self {
        Self { live: Mutex::new(HashMap::new()), started: SystemTime::now() }
    }
}

impl Sessions {
    /// Open a session; returns the id for the cookie.
    fn open(&self) -> Option<String> {
        let mut id = [0u8; 32];
        // The crypto provider's generator: the operating system's CSPRNG.
        rustls::crypto::ring::default_provider().secure_random.fill(&mut id).ok()?;
        let id = hex(&id);
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live.iter().min_by_key(|(_, expires)| **expires).map(|(k, _)| *k)
        {
            live.remove(&oldest);
        }
        live.insert(digest(&id), now + SESSION_TTL);
        Some(id)
    }

    fn is_live(&self, id: &str) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&digest(id)).is_some_and(|expires| *expires > Instant::now())
    }

    fn close(&self, id: &str) {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest(id));
    }
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session id in the request's cookie, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// How a request may see the dashboard: off, not signed in, or signed in.
fn access(shared: &Shared, headers: &HeaderMap) -> Result<(), Denied> {
    match authorize(shared, headers) {
        Err(Denied::Unauthorized) if cookie(headers).is_some_and(|id| shared.dashboard.is_live(id)) => Ok(()),
        other => other,
    }
}

/// `GET /dashboard`: the dashboard for a signed-in browser, else the token form.
async fn page(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match access(&shared, &headers) {
        Ok(()) => assets::page(Asset::Dashboard),
        Err(Denied::Off) => Denied::Off.into_response(),
        Err(Denied::Unauthorized) => assets::page(Asset::Login),
    }
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// `POST /dashboard/login`: trade the admin token for a session cookie.
async fn login(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    // Everything that can refuse the request does so before its body is read.
    let Some(token) = shared.config.admin_token.as_deref() else {
        return Denied::Off.into_response();
    };
    // Only the dashboard's own page may sign in (no cross-site form posts).
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !origin_allowed(&OriginPolicy::SameHost, origin, host) {
            return (StatusCode::FORBIDDEN, "cross-origin sign-in refused\n").into_response();
        }
    }
    let body = match read_body(&headers, body, LOGIN_BODY_LIMIT).await {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    let Ok(form) = serde_urlencoded::from_bytes::<Login>(&body) else {
        return (StatusCode::BAD_REQUEST, "expected a form with a `token` field\n").into_response();
    };
    if !constant_time_eq(form.token.trim().as_bytes(), token.as_bytes()) {
        tracing::info!("dashboard sign-in refused: wrong token");
        let mut response = assets::page(Asset::LoginFailed);
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let Some(id) = shared.dashboard.open() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no randomness for a session id\n").into_response();
    };
    let secure = if shared.tls.is_some() { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    see_other(cookie)
}

/// `POST /dashboard/logout`: end the session and drop the cookie.
async fn logout(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers) {
        shared.dashboard.close(id);
    }
    see_other(format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"))
}

/// 303 back to `/dashboard`, setting `cookie`.
fn see_other(cookie: String) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /dashboard/events`: a `snapshot` event now and every second after, until the
/// session ends, the client goes away or the server shuts down.
async fn events(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(denied) = access(&shared, &headers) {
        return denied.into_response();
    }
    let session = cookie(&headers).map(str::to_owned);
    let bearer = authorize(&shared, &headers).is_ok();
    let state = (shared, Rates::default(), true);
    let stream = futures_util::stream::unfold(state, move |(shared, mut rates, first)| {
        let session = session.clone();
        async move {
            if !first {
                tokio::select! {
                    () = tokio::time::sleep(PUSH_EVERY) => {}
                    () = shared.shutdown.cancelled() => return None,
                }
            }
            if !bearer && !session.as_deref().is_some_and(|id| shared.dashboard.is_live(id)) {
                return None;
            }
            let data = snapshot(&shared, &mut rates).await.to_string();
            let event = Event::default().event("snapshot").data(data);
            Some((Ok::<_, Infallible>(event), (shared, rates, false)))
        }
    });
    let mut response = Sse::new(stream).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The stream ends with the sign-in session or at shutdown, not at the HTTP deadline.
    response.extensions_mut().insert(super::LongLived);
    response
}

/// The message counters at the previous snapshot, for rates.
#[derive(Debug, Default)]
struct Rates {
    last: Option<(Instant, u64, u64)>,
}

impl Rates {
    /// Messages per second in and out since the previous call.
    fn update(&mut self, now: Instant, messages_in: u64, messages_out: u64) -> (f64, f64) {
        let rates = match self.last {
            Some((then, i, o)) if now > then => {
                let secs = (now - then).as_secs_f64();
                (
                    (messages_in.saturating_sub(i)) as f64 / secs,
                    (messages_out.saturating_sub(o)) as f64 / secs,
                )
            }
            _ => (0.0, 0.0),
        };
        self.last = Some((now, messages_in, messages_out));
        rates
    }
}

/// Everything the dashboard shows, as one JSON document. In cluster mode the rooms
/// are the cluster's, as `/admin/rooms` lists them: `member_count` is cluster-wide,
/// `members` names this node's members, and `owner` and `nodes` (member count per
/// node) say where the room lives.
async fn snapshot(shared: &Shared, rates: &mut Rates) -> Value {
    let metrics = &shared.metrics;
    let (messages_in, messages_out) = (metrics.messages_in.load(Relaxed), metrics.messages_out.load(Relaxed));
    let (in_per_s, out_per_s) = rates.update(Instant::now(), messages_in, messages_out);
    let listing = rooms_listing(shared).await;
    let room_count = listing.len();
    let rooms: Vec<Value> = listing
        .into_iter()
        .take(MAX_ROOMS)
        .map(|mut entry| {
            let name = entry["name"].as_str().unwrap_or_default();
            let members: Vec<Value> = shared
                .rooms
                .get(name)
                .map(|room| room.members())
                .into_iter()
                .flat_map(|members| members.into_iter().take(MAX_MEMBERS))
                .map(|peer| json!({ "id": peer.id, "name": query_name(&peer.query), "remote": peer.remote_addr }))
                .collect();
            entry["member_count"] = entry["members"].take();
            entry["members"] = Value::Array(members);
            // Counts, not every member id of a large room once a second.
            if let Value::Object(nodes) = &mut entry["nodes"] {
                for ids in nodes.values_mut() {
                    *ids = json!(ids.as_array().map_or(0, Vec::len));
                }
            }
            entry
        })
        .collect();
    let events: Vec<Value> = shared
        .rooms
        .plugins()
        .reload_events()
        .into_iter()
        .rev()
        .map(|e| {
            json!({
                "at": rfc3339(e.at),
                "plugin": e.plugin,
                "kind": e.kind.label(),
                "version": e.version,
                "error": e.error,
            })
        })
        .collect();
    let closed: serde_json::Map<String, Value> =
        CloseReason::ALL.iter().map(|r| (r.label().to_owned(), json!(metrics.closed_count(*r)))).collect();
    let rejected: serde_json::Map<String, Value> =
        RejectReason::ALL.iter().map(|r| (r.label().to_owned(), json!(metrics.rejected_count(*r)))).collect();
    json!({
        "at": rfc3339(SystemTime::now()),
        "started_at": rfc3339(shared.dashboard.started),
        "tls": shared.tls.is_some(),
        "draining": shared.draining.load(Relaxed),
        "connections": metrics.connections.load(Relaxed),
        "room_count": room_count,
        "cluster": shared.rooms.cluster().map(|c| json!({ "node": c.node(), "up": c.is_up() })),
        "members": metrics.room_members.load(Relaxed),
        "messages_in_total": messages_in,
        "messages_out_total": messages_out,
        "messages_in_per_s": in_per_s,
        "messages_out_per_s": out_per_s,
        "rooms": rooms,
        "plugins": plugins_json(shared),
        "reloads": events,
        "closed": closed,
        "rejected": rejected,
    })
}

/// The `name` parameter of a member's upgrade query (the chat page's nickname), if
/// any. Nothing else of the query is shown: it may carry tokens.
fn query_name(query: &str) -> Option<String> {
    let value = query.split('&').find_map(|pair| pair.strip_prefix("name="))?;
    let name = percent_decode(&value.replace('+', " "))?;
    Some(name.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_names() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; roomcast_dashboard=abc; b=2"));
        assert_eq!(cookie(&headers), Some("abc"));
        assert_eq!(query_name("x=1&name=Ada%20L&y=2").as_deref(), Some("Ada L"));
        assert_eq!(query_name("token=s3cret").as_deref(), None);
        assert_eq!(query_name("name=bad%zz"), None);
    }

    #[test]
    fn sessions_expire_and_close() {
        let sessions = Sessions::default();
        let id = sessions.open().unwrap();
        assert_eq!(id.len(), 64);
        assert!(sessions.is_live(&id) && !sessions.is_live("nope"));
        sessions.close(&id);
        assert!(!sessions.is_live(&id));
        for _ in 0..MAX_SESSIONS + 10 {
            sessions.open().unwrap();
        }
        assert!(sessions.live.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
