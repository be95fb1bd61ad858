//! Roomcast's own guest-side types: what hooks receive and return, mirrored from the
//! WIT `types` interface so plugin authors never see generated bindings.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A member of a room. The host assigns it; it is unique for the life of the host.
pub type MemberId = u64;

/// A timer returned by [`Room::set_timer`](crate::Room::set_timer) and handed back to
/// [`Plugin::timer`](crate::Plugin::timer).
pub type TimerId = u64;

/// A WebSocket data message. The opcode is kept: text stays text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A text frame (always valid UTF-8).
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

impl Message {
    /// The text of a text message, `None` for a binary one.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
        }
    }

    /// The raw bytes of either kind of message.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
        }
    }

    /// Parses the message body (text or binary) as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.as_bytes())
    }

    /// A text message holding `value` as compact JSON.
    ///
    /// # Panics
    ///
    /// If `value` cannot be represented as JSON (a map with non-string keys, or a
    /// `Serialize` impl that fails): a bug in the plugin, not in its input.
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Message {
        match serde_json::to_string(value) {
            Ok(text) => Message::Text(text),
            Err(error) => panic!("value cannot be serialized as JSON: {error}"),
        }
    }
}

impl From<String> for Message {
    fn from(text: String) -> Self {
        Message::Text(text)
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Self {
        Message::Text(text.to_owned())
    }
}

impl From<Vec<u8>> for Message {
    fn from(bytes: Vec<u8>) -> Self {
        Message::Binary(bytes)
    }
}

impl From<&[u8]> for Message {
    fn from(bytes: &[u8]) -> Self {
        Message::Binary(bytes.to_vec())
    }
}

/// Where a message handed to [`Plugin::message`](crate::Plugin::message) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A member of this room sent it.
    Member(MemberId),
    /// Another room's plugin forwarded it here; the string is that room's name.
    Room(String),
    /// The server: a backend published it to the room through the admin API
    /// (`POST /admin/rooms/{room}/publish`). [`Verdict::Pass`] delivers it to every
    /// member unchanged; a plugin whose members expect a format of its own wraps it.
    Server,
}

impl Origin {
    /// The sending member, `None` for a message forwarded from another room.
    pub fn member(&self) -> Option<MemberId> {
        match self {
            Origin::Member(id) => Some(*id),
            Origin::Room(_) | Origin::Server => None,
        }
    }
}

/// A member that joined the room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The id the host assigned.
    pub id: MemberId,
    /// The query string of the member's upgrade request (without `?`).
    pub query: String,
    /// The peer's socket address, e.g. `127.0.0.1:51234`.
    pub remote_addr: String,
    /// The subprotocol agreed at the handshake, if any.
    pub protocol: Option<String>,
    /// What the handshake that accepted the connection attached (JSON text; see
    /// [`HandshakeDecision::with_identity`]), in every room the connection is in.
    pub identity: Option<String>,
    /// The join's parameters (JSON text): the `params` of a room-protocol join, or what
    /// the plugin that added the member passed to [`Room::add_to_room`](crate::Room::add_to_room).
    /// `None` for the room in the upgrade's path.
    pub params: Option<String>,
}

impl Member {
    /// The first query parameter called `name`, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(&self.query, name)
    }

    /// The identity the handshake attached, parsed as `T`; `None` when there is none
    /// or it does not parse as `T`.
    pub fn identity_json<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.identity.as_deref()?).ok()
    }

    /// The join's parameters, parsed as `T`; `None` when there are none or they do
    /// not parse as `T`.
    pub fn params_json<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.params.as_deref()?).ok()
    }
}

/// A refused join (see [`Plugin::admit`](crate::Plugin::admit)): the status and reason
/// a room-protocol client gets in its `error` reply (a raw connection is closed with
/// 1008 and the reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// A 4xx or 5xx status (anything else is sent as 403).
    pub status: u16,
    /// One line.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status` and `reason`.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal { status, reason: reason.into() }
    }
}

/// An upgrade request, before any upgrade has happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeRequest {
    /// The room name from the path, percent-decoded.
    pub room: String,
    /// The request path as sent, e.g. `/ws/chat:lobby`.
    pub path: String,
    /// The raw query string without the `?` (empty when there is none).
    pub query: String,
    /// Request headers, names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The peer's socket address, e.g. `127.0.0.1:51234`.
    pub remote_addr: String,
    /// The subprotocols the client offered in `Sec-WebSocket-Protocol`.
    pub protocols: Vec<String>,
}

