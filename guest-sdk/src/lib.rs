//! The guest SDK for Roomcast plugins: one trait ([`Plugin`]) and one macro
//! ([`export!`]) turn a Rust type into a room plugin component.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2`. The host creates one
//! instance per live room (plus one that holds no room and only answers handshakes),
//! calls [`Plugin::init`] once with the plugin's configuration, then one hook at a
//! time. Every hook but `init` has a default, so a plugin implements only what it
//! needs. Hooks that run in a room get a [`Room`] to send, broadcast, forward, close
//! members, move them into other rooms and set timers; what they send is applied when
//! the hook returns.
//!
//! Who is who: [`Plugin::handshake`] may attach an identity to a connection
//! ([`HandshakeDecision::with_identity`]), which every room's plugin then reads as
//! [`Member::identity`]; [`Plugin::admit`] decides each join with the room's state, that
//! identity and the join's [`params`](Member::params). The SDK targets the WIT contract
//! `roomcast:plugin@0.2.0`.
//!
//! # Example
//!
//! A complete plugin: members send `{"say":"..."}`, everybody gets
//! `{"from":<id>,"text":"..."}`, and anything else is dropped with a warning.
//!
//! ```no_run
//! use roomcast_guest::{Config, Member, Message, Origin, Plugin, Room, Verdict};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Say {
//!     say: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Said<'a> {
//!     from: u64,
//!     text: &'a str,
//! }
//!
//! #[derive(Default)]
//! struct Shout {
//!     said: u64,
//! }
//!
//! impl Plugin for Shout {
//!     // The one hook without a default: build the state from the config JSON.
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(Self::default())
//!     }
//!
//!     fn join(&mut self, room: &Room, member: Member) {
//!         roomcast_guest::info!("{} joined {}", member.id, room.name());
//!     }
//!
//!     fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
//!         let Some(id) = from.member() else {
//!             return Verdict::Pass;
//!         };
//!         match message.json::<Say>() {
//!             Ok(say) => {
//!                 self.said += 1;
//!                 let text = say.say.to_uppercase();
//!                 // A refused call (e.g. over the action budget) has no effect.
//!                 let _ = room.broadcast_json(&Said { from: id, text: &text });
//!             }
//!             Err(error) => roomcast_guest::warn!("member {id} sent bad JSON: {error}"),
//!         }
//!         Verdict::Drop
//!     }
//!
//!     // Hand the state to the next version of the plugin on a hot reload.
//!     fn snapshot(&self) -> Option<Vec<u8>> {
//!         Some(self.said.to_le_bytes().to_vec())
//!     }
//!
//!     fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
//!         let bytes = state.try_into().map_err(|_| "expected 8 bytes".to_string())?;
//!         self.said = u64::from_le_bytes(bytes);
//!         Ok(())
//!     }
//! }
//!
//! roomcast_guest::export!(Shout);
//! # fn main() {}
//! ```
//!
//! The crate's `Cargo.toml` needs `crate-type = ["cdylib"]`; then
//! `cargo build --release --target wasm32-wasip2` writes `NAME.wasm`, which the
//! server loads from its plugins folder.
//!
//! # What a plugin cannot do
//!
//! The host gives a plugin nothing but the WIT `room` interface and defines every WASI
//! import as a trap (except `wasi:random`). So:
//!
//! - `println!`, `eprintln!` and `dbg!` trap: use [`log()`] or the [`info!`] family.
//!   A panic is logged at error level through [`log()`] (the SDK installs a panic
//!   hook in `init`), then the instance traps and the host reports the failure.
//! - `std::time` and `std::thread::sleep` trap: [`Room::now`] is the clock and
//!   [`Room::set_timer`] the way to act later.
//! - `std::collections::HashMap::new()` and `HashSet::new()` work: the host answers
//!   the `wasi:random` imports their seed comes from (from a per-instance generator),
//!   and that is the only WASI the host provides.
//! - An allocation the host's memory cap refuses makes std write to stderr, which
//!   traps; the room's instance is gone either way.
//! - Files, sockets, environment variables and threads are unavailable.
//!
//! State lives in the plugin value itself: the SDK keeps it for the instance between
//! hooks. The handshake hook runs on an instance that holds no room state, so
//! [`Plugin::handshake`] should decide from the configuration and the request alone.
//!
//! # Instances and their life
//!
//! - **One instance per live room**, created with the room's first member (`init`,
//!   then a `join` per member) and dropped when the room empties.
//! - **The handshake instance.** Upgrade requests are answered by separate instances
//!   that never see a room: `init` runs there too (with the same configuration), but
//!   [`Room`] calls return [`RoomError::Unavailable`], so a timer `init` tries to set
//!   there is refused. Keep `init` free of side effects that need a room, or ignore
//!   that error.
//! - **A failed call** (trap, panic, deadline, memory cap) discards what the call sent
//!   and the instance; the room continues on a fresh one, which gets `init` and a
//!   `join` for every current member.
//! - **A reload** (a new file in the plugins folder) calls the old version's
//!   [`snapshot`](Plugin::snapshot), then the new version's `init` and
//!   [`restore`](Plugin::restore). After a successful `restore` the joins are **not**
//!   replayed: whatever `join` built must be in the snapshot, or be rebuilt from
//!   [`Room::members`] at the next hook. Without a snapshot, or when `restore` returns
//!   `Err`, the new version gets a `join` per current member instead. Timers do not
//!   carry over.
//! - **The version** a plugin reports (in the server's log and `/admin/plugins`'
//!   `describe`) is its crate's `CARGO_PKG_NAME` and `CARGO_PKG_VERSION`, which
//!   [`export!`] reads.
//!
//! # Installing a new version
//!
//! Copy the `.wasm` over the old file, or (safer) write it to a name the server ignores
//! and rename it into place: names that start with `.` or `#`, end with `~`, or do not
//! end in `.wasm` or `.toml` (`chat.wasm.part`, `.chat.wasm`) are never loaded. Any
//! other `NAME.wasm` is a plugin of its own: `chat-new.wasm` briefly serves the rooms
//! `chat-new` and `chat-new:*` while it exists.

