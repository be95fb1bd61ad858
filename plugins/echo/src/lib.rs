//! Echo: sends every message back to its sender only, unchanged (text stays text,
//! binary stays binary); nobody else sees it. The smallest Roomcast plugin.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/echo.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/echo (or /ws/echo:anything)
//! ```

use roomcast_guest::{Config, Message, Origin, Plugin, Room, Verdict};

struct Echo;

impl Plugin for Echo {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Echo)
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        if let Origin::Member(sender) = from {
            let _ = room.send(sender, message);
        }
        Verdict::Drop
    }
}

roomcast_guest::export!(Echo);
