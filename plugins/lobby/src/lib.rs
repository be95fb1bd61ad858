//! Lobby: matchmaking, and posting into other rooms on this host. Members who ask to
//! play wait in the lobby until enough of them do; the lobby then seats them in a new
//! match room (served by this plugin too, open only to the seated players) and removes
//! them from the lobby. Any member can also send `{"room":"chat:x","say":"hi"}`, and
//! room `chat:x`'s plugin receives `{"say":"hi"}` as a message from room `lobby`.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/lobby.wasm target/wasm32-wasip2/release/chat.wasm \
//!    /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # two room-protocol clients (subprotocol roomcast.v1) on ws://127.0.0.1:8080/ws/lobby
//! # each send {"send":"lobby","text":"{\"play\":true}"}: both are seated in a match room
//! ```
//!
//! # Configuration
//!
//! The `[config]` table of `lobby.toml`; unknown keys are an error:
//!
//! ```toml
//! [config]
//! players = 2   # players per match, 2 to 16 (default 2)
//! ```
//!
//! # Rooms
//!
//! The plugin serves `lobby` and `lobby:*`. A room whose name has a `:match:` segment
//! (`lobby:match:1f3a9c02b7e4-1`) is a **match room**; every other one (`lobby`,
//! `lobby:eu`) is a **lobby**, whose matches are named after it (`lobby:eu:match:…`).
//! Match names carry a random part drawn when the lobby's instance starts, so a client
//! cannot guess the next one and occupy it first.
//!
//! # In a lobby
//!
//! Member ids are the host's `u64` ids, written as JSON numbers.
//!
//! | a member sends | what happens |
//! |---|---|
//! | text `{"play":true}`, from a room-protocol member (`roomcast.v1`) | the member joins the queue (again asking changes nothing) and gets `{"type":"queued","waiting":1,"players":2}` (how many wait, how many a match needs). When `players` members wait, the first of them (in the order they asked) are matched: each gets `{"type":"matched","room":"lobby:match:…","seat":1,"players":[3,7]}`, is added to the match room (the client gets `{"joined":"lobby:match:…"}` without a `ref`), and is removed from the lobby (`{"left":"lobby","code":1000,"reason":"matched"}`): a player in a match is no longer waiting; to play again, it joins the lobby again. |
//! | text `{"play":true}` from a raw connection | the sender gets `{"type":"error","error":"matchmaking needs the room protocol: connect with the subprotocol roomcast.v1"}`: a raw connection is in exactly one room and cannot be moved into a match |
//! | text `{"play":false}` | the member leaves the queue and gets `{"type":"unqueued"}` |
//! | text `{"room":"chat:x","say":"hi"}` (both strings) | the JSON text `{"say":"hi"}` is forwarded into room `chat:x`; the sender gets `{"type":"forwarded","room":"chat:x"}`, or `{"type":"error","error":"unknown room"}` when no such room is live (other refusals give their reason, e.g. `"too many actions"`); nobody in the lobby sees the original |
//! | anything else | passed unchanged to the other members of the lobby |
//!
//! A member that leaves the lobby leaves the queue. Messages forwarded into the lobby
//! from other rooms are passed to its members. The queue survives a hot reload.
//!
//! # In a match room
//!
//! Only the players the lobby seated get in: the lobby adds each with the join
//! parameters `{"match":"lobby:match:…","seat":1,"players":[3,7]}`, and the first
//! seated player to arrive fixes the room's players. Any other join (a client's own
//! `{"join":"lobby:match:…"}`, with or without made-up parameters, or a raw upgrade to
//! `/ws/lobby:match:…`) is refused with 403 `no seat in this match` (a raw connection is
//! closed with 1008). A seat belongs to the connection the lobby matched: a player that
//! reconnects gets a new member id and cannot take it again.
//!
//! | when | who gets it | message |
//! |---|---|---|
//! | a player arrives | that player | `{"type":"match","room":"lobby:match:…","seat":1,"players":[3,7]}` |
//! | the last seated player arrives | every player | `{"type":"start","players":[3,7]}` (once) |
//! | a player leaves | the players left | `{"type":"quit","id":3}` |
//!
//! Everything the players send passes unchanged to the other players.

use std::collections::BTreeMap;
use std::hash::{BuildHasher as _, RandomState};

