//! Upgrade request validation (RFC 6455 section 4.2.1) and the HTTP rejections it
//! produces.
//!
//! Checks run in a fixed order and the first failure wins: method (405), path (404 /
//! 400 for a bad room name), `Upgrade`/`Connection` (426 for plain HTTP, 400 otherwise,
//! 400 for an HTTP/1.0 upgrade), version (426; also when repeated), key (400; also when
//! repeated), origin (403). Capacity (503) and the plugin's decision come
//! after, in the server. Every rejection is a [`Rejection`]: a status, a metrics reason
//! and a one-line body.

use crate::types::valid_room_name;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::config::OriginPolicy;
use crate::metrics::RejectReason;

/// The subprotocol of the room protocol: the one that may open `GET /ws`.
pub const ROOM_PROTOCOL: &str = "roomcast.v1";

/// A refused upgrade request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: RejectReason,
    pub message: String,
    /// A header the status requires (`Allow`, `Upgrade`, `Sec-WebSocket-Version`).
    pub header: Option<(header::HeaderName, &'static str)>,
}

impl Rejection {
    pub fn new(status: StatusCode, reason: RejectReason, message: impl Into<String>) -> Self {
        Self { status, reason, message: message.into(), header: None }
    }

    fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.header = Some((name, value));
        self
    }

    /// The response as HTTP/1.1 bytes, the same status, header and body as
    /// [`IntoResponse`]'s, and `connection: close` (the server closes after it).
    pub fn http1_response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.message);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some((name, value)) = &self.header {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        head.into_bytes()
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = (self.status, format!("{}\n", self.message)).into_response();
        if let Some((name, value)) = self.header {
            response.headers_mut().insert(name, HeaderValue::from_static(value));
        }
        response
    }
}

/// A request that passed every protocol check.
#[derive(Debug, Clone)]
pub struct Valid {
    /// The room in the path (`/ws/{room}`); `None` for `GET /ws`, which only a client
    /// offering the room protocol may open.
    pub room: Option<String>,
    /// The `Sec-WebSocket-Accept` value for the response.
    pub accept: String,
    pub protocols: Vec<String>,
}

/// Run the protocol checks on an upgrade request.
pub fn validate(
    method: &Method,
    version: Version,
    path: &str,
    headers: &HeaderMap,
    origins: &OriginPolicy,
) -> Result<Valid, Rejection> {
    use RejectReason as R;
    if method != Method::GET {
        return Err(Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            R::Method,
            "only GET can open a WebSocket",
        )
        .with_header(header::ALLOW, "GET"));
    }
    let not_found =
        || Rejection::new(StatusCode::NOT_FOUND, R::BadRequest, "not found; WebSockets live at /ws/{room}");
    let room = match path.strip_prefix("/ws/") {
        Some(raw_room) => {
            Some(percent_decode(raw_room).filter(|name| valid_room_name(name)).ok_or_else(|| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    R::RoomName,
                    "invalid room name: use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
                )
            })?)
        }
        // `GET /ws` joins no room: only for the room protocol, which joins them later.
        None if path == "/ws" && offers(headers, ROOM_PROTOCOL) => None,
        None => return Err(not_found()),
    };

    if !headers.contains_key(header::UPGRADE) {
        return Err(Rejection::new(
            StatusCode::UPGRADE_REQUIRED,
            R::BadRequest,
            "this endpoint needs a WebSocket upgrade",
        )
        .with_header(header::UPGRADE, "websocket"));
    }
    if version != Version::HTTP_11 {
        // RFC 6455 4.1: the opening handshake is an HTTP/1.1 request.
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            R::BadRequest,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    if !headers.get_all(header::UPGRADE).iter().any(|v| has_token(v, "websocket")) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            R::BadRequest,
            "Upgrade header must be `websocket`",
        ));
    }
    if !headers.get_all(header::CONNECTION).iter().any(|v| has_token(v, "upgrade")) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            R::BadRequest,
            "Connection header must include `upgrade`",
        ));
    }
    // RFC 6455 11.3.1 and 11.3.5: the key and the version appear exactly once.
    if single(headers, header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Rejection::new(
            StatusCode::UPGRADE_REQUIRED,
            R::Version,
            "unsupported WebSocket version; use 13",
        )
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let key = single(headers, header::SEC_WEBSOCKET_KEY)
        .filter(|key| {
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .is_ok_and(|bytes| bytes.len() == 16)
        })
        .ok_or_else(|| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                R::BadRequest,
                "Sec-WebSocket-Key must be the base64 of 16 bytes",
            )
        })?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origins, origin, host) {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                R::Origin,
                format!("origin `{origin}` is not allowed"),
            ));
        }
    }
    let protocols = offered(headers).map(str::to_owned).collect();
    Ok(Valid { room, accept: accept_key(key.as_bytes()), protocols })
}

