//! The room protocol `roomcast.v1` on the wire: what a client in room-protocol mode
//! sends (join, leave, send; binary messages behind a room prefix) and what it is sent
//! (joined, left, error, and each room's messages tagged with the room). Parsing and
//! encoding only, as DESIGN.md's "The room protocol" describes them.
//!
//! A text frame is one JSON object with exactly one operation (`join`, `leave`,
//! `send`); fields it does not know are ignored. A frame that is not such an object is
//! a protocol error ([`NotAnOperation`]: the connection closes with 1002). A known
//! operation with a bad field (a room name that is not one, a `send` without `text`,
//! two operations at once) is a [`Refusal`]: the client gets an `error` reply and the
//! connection stays up.
//!
//! The hot path is a `send`: it is parsed into borrowed strings (no allocation unless
//! the client escaped characters), and a room's delivery is encoded once for every
//! member in this mode ([`text_delivery`], [`binary_delivery`]).

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::types::valid_room_name;
use crate::ws::frame::{self, OP_BINARY, OP_TEXT};

/// The subprotocol a client offers to speak the room protocol.
pub const SUBPROTOCOL: &str = crate::ws::handshake::ROOM_PROTOCOL;

/// The longest room name a binary message's one-byte prefix can carry.
pub const MAX_PREFIXED_ROOM: usize = u8::MAX as usize;

/// A recovery position: the room's history epoch and the last offset the client saw.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// One operation from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Join {
        room: Cow<'a, str>,
        reference: Option<u64>,
        /// Handed to the room's plugin as they came (a JSON value).
        params: Option<&'a str>,
        since: Option<Since>,
    },
    Leave {
        room: Cow<'a, str>,
        reference: Option<u64>,
    },
    Send {
        room: Cow<'a, str>,
        text: Cow<'a, str>,
        reference: Option<u64>,
    },
}

/// A known operation the server will not carry out: the client gets
/// `{"error": reason, "status": status, "ref": reference}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Cow<'static, str>,
    pub status: u16,
    pub reference: Option<u64>,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>, reference: Option<u64>) -> Self {
        Self { reason: reason.into(), status, reference }
    }

    /// The `error` reply, as a text frame.
    pub fn frame(&self) -> Bytes {
        error(&self.reason, self.status, self.reference)
    }
}

/// A frame that is not a JSON object with a known operation (or a binary message
/// without a whole room prefix): the connection closes with 1002.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a room-protocol operation")]
pub struct NotAnOperation;

/// A JSON string, borrowed from the frame unless it had escapes. (serde borrows a
/// `Cow<str>` only as a field of its own, not inside an `Option`.)
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    join: Option<Str<'a>>,
    #[serde(borrow, default)]
    leave: Option<Str<'a>>,
    #[serde(borrow, default)]
    send: Option<Str<'a>>,
    #[serde(borrow, default)]
    text: Option<Str<'a>>,
    #[serde(rename = "ref", default)]
    reference: Option<u64>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    since: Option<Since>,
}

const OPERATIONS: [&str; 3] = ["join", "leave", "send"];

/// Parse one text frame (already checked to be UTF-8).
pub fn parse(text: &str) -> Result<Result<Request<'_>, Refusal>, NotAnOperation> {
    let Ok(envelope) = serde_json::from_str::<Envelope<'_>>(text) else {
        return refuse_malformed(text);
    };
    let Envelope { join, leave, send, text, reference, params, since } = envelope;
    let (join, leave, send, text) =
        (join.map(|s| s.0), leave.map(|s| s.0), send.map(|s| s.0), text.map(|s| s.0));
    let refuse = |status, reason: &'static str| Ok(Err(Refusal::new(status, reason, reference)));
    let room_ok = |room: &str| valid_room_name(room);
    match (join, leave, send) {
        (Some(room), None, None) => {
            if !room_ok(&room) {
                return refuse(400, "bad room name");
            }
            Ok(Ok(Request::Join { room, reference, params: params.map(RawValue::get), since }))
        }
        (None, Some(room), None) => {
            if !room_ok(&room) {
                return refuse(400, "bad room name");
            }
            Ok(Ok(Request::Leave { room, reference }))
        }
        (None, None, Some(room)) => {
            if !room_ok(&room) {
                return refuse(400, "bad room name");
            }
            match text {
                Some(text) => Ok(Ok(Request::Send { room, text, reference })),
                None => refuse(400, "a send needs a text"),
            }
        }
        (None, None, None) => Err(NotAnOperation),
        _ => refuse(400, "one operation per frame"),
    }
}

/// A frame the typed parse refused: an object naming a known operation is refused
/// with 400 (a field of the wrong type); anything else is not an operation.
fn refuse_malformed(text: &str) -> Result<Result<Request<'_>, Refusal>, NotAnOperation> {
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(text) else {
        return Err(NotAnOperation);
    };
    if !OPERATIONS.iter().any(|op| object.contains_key(*op)) {
        return Err(NotAnOperation);
    }
    let reference = object.get("ref").and_then(serde_json::Value::as_u64);
    Ok(Err(Refusal::new(400, "malformed operation", reference)))
}

