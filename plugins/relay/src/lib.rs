//! Relay: passes every message unchanged to every other member of the room, exactly
//! what the host does with no plugin. It is the baseline that plugin overhead is
//! measured against.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/relay.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/relay (or /ws/relay:anything)
//! ```

use roomcast_guest::{Config, Plugin};

struct Relay;

/// Every hook keeps its default: accept, and pass each message on.
impl Plugin for Relay {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Relay)
    }
}

roomcast_guest::export!(Relay);
