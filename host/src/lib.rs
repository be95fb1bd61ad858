//! Roomcast: a WebSocket room server whose room logic lives in WebAssembly components.
//!
//! [`server::run`] serves on a bound listener until a shutdown future resolves; the
//! `roomcast` binary wires [`config::Config`] to it. See `ARCHITECTURE.md` for the map.

pub mod cluster;
pub mod config;
pub mod files;
pub mod http;
pub mod metrics;
pub mod plugin;
pub mod room;
pub mod scaffold;
pub mod server;
pub mod session;
pub mod types;
pub mod units;
pub mod ws;
