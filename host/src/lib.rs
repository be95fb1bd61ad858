//! Roomcast: a WebSocket room server whose room logic lives in WebAssembly components.
//!
//! [`server::run`] serves on a bound listener until a shutdown future resolves; the
//! `roomcast` binary wires [`config::Config`] to it. See `ARCHITECTURE.md` for the map.

pub mod admin;
pub mod broadcast;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod files;
pub mod frame;
pub mod handshake;
pub mod heartbeat;
pub mod metrics;
pub mod plugin;
pub mod reload;
pub mod room;
pub mod scaffold;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod transport;
pub mod units;
pub mod watchdog;
pub mod web;