#![warn(missing_docs)]

mod room;
mod runtime;
mod types;

pub use room::{Room, log};
pub use types::{
    Config, HandshakeDecision, HandshakeRequest, LeaveReason, LogLevel, Member, MemberId, Message, Origin,
    Refusal, RoomError, TimerId, Verdict,
};

/// The JSON crate the SDK uses; its [`Error`](serde_json::Error) is what
/// [`Message::json`] returns, and its `json!` macro builds ad-hoc replies.
pub use serde_json;

/// A room plugin. Implement it for the type that holds the plugin's state and export
/// that type with [`export!`].
///
/// Every method but [`init`](Plugin::init) has a default: accept every handshake,
/// ignore joins, leaves and timers, pass every message on, and keep no state across
/// reloads.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin's state from the `[config]` table of its `NAME.toml`, handed
    /// over as JSON (`{}` when there is none; see [`Config::parse`]). Runs once per
    /// instance, before any other hook. An `Err` fails the instance with that message,
    /// which the host reports.
    ///
    /// A plugin whose state is [`Default`] writes `Ok(Self::default())`; one whose state
    /// is its configuration derives `Deserialize` and writes `config.parse()`.
    fn init(config: Config) -> Result<Self, String>;

    /// Decides an upgrade request for a room this plugin serves. Runs on an instance
    /// that holds no room state (only what `init` built), so the [`Room`] is not
    /// available. The default accepts without choosing a subprotocol.
    fn handshake(&self, request: &HandshakeRequest) -> HandshakeDecision {
        let _ = request;
        HandshakeDecision::accept()
    }

    /// Decides whether `member` may join the room, before [`join`](Plugin::join): with
    /// the room's state, the member's [`identity`](Member::identity) and the join's
    /// [`params`](Member::params). The member is in [`Room::members`] while this runs;
    /// a refused one is then removed without `join` or `leave`, and what this hook
    /// sent to it is not delivered. The default admits everyone.
    fn admit(&mut self, room: &Room, member: &Member) -> Result<(), Refusal> {
        let _ = (room, member);
        Ok(())
    }

    /// A member joined the room. It is already in [`Room::members`].
    fn join(&mut self, room: &Room, member: Member) {
        let _ = (room, member);
    }

    /// A member left the room. It is no longer in [`Room::members`].
    fn leave(&mut self, room: &Room, member: MemberId, reason: LeaveReason) {
        let _ = (room, member, reason);
    }

    /// A data message arrived from a member of this room or was forwarded from another
    /// room. Return [`Verdict::Pass`] to deliver it unchanged to every other member,
    /// or [`Verdict::Drop`] to deliver only what the hook sent through `room`. The
    /// default passes.
    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        let _ = (room, from, message);
        Verdict::Pass
    }

    /// A timer set with [`Room::set_timer`] fired.
    fn timer(&mut self, room: &Room, timer: TimerId) {
        let _ = (room, timer);
    }

    /// The room's state for the next version of the plugin on a hot reload; `None`
    /// (the default) when it keeps none.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }

    /// Takes over the state a previous version returned from
    /// [`snapshot`](Plugin::snapshot). Called right after `init` on the new version's
    /// instance; an `Err` says the state was not taken over, with the reason.
    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}

/// Exports a [`Plugin`] type as the component's implementation of the
/// `roomcast:plugin/room-plugin` world. Use it once, at the crate's top level:
///
/// ```no_run
/// # use roomcast_guest::{Config, Plugin};
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     fn init(_config: Config) -> Result<Self, String> {
/// #         Ok(MyPlugin)
/// #     }
/// # }
/// roomcast_guest::export!(MyPlugin);
/// # fn main() {}
/// ```
///
/// The plugin's `describe` answer is the crate's `CARGO_PKG_NAME` and
/// `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[allow(unsafe_code)]
        const _: () = {
            impl $crate::__private::Describe for $plugin {
                const NAME: &'static str = ::core::env!("CARGO_PKG_NAME");
                const VERSION: &'static str = ::core::env!("CARGO_PKG_VERSION");
            }
            type RoomcastExport = $crate::__private::Export<$plugin>;
            $crate::__private::bindings::__export_bindings!(
                RoomcastExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Logs a formatted line at [`LogLevel::Trace`] (see [`log()`]).
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Trace, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at [`LogLevel::Debug`] (see [`log()`]).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Debug, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at [`LogLevel::Info`] (see [`log()`]).
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Info, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at [`LogLevel::Warn`] (see [`log()`]).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Warn, &::std::format!($($arg)+)) };
}

/// Logs a formatted line at [`LogLevel::Error`] (see [`log()`]).
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log($crate::LogLevel::Error, &::std::format!($($arg)+)) };
}

#[doc(hidden)]
pub mod __private {
    //! What [`export!`](crate::export) expands to; not part of the API.
    pub use crate::runtime::{Describe, Export, bindings};
}