/// The subprotocols the client offers in `Sec-WebSocket-Protocol`, in order.
fn offered(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Whether the client offers `protocol` in `Sec-WebSocket-Protocol`.
fn offers(headers: &HeaderMap, protocol: &str) -> bool {
    offered(headers).any(|p| p == protocol)
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The value of a header that must appear once: `None` when it is missing or repeated.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Option<&HeaderValue> {
    let mut values = headers.get_all(name).iter();
    values.next().filter(|_| values.next().is_none())
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Decode `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Split `scheme://host[:port]` into the scheme and the authority with the scheme's
/// default port removed, both lower-cased.
fn normalize_origin(origin: &str) -> Option<(String, String)> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    // A host name or address and an optional port: nothing a URL could hide behind.
    let host_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'*');
    if authority.is_empty() || !authority.bytes().all(host_byte) {
        return None;
    }
    let authority = strip_default_port(scheme, authority);
    Some((scheme.to_owned(), authority.to_owned()))
}

fn strip_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return authority,
    };
    authority.strip_suffix(default).unwrap_or(authority)
}

/// Whether a browser `Origin` may open a WebSocket under `policy`.
pub fn origin_allowed(policy: &OriginPolicy, origin: &str, host: &str) -> bool {
    match policy {
        OriginPolicy::Any => true,
        OriginPolicy::SameHost => {
            let Some((scheme, authority)) = normalize_origin(origin) else {
                return false;
            };
            let host = host.trim().to_ascii_lowercase();
            authority == strip_default_port(&scheme, &host)
        }
        OriginPolicy::List(allowed) => {
            let Some((scheme, authority)) = normalize_origin(origin) else {
                return false;
            };
            allowed.iter().any(|pattern| {
                let Some((p_scheme, p_authority)) = normalize_origin(pattern) else {
                    return false;
                };
                if p_scheme != scheme {
                    return false;
                }
                match p_authority.strip_prefix("*.") {
                    Some(suffix) => {
                        authority.strip_suffix(suffix).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
                    }
                    None => p_authority == authority,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn room_names() {
        assert!(valid_room_name("chat:lobby-1.a_b"));
        assert!(valid_room_name(&"a".repeat(128)));
        for bad in ["", "a/b", "a b", "é", &"a".repeat(129)] {
            assert!(!valid_room_name(bad), "{bad:?}");
        }
        assert_eq!(percent_decode("chat%3Alobby").as_deref(), Some("chat:lobby"));
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a%zz"), None);
        assert_eq!(percent_decode("a%4"), None);
    }

    #[test]
    fn origins() {
        let same = OriginPolicy::SameHost;
        assert!(origin_allowed(&same, "http://localhost:8080", "localhost:8080"));
        assert!(origin_allowed(&same, "https://example.com", "example.com"));
        assert!(origin_allowed(&same, "https://example.com", "example.com:443"));
        assert!(!origin_allowed(&same, "http://evil.com", "example.com"));
        assert!(!origin_allowed(&same, "http://localhost:9090", "localhost:8080"));
        assert!(!origin_allowed(&same, "null", "localhost:8080"));

        let list = OriginPolicy::parse("https://app.example.com, https://*.example.org").unwrap();
        assert!(origin_allowed(&list, "https://app.example.com", "x"));
        assert!(origin_allowed(&list, "https://a.b.example.org", "x"));
        assert!(!origin_allowed(&list, "https://example.org", "x"));
        assert!(!origin_allowed(&list, "https://badexample.org", "x"));
        assert!(!origin_allowed(&list, "http://app.example.com", "x"));
        // An origin is a host and a port, nothing a wildcard could be fooled by.
        assert!(!origin_allowed(&list, "https://evil.com?.example.org", "x"));
        assert!(!origin_allowed(&list, "https://evil.com#.example.org", "x"));
        assert!(!origin_allowed(&list, "https://user@evil.com.example.org", "x"));
        assert!(origin_allowed(&OriginPolicy::Any, "http://anything", "x"));
    }
}
