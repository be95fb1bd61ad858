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
//! Every join is checked too (`admit`), including a room-protocol join of a gate room
//! from a connection opened elsewhere (`{"join":"gate"}` on `GET /ws?token=secret`):
//! check 2 runs on the `token` of the connection's upgrade query, and a failure refuses
//! the join with 403 `bad token`. A join carries no headers, so check 1 applies to
//! upgrades only; a connection opened on `GET /ws` passed the server's own origin check
//! (`--allowed-origins`).

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
        if !self.token_matches(request.query_param("token")) {
            return HandshakeDecision::reject(403, "bad token");
        }
        HandshakeDecision::accept()
    }

    fn admit(&mut self, _room: &Room, member: &Member) -> Result<(), Refusal> {
        if !self.token_matches(member.query_param("token")) {
            return Err(Refusal::new(403, "bad token"));
        }
        Ok(())
    }
}

impl Gate {
    /// Whether `given` is the configured token (always, when none is configured).
    fn token_matches(&self, given: Option<String>) -> bool {
        match self.token.as_deref().filter(|token| !token.is_empty()) {
            Some(token) => constant_time_eq(given.unwrap_or_default().as_bytes(), token.as_bytes()),
            None => true,
        }
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
    use super::*;

    #[test]
    fn joins_need_the_token_of_the_connections_upgrade() {
        let mut gate: Gate = Gate::init(Config::new(r#"{"token":"s3cret"}"#)).unwrap();
        let member = |query: &str| Member {
            id: 1,
            query: query.into(),
            remote_addr: "127.0.0.1:1".into(),
            protocol: Some("roomcast.v1".into()),
            identity: None,
            params: None,
        };
        assert_eq!(gate.admit(&Room, &member("")), Err(Refusal::new(403, "bad token")));
        assert!(gate.admit(&Room, &member("token=guess")).is_err());
        assert_eq!(gate.admit(&Room, &member("x=1&token=s3cret")), Ok(()));
        let mut open: Gate = Gate::init(Config::new("{}")).unwrap();
        assert_eq!(open.admit(&Room, &member("")), Ok(()));
    }

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