impl HandshakeRequest {
    /// The first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The first query parameter called `name`, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(&self.query, name)
    }
}

/// What [`Plugin::handshake`](crate::Plugin::handshake) decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeDecision {
    /// Upgrade.
    Accept {
        /// One of the offered subprotocols to agree on, or none.
        protocol: Option<String>,
        /// JSON text the host attaches to the connection (at most 4096 bytes): every
        /// room's plugin sees it as [`Member::identity`].
        identity: Option<String>,
    },
    /// Refuse: the client gets this HTTP status (4xx or 5xx; anything else is sent
    /// as 403) and one line of reason as the body.
    Reject {
        /// The HTTP status.
        status: u16,
        /// The response body.
        reason: String,
    },
}

impl HandshakeDecision {
    /// Upgrade without selecting a subprotocol.
    pub fn accept() -> Self {
        HandshakeDecision::Accept { protocol: None, identity: None }
    }

    /// Upgrade, agreeing on `protocol` (one the client offered).
    pub fn accept_protocol(protocol: impl Into<String>) -> Self {
        HandshakeDecision::Accept { protocol: Some(protocol.into()), identity: None }
    }

    /// Attach `identity`, serialised as JSON, to the connection this accepts (a
    /// rejection stays a rejection). Every room's plugin sees it as
    /// [`Member::identity`]; keep it under 4096 bytes of JSON, or the host refuses
    /// the handshake as a plugin failure.
    pub fn with_identity<T: Serialize + ?Sized>(self, identity: &T) -> Self {
        match self {
            HandshakeDecision::Accept { protocol, .. } => HandshakeDecision::Accept {
                protocol,
                identity: Some(serde_json::to_string(identity).expect("identity serialises to JSON")),
            },
            reject => reject,
        }
    }

    /// Refuse with `status` and `reason`.
    pub fn reject(status: u16, reason: impl Into<String>) -> Self {
        HandshakeDecision::Reject { status, reason: reason.into() }
    }
}

/// Why a member left the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaveReason {
    /// The client closed the connection with a close frame.
    Client,
    /// No sign of life within the heartbeat interval plus the pong timeout.
    Heartbeat,
    /// The member's outbound queue overflowed.
    SlowConsumer,
    /// The member sent a message over the size limit.
    TooBig,
    /// The member broke the WebSocket protocol.
    Protocol,
    /// The connection was reset or hit end of file without a close frame.
    Reset,
    /// The server is shutting down.
    Shutdown,
    /// A plugin closed the member.
    ClosedByPlugin,
    /// The room's plugin failed and the room could not continue.
    PluginFailure,
}

impl LeaveReason {
    /// The reason's name, as the server's metrics and logs spell it: `client`,
    /// `heartbeat`, `slow_consumer`, `too_big`, `protocol`, `reset`, `shutdown`,
    /// `plugin`, `plugin_failure`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Heartbeat => "heartbeat",
            Self::SlowConsumer => "slow_consumer",
            Self::TooBig => "too_big",
            Self::Protocol => "protocol",
            Self::Reset => "reset",
            Self::Shutdown => "shutdown",
            Self::ClosedByPlugin => "plugin",
            Self::PluginFailure => "plugin_failure",
        }
    }
}

impl std::fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to the message a [`Plugin::message`](crate::Plugin::message) call was
/// given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Deliver it unchanged to every other member, in addition to whatever the call
    /// sent through the [`Room`](crate::Room).
    Pass,
    /// Do not deliver it; only what the call sent through the [`Room`](crate::Room)
    /// goes out.
    Drop,
}

/// The level of a line written with [`log`](crate::log()).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

/// Why a [`Room`](crate::Room) call was refused. A refused call has no effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoomError {
    /// The member is not in this room.
    UnknownMember,
    /// No room of that name is live on this host, or the name is invalid.
    UnknownRoom,
    /// The call would exceed the actions or bytes one hook call may produce.
    TooManyActions,
    /// The room already has the maximum number of pending timers.
    TooManyTimers,
    /// Close codes allowed to plugins: 1000, 1001, 1008, 1011 and 3000 to 4999.
    InvalidCloseCode,
    /// This call is not available here (e.g. from the handshake hook).
    Unavailable,
    /// An argument is malformed (e.g. join parameters that are not JSON).
    InvalidArgument,
}

