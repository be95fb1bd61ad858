//! Rooms: the registry of live rooms, membership kept both ways, and one sequential
//! actor per room that decides where each message goes.
//!
//! Architecture invariant: membership changes only under the registry lock, so the
//! room → members side (here) and the member → rooms side (the session's list of
//! [`Room`]s) change in the same step, and a room with no members is removed from the
//! registry in the step that empties it. The actor never awaits a member: delivery is a
//! push onto each member's bounded [`Outbound`](crate::broadcast::Outbound) queue.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::Outbound;
use crate::frame::{self, close_code};
use crate::metrics::{CloseReason, Metrics};

pub type MemberId = u64;

/// How many events a room's inbox holds. A member whose message does not fit waits
/// (its reader stops reading its socket) until the room catches up: backpressure on
/// the sender, never on the other members.
pub const ROOM_INBOX: usize = 1024;

/// A connection as rooms see it: shared by its session and every room it is in.
#[derive(Debug)]
pub struct Peer {
    pub id: MemberId,
    pub outbound: Outbound,
    /// The member's upgrade query string, remote address and agreed subprotocol.
    pub query: String,
    pub remote_addr: String,
    pub protocol: Option<String>,
    /// Cancelled when something other than the session itself ends the session (slow
    /// consumer, a plugin's close); the session task owns the teardown.
    kill: CancellationToken,
    /// Why the session was ended from outside; the first reason wins.
    ending: Mutex<Option<Ending>>,
}

/// Why a session ends, and the close frame it sends (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub reason: CloseReason,
    /// The close frame to send; `None` drops the connection without one.
    pub close: Option<(u16, String)>,
}

impl Ending {
    pub fn new(reason: CloseReason, code: u16, text: impl Into<String>) -> Self {
        Self {
            reason,
            close: Some((code, text.into())),
        }
    }
}

impl Peer {
    pub fn new(
        id: MemberId,
        max_queue_bytes: usize,
        query: String,
        remote_addr: String,
        protocol: Option<String>,
    ) -> Self {
        Self {
            id,
            outbound: Outbound::new(max_queue_bytes),
            query,
            remote_addr,
            protocol,
            kill: CancellationToken::new(),
            ending: Mutex::new(None),
        }
    }

    /// End the session from outside. The first call decides the reason.
    pub fn end(&self, ending: Ending) {
        let mut slot = self.ending.lock().expect("peer lock");
        if slot.is_none() {
            *slot = Some(ending);
            self.kill.cancel();
        }
    }

    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    pub fn ending(&self) -> Option<Ending> {
        self.ending.lock().expect("peer lock").clone()
    }

    /// Queue a data frame; an overflow cuts the member off as a slow consumer.
    /// Returns whether the frame was queued.
    pub fn deliver(&self, frame: Bytes) -> bool {
        match self.outbound.push_data(frame) {
            Ok(()) => true,
            Err(_) => {
                self.end(Ending::new(
                    CloseReason::SlowConsumer,
                    close_code::POLICY,
                    "slow consumer",
                ));
                false
            }
        }
    }
}

/// A data message on its way through a room.
#[derive(Debug, Clone)]
pub struct Message {
    pub text: bool,
    pub payload: Bytes,
}

impl Message {
    pub fn encode(&self) -> Bytes {
        frame::encode(
            if self.text {
                frame::OP_TEXT
            } else {
                frame::OP_BINARY
            },
            &self.payload,
        )
    }
}

/// What a room's actor is told, in the order it happened.
#[derive(Debug)]
pub enum RoomEvent {
    Join(Arc<Peer>),
    /// `last` is set when this leave emptied the room: the actor stops after it.
    Leave {
        member: MemberId,
        reason: CloseReason,
        last: bool,
    },
    Message {
        from: MemberId,
        message: Message,
    },
}

/// A live room. Sessions hold it for as long as they are members.
#[derive(Debug)]
pub struct Room {
    name: Arc<str>,
    /// Members in join order. Copy-on-write: the actor takes a snapshot (an `Arc`
    /// clone) per broadcast, so no lock is held while it delivers.
    members: Mutex<Arc<Vec<Arc<Peer>>>>,
    /// The actor's inbox. The actor ends after the `Leave` that empties the room.
    tx: mpsc::Sender<RoomEvent>,
}

impl Room {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn members(&self) -> Arc<Vec<Arc<Peer>>> {
        self.members.lock().expect("room lock").clone()
    }

