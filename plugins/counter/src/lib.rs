//! Counter: counts the messages its room has seen and tells each sender the count.
//! The count survives a hot reload, which makes this the plugin for reload tests.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/counter.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/counter (or /ws/counter:anything)
//! ```
//!
//! # Protocol
//!
//! Every message (text or binary, from a member or forwarded from another room) adds
//! one to the room's count and is dropped. A member that sent it gets the JSON text
//! `{"count":N,"version":"0.1.0"}`: `N` counts this message, and `version` is this
//! crate's version, so tests can tell two builds apart.
//!
//! On reload, `snapshot` returns the count as 8 little-endian bytes and `restore`
//! takes exactly that back (anything else is an error).

use roomcast_guest::{Config, Message, Origin, Plugin, Room, Verdict, serde_json::json};

struct Counter {
    count: u64,
}

impl Plugin for Counter {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Counter { count: 0 })
    }

    fn message(&mut self, room: &Room, from: Origin, _message: Message) -> Verdict {
        self.count += 1;
        if let Origin::Member(sender) = from {
            let reply = json!({"count": self.count, "version": env!("CARGO_PKG_VERSION")});
            let _ = room.send_json(sender, &reply);
        }
        Verdict::Drop
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.count.to_le_bytes().to_vec())
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let bytes: [u8; 8] =
            state.try_into().map_err(|state: Vec<u8>| format!("expected 8 bytes, got {}", state.len()))?;
        self.count = u64::from_le_bytes(bytes);
        Ok(())
    }
}

roomcast_guest::export!(Counter);
