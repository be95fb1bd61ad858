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
    pub query: Box<str>,
    pub remote_addr: Box<str>,
    pub protocol: Option<Box<str>>,
    /// What the handshake attached to the connection (JSON text): every room's plugin
    /// sees it in the member's info.
    pub identity: Option<Arc<str>>,
    /// Room-protocol mode (`roomcast.v1`): deliveries are tagged with their room, and a
    /// plugin's close ends one membership, not the session.
    pub tagged: bool,
    /// What `permessage-deflate` negotiation agreed (`None`: not negotiated).
    pub deflate: Option<crate::ws::deflate::Agreement>,
    /// Notified when something other than the session itself ends the session (slow
    /// consumer, a plugin's close) or one of its memberships; the session task owns
    /// the teardown.
    kill: tokio::sync::Notify,
    departures: Mutex<Departures>,
}

/// A session parked without a task: what starts it again. The session layer
/// implements it (`session::park`); the peer only keeps it and calls it when woken.
pub trait Resume: Send {
    /// Start the session's task again.
    fn resume(self: Box<Self>, peer: Arc<Peer>);

    /// The session's heartbeat, which goes on while it is parked.
    fn heartbeat(&mut self) -> &mut crate::ws::heartbeat::Heartbeat;
}

/// Where a member's session is: running, on its way to parking, or parked.
#[derive(Default)]
enum Park {
    #[default]
    Active,
    /// The session registered its wake-ups and is about to hand itself over; `woken`
    /// is set if one of them fired meanwhile (the session then stays as it is).
    Parking {
        woken: bool,
    },
    Parked(Box<dyn Resume>),
}

impl std::fmt::Debug for Park {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "Active",
            Self::Parking { .. } => "Parking",
            Self::Parked(_) => "Parked",
        })
    }
}

/// What others decided about a member, for its session to carry out.
#[derive(Debug, Default)]
struct Departures {
    /// Why the session was ended from outside; the first reason wins (boxed: set
    /// once, at the end).
    ending: Option<Box<Ending>>,
    /// Rooms that ended the membership and rooms plugins asked the member to join
    /// (room-protocol mode), in order; at most [`MAX_PENDING_INVITES`] invites. One
    /// list, so that a peer's memory stays in mimalloc's 448-byte class.
    memberships: Vec<Membership>,
    /// Whether the session runs as a task or is parked without one (under the same
    /// lock).
    park: Park,
}

/// A change of membership for the session to carry out.
#[derive(Debug)]
enum Membership {
    /// A room ended the membership, with why.
    Evicted(Arc<str>, CloseReason),
    Invited(Invite),
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

/// A parked session's wake-ups (its socket turning readable, a push to its queue, its
/// heartbeat deadline) hold the peer as their waker.
impl std::task::Wake for Peer {
    fn wake(self: Arc<Self>) {
        self.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.unpark();
    }
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
        deflate: Option<crate::ws::deflate::Agreement>,
    ) -> Self {
        Self {
            id,
            outbound: Outbound::new(max_queue_bytes),
            query: query.into(),
            remote_addr: remote_addr.into(),
            identity,
            tagged: protocol.as_deref() == Some(crate::protocol::SUBPROTOCOL),
            deflate,
            protocol: protocol.map(String::into_boxed_str),
            kill: tokio::sync::Notify::new(),
            departures: Mutex::new(Departures::default()),
        }
    }

    /// Wake the session: its task through `kill`, or the session itself if parked.
    fn signal(&self) {
        self.kill.notify_one();
        self.outbound.wake_parked();
    }

    /// The session is about to park: wake-ups from now on are remembered.
    pub fn begin_park(&self) {
        self.departures.lock().expect("peer lock").park = Park::Parking { woken: false };
    }

    /// Park with what `resume` makes, unless a wake-up came since
    /// [`Peer::begin_park`]: then `resume` is not called, and `false` says the
    /// session keeps its task.
    pub fn finish_park(&self, resume: impl FnOnce() -> Box<dyn Resume>) -> bool {
        let park = &mut self.departures.lock().expect("peer lock").park;
        match *park {
            Park::Parking { woken: false } => {
                *park = Park::Parked(resume());
                true
            }
            _ => {
                *park = Park::Active;
                false
            }
        }
    }

    /// The session keeps its task after all.
    pub fn cancel_park(&self) {
        self.departures.lock().expect("peer lock").park = Park::Active;
    }

    /// Resume a parked session (a wake-up on its way to parking is remembered; a
    /// running session is left alone: it waits on its own wake-ups).
    pub fn unpark(self: &Arc<Self>) {
        let resume = {
            let park = &mut self.departures.lock().expect("peer lock").park;
            match std::mem::replace(park, Park::Active) {
                Park::Parked(resume) => resume,
                Park::Parking { .. } => {
                    *park = Park::Parking { woken: true };
                    return;
                }
                Park::Active => return,
            }
        };
        resume.resume(self.clone());
    }

