//! {{Type}}: sends every message back to its sender only, unchanged (text stays text,
//! binary stays binary); nobody else sees it. Written by `roomcast plugin new {{name}}`
//! from the same code as the `echo` example: change `message`, or add other hooks of
//! the `Plugin` trait (see the `roomcast-guest` docs).
//!
//! Build and run:
//!
//! ```text
//! cargo build --release
//! cp target/wasm32-wasip2/release/{{name}}.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/{{name}} (or /ws/{{name}}:anything)
//! ```

use roomcast_guest::{Config, Message, Origin, Plugin, Room, Verdict};

struct {{Type}};

impl Plugin for {{Type}} {
    fn init(_config: Config) -> Result<Self, String> {
        Ok({{Type}})
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        if let Origin::Member(sender) = from {
            let _ = room.send(sender, message);
        }
        Verdict::Drop
    }
}

roomcast_guest::export!({{Type}});
