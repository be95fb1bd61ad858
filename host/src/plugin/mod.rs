//! The plugin runtime: wasmtime engine, one sandboxed instance per live room.
//!
//! This module is the seam between the host and room plugins. Everything the rest of
//! the host needs is re-exported here as Roomcast's own types; only `bindings.rs` names
//! the types that `wasmtime::component::bindgen!` generates from `wit/roomcast.wit`.
//!
//! Reading order, top-down like wasmtime's embedding docs:
//!
//! - `bindings.rs`: the WIT world, the host side of the `room` interface, conversions;
//! - `runtime.rs`: the engines (Cranelift's and Winch's; epoch interruption,
//!   single-threaded compiles), the epoch ticker, compiling and linking a plugin file,
//!   `roomcast plugin check`;
//! - `source.rs`: reading a plugin's `NAME.wasm` and `NAME.toml`, once, regular files
//!   only and bounded in size;
//! - `manifest.rs`: the optional `NAME.toml` beside a plugin;
//! - `instance.rs`: a loaded [`Plugin`], the per-room [`RoomInstance`], the store data
//!   that records a call's actions and enforces the per-call limits;
//! - `set.rs`: a folder of plugins and the room → plugin matching.
//!
//! Architecture invariants:
//!
//! - Every call into a guest runs under an epoch deadline and a per-store memory cap.
//!   A failed call (trap, timeout, memory) has no effect: the actions it recorded are
//!   discarded and the instance refuses further calls. The caller makes a new one.
//! - Deadlines are measured in 1 ms epoch ticks of wall-clock time (the ticker thread
//!   wakes once per shortest deadline while calls are short, every tick while one
//!   runs, and once a minute while none has run for 100 ms), but a
//!   call that reaches its deadline while its thread mostly waited for a CPU gets
//!   another window (see `HostState::deadline_reached`): a spinning guest is stopped
//!   after about two deadlines of CPU time, a preempted honest one is not failed.
//!   Hooks that run per event
//!   (`handshake`, `join`, `leave`, `message`, `timer`) get the plugin's deadline;
//!   the once-per-instance calls (instantiation, `init`, `describe`, `snapshot`,
//!   `restore`) get the host's largest deadline, so that a preempted thread on a busy
//!   machine does not make a room impossible to create.
//! - Plugins get the `room` interface and nothing else: every other import (the
//!   `wasi:*` interfaces Rust's std declares) traps, except `wasi:random/*`, which is
//!   answered from a per-store generator seeded by the host (so `HashMap::new()`
//!   works in a guest). An import from another `roomcast:plugin` version, or from any
//!   other package, fails the load.
//! - The engine reserves only the largest allowed memory per linear memory (not 4 GiB)
//!   and maps memories without a copy-on-write image or a leading guard: a live
//!   instance costs two memory mappings, so tens of thousands of rooms stay under the
//!   kernel's 65,530.
//! - One call produces at most [`MAX_ACTIONS_PER_CALL`] actions carrying at most
//!   [`MAX_ACTION_BYTES_PER_CALL`] bytes; a room has at most [`MAX_TIMERS_PER_ROOM`]
//!   pending timers. Past a bound the import returns an error and records nothing.

mod bindings;
mod error;
mod instance;
mod manifest;
pub mod reload;
mod runtime;
mod sandbox;
mod set;
mod source;
mod state;

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;
use std::time::Duration;

pub use crate::types::{MemberId, Payload};
pub use error::{FailureKind, PluginError};
pub use instance::{Compiler, Plugin, RoomInstance};
pub use runtime::{CheckReport, PluginRuntime, WIT_PACKAGE};
pub use set::{PluginSet, RoomPattern};
pub use source::{MAX_MANIFEST_BYTES, MAX_PLUGIN_BYTES, PluginSource, SourceError};

/// The most actions (sends, broadcasts, forwards, closes, timer changes) one hook call
/// may produce. Past it the `room` imports answer `too-many-actions`.
pub const MAX_ACTIONS_PER_CALL: usize = 10_000;
/// The most payload bytes one hook call may hand to the `room` imports.
pub const MAX_ACTION_BYTES_PER_CALL: usize = 16 << 20;
/// The most timers one room's instance may have pending at once.
pub const MAX_TIMERS_PER_ROOM: usize = 256;
/// The longest close reason a plugin may give (a close frame's payload is at most 125
/// bytes, two of which are the code). Longer reasons are truncated on a char boundary.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// Where a message handed to [`RoomInstance::message`] comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A member of this room sent it.
    Member(MemberId),
    /// Another room's plugin forwarded it here; the string is that room's name.
    Room(String),
    /// The server itself: a backend published it through the admin API. Plugins see
    /// it as a forward from a room with an empty name (no room has one).
    Server,
}

/// An upgrade request, before any upgrade has happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// A plugin's answer to a [`HandshakeRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeDecision {
    /// Upgrade, optionally with one of the subprotocols the client offered (checked),
    /// attaching `identity` (JSON text of at most [`MAX_IDENTITY_BYTES`], checked) to
    /// the connection.
    Accept { protocol: Option<String>, identity: Option<String> },
    /// Refuse with this HTTP status (always 4xx or 5xx: anything else became 403) and a
    /// one-line reason (line breaks become spaces; cut at 512 bytes).
    Reject { status: u16, reason: String },
}