    /// Run `f` on the parked session (`None` if it is not parked), under the lock
    /// that keeps it parked: `f` must not wake the peer.
    pub fn with_parked<R>(&self, f: impl FnOnce(&mut dyn Resume) -> R) -> Option<R> {
        match &mut self.departures.lock().expect("peer lock").park {
            Park::Parked(parked) => Some(f(parked.as_mut())),
            _ => None,
        }
    }

    /// Something waits for the session: an ending, evictions or invites.
    pub fn has_departures(&self) -> bool {
        let departures = self.departures.lock().expect("peer lock");
        departures.ending.is_some() || !departures.memberships.is_empty()
    }

    /// End the session from outside. The first call decides the reason.
    pub fn end(&self, ending: Ending) {
        let mut departures = self.departures.lock().expect("peer lock");
        if departures.ending.is_none() {
            departures.ending = Some(Box::new(ending));
            // `notify_one` keeps a permit if the session is not waiting right now.
            drop(departures);
            self.signal();
        }
    }

    /// End the membership in `room` (room-protocol mode): the room has told the member
    /// (`left`) and stopped delivering to it; its session leaves the room.
    pub fn evict(&self, room: Arc<str>, why: CloseReason) {
        self.departures.lock().expect("peer lock").memberships.push(Membership::Evicted(room, why));
        self.signal();
    }

    /// Ask the session to join `invite.room` (room-protocol mode): a plugin added the
    /// member to it. Its session joins as for a client's join without a `ref`.
    pub fn invite(&self, invite: Invite) {
        let mut departures = self.departures.lock().expect("peer lock");
        let invites = departures.memberships.iter().filter(|m| matches!(m, Membership::Invited(_))).count();
        if invites >= MAX_PENDING_INVITES {
            tracing::warn!(member = self.id, room = %invite.room, "too many pending joins: add-to-room dropped");
            return;
        }
        departures.memberships.push(Membership::Invited(invite));
        drop(departures);
        self.signal();
    }

    /// The joins plugins asked for since the last call.
    pub fn take_invites(&self) -> Vec<Invite> {
        self.take_memberships(|m| match m {
            Membership::Invited(invite) => Ok(invite),
            other => Err(other),
        })
    }

    /// Take out the pending membership changes `pick` accepts, in order; the others
    /// stay, in order.
    fn take_memberships<T>(&self, mut pick: impl FnMut(Membership) -> Result<T, Membership>) -> Vec<T> {
        let mut departures = self.departures.lock().expect("peer lock");
        let mut taken = Vec::new();
        departures.memberships = std::mem::take(&mut departures.memberships)
            .into_iter()
            .filter_map(|m| pick(m).map(|t| taken.push(t)).err())
            .collect();
        taken
    }

    /// Wake the session again (it took a wake-up it could not act on yet).
    pub fn rewake(&self) {
        self.signal();
    }

    /// The memberships rooms ended since the last call.
    pub fn take_evictions(&self) -> Vec<(Arc<str>, CloseReason)> {
        self.take_memberships(|m| match m {
            Membership::Evicted(room, why) => Ok((room, why)),
            other => Err(other),
        })
    }

    /// Resolves once [`Peer::end`] or [`Peer::evict`] was called (at once if it
    /// already was). Only the session task waits on it.
    pub async fn killed(&self) {
        self.kill.notified().await;
    }

    pub fn ending(&self) -> Option<Ending> {
        self.departures.lock().expect("peer lock").ending.as_deref().cloned()
    }

    /// What a plugin's `join` hook is told about this member (the join's parameters
    /// are the room's to add).
    pub fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id,
            query: self.query.to_string(),
            remote_addr: self.remote_addr.to_string(),
            protocol: self.protocol.as_deref().map(str::to_owned),
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
/// and, when a member in room-protocol mode is among the recipients, tagged; and each of
/// those deflated at most once per window size, for members that negotiated
/// `permessage-deflate` (a broadcast is compressed once, whatever the room's size).
#[derive(Debug)]
pub struct Frames {
    payload: Payload,
    raw: Option<Bytes>,
    tagged: Option<Bytes>,
    /// Deflate frames whose payload has at least this many bytes (`None`: never).
    compress: Option<usize>,
    /// The deflated frames made so far, by kind (tagged or not) and window; `None`
    /// where deflating did not make the frame smaller.
    deflated: Vec<(bool, u8, Option<Bytes>)>,
}

impl Frames {
    pub fn new(payload: Payload, compress: Option<usize>) -> Self {
        Self::with_tagged(payload, None, compress)
    }