use roomcast_guest::serde_json::{self, json};
use roomcast_guest::{
    Config, LeaveReason, Member, MemberId, Message, Origin, Plugin, Refusal, Room, Verdict,
};
use serde::{Deserialize, Serialize};

/// The subprotocol of room-protocol connections, the only ones a lobby can move.
const ROOM_PROTOCOL: &str = "roomcast.v1";

const RAW_CANNOT_PLAY: &str = "matchmaking needs the room protocol: connect with the subprotocol roomcast.v1";

const NO_SEAT: &str = "no seat in this match";

/// The most players a match may have.
const MAX_PLAYERS: usize = 16;

/// What `lobby.toml`'s `[config]` holds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    players: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { players: 2 }
    }
}

/// The lobby's state in one room: the lobby's queue, or the match's players.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Lobby {
    settings: Settings,
    /// In a lobby: whether each member speaks the room protocol (and so can be moved).
    members: BTreeMap<MemberId, bool>,
    /// In a lobby: who asked to play, in the order they asked.
    queue: Vec<MemberId>,
    /// In a lobby: the random part of its match names, and how many it made.
    nonce: u64,
    matches: u64,
    /// In a match room: the players the lobby seated, fixed by the first to arrive.
    players: Option<Vec<MemberId>>,
    /// In a match room: whether `start` was sent.
    started: bool,
}

/// What a lobby member may send (besides a post into another room).
#[derive(Deserialize)]
struct Play {
    play: bool,
}

/// A post into another room.
#[derive(Deserialize)]
struct Post {
    room: String,
    say: String,
}

/// The join parameters the lobby gives each player it seats in a match room.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Ticket {
    #[serde(rename = "match")]
    room: String,
    seat: usize,
    players: Vec<MemberId>,
}

/// What the lobby and its match rooms send.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply<'a> {
    Queued { waiting: usize, players: usize },
    Unqueued,
    Matched { room: &'a str, seat: usize, players: &'a [MemberId] },
    Forwarded { room: String },
    Error { error: String },
    Match { room: &'a str, seat: usize, players: &'a [MemberId] },
    Start { players: &'a [MemberId] },
    Quit { id: MemberId },
}

/// Whether `room` is a match room (it has a `:match:` segment) rather than a lobby.
fn is_match_room(room: &str) -> bool {
    room.contains(":match:")
}

/// A random number from the `wasi:random` seed std's hash maps use (the host answers
/// it from a per-instance generator).
fn random() -> u64 {
    RandomState::new().hash_one(0u8)
}

impl Lobby {
    fn new(settings: Settings, nonce: u64) -> Self {
        Lobby {
            settings,
            members: BTreeMap::new(),
            queue: Vec::new(),
            nonce,
            matches: 0,
            players: None,
            started: false,
        }
    }

    /// The name of the lobby `lobby`'s next match.
    fn next_match(&mut self, lobby: &str) -> String {
        self.matches += 1;
        format!("{lobby}:match:{:012x}-{}", self.nonce & 0xffff_ffff_ffff, self.matches)
    }

    /// `member` asks to play: its place in the queue, and the players of a match when
    /// it completes one (taken off the queue).
    fn play(&mut self, member: MemberId) -> Option<Vec<MemberId>> {
        if !self.queue.contains(&member) {
            self.queue.push(member);
        }
        (self.queue.len() >= self.settings.players)
            .then(|| self.queue.drain(..self.settings.players).collect())
    }

    /// Whether `member` may enter match room `room`, with the join's `params`; the
    /// first seated player to arrive fixes the room's players. Its seat (from 1).
    fn seat(&mut self, room: &str, member: MemberId, params: Option<Ticket>) -> Result<usize, Refusal> {
        let no_seat = || Refusal::new(403, NO_SEAT);
        let ticket = params.filter(|ticket| ticket.room == room).ok_or_else(no_seat)?;
        let players = match &self.players {
            Some(players) => players,
            None => {
                let valid = (2..=MAX_PLAYERS).contains(&ticket.players.len())
                    && ticket.players.get(ticket.seat.wrapping_sub(1)) == Some(&member);
                if !valid {
                    return Err(no_seat());
                }
                self.players.insert(ticket.players)
            }
        };
        players.iter().position(|&player| player == member).map(|at| at + 1).ok_or_else(no_seat)
    }