/// What the host tells a room about a member that joins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: MemberId,
    /// The query string of the member's upgrade request (without `?`).
    pub query: String,
    pub remote_addr: String,
    /// The subprotocol agreed at the handshake, if any.
    pub protocol: Option<String>,
    /// What the handshake attached to the connection (JSON text), if anything.
    pub identity: Option<Arc<str>>,
    /// The join's parameters (JSON text), if any: a room-protocol join's `params`, or
    /// what the plugin that added the member passed.
    pub params: Option<Arc<str>>,
}

/// A plugin refused a member's join: the status (4xx or 5xx; anything else became 403)
/// and a one-line reason (cut at [`MAX_CLOSE_REASON_BYTES`], so that it also fits a
/// close frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

/// The most bytes of JSON a handshake may attach to a connection as its identity.
pub const MAX_IDENTITY_BYTES: usize = 4096;
/// The most bytes of JSON a plugin may pass as the parameters of a join it asks for.
pub const MAX_PARAMS_BYTES: usize = 4096;

/// What happens to the message a `message` call was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it unchanged to every other member, besides the call's actions.
    Pass,
    /// Do not deliver it; only the call's actions go out.
    Drop,
}

/// Something a plugin asked for during a successful call, in the order it asked.
/// Every action has been validated against the [`RoomView`] the call was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: MemberId,
        payload: Payload,
    },
    Broadcast {
        payload: Payload,
        except: Vec<MemberId>,
    },
    Forward {
        room: String,
        payload: Payload,
    },
    /// `code` is one of 1000, 1001, 1008, 1011 or 3000..=4999; `reason` is at most
    /// [`MAX_CLOSE_REASON_BYTES`] bytes.
    Close {
        member: MemberId,
        code: u16,
        reason: String,
    },
    /// Add `member` (of this room) to room `room` as well; that room's plugin decides.
    /// `room` is a valid room name; `params` is JSON text of at most
    /// [`MAX_PARAMS_BYTES`].
    AddToRoom {
        member: MemberId,
        room: String,
        params: Option<String>,
    },
    /// End `member`'s membership of this room, keeping its connection (code 1000);
    /// `reason` is at most [`MAX_CLOSE_REASON_BYTES`] bytes.
    Remove {
        member: MemberId,
        reason: String,
    },
    /// Call [`RoomInstance::timer`] with `id` after `after`.
    SetTimer {
        id: u64,
        after: Duration,
    },
    /// The pending timer `id` was cancelled. Firing it anyway is harmless:
    /// [`RoomInstance::timer`] ignores ids that are no longer pending.
    CancelTimer {
        id: u64,
    },
}

/// Whether a room of this name is live on this host (for `forward`).
///
/// It is an `Arc` rather than a borrowed closure because the `room` imports run inside
/// wasmtime's store, whose data must be `'static`: the instance keeps a clone and only
/// replaces it when a call brings a different `Arc` (a pointer comparison per call).
pub type RoomExists = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What the instance may know about its room during a call (the host builds it per
/// call, cheaply).
#[derive(Clone, Copy)]
pub struct RoomView<'a> {
    /// The room's name.
    pub room: &'a str,
    /// The room's members in join order.
    pub members: &'a [MemberId],
    /// Whether a room is live, for `forward`.
    pub room_exists: &'a RoomExists,
}

impl std::fmt::Debug for RoomView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomView")
            .field("room", &self.room)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// What a plugin's `describe` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
}

/// Per-plugin limits, from `[limits]` in `NAME.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest one call into the plugin may run (default 10 ms).
    pub deadline: Duration,
    /// The most linear memory one instance may have, in bytes (default 32 MiB).
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { deadline: Duration::from_millis(10), memory: 32 << 20 }
    }
}

/// `[history]` in a plugin's `NAME.toml`: its rooms keep their last `size` broadcasts
/// for `ttl`, for clients that come back with `since`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistorySettings {
    pub size: usize,
    pub ttl: Duration,
}

impl HistorySettings {
    /// How long a message is kept when `ttl` is not set.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
}

/// The most any plugin may ask for in its `[limits]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCaps {
    /// The longest deadline a plugin may set (default 1 s).
    pub max_deadline: Duration,
    /// The most memory a plugin may set (default 256 MiB). Also the address space
    /// reserved per linear memory, so that memories never move.
    pub max_memory: u64,
}

impl Default for HostCaps {
    fn default() -> Self {
        HostCaps { max_deadline: Duration::from_secs(1), max_memory: 256 << 20 }
    }
}

impl HostCaps {
    /// The limits a plugin gets when its `NAME.toml` sets none: [`Limits::default`],
    /// lowered to the caps if they are smaller.
    pub fn default_limits(&self) -> Limits {
        let limits = Limits::default();
        Limits {
            deadline: limits.deadline.min(self.max_deadline),
            memory: limits.memory.min(self.max_memory),
        }
    }
}