/// Split a binary message into its room and payload: one byte L, L bytes of room
/// name, then the payload.
pub fn parse_binary(message: &[u8]) -> Result<Result<(&str, &[u8]), Refusal>, NotAnOperation> {
    let (&len, rest) = message.split_first().ok_or(NotAnOperation)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(NotAnOperation);
    }
    let (name, payload) = rest.split_at(len);
    match std::str::from_utf8(name) {
        Ok(room) if valid_room_name(room) => Ok(Ok((room, payload))),
        _ => Ok(Err(Refusal::new(400, "bad room name", None))),
    }
}

/// `{"joined": room, "ref": N}`, with the room's history position (`epoch`,
/// `offset`) when it keeps history and `recovered` when the join asked for it.
pub fn joined(
    room: &str,
    reference: Option<u64>,
    history: Option<(&str, u64)>,
    recovered: Option<bool>,
) -> Bytes {
    let mut json = JsonObject::new();
    json.string("joined", room);
    json.reference(reference);
    if let Some((epoch, offset)) = history {
        json.string("epoch", epoch);
        json.number("offset", offset);
    }
    if let Some(recovered) = recovered {
        json.raw("recovered", if recovered { "true" } else { "false" });
    }
    json.text_frame()
}

/// `{"left": room, "code": C, "reason": R}`, with the `ref` of the client's leave.
pub fn left(room: &str, code: u16, reason: &str, reference: Option<u64>) -> Bytes {
    let mut json = JsonObject::new();
    json.string("left", room);
    json.reference(reference);
    json.number("code", u64::from(code));
    json.string("reason", reason);
    json.text_frame()
}

/// `{"error": reason, "status": S, "ref": N}`.
pub fn error(reason: &str, status: u16, reference: Option<u64>) -> Bytes {
    let mut json = JsonObject::new();
    json.string("error", reason);
    json.number("status", u64::from(status));
    json.reference(reference);
    json.text_frame()
}

/// `{"error": reason, "status": S, "room": room, "ref": N}`: a join of `room` was
/// refused (`ref` is absent when a plugin asked for the join).
pub fn refused(room: &str, reason: &str, status: u16, reference: Option<u64>) -> Bytes {
    let mut json = JsonObject::new();
    json.string("error", reason);
    json.number("status", u64::from(status));
    json.string("room", room);
    json.reference(reference);
    json.text_frame()
}

/// A room's text message for every member in this mode, encoded once:
/// `{"room": room, "text": text}`, with `offset` when the room keeps history.
pub fn text_delivery(room: &str, text: &str, offset: Option<u64>) -> Bytes {
    let mut json = JsonObject::new();
    json.string("room", room);
    json.string("text", text);
    if let Some(offset) = offset {
        json.number("offset", offset);
    }
    json.text_frame()
}

/// A room's binary message for every member in this mode, encoded once: the room
/// prefix, then the payload. `None` if the room's name does not fit the prefix.
pub fn binary_delivery(room: &str, payload: &[u8]) -> Option<Bytes> {
    let len = u8::try_from(room.len()).ok()?;
    let mut body = BytesMut::with_capacity(1 + room.len() + payload.len());
    body.put_u8(len);
    body.put_slice(room.as_bytes());
    body.put_slice(payload);
    Some(frame::encode(OP_BINARY, &body))
}

/// A JSON object written field by field, strings escaped by serde_json.
struct JsonObject(Vec<u8>);

impl JsonObject {
    fn new() -> Self {
        Self(Vec::with_capacity(64))
    }

    fn key(&mut self, key: &str) {
        self.0.push(if self.0.is_empty() { b'{' } else { b',' });
        self.0.push(b'"');
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        // Writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut self.0, value);
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0.extend_from_slice(value.to_string().as_bytes());
    }

    fn raw(&mut self, key: &str, value: &str) {
        self.key(key);
        self.0.extend_from_slice(value.as_bytes());
    }

    fn reference(&mut self, reference: Option<u64>) {
        if let Some(reference) = reference {
            self.number("ref", reference);
        }
    }

    fn text_frame(mut self) -> Bytes {
        self.0.push(b'}');
        frame::encode(OP_TEXT, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn request(text: &str) -> Request<'_> {
        parse(text).expect("an operation").expect("accepted")
    }

    fn refusal(text: &str) -> Refusal {
        parse(text).expect("an operation").expect_err("refused")
    }

    /// The JSON in a text frame this module encoded (short frames: 2-byte header, or
    /// 4 with a 16-bit length).
    fn json_of(frame: &Bytes) -> Value {
        assert_eq!(frame[0], 0x80 | OP_TEXT);
        let at = if frame[1] & 0x7f == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[at..]).expect("valid JSON")
    }