impl fmt::Display for RoomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoomError::UnknownMember => "unknown member",
            RoomError::UnknownRoom => "unknown room",
            RoomError::TooManyActions => "too many actions",
            RoomError::TooManyTimers => "too many timers",
            RoomError::InvalidCloseCode => "invalid close code",
            RoomError::Unavailable => "unavailable",
            RoomError::InvalidArgument => "invalid argument",
        })
    }
}

impl std::error::Error for RoomError {}

/// The plugin's configuration: the `[config]` table of its `NAME.toml` as JSON text
/// (`{}` when there is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wraps the JSON text the host passed to `init`.
    pub fn new(json: impl Into<String>) -> Self {
        Config { json: json.into() }
    }

    /// The JSON text as the host passed it.
    pub fn as_str(&self) -> &str {
        &self.json
    }

    /// Deserializes the configuration; the error reads `invalid config: ...`, ready
    /// to return from [`Plugin::init`](crate::Plugin::init). Use
    /// `#[serde(default)]` so that `{}` gives the defaults.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(&self.json).map_err(|error| format!("invalid config: {error}"))
    }
}

/// The first parameter called `name` in a raw query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

/// Decodes `%XX` escapes and `+` (a space, as in HTML forms); a malformed escape is
/// kept as written and invalid UTF-8 becomes U+FFFD.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3).and_then(|hex| hex_pair(hex[0], hex[1])) {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_pair(high: u8, low: u8) -> Option<u8> {
    let digit = |byte: u8| (byte as char).to_digit(16);
    Some((digit(high)? * 16 + digit(low)?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_reasons_have_the_servers_names() {
        use LeaveReason::*;
        let all = [
            Client,
            Heartbeat,
            SlowConsumer,
            TooBig,
            Protocol,
            Reset,
            Shutdown,
            ClosedByPlugin,
            PluginFailure,
        ];
        let names: Vec<&str> = all.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "client",
                "heartbeat",
                "slow_consumer",
                "too_big",
                "protocol",
                "reset",
                "shutdown",
                "plugin",
                "plugin_failure"
            ]
        );
        assert_eq!(SlowConsumer.to_string(), "slow_consumer");
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let query = "name=Ada%20L%C3%B6w&x=1&flag&plus=a+b&bad=%zz%4";
        assert_eq!(query_param(query, "name").as_deref(), Some("Ada Löw"));
        assert_eq!(query_param(query, "x").as_deref(), Some("1"));
        assert_eq!(query_param(query, "flag").as_deref(), Some(""));
        assert_eq!(query_param(query, "plus").as_deref(), Some("a b"));
        assert_eq!(query_param(query, "bad").as_deref(), Some("%zz%4"));
        assert_eq!(query_param(query, "missing"), None);
        assert_eq!(query_param("", "name"), None);
    }

    #[test]
    fn headers_match_case_insensitively() {
        let request = HandshakeRequest {
            room: "r".into(),
            path: "/ws/r".into(),
            query: "token=a%2Fb".into(),
            headers: vec![("origin".into(), "https://a.example".into())],
            remote_addr: "127.0.0.1:1".into(),
            protocols: vec![],
        };
        assert_eq!(request.header("Origin"), Some("https://a.example"));
        assert_eq!(request.header("host"), None);
        assert_eq!(request.query_param("token").as_deref(), Some("a/b"));
    }

    #[test]
    fn json_round_trips_through_messages() {
        let message = Message::to_json(&serde_json::json!({"say": "hi"}));
        assert_eq!(message, Message::Text(r#"{"say":"hi"}"#.into()));
        let value: serde_json::Value = message.json().unwrap();
        assert_eq!(value["say"], "hi");
        assert!(Message::from("not json").json::<serde_json::Value>().is_err());
        assert_eq!(Message::from(&b"[1]"[..]).json::<Vec<u8>>().unwrap(), vec![1]);
    }

    #[test]
    fn config_parse_reports_errors() {
        #[derive(serde::Deserialize, Debug)]
        struct Settings {
            #[serde(default)]
            limit: u32,
        }
        assert_eq!(Config::new("{}").parse::<Settings>().unwrap().limit, 0);
        let error = Config::new("{\"limit\":\"x\"}").parse::<Settings>().unwrap_err();
        assert!(error.starts_with("invalid config: "), "{error}");
    }
}
