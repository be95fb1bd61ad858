//! Who may use the admin API and the dashboard: the bearer token (compared in constant
//! time, never logged), the [`Admin`] extractor every admin route takes, and bounded
//! request bodies.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;

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
/// connection's deadline (see [`crate::server::watchdog`]) bounds how long this can wait.
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
