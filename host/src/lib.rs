//! Roomcast: a WebSocket room server whose room logic lives in WebAssembly components.
//!
//! [`server::run`] serves on a bound listener until a shutdown future resolves; the
//! `roomcast` binary wires [`config::Config`] to it. See `ARCHITECTURE.md` for the map.
//!
//! Public are the modules the binary and the tests use (configuration, the server,
//! the plugin runtime for `plugin check`, the scaffold, the wire-level WebSocket
//! pieces and the room protocol's codec, the shared types and metric labels, the
//! cluster's Redis keys and record format, which tests speak as a node would); the
//! rest is the crate's own.

pub mod cluster;
pub mod config;
pub(crate) mod files;
pub(crate) mod http;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub(crate) mod room;
pub mod scaffold;
pub mod server;
pub(crate) mod session;
pub mod types;
pub(crate) mod units;
pub mod ws;
