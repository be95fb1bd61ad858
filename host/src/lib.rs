//! Roomcast: a WebSocket room server whose room logic lives in WebAssembly components.

pub mod plugin;
pub mod units;
