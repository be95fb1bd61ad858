//! Jwt: admits an upgrade only with a JSON Web Token signed with HMAC-SHA256 (`HS256`)
//! under the configured secret, and attaches the token's claims to the connection as
//! its identity, which every room's plugin then sees (`Member::identity`). Its own
//! rooms are a small chat that tags every message with the sender's `sub` and `name`.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/jwt.wasm /path/to/plugins-dir/
//! printf '[config]\nsecret = "change me"\n' > /path/to/plugins-dir/jwt.toml
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/jwt?token=<a HS256 JWT signed with "change me">
//! # (or send it as `Authorization: Bearer <token>` where the client can set headers)
//! ```
//!
//! # Configuration
//!
//! The `[config]` table of `jwt.toml`; unknown keys are an error:
//!
//! ```toml
//! [config]
//! secret = "change me"         # required: the HMAC key, as UTF-8 bytes
//! issuer = "https://auth.example.com"  # optional: `iss` must equal it
//! audience = "roomcast"        # optional: `aud` (a string or an array) must hold it
//! ```
//!
//! Without a non-empty `secret`, `init` fails with `jwt: [config] secret is required`
//! and the plugin does not load (its rooms are then closed to everyone).
//!
//! # The handshake
//!
//! The token is the `Authorization: Bearer <token>` header if there is one, else the
//! `token` query parameter (browsers cannot set headers on a WebSocket, so they use
//! `?token=`). Checked in this order; the first failure rejects the upgrade with HTTP
//! 401 and the reason as the body:
//!
//! | check | reason |
//! |---|---|
//! | a token is given | `missing token` |
//! | three base64url parts, a JSON header and a JSON object of claims | `malformed token` |
//! | the header's `alg` is `HS256` (never `none`, nor any other), and it has no `crit` | `unsupported alg` |
//! | the signature is HMAC-SHA256 of `header.payload` under the secret, compared in constant time | `bad signature` |
//! | `sub` is a string | `token has no sub` |
//! | `iss` equals `issuer`, when configured | `wrong issuer` |
//! | `aud` is or contains `audience`, when configured | `wrong audience` |
//! | the claims are at most 4096 bytes of JSON (the host's identity limit) | `claims too large` |
//!
//! On success the upgrade is accepted and the claims object, as the token carried it,
//! becomes the connection's identity: `{"sub":"42","name":"Ada",...}`. A token in the
//! query string stays in the upgrade's query, which every room's plugin also sees
//! (`Member::query`): plugins should read `identity`, and never log the query.
//!
//! **`exp`, `nbf` and `iat` are not checked.** A plugin has no wall clock: the host
//! gives it only a monotonic clock ([`Room::now`]), whose value means nothing as a
//! date, so no plugin can tell whether a date has passed. The claims are passed on
//! unchanged, and the token is checked once, at the handshake; a connection outlives
//! its token like any WebSocket authenticated at connect. Instead: have the issuer mint
//! short-lived tokens just before the client connects (a connect ticket), rotate the
//! secret to revoke every outstanding token, and close long-lived sessions from the
//! application if it needs to. Checking `exp` needs a wall-clock import from the host,
//! which the contract may add later.
//!
//! # Rooms
//!
//! `jwt` and `jwt:*`. Every member needs an identity with a string `sub`: a raw
//! connection has one from this plugin's handshake; a room-protocol join into one of
//! these rooms (`{"join":"jwt:b"}`) from a connection that has none (one opened on
//! `GET /ws`, which runs no handshake) is refused with 401 and the connection stays
//! up. An identity attached by another plugin's handshake counts too: every plugin on
//! a server is the operator's.
//!
//! Server to client (member ids are the host's `u64` ids):
//!
//! | when | who gets it | message |
//! |---|---|---|
//! | a member joins | the joiner | `{"type":"welcome","id":7,"user":{"sub":"42","name":"Ada",...}}` (`user` is the whole identity) |
//! | a member joins | everyone else | `{"type":"join","id":7,"sub":"42","name":"Ada"}` |
//! | a member leaves | everyone left | `{"type":"leave","id":7,"sub":"42","name":"Ada"}` |
//! | `{"say":"hi"}` | everyone, the sender included | `{"type":"say","from":7,"sub":"42","name":"Ada","text":"hi"}` |
//! | anything else from a member | the sender | `{"type":"error","error":"expected {\"say\":\"...\"}"}` |
//!
//! `name` is the claim of that name, left out when the token has none. Messages
//! forwarded from other rooms or published by a backend pass unchanged.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use roomcast_guest::serde_json::{self, Map, Value};
use roomcast_guest::{
    Config, HandshakeDecision, HandshakeRequest, LeaveReason, Member, MemberId, Message, Origin, Plugin,
    Refusal, Room, Verdict,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The most bytes of JSON the host lets a handshake attach as identity.
const MAX_IDENTITY_BYTES: usize = 4096;

const USAGE: &str = r#"expected {"say":"..."}"#;

/// What `jwt.toml`'s `[config]` holds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    secret: String,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Why a token was refused; the reason is the 401's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Invalid {
    Missing,
    Malformed,
    UnsupportedAlg,
    BadSignature,
    NoSub,
    WrongIssuer,
    WrongAudience,
    TooLarge,
}

