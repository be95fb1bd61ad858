//! Chaos: a test plugin that misbehaves on command, so host tests can check that a
//! runaway, greedy or crashing plugin takes down only its own room. Not an example to
//! copy.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/chaos.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/chaos and send one of the commands below
//! ```
//!
//! # Commands (text messages from a member)
//!
//! | text | what the plugin does |
//! |---|---|
//! | `spin` | loops forever (the host's deadline must interrupt it) |
//! | `hog` | allocates 1 MiB blocks forever (the host's memory cap must stop it) |
//! | `panic` | panics with `chaos panic` (logged at error level, then a trap) |
//! | `burst` | calls `send(sender, "x")` 1,000,000 times, ignoring refusals (the host's action budget must cap it) |
//! | `timer:N` | sets an `N` ms timer; when it fires the setter gets the text `timer fired`; if `set-timer` is refused the setter gets `timer error: <reason>` at once |
//! | `members` | sends the sender the room's member ids as a JSON array, e.g. `[3,7]` |
//! | `whoami` | sends the sender what its join told the room: `{"id":7,"identity":…,"params":…}` (the JSON texts parsed, `null` when absent) |
//! | `add:ROOM` | adds the sender to room `ROOM` with params `{"by":"<this room>"}`; a refused call sends back `add error: <reason>` |
//! | `remove` | ends the sender's membership of this room with reason `removed` |
//! | anything else, and binary | passed unchanged to the other members |
//!
//! Commands are dropped.
//!
//! # Handshakes
//!
//! An upgrade whose query string is `hog` allocates 1 MiB blocks forever in the
//! handshake hook (the host's memory cap must stop it); any other is accepted. A query
//! parameter `identity=NAME` attaches the identity `{"user":"NAME"}`; `identity=huge`
//! attaches one of 5000 bytes (over the host's limit).
//!
//! # Joins
//!
//! `admit` refuses (403 `refused`) a member whose join params are `{"refuse":true}`
//! or whose upgrade query has a parameter `refuse`.
//!
//! # Configuration
//!
//! `{"panic_in_init": true}` makes `init` panic (a trap); `{"fail_init": true}` makes
//! `init` return the error `fail_init set`. Both default to false.

use std::collections::BTreeMap;
use std::hint::black_box;

use roomcast_guest::serde_json;
use roomcast_guest::{
    Config, HandshakeDecision, HandshakeRequest, LeaveReason, Member, MemberId, Message, Origin, Plugin,
    Refusal, Room, TimerId, Verdict,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Settings {
    panic_in_init: bool,
    fail_init: bool,
}

struct Chaos {
    /// Who set each pending timer.
    timers: BTreeMap<TimerId, MemberId>,
    /// What each member's join said.
    members: BTreeMap<MemberId, Member>,
}

/// Parse a JSON text the host handed over, `null` when absent.
fn parsed(text: &Option<String>) -> serde_json::Value {
    text.as_deref().and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default()
}

/// Allocate 1 MiB blocks until the host's memory cap stops the call.
fn hog() -> ! {
    let mut blocks = Vec::new();
    loop {
        blocks.push(black_box(vec![0xA5u8; 1 << 20]));
        black_box(&blocks);
    }
}

impl Plugin for Chaos {
    fn handshake(&self, request: &HandshakeRequest) -> HandshakeDecision {
        if request.query == "hog" {
            hog();
        }
        match request.query_param("identity").as_deref() {
            Some("huge") => HandshakeDecision::accept().with_identity(&"x".repeat(5000)),
            Some(user) => HandshakeDecision::accept().with_identity(&serde_json::json!({ "user": user })),
            None => HandshakeDecision::accept(),
        }
    }

    fn admit(&mut self, _room: &Room, member: &Member) -> Result<(), Refusal> {
        let by_params = parsed(&member.params)["refuse"] == true;
        if by_params || member.query_param("refuse").is_some() {
            return Err(Refusal::new(403, "refused"));
        }
        Ok(())
    }

    fn join(&mut self, _room: &Room, member: Member) {
        self.members.insert(member.id, member);
    }

    fn leave(&mut self, _room: &Room, member: MemberId, _reason: LeaveReason) {
        self.members.remove(&member);
    }

    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.panic_in_init {
            panic!("panic_in_init set");
        }
        if settings.fail_init {
            return Err("fail_init set".into());
        }
        Ok(Chaos { timers: BTreeMap::new(), members: BTreeMap::new() })
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        let (Origin::Member(sender), Some(command)) = (from, message.as_text()) else {
            return Verdict::Pass;
        };
        match command {
            "spin" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "hog" => hog(),
            "panic" => panic!("chaos panic"),
            "burst" => {
                for _ in 0..1_000_000 {
                    let _ = room.send(sender, "x");
                }
            }
            "members" => {
                let _ = room.send_json(sender, &room.members());
            }
            "whoami" => {
                let (identity, params) = match self.members.get(&sender) {
                    Some(member) => (parsed(&member.identity), parsed(&member.params)),
                    None => Default::default(),
                };
                let me = serde_json::json!({ "id": sender, "identity": identity, "params": params });
                let _ = room.send_json(sender, &me);
            }
            "remove" => {
                let _ = room.remove(sender, "removed");
            }
            _ if command.starts_with("add:") => {
                let params = serde_json::json!({ "by": room.name() }).to_string();
                if let Err(error) = room.add_to_room(sender, &command["add:".len()..], Some(&params)) {
                    let _ = room.send(sender, format!("add error: {error}"));
                }
            }
            _ => match command.strip_prefix("timer:").map(str::parse::<u32>) {
                Some(Ok(after_ms)) => match room.set_timer(after_ms) {
                    Ok(timer) => {
                        self.timers.insert(timer, sender);
                    }
                    Err(error) => {
                        let _ = room.send(sender, format!("timer error: {error}"));
                    }
                },
                _ => return Verdict::Pass,
            },
        }
        Verdict::Drop
    }

    fn timer(&mut self, room: &Room, timer: TimerId) {
        if let Some(setter) = self.timers.remove(&timer) {
            let _ = room.send(setter, "timer fired");
        }
    }
}

roomcast_guest::export!(Chaos);
