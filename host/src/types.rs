//! The small types every layer shares: who a member is, what a message carries, why a
//! membership ended, and what a room may be called.

use bytes::Bytes;

/// A member of a room. The host assigns it; it is unique for the life of the host.
pub type MemberId = u64;

/// A WebSocket data message. The opcode is kept: text stays text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A text message. The bytes are valid UTF-8: whoever builds one guarantees it.
    Text(Bytes),
    Binary(Bytes),
}

impl Payload {
    /// A text payload from a string (no copy for an owned `String`).
    pub fn text(text: impl Into<String>) -> Self {
        Payload::Text(Bytes::from(text.into()))
    }

    /// A binary payload.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Payload::Binary(data.into())
    }

    /// The payload's bytes, whatever its kind.
    pub fn as_bytes(&self) -> &Bytes {
        match self {
            Payload::Text(bytes) | Payload::Binary(bytes) => bytes,
        }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

/// Why a member's session (and so its membership) ended: the `reason` label of
/// `roomcast_connections_closed_total`, the reason a plugin's `leave` hook gets, and
/// what a follower tells a room's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    Client,
    /// No sign of life within heartbeat interval + pong timeout.
    Heartbeat,
    /// The member's outbound queue overflowed (close 1008).
    SlowConsumer,
    /// A message over `max_message_bytes` (close 1009).
    TooBig,
    /// A protocol or UTF-8 error (close 1002 / 1007).
    Protocol,
    /// TCP error, or end of file without a close frame.
    Reset,
    /// The server is shutting down (close 1001).
    Shutdown,
    /// A plugin closed the member.
    Plugin,
    /// The room's plugin failed and the room could not continue (close 1011).
    PluginFailure,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        Self::Client,
        Self::Heartbeat,
        Self::SlowConsumer,
        Self::TooBig,
        Self::Protocol,
        Self::Reset,
        Self::Shutdown,
        Self::Plugin,
        Self::PluginFailure,
    ];

    /// The reason's name: its `/metrics` label, and what a plugin's `leave` is told.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Heartbeat => "heartbeat",
            Self::SlowConsumer => "slow_consumer",
            Self::TooBig => "too_big",
            Self::Protocol => "protocol",
            Self::Reset => "reset",
            Self::Shutdown => "shutdown",
            Self::Plugin => "plugin",
            Self::PluginFailure => "plugin_failure",
        }
    }

    /// The reason's position in [`Self::ALL`]: its one-byte form on the cluster wire.
    pub fn index(self) -> u8 {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8
    }

    /// The reason at `index` in [`Self::ALL`].
    pub fn from_index(index: u8) -> Option<Self> {
        Self::ALL.get(usize::from(index)).copied()
    }
}

/// Whether `name` is a valid room name: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
pub fn valid_room_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(is_room_byte)
}

/// Whether `byte` may appear in a room name.
pub fn is_room_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_round_trip_through_their_index() {
        for reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_index(reason.index()), Some(reason));
        }
        assert_eq!(CloseReason::from_index(CloseReason::ALL.len() as u8), None);
    }
}
