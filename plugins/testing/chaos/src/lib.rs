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
//! | anything else, and binary | passed unchanged to the other members |
//!
//! Commands are dropped.
//!
//! # Handshakes
//!
//! An upgrade whose query string is `hog` allocates 1 MiB blocks forever in the
//! handshake hook (the host's memory cap must stop it); any other is accepted.
//!
//! # Configuration
//!
//! `{"panic_in_init": true}` makes `init` panic (a trap); `{"fail_init": true}` makes
//! `init` return the error `fail_init set`. Both default to false.

use std::collections::BTreeMap;
use std::hint::black_box;

use roomcast_guest::{
    Config, HandshakeDecision, HandshakeRequest, MemberId, Message, Origin, Plugin, Room, TimerId, Verdict,
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
        HandshakeDecision::accept()
    }

    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.panic_in_init {
            panic!("panic_in_init set");
        }
        if settings.fail_init {
            return Err("fail_init set".into());
        }
        Ok(Chaos { timers: BTreeMap::new() })
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
