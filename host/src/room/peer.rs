//! A member as rooms see it, and why its session ends.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::plugin::{MemberId, MemberInfo, Payload};
use crate::types::CloseReason;
use crate::ws::frame::{self, close_code};
use crate::ws::outbound::{Outbound, Overflow};

/// A connection as rooms see it: shared by its session and every room it is in.
#[derive(Debug)]
pub struct Peer {
    pub id: MemberId,
    pub outbound: Outbound,
    /// The member's upgrade query string, remote address and agreed subprotocol.
    pub query: String,
    pub remote_addr: String,
    pub protocol: Option<String>,
    /// What the handshake attached to the connection (JSON text): every room's plugin
    /// sees it in the member's info.
    pub identity: Option<Arc<str>>,
    /// Room-protocol mode (`roomcast.v1`): deliveries are tagged with their room, and a
    /// plugin's close ends one membership, not the session.
    pub tagged: bool,
    /// Notified when something other than the session itself ends the session (slow
    /// consumer, a plugin's close) or one of its memberships; the session task owns
    /// the teardown.
    kill: tokio::sync::Notify,
    departures: Mutex<Departures>,
}

/// What others decided about a member, for its session to carry out.
#[derive(Debug, Default)]
struct Departures {
    /// Why the session was ended from outside; the first reason wins.
    ending: Option<Ending>,
    /// Rooms that ended the membership (room-protocol mode), with why.
    evicted: Vec<(Arc<str>, CloseReason)>,
    /// Rooms plugins asked the member to join (room-protocol mode), in order; at most
    /// [`MAX_PENDING_INVITES`].
    invites: Vec<Invite>,
}

/// The most joins plugins may have asked of one member before its session carries
/// them out; more are dropped (and logged).
pub const MAX_PENDING_INVITES: usize = 64;

/// A plugin asked a member to join a room (`add-to-room`).
#[derive(Debug, Clone)]
pub struct Invite {
    pub room: String,
    pub params: Option<Arc<str>>,
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
        Self { reason, close: Some((code, text.into())) }
    }

    /// A member that does not read what it is sent (1008 `slow consumer`).
    pub fn slow_consumer() -> Self {
        Self::new(CloseReason::SlowConsumer, close_code::POLICY, "slow consumer")
    }
}

impl Peer {
    pub fn new(
        id: MemberId,
        max_queue_bytes: usize,
        query: String,
        remote_addr: String,
        protocol: Option<String>,
        identity: Option<Arc<str>>,
    ) -> Self {
        Self {
            id,
            outbound: Outbound::new(max_queue_bytes),
            query,
            remote_addr,
            identity,
            tagged: protocol.as_deref() == Some(crate::protocol::SUBPROTOCOL),
            protocol,
            kill: tokio::sync::Notify::new(),
            departures: Mutex::new(Departures::default()),
        }
    }

    /// End the session from outside. The first call decides the reason.
    pub fn end(&self, ending: Ending) {
        let mut departures = self.departures.lock().expect("peer lock");
        if departures.ending.is_none() {
            departures.ending = Some(ending);
            // `notify_one` keeps a permit if the session is not waiting right now.
            self.kill.notify_one();
        }
    }

    /// End the membership in `room` (room-protocol mode): the room has told the member
    /// (`left`) and stopped delivering to it; its session leaves the room.
    pub fn evict(&self, room: Arc<str>, why: CloseReason) {
        self.departures.lock().expect("peer lock").evicted.push((room, why));
        self.kill.notify_one();
    }

    /// Ask the session to join `invite.room` (room-protocol mode): a plugin added the
    /// member to it. Its session joins as for a client's join without a `ref`.
    pub fn invite(&self, invite: Invite) {
        let mut departures = self.departures.lock().expect("peer lock");
        if departures.invites.len() >= MAX_PENDING_INVITES {
            tracing::warn!(member = self.id, room = %invite.room, "too many pending joins: add-to-room dropped");
            return;
        }
        departures.invites.push(invite);
        self.kill.notify_one();
    }

    /// The joins plugins asked for since the last call.
    pub fn take_invites(&self) -> Vec<Invite> {
        std::mem::take(&mut self.departures.lock().expect("peer lock").invites)
    }

    /// Wake the session again (it took a wake-up it could not act on yet).
    pub fn rewake(&self) {
        self.kill.notify_one();
    }

    /// The memberships rooms ended since the last call.
    pub fn take_evictions(&self) -> Vec<(Arc<str>, CloseReason)> {
        std::mem::take(&mut self.departures.lock().expect("peer lock").evicted)
    }