impl Invalid {
    fn reason(self) -> &'static str {
        match self {
            Invalid::Missing => "missing token",
            Invalid::Malformed => "malformed token",
            Invalid::UnsupportedAlg => "unsupported alg",
            Invalid::BadSignature => "bad signature",
            Invalid::NoSub => "token has no sub",
            Invalid::WrongIssuer => "wrong issuer",
            Invalid::WrongAudience => "wrong audience",
            Invalid::TooLarge => "claims too large",
        }
    }
}

/// Who a member is, as this plugin reads an identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct User {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// The plugin: its settings, and in a room the users of its members.
struct Jwt {
    settings: Settings,
    users: BTreeMap<MemberId, User>,
}

/// What the room sends.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a> {
    Welcome {
        id: MemberId,
        user: &'a Value,
    },
    Join {
        id: MemberId,
        #[serde(flatten)]
        user: &'a User,
    },
    Leave {
        id: MemberId,
        #[serde(flatten)]
        user: &'a User,
    },
    Say {
        from: MemberId,
        #[serde(flatten)]
        user: &'a User,
        text: &'a str,
    },
    Error {
        error: &'a str,
    },
}

#[derive(Deserialize)]
struct Say {
    say: String,
}

impl Jwt {
    /// The claims of `token` if it is a valid HS256 JWT under the configured secret,
    /// as the JSON text to attach.
    fn verify(&self, token: &str) -> Result<String, Invalid> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Invalid::Malformed);
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| Invalid::Malformed);
        let header: Map<String, Value> =
            serde_json::from_slice(&decode(header)?).map_err(|_| Invalid::Malformed)?;
        if header.get("alg").and_then(Value::as_str) != Some("HS256") || header.contains_key("crit") {
            return Err(Invalid::UnsupportedAlg);
        }
        let claims_json = decode(payload)?;
        let signature = decode(signature)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(self.settings.secret.as_bytes())
            .expect("HMAC takes a key of any length");
        // The signed input is the first two parts exactly as sent.
        let signed = token.rfind('.').map_or(token, |dot| &token[..dot]);
        mac.update(signed.as_bytes());
        mac.verify_slice(&signature).map_err(|_| Invalid::BadSignature)?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&claims_json).map_err(|_| Invalid::Malformed)?;
        if !claims.get("sub").is_some_and(Value::is_string) {
            return Err(Invalid::NoSub);
        }
        if let Some(issuer) = &self.settings.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(issuer)
        {
            return Err(Invalid::WrongIssuer);
        }
        if let Some(audience) = &self.settings.audience {
            let holds = match claims.get("aud") {
                Some(Value::String(aud)) => aud == audience,
                Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
                _ => false,
            };
            if !holds {
                return Err(Invalid::WrongAudience);
            }
        }
        let identity = serde_json::to_string(&claims).map_err(|_| Invalid::Malformed)?;
        if identity.len() > MAX_IDENTITY_BYTES {
            return Err(Invalid::TooLarge);
        }
        Ok(identity)
    }

    /// The user of a member, `"?"` for one this instance did not see join.
    fn user(&self, id: MemberId) -> User {
        self.users.get(&id).cloned().unwrap_or(User { sub: "?".into(), name: None })
    }
}

/// The token of an upgrade request: the bearer token of its `Authorization` header,
/// else its `token` query parameter.
fn token_of(request: &HandshakeRequest) -> Option<String> {
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    bearer.or_else(|| request.query_param("token")).filter(|token| !token.is_empty())
}

/// The user of a member's identity: its string `sub`, and its `name` if that is a
/// string; `None` without an identity or a string `sub`.
fn user_of(member: &Member) -> Option<User> {
    let claims = member.identity_json::<Map<String, Value>>()?;
    let sub = claims.get("sub")?.as_str()?.to_owned();
    let name = claims.get("name").and_then(Value::as_str).map(str::to_owned);
    Some(User { sub, name })
}

