//! Gate: admits a WebSocket upgrade only from allowed origins and with the right
//! token; messages then pass unchanged to the other members.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/gate.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/gate?token=secret with the header
//! # Origin: https://app.example.com
//! ```
//!
//! # Configuration
//!
//! The `[config]` table of `gate.toml`; both keys are optional and unknown keys are an
//! error:
//!
//! ```toml
//! [config]
//! origins = ["https://app.example.com"]  # default: any origin (no check)
//! token = "secret"                       # default: no token needed
//! ```
//!
//! # Decisions
//!
//! Checked in this order; the first failure rejects the upgrade with HTTP 403:
//!
//! 1. When `origins` is non-empty, the request's `Origin` header must equal one of them
//!    (ASCII case-insensitively); a request without `Origin` is rejected. Reason:
//!    `origin not allowed`.
//! 2. When `token` is set and non-empty, the query parameter `token` (percent-decoded)
//!    must equal it; the comparison takes the same time wherever the first difference
//!    is. A missing token is rejected too. Reason: `bad token`.
//!
//! Otherwise the upgrade is accepted without a subprotocol.
//!
//! A room-protocol connection that joins a gate room after its upgrade (made on
//! `GET /ws` or to another room) is checked again in `admit`: the token of its
//! upgrade's query must match, or the join is refused with 403 `bad token` (the
//! origin was checked by the server's own origin policy when it upgraded).

use roomcast_guest::{Config, HandshakeDecision, HandshakeRequest, Member, Plugin, Refusal, Room};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Gate {
    origins: Vec<String>,
    token: Option<String>,
}

impl Plugin for Gate {
    fn init(config: Config) -> Result<Self, String> {
        config.parse()
    }

    fn handshake(&self, request: &HandshakeRequest) -> HandshakeDecision {
        if !self.origins.is_empty() {
            let allowed = request.header("origin").is_some_and(|origin| {
                self.origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
            });
            if !allowed {
                return HandshakeDecision::reject(403, "origin not allowed");
            }
        }
        if let Some(token) = self.token.as_deref().filter(|token| !token.is_empty()) {
            let given = request.query_param("token").unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                return HandshakeDecision::reject(403, "bad token");
            }
        }
        HandshakeDecision::accept()
    }

    /// A room-protocol connection joining a gate room later (its upgrade went to
    /// another room, or to `GET /ws`) shows the token of its upgrade's query too; the
    /// origin was checked by the server when it upgraded.
    fn admit(&mut self, _room: &Room, member: &Member) -> Result<(), Refusal> {
        if let Some(token) = self.token.as_deref().filter(|token| !token.is_empty()) {
            let given = member.query_param("token").unwrap_or_default();
            if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                return Err(Refusal::new(403, "bad token"));
            }
        }
        Ok(())
    }
}

/// Compares `given` with the non-empty `expected` in time that depends only on the
/// length of `given`: every byte is compared, with no early exit, and the lengths are
/// compared without branching on the secret's bytes.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(given.len() != expected.len());
    for (i, byte) in given.iter().enumerate() {
        difference |= byte ^ expected[i % expected.len()];
    }
    core::hint::black_box(difference) == 0
}

roomcast_guest::export!(Gate);

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
    }
}