    fn lobby_message(&mut self, room: &Room, sender: MemberId, message: &Message) -> Verdict {
        if message.as_text().is_none() {
            return Verdict::Pass;
        }
        if let Ok(Play { play }) = message.json::<Play>() {
            self.ask(room, sender, play);
            return Verdict::Drop;
        }
        let Ok(post) = message.json::<Post>() else {
            return Verdict::Pass;
        };
        let reply = match room.forward(&post.room, Message::to_json(&json!({"say": post.say}))) {
            Ok(()) => Reply::Forwarded { room: post.room },
            Err(error) => Reply::Error { error: error.to_string() },
        };
        let _ = room.send_json(sender, &reply);
        Verdict::Drop
    }

    /// `{"play": play}` from `member`.
    fn ask(&mut self, room: &Room, member: MemberId, play: bool) {
        if !play {
            self.queue.retain(|&waiting| waiting != member);
            let _ = room.send_json(member, &Reply::Unqueued);
            return;
        }
        if self.members.get(&member) != Some(&true) {
            let _ = room.send_json(member, &Reply::Error { error: RAW_CANNOT_PLAY.into() });
            return;
        }
        let Some(players) = self.play(member) else {
            let queued = Reply::Queued { waiting: self.queue.len(), players: self.settings.players };
            let _ = room.send_json(member, &queued);
            return;
        };
        let name = self.next_match(&room.name());
        roomcast_guest::info!("seating {players:?} in {name}");
        for (at, &player) in players.iter().enumerate() {
            let seat = at + 1;
            let ticket = Ticket { room: name.clone(), seat, players: players.clone() };
            let params = serde_json::to_string(&ticket).expect("a ticket is JSON");
            let _ = room.send_json(player, &Reply::Matched { room: &name, seat, players: &players });
            match room.add_to_room(player, &name, Some(&params)) {
                Ok(()) => {
                    let _ = room.remove(player, "matched");
                }
                Err(error) => {
                    roomcast_guest::warn!("cannot seat {player} in {name}: {error}");
                    let _ = room.send_json(player, &Reply::Error { error: error.to_string() });
                }
            }
        }
    }
}

impl Plugin for Lobby {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if !(2..=MAX_PLAYERS).contains(&settings.players) {
            return Err(format!("invalid config: players must be 2 to {MAX_PLAYERS}"));
        }
        Ok(Lobby::new(settings, random()))
    }

    fn admit(&mut self, room: &Room, member: &Member) -> Result<(), Refusal> {
        let name = room.name();
        if is_match_room(&name) {
            self.seat(&name, member.id, member.params_json())?;
        }
        Ok(())
    }

    fn join(&mut self, room: &Room, member: Member) {
        let name = room.name();
        if !is_match_room(&name) {
            self.members.insert(member.id, member.protocol.as_deref() == Some(ROOM_PROTOCOL));
            return;
        }
        let Some(players) = self.players.clone() else { return };
        let seat = players.iter().position(|&player| player == member.id).map_or(0, |at| at + 1);
        let _ = room.send_json(member.id, &Reply::Match { room: &name, seat, players: &players });
        let present = room.members();
        if !self.started && players.iter().all(|player| present.contains(player)) {
            self.started = true;
            let _ = room.broadcast_json(&Reply::Start { players: &players });
        }
    }

    fn leave(&mut self, room: &Room, member: MemberId, _reason: LeaveReason) {
        if is_match_room(&room.name()) {
            let _ = room.broadcast_json(&Reply::Quit { id: member });
        } else {
            self.members.remove(&member);
            self.queue.retain(|&waiting| waiting != member);
        }
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        match from {
            Origin::Member(sender) if !is_match_room(&room.name()) => {
                self.lobby_message(room, sender, &message)
            }
            _ => Verdict::Pass,
        }
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self).ok()
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        let settings = self.settings;
        *self = serde_json::from_slice(&state).map_err(|error| error.to_string())?;
        // The new version's configuration wins; a smaller match size applies at the
        // next request to play.
        self.settings = settings;
        Ok(())
    }
}

roomcast_guest::export!(Lobby);

#[cfg(test)]
mod tests {
    use super::*;

    fn lobby(players: usize) -> Lobby {
        Lobby::new(Settings { players }, 0xabc)
    }

    fn ticket(room: &str, seat: usize, players: &[MemberId]) -> Option<Ticket> {
        Some(Ticket { room: room.into(), seat, players: players.to_vec() })
    }