impl Plugin for Jwt {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.secret.is_empty() {
            return Err(
                "jwt: [config] secret is required (the HMAC-SHA256 key tokens are signed with)".into()
            );
        }
        Ok(Jwt { settings, users: BTreeMap::new() })
    }

    fn handshake(&self, request: &HandshakeRequest) -> HandshakeDecision {
        let verified = token_of(request).ok_or(Invalid::Missing).and_then(|token| self.verify(&token));
        match verified {
            Ok(claims) => HandshakeDecision::Accept { protocol: None, identity: Some(claims) },
            Err(invalid) => HandshakeDecision::reject(401, invalid.reason()),
        }
    }

    fn admit(&mut self, _room: &Room, member: &Member) -> Result<(), Refusal> {
        match user_of(member) {
            Some(_) => Ok(()),
            None => Err(Refusal::new(401, "this room needs a verified token: connect with ?token=")),
        }
    }

    fn join(&mut self, room: &Room, member: Member) {
        let Some(user) = user_of(&member) else { return };
        let claims = member.identity_json::<Value>().unwrap_or(Value::Null);
        let _ = room.send_json(member.id, &Outgoing::Welcome { id: member.id, user: &claims });
        let _ = room.broadcast_json_except(&Outgoing::Join { id: member.id, user: &user }, &[member.id]);
        self.users.insert(member.id, user);
    }

    fn leave(&mut self, room: &Room, member: MemberId, _reason: LeaveReason) {
        let user = self.users.remove(&member).unwrap_or_else(|| self.user(member));
        let _ = room.broadcast_json(&Outgoing::Leave { id: member, user: &user });
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        let Origin::Member(id) = from else { return Verdict::Pass };
        match message.json::<Say>() {
            Ok(Say { say }) => {
                let user = self.user(id);
                let _ = room.broadcast_json(&Outgoing::Say { from: id, user: &user, text: &say });
            }
            Err(_) => {
                let _ = room.send_json(id, &Outgoing::Error { error: USAGE });
            }
        }
        Verdict::Drop
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(&self.users).ok()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        self.users = serde_json::from_slice(&state).map_err(|error| error.to_string())?;
        Ok(())
    }
}

roomcast_guest::export!(Jwt);

#[cfg(test)]
mod tests {
    use roomcast_guest::serde_json::json;

    use super::*;

    const SECRET: &str = "test secret";

