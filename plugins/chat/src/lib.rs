//! Chat: a chat room with nicknames, room-wide and direct messages, and join/leave
//! notices. Every message is JSON text; nothing a member sends is passed on raw.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/chat.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/chat?name=ada (or /ws/chat:lobby?name=ada)
//! ```
//!
//! # Protocol
//!
//! A member's nickname is the `name` query parameter of its upgrade request,
//! percent-decoded (`?name=Ada%20L`); without one, or with an empty one, it is
//! `guest-<id>`. Member ids are the host's `u64` ids, written as JSON numbers.
//!
//! Server to client:
//!
//! | when | who gets it | message |
//! |---|---|---|
//! | a member joins | the joiner | `{"type":"welcome","id":7,"name":"ada","members":[{"id":3,"name":"bob"},{"id":7,"name":"ada"}]}` (every member in join order, the joiner included) |
//! | a member joins | everyone else | `{"type":"join","id":7,"name":"ada"}` |
//! | a member leaves | everyone left | `{"type":"leave","id":7,"name":"ada"}` |
//! | `{"say":"hi"}` | everyone, the sender included | `{"type":"say","from":7,"name":"ada","text":"hi"}` |
//! | `{"to":3,"say":"psst"}` | member 3, plus a copy to the sender (once if it is the sender) | `{"type":"direct","from":7,"name":"ada","to":3,"text":"psst"}` |
//! | `{"to":99,"say":"psst"}` with no member 99 here | the sender | `{"type":"error","error":"unknown member 99"}` |
//! | anything else (bad JSON, no string `say`, binary) | the sender | `{"type":"error","error":"expected {\"say\":\"...\"} or {\"to\":<id>,\"say\":\"...\"}"}` |
//! | a message forwarded from room `lobby` (e.g. by the lobby plugin) | everyone | `{"type":"say","from_room":"lobby","text":"hi"}`: the text is the `say` string of a JSON body, else the raw text |
//! | a backend publishes to the room (`POST /admin/rooms/chat:lobby/publish`) | everyone | `{"type":"announcement","text":"hi"}`, the text taken as for a forward |
//!
//! Nicknames survive a hot reload (snapshot/restore).

use std::collections::BTreeMap;

use roomcast_guest::{
    Config, LeaveReason, Member, MemberId, Message, Origin, Plugin, Room, RoomError, Verdict,
};
use serde::{Deserialize, Serialize};

/// Nicknames of the members in the room.
struct Chat {
    names: BTreeMap<MemberId, String>,
}

/// What a member may send.
#[derive(Deserialize)]
struct Incoming {
    say: String,
    to: Option<MemberId>,
}

/// What the room sends.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a> {
    Welcome {
        id: MemberId,
        name: &'a str,
        members: Vec<Entry<'a>>,
    },
    Join {
        id: MemberId,
        name: &'a str,
    },
    Leave {
        id: MemberId,
        name: &'a str,
    },
    Say {
        from: MemberId,
        name: &'a str,
        text: &'a str,
    },
    #[serde(rename = "say")]
    SayFromRoom {
        from_room: &'a str,
        text: &'a str,
    },
    Announcement {
        text: &'a str,
    },
    Direct {
        from: MemberId,
        name: &'a str,
        to: MemberId,
        text: &'a str,
    },
    Error {
        error: &'a str,
    },
}

#[derive(Serialize)]
struct Entry<'a> {
    id: MemberId,
    name: &'a str,
}

const USAGE: &str = r#"expected {"say":"..."} or {"to":<id>,"say":"..."}"#;

impl Chat {
    fn name(&self, id: MemberId) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| format!("guest-{id}"))
    }

    fn member_message(&self, room: &Room, from: MemberId, message: &Message) {
        let name = self.name(from);
        let error = |error: &str| {
            let _ = room.send_json(from, &Outgoing::Error { error });
        };
        let Ok(Incoming { say, to }) = message.json::<Incoming>() else {
            return error(USAGE);
        };
        match to {
            None => {
                let say = Outgoing::Say { from, name: &name, text: &say };
                let _ = room.broadcast_json(&say);
            }
            Some(to) => {
                let direct = Message::to_json(&Outgoing::Direct { from, name: &name, to, text: &say });
                match room.send(to, direct.clone()) {
                    Ok(()) => {}
                    Err(RoomError::UnknownMember) => return error(&format!("unknown member {to}")),
                    Err(other) => return error(&other.to_string()),
                }
                if to != from {
                    let _ = room.send(from, direct);
                }
            }
        }
    }
}

impl Plugin for Chat {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Chat { names: BTreeMap::new() })
    }

    fn join(&mut self, room: &Room, member: Member) {
        let name = member
            .query_param("name")
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| format!("guest-{}", member.id));
        self.names.insert(member.id, name);
        let names: Vec<(MemberId, String)> =
            room.members().into_iter().map(|id| (id, self.name(id))).collect();
        let name = self.name(member.id);
        let welcome = Outgoing::Welcome {
            id: member.id,
            name: &name,
            members: names.iter().map(|(id, name)| Entry { id: *id, name }).collect(),
        };
        let _ = room.send_json(member.id, &welcome);
        let join = Message::to_json(&Outgoing::Join { id: member.id, name: &name });
        let _ = room.broadcast_except(join, &[member.id]);
    }

    fn leave(&mut self, room: &Room, member: MemberId, _reason: LeaveReason) {
        let name = self.names.remove(&member).unwrap_or_else(|| format!("guest-{member}"));
        let _ = room.broadcast_json(&Outgoing::Leave { id: member, name: &name });
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        match from {
            Origin::Member(id) => self.member_message(room, id, &message),
            Origin::Room(from_room) => {
                let text = say_or_raw(&message);
                let _ = room.broadcast_json(&Outgoing::SayFromRoom { from_room: &from_room, text: &text });
            }
            Origin::Server => {
                let _ = room.broadcast_json(&Outgoing::Announcement { text: &say_or_raw(&message) });
            }
        }
        Verdict::Drop
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        roomcast_guest::serde_json::to_vec(&self.names).ok()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        self.names = roomcast_guest::serde_json::from_slice(&state).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The `say` string of a JSON body, else the message as text.
fn say_or_raw(message: &Message) -> String {
    #[derive(Deserialize)]
    struct Say {
        say: String,
    }
    match message.json::<Say>() {
        Ok(Say { say }) => say,
        Err(_) => String::from_utf8_lossy(message.as_bytes()).into_owned(),
    }
}

roomcast_guest::export!(Chat);
