//! Lobby: lets members post into other rooms on this host. A member sends
//! `{"room":"chat:x","say":"hi"}` and room `chat:x`'s plugin receives `{"say":"hi"}` as
//! a message from room `lobby` (the chat plugin shows it to everyone there).
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/lobby.wasm target/wasm32-wasip2/release/chat.wasm \
//!    /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # connect one client to ws://127.0.0.1:8080/ws/chat:x and another to
//! # ws://127.0.0.1:8080/ws/lobby, then send {"room":"chat:x","say":"hi"} from the second
//! ```
//!
//! # Protocol
//!
//! | a member sends | what happens |
//! |---|---|
//! | text `{"room":"chat:x","say":"hi"}` (both strings) | the JSON text `{"say":"hi"}` is forwarded into room `chat:x`; the sender gets `{"type":"forwarded","room":"chat:x"}`, or `{"type":"error","error":"unknown room"}` when no such room is live (other refusals give their reason, e.g. `"too many actions"`); nobody in the lobby sees the original |
//! | anything else | passed unchanged to the other members of the lobby |
//!
//! Messages forwarded into the lobby from other rooms are passed to its members.

use roomcast_guest::{Config, Message, Origin, Plugin, Room, Verdict, serde_json::json};
use serde::{Deserialize, Serialize};

struct Lobby;

#[derive(Deserialize)]
struct Post {
    room: String,
    say: String,
}

/// What the sender of a post gets.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    Forwarded { room: String },
    Error { error: String },
}

impl Plugin for Lobby {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Lobby)
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        let (Origin::Member(sender), Some(_)) = (&from, message.as_text()) else {
            return Verdict::Pass;
        };
        let Ok(post) = message.json::<Post>() else {
            return Verdict::Pass;
        };
        let reply = match room.forward(&post.room, Message::to_json(&json!({"say": post.say}))) {
            Ok(()) => Reply::Forwarded { room: post.room },
            Err(error) => Reply::Error { error: error.to_string() },
        };
        let _ = room.send_json(*sender, &reply);
        Verdict::Drop
    }
}

roomcast_guest::export!(Lobby);
