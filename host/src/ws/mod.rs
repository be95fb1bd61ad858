//! The WebSocket layer: RFC 6455 framing, the upgrade's validation, the socket a
//! session reads and writes, the heartbeat, and each member's outbound queue. Nothing
//! here knows about rooms or plugins; [`crate::session`] joins a connection to its
//! rooms on top of it.

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod heartbeat;
pub mod outbound;
pub mod transport;