    fn plugin(config: Value) -> Jwt {
        Jwt::init(Config::new(config.to_string())).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with `header` and `claims`, signed with HMAC-SHA256 under `secret`.
    fn sign(header: &Value, claims: &Value, secret: &str) -> String {
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn hs256(claims: &Value) -> String {
        sign(&json!({"alg": "HS256", "typ": "JWT"}), claims, SECRET)
    }

    fn request(query: &str, headers: &[(&str, &str)]) -> HandshakeRequest {
        HandshakeRequest {
            room: "jwt".into(),
            path: "/ws/jwt".into(),
            query: query.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            remote_addr: "127.0.0.1:1".into(),
            protocols: vec![],
        }
    }

    fn rejected(decision: HandshakeDecision) -> (u16, String) {
        match decision {
            HandshakeDecision::Reject { status, reason } => (status, reason),
            accept => panic!("expected a rejection, got {accept:?}"),
        }
    }

    #[test]
    fn a_valid_token_attaches_its_claims() {
        let jwt = plugin(json!({"secret": SECRET}));
        let claims = json!({"sub": "42", "name": "Ada", "exp": 1, "roles": ["admin"]});
        let token = hs256(&claims);
        for request in [
            request(&format!("token={token}"), &[]),
            request("", &[("authorization", &format!("Bearer {token}"))]),
            request("token=ignored", &[("authorization", &format!("bearer {token}"))]),
        ] {
            match jwt.handshake(&request) {
                HandshakeDecision::Accept { protocol: None, identity: Some(identity) } => {
                    let identity: Value = serde_json::from_str(&identity).unwrap();
                    // An `exp` long past is not checked: a plugin has no wall clock.
                    assert_eq!(identity, claims);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_tokens_are_401_with_a_reason() {
        let jwt = plugin(json!({"secret": SECRET}));
        let claims = json!({"sub": "42"});
        let good = hs256(&claims);
        let (head, rest) = good.split_once('.').unwrap();
        let (payload, signature) = rest.split_once('.').unwrap();
        let other_payload = b64(br#"{"sub":"1"}"#);
        let cases = [
            (String::new(), "missing token"),
            ("abc".to_owned(), "malformed token"),
            (format!("{good}.x"), "malformed token"),
            (format!("{head}.{payload}.{signature}="), "malformed token"),
            (format!("{head}.!!.{signature}"), "malformed token"),
            (sign(&json!({"alg": "none"}), &claims, SECRET), "unsupported alg"),
            (format!("{}.{payload}.", b64(br#"{"alg":"none"}"#)), "unsupported alg"),
            (sign(&json!({"alg": "HS512"}), &claims, SECRET), "unsupported alg"),
            (sign(&json!({"typ": "JWT"}), &claims, SECRET), "unsupported alg"),
            (sign(&json!({"alg": "HS256", "crit": ["x"]}), &claims, SECRET), "unsupported alg"),
            (sign(&json!({"alg": "HS256"}), &claims, "wrong secret"), "bad signature"),
            (format!("{head}.{other_payload}.{signature}"), "bad signature"),
            (format!("{head}.{payload}."), "bad signature"),
            (hs256(&json!({"name": "no sub"})), "token has no sub"),
            (hs256(&json!({"sub": 42})), "token has no sub"),
            (hs256(&json!(["sub"])), "malformed token"),
            (hs256(&json!({"sub": "x", "pad": "y".repeat(5000)})), "claims too large"),
        ];
        for (token, reason) in cases {
            let decision = jwt.handshake(&request(&format!("token={token}"), &[]));
            assert_eq!(rejected(decision), (401, reason.to_owned()), "{token}");
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let jwt = plugin(json!({"secret": SECRET, "issuer": "auth", "audience": "roomcast"}));
        let check = |claims: Value| match jwt.verify(&hs256(&claims)) {
            Ok(_) => "ok",
            Err(invalid) => invalid.reason(),
        };
        assert_eq!(check(json!({"sub": "1", "iss": "auth", "aud": "roomcast"})), "ok");
        assert_eq!(check(json!({"sub": "1", "iss": "auth", "aud": ["x", "roomcast"]})), "ok");
        assert_eq!(check(json!({"sub": "1", "iss": "other", "aud": "roomcast"})), "wrong issuer");
        assert_eq!(check(json!({"sub": "1", "aud": "roomcast"})), "wrong issuer");
        assert_eq!(check(json!({"sub": "1", "iss": "auth", "aud": ["x"]})), "wrong audience");
        assert_eq!(check(json!({"sub": "1", "iss": "auth"})), "wrong audience");
    }

    #[test]
    fn config_needs_a_secret() {
        let error = Jwt::init(Config::new("{}")).err().unwrap();
        assert!(error.contains("secret is required"), "{error}");
        assert!(Jwt::init(Config::new(r#"{"secret":""}"#)).is_err());
        assert!(Jwt::init(Config::new(r#"{"secret":"s","algorithm":"none"}"#)).is_err());
    }

    #[test]
    fn rooms_admit_only_members_with_an_identity() {
        let mut jwt = plugin(json!({"secret": SECRET}));
        let member = |identity: Option<&str>| Member {
            id: 1,
            query: String::new(),
            remote_addr: "127.0.0.1:1".into(),
            protocol: Some("roomcast.v1".into()),
            identity: identity.map(str::to_owned),
            params: None,
        };
        let refusal = jwt.admit(&Room, &member(None)).unwrap_err();
        assert_eq!(refusal.status, 401);
        assert!(jwt.admit(&Room, &member(Some(r#"{"name":"no sub"}"#))).is_err());
        assert!(jwt.admit(&Room, &member(Some(r#"{"sub":"42","name":7}"#))).is_ok());
        let ada = member(Some(r#"{"sub":"42","name":"Ada","roles":[]}"#));
        assert_eq!(user_of(&ada), Some(User { sub: "42".into(), name: Some("Ada".into()) }));
    }

    #[test]
    fn messages_carry_the_senders_user() {
        let user = User { sub: "42".into(), name: Some("Ada".into()) };
        let say = serde_json::to_value(Outgoing::Say { from: 7, user: &user, text: "hi" }).unwrap();
        assert_eq!(say, json!({"type": "say", "from": 7, "sub": "42", "name": "Ada", "text": "hi"}));
        let anonymous = User { sub: "1".into(), name: None };
        let join = serde_json::to_value(Outgoing::Join { id: 3, user: &anonymous }).unwrap();
        assert_eq!(join, json!({"type": "join", "id": 3, "sub": "1"}));
    }
}