    #[test]
    fn the_three_operations_parse_with_their_fields() {
        assert_eq!(
            request(
                r#"{"join":"chat:lobby","ref":1,"params":{"name":"ada"},"since":{"epoch":"e1","offset":7}}"#
            ),
            Request::Join {
                room: "chat:lobby".into(),
                reference: Some(1),
                params: Some(r#"{"name":"ada"}"#),
                since: Some(Since { epoch: "e1".into(), offset: 7 }),
            }
        );
        assert_eq!(
            request(r#"{"leave":"a","ref":2}"#),
            Request::Leave { room: "a".into(), reference: Some(2) }
        );
        assert_eq!(
            request(r#"{"send":"a","text":"hi \"you\"","x-unknown":[1]}"#),
            Request::Send { room: "a".into(), text: "hi \"you\"".into(), reference: None }
        );
    }

    #[test]
    fn a_send_without_escapes_borrows_its_text() {
        let Request::Send { text, room, .. } = request(r#"{"send":"a","text":"plain"}"#) else { panic!() };
        assert!(matches!((text, room), (Cow::Borrowed("plain"), Cow::Borrowed("a"))));
    }

    #[test]
    fn known_operations_with_bad_fields_are_refused_not_closed() {
        for (text, reason) in [
            (r#"{"join":"bad name!","ref":3}"#, "bad room name"),
            (r#"{"send":"a","ref":3}"#, "a send needs a text"),
            (r#"{"join":"a","leave":"a","ref":3}"#, "one operation per frame"),
            (r#"{"join":5,"ref":3}"#, "malformed operation"),
            (r#"{"send":"a","text":7,"ref":3}"#, "malformed operation"),
        ] {
            assert_eq!(refusal(text), Refusal::new(400, reason, Some(3)), "{text}");
        }
        assert_eq!(refusal(&format!(r#"{{"leave":"{}"}}"#, "a".repeat(129))).reason, "bad room name");
    }

    #[test]
    fn anything_else_is_not_an_operation() {
        for text in ["", "hello", "[]", "7", r#"{"ref":1}"#, r#"{"publish":"a"}"#, r#"{"join":"a""#] {
            assert_eq!(parse(text), Err(NotAnOperation), "{text:?}");
        }
    }

    #[test]
    fn binary_messages_carry_their_room_in_a_prefix() {
        assert_eq!(parse_binary(b"\x04chat\x00\x01"), Ok(Ok(("chat", &b"\x00\x01"[..]))));
        assert_eq!(parse_binary(b"\x01a"), Ok(Ok(("a", &b""[..]))));
        assert_eq!(parse_binary(b""), Err(NotAnOperation));
        assert_eq!(parse_binary(b"\x05chat"), Err(NotAnOperation));
        assert_eq!(
            parse_binary(b"\x02\xff\xfe").map(|r| r.map_err(|e| e.reason)),
            Ok(Err("bad room name".into()))
        );
        assert_eq!(parse_binary(b"\x00payload").map(|r| r.map_err(|e| e.status)), Ok(Err(400)));
    }

    #[test]
    fn replies_are_the_documented_json() {
        assert_eq!(json_of(&joined("a", Some(1), None, None)), json!({"joined": "a", "ref": 1}));
        assert_eq!(
            json_of(&joined("a", None, Some(("e\"1", 9)), Some(false))),
            json!({"joined": "a", "epoch": "e\"1", "offset": 9, "recovered": false})
        );
        assert_eq!(
            json_of(&left("a", 4000, "kicked: \u{1F600}", Some(5))),
            json!({"left": "a", "ref": 5, "code": 4000, "reason": "kicked: \u{1F600}"})
        );
        assert_eq!(
            json_of(&error("bad room name", 400, None)),
            json!({"error": "bad room name", "status": 400})
        );
        assert_eq!(
            json_of(&Refusal::new(403, "no", Some(2)).frame()),
            json!({"error": "no", "status": 403, "ref": 2})
        );
    }

    #[test]
    fn deliveries_escape_any_text_and_round_trip() {
        let text = "line\nbreak \"quoted\" \\ tab\t \u{0} é 😀";
        let frame = text_delivery("chat:lobby", text, Some(42));
        assert_eq!(json_of(&frame), json!({"room": "chat:lobby", "text": text, "offset": 42}));
        let long = "x".repeat(300);
        assert_eq!(json_of(&text_delivery("a", &long, None)), json!({"room": "a", "text": long}));
    }

    #[test]
    fn a_binary_delivery_parses_back_to_its_room_and_payload() {
        let frame = binary_delivery("game:7", b"\x01\x02\x03").expect("fits");
        assert_eq!(frame[0], 0x80 | OP_BINARY);
        let body = &frame[2..];
        assert_eq!(parse_binary(body), Ok(Ok(("game:7", &b"\x01\x02\x03"[..]))));
        assert_eq!(binary_delivery(&"a".repeat(MAX_PREFIXED_ROOM + 1), b""), None);
    }
}