    /// Resolves once [`Peer::end`] or [`Peer::evict`] was called (at once if it
    /// already was). Only the session task waits on it.
    pub async fn killed(&self) {
        self.kill.notified().await;
    }

    pub fn ending(&self) -> Option<Ending> {
        self.departures.lock().expect("peer lock").ending.clone()
    }

    /// What a plugin's `join` hook is told about this member (the join's parameters
    /// are the room's to add).
    pub fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id,
            query: self.query.clone(),
            remote_addr: self.remote_addr.clone(),
            protocol: self.protocol.clone(),
            identity: self.identity.clone(),
            params: None,
        }
    }

    /// Several frames with one push (written through if nothing is queued for the
    /// member); an overflow cuts the member off. Returns how many were taken.
    pub fn deliver_batch(&self, frames: &[&Bytes]) -> u64 {
        if self.taken(self.outbound.push_batch(frames, true)) { frames.len() as u64 } else { 0 }
    }

    /// Send or queue a data frame (with `write_through`, a member with nothing queued
    /// gets it at once: see [`Outbound::push_data`]); an overflow cuts the member off
    /// as a slow consumer. Returns whether the frame was taken.
    pub fn deliver(&self, frame: &Bytes, write_through: bool) -> bool {
        self.taken(self.outbound.push_data(frame, write_through))
    }

    /// Whether a push went through; an overflow cuts the member off as a slow consumer.
    fn taken(&self, pushed: Result<(), Overflow>) -> bool {
        if pushed.is_err() {
            self.end(Ending::slow_consumer());
        }
        pushed.is_ok()
    }
}

/// The frame for a data payload, encoded once and shared by every recipient.
pub fn encode(payload: &Payload) -> Bytes {
    match payload {
        Payload::Text(bytes) => frame::encode(frame::OP_TEXT, bytes),
        Payload::Binary(bytes) => frame::encode(frame::OP_BINARY, bytes),
    }
}

/// The frame for a data payload as room-protocol members get it: tagged with `room`
/// (`{"room": …, "text": …}` with the history `offset` when the room keeps history, or
/// a binary message behind the room prefix, which carries no offset).
pub fn encode_tagged(room: &str, payload: &Payload, offset: Option<u64>) -> Bytes {
    match payload {
        // A text payload is UTF-8: whoever built it guaranteed it.
        Payload::Text(bytes) => crate::protocol::text_delivery(room, &String::from_utf8_lossy(bytes), offset),
        // Room names are at most 128 bytes: the prefix always fits.
        Payload::Binary(bytes) => {
            crate::protocol::binary_delivery(room, bytes).unwrap_or_else(|| encode(payload))
        }
    }
}

/// The payload of a frame [`encode_tagged`] made (text: the `text` of its JSON; binary:
/// what follows the room prefix); `None` for anything else.
pub fn untag(frame: &Bytes) -> Option<Payload> {
    let (opcode, payload) = frame::decode_server_frame(frame)?;
    match opcode {
        frame::OP_TEXT => {
            #[derive(serde::Deserialize)]
            struct Tagged {
                text: String,
            }
            let tagged: Tagged = serde_json::from_slice(&payload).ok()?;
            Some(Payload::text(tagged.text))
        }
        frame::OP_BINARY => {
            let len = usize::from(*payload.first()?);
            (payload.len() > len).then(|| Payload::Binary(payload.slice(1 + len..)))
        }
        _ => None,
    }
}

/// A payload's frames, each encoded at most once per delivery: as raw members get it
/// and, when a member in room-protocol mode is among the recipients, tagged.
#[derive(Debug)]
pub struct Frames<'a> {
    room: &'a str,
    payload: &'a Payload,
    raw: Option<Bytes>,
    tagged: Option<Bytes>,
}

impl<'a> Frames<'a> {
    pub fn new(room: &'a str, payload: &'a Payload) -> Self {
        Self::with_tagged(room, payload, None)
    }

    /// With the tagged frame already encoded (it carries a history offset).
    pub fn with_tagged(room: &'a str, payload: &'a Payload, tagged: Option<Bytes>) -> Self {
        Self { room, payload, raw: None, tagged }
    }

    /// The frame for `peer`.
    pub fn for_peer(&mut self, peer: &Peer) -> &Bytes {
        if peer.tagged {
            self.tagged.get_or_insert_with(|| encode_tagged(self.room, self.payload, None))
        } else {
            self.raw.get_or_insert_with(|| encode(self.payload))
        }
    }
}