    /// Hand a member's message to the room, in arrival order; waits while the inbox is
    /// full.
    pub async fn send(&self, from: MemberId, message: Message) {
        // The actor only stops after the last member left, so this cannot fail while
        // the sender is a member.
        let _ = self.tx.send(RoomEvent::Message { from, message }).await;
    }
}

/// Every live room on this host.
#[derive(Debug)]
pub struct Rooms {
    map: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    metrics: Arc<Metrics>,
    /// Room actors are tracked so shutdown can wait for them.
    tracker: TaskTracker,
}

impl Rooms {
    pub fn new(metrics: Arc<Metrics>, tracker: TaskTracker) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            metrics,
            tracker,
        }
    }

    /// Add `peer` to room `name`, creating the room (and its actor) if it is not live.
    pub async fn join(&self, name: &str, peer: &Arc<Peer>) -> Arc<Room> {
        let room = {
            let mut map = self.map.lock().expect("rooms lock");
            let room = match map.get(name) {
                Some(room) => room.clone(),
                None => {
                    let room = self.spawn_room(name);
                    map.insert(room.name.clone(), room.clone());
                    self.metrics.rooms.fetch_add(1, Relaxed);
                    room
                }
            };
            let mut members = room.members.lock().expect("room lock");
            let mut next = Vec::with_capacity(members.len() + 1);
            next.extend(members.iter().cloned());
            next.push(peer.clone());
            *members = Arc::new(next);
            self.metrics.room_members.fetch_add(1, Relaxed);
            drop(members);
            room
        };
        let _ = room.tx.send(RoomEvent::Join(peer.clone())).await;
        room
    }

    /// Remove `member` from `room`; the step that empties a room also removes it.
    pub async fn leave(&self, room: &Arc<Room>, member: MemberId, reason: CloseReason) {
        let last = {
            let mut map = self.map.lock().expect("rooms lock");
            let mut members = room.members.lock().expect("room lock");
            let before = members.len();
            let next: Vec<_> = members.iter().filter(|p| p.id != member).cloned().collect();
            if next.len() == before {
                return; // not a member (already left)
            }
            let last = next.is_empty();
            *members = Arc::new(next);
            self.metrics.room_members.fetch_sub(1, Relaxed);
            if last && map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
                map.remove(&room.name);
                self.metrics.rooms.fetch_sub(1, Relaxed);
            }
            last
        };
        let _ = room
            .tx
            .send(RoomEvent::Leave {
                member,
                reason,
                last,
            })
            .await;
    }

    /// The live room called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.map.lock().expect("rooms lock").get(name).cloned()
    }

    /// Names and member counts of the live rooms.
    pub fn list(&self) -> Vec<(String, usize)> {
        let map = self.map.lock().expect("rooms lock");
        let mut rooms: Vec<_> = map
            .values()
            .map(|r| (r.name.to_string(), r.members().len()))
            .collect();
        rooms.sort();
        rooms
    }

    fn spawn_room(&self, name: &str) -> Arc<Room> {
        let (tx, rx) = mpsc::channel(ROOM_INBOX);
        let room = Arc::new(Room {
            name: Arc::from(name),
            members: Mutex::new(Arc::new(Vec::new())),
            tx,
        });
        let actor = RoomActor {
            room: room.clone(),
            metrics: self.metrics.clone(),
        };
        self.tracker.spawn(actor.run(rx));
        room
    }
}

/// The sequential owner of a room's behaviour.
struct RoomActor {
    room: Arc<Room>,
    metrics: Arc<Metrics>,
}

impl RoomActor {
    async fn run(self, mut rx: mpsc::Receiver<RoomEvent>) {
        while let Some(event) = rx.recv().await {
            match event {
                RoomEvent::Join(_) => {}
                RoomEvent::Leave { last, .. } => {
                    if last {
                        break;
                    }
                }
                RoomEvent::Message { from, message } => {
                    self.broadcast(&message.encode(), &[from]);
                }
            }
        }
        tracing::debug!(room = %self.room.name, "room closed");
    }

    /// Queue `frame` for every member except `except`. Never awaits.
    fn broadcast(&self, frame: &Bytes, except: &[MemberId]) {
        let members = self.room.members();
        let mut delivered = 0;
        for peer in members.iter() {
            if !except.contains(&peer.id) && peer.deliver(frame.clone()) {
                delivered += 1;
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
    }
}