    /// With the tagged frame already encoded (it carries a history offset).
    pub fn with_tagged(payload: Payload, tagged: Option<Bytes>, compress: Option<usize>) -> Self {
        Self { payload, raw: None, tagged, compress, deflated: Vec::new() }
    }

    /// The frame for `peer`, a member of `room`.
    pub fn for_peer(&mut self, room: &str, peer: &Peer) -> &Bytes {
        self.prepare(room, peer);
        self.get(peer)
    }

    /// Encode (and deflate) the frame `peer`, a member of `room`, gets, if not done yet.
    pub fn prepare(&mut self, room: &str, peer: &Peer) {
        let plain = if peer.tagged {
            self.tagged.get_or_insert_with(|| encode_tagged(room, &self.payload, None))
        } else {
            self.raw.get_or_insert_with(|| encode(&self.payload))
        };
        let Some(window) = deflate_window(self.compress, peer, plain) else { return };
        if !self.deflated.iter().any(|(tagged, w, _)| *tagged == peer.tagged && *w == window) {
            let deflated = frame::decode_server_frame(plain)
                .and_then(|(opcode, payload)| crate::ws::deflate::compress_frame(opcode, &payload, window));
            self.deflated.push((peer.tagged, window, deflated));
        }
    }

    /// The frame `peer` gets, once [`Self::prepare`]d for it.
    pub fn get(&self, peer: &Peer) -> &Bytes {
        let plain = if peer.tagged { self.tagged.as_ref() } else { self.raw.as_ref() };
        let plain = plain.expect("frames prepared for the peer");
        let deflated = deflate_window(self.compress, peer, plain).and_then(|window| {
            self.deflated.iter().find(|(tagged, w, _)| *tagged == peer.tagged && *w == window)?.2.as_ref()
        });
        deflated.unwrap_or(plain)
    }
}

/// The window `peer`'s copy of `plain` is deflated with, if it is deflated: the room
/// compresses (`compress`, its threshold), the peer negotiated it, and the payload is
/// large enough.
fn deflate_window(compress: Option<usize>, peer: &Peer, plain: &Bytes) -> Option<u8> {
    let threshold = compress?;
    let window = peer.deflate?.server_window?;
    let header = match plain.get(1).map(|len| len & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    (plain.len().saturating_sub(header) >= threshold).then_some(window)
}

#[cfg(test)]
mod park_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// Counts how often the parked session was started again.
    struct Counted(Arc<AtomicUsize>);

    impl Resume for Counted {
        fn resume(self: Box<Self>, _peer: Arc<Peer>) {
            self.0.fetch_add(1, SeqCst);
        }

        fn heartbeat(&mut self) -> &mut crate::ws::heartbeat::Heartbeat {
            unreachable!("not asked in these tests")
        }
    }

    fn peer() -> Arc<Peer> {
        Arc::new(Peer::new(1, 1 << 10, String::new(), String::new(), None, None, None))
    }

    /// A parked connection's memory is mostly its peer (with its `Arc`'s counts):
    /// within 432 bytes it takes mimalloc's 448-byte class, 64 bytes less than the next.
    #[test]
    fn a_peer_stays_in_the_448_byte_class() {
        let size = std::mem::size_of::<Peer>();
        assert!(size + 16 <= 448, "a peer grew to {size} bytes");
    }

    #[test]
    fn a_wake_up_on_the_way_to_parking_keeps_the_task() {
        let peer = peer();
        peer.begin_park();
        std::task::Waker::from(peer.clone()).wake_by_ref();
        assert!(!peer.finish_park(|| unreachable!("woken: the session keeps its task")));
        // Running again: a wake-up now is the task's own business.
        peer.unpark();
    }

    #[test]
    fn a_parked_session_resumes_once_on_the_first_wake_up() {
        let peer = peer();
        let resumed = Arc::new(AtomicUsize::new(0));
        peer.begin_park();
        assert!(peer.finish_park(|| Box::new(Counted(resumed.clone()))));
        assert_eq!(resumed.load(SeqCst), 0);
        let waker = std::task::Waker::from(peer.clone());
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert_eq!(resumed.load(SeqCst), 1);
    }

    #[test]
    fn ending_a_parked_member_wakes_its_session() {
        let peer = peer();
        let resumed = Arc::new(AtomicUsize::new(0));
        peer.begin_park();
        peer.outbound.wake_on_push(&std::task::Waker::from(peer.clone()));
        assert!(peer.finish_park(|| Box::new(Counted(resumed.clone()))));
        assert!(!peer.has_departures());
        peer.end(Ending::slow_consumer());
        assert_eq!(resumed.load(SeqCst), 1);
        assert!(peer.has_departures());
    }
}