    #[test]
    fn a_match_forms_when_enough_players_wait() {
        let mut lobby = lobby(3);
        assert_eq!(lobby.play(5), None);
        assert_eq!(lobby.play(5), None, "asking again keeps one place");
        assert_eq!(lobby.play(2), None);
        assert_eq!(lobby.queue, [5, 2]);
        assert_eq!(lobby.play(9), Some(vec![5, 2, 9]));
        assert!(lobby.queue.is_empty());
        assert_eq!(lobby.play(1), None);
    }

    #[test]
    fn match_names_are_new_each_time_and_name_their_lobby() {
        let mut lobby = lobby(2);
        let first = lobby.next_match("lobby:eu");
        let second = lobby.next_match("lobby:eu");
        assert_eq!(first, "lobby:eu:match:000000000abc-1");
        assert_ne!(first, second);
        assert!(is_match_room(&first));
        assert!(!is_match_room("lobby") && !is_match_room("lobby:eu") && !is_match_room("lobby:matches"));
        assert_ne!(random(), random(), "each instance draws its own nonce");
    }

    #[test]
    fn only_seated_players_enter_a_match() {
        let room = "lobby:match:abc-1";
        let mut fresh = lobby(2);
        // Without a ticket, for another room, or naming someone else in the seat.
        assert_eq!(fresh.seat(room, 3, None).unwrap_err().status, 403);
        assert!(fresh.seat(room, 3, ticket("lobby:match:abc-2", 1, &[3, 7])).is_err());
        assert!(fresh.seat(room, 3, ticket(room, 2, &[3, 7])).is_err());
        assert!(fresh.seat(room, 3, ticket(room, 0, &[3, 7])).is_err());
        assert!(fresh.seat(room, 3, ticket(room, 1, &[3])).is_err(), "a match of one");
        assert_eq!(fresh.players, None, "a refused ticket fixes nothing");
        // The first seated player fixes the players; the second takes its seat.
        assert_eq!(fresh.seat(room, 7, ticket(room, 2, &[3, 7])), Ok(2));
        assert_eq!(fresh.seat(room, 3, ticket(room, 1, &[3, 7])), Ok(1));
        // Somebody else, even with a ticket of its own making, stays out.
        assert!(fresh.seat(room, 9, ticket(room, 1, &[9, 3])).is_err());
        assert!(fresh.seat(room, 9, ticket(room, 3, &[3, 7, 9])).is_err());
        assert_eq!(fresh.players, Some(vec![3, 7]));
    }

    #[test]
    fn config_bounds_the_match_size() {
        assert_eq!(Lobby::init(Config::new("{}")).unwrap().settings.players, 2);
        assert_eq!(Lobby::init(Config::new(r#"{"players":4}"#)).unwrap().settings.players, 4);
        assert!(Lobby::init(Config::new(r#"{"players":1}"#)).is_err());
        assert!(Lobby::init(Config::new(r#"{"players":17}"#)).is_err());
        assert!(Lobby::init(Config::new(r#"{"size":2}"#)).is_err());
    }

    #[test]
    fn the_queue_survives_a_reload() {
        let mut old = lobby(3);
        old.members.insert(5, true);
        old.play(5);
        old.next_match("lobby");
        let mut new = Lobby::init(Config::new(r#"{"players":2}"#)).unwrap();
        new.restore(old.snapshot().unwrap()).unwrap();
        assert_eq!((new.queue.clone(), new.matches, new.nonce), (vec![5], 1, 0xabc));
        assert_eq!(new.settings.players, 2);
    }

    #[test]
    fn replies_read_as_documented() {
        let text = |reply: Reply| serde_json::to_value(reply).unwrap();
        assert_eq!(
            text(Reply::Queued { waiting: 1, players: 2 }),
            json!({"type": "queued", "waiting": 1, "players": 2})
        );
        assert_eq!(
            text(Reply::Matched { room: "lobby:match:x-1", seat: 1, players: &[3, 7] }),
            json!({"type": "matched", "room": "lobby:match:x-1", "seat": 1, "players": [3, 7]})
        );
        let params = serde_json::to_value(ticket("m", 1, &[3, 7])).unwrap();
        assert_eq!(params, json!({"match": "m", "seat": 1, "players": [3, 7]}));
    }
}
