//! The room actor: its state, its event loop, and what members' events do.

use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::clustered::Clustered;
use super::delivery::Target;
use super::peer::Frames;
use super::timers::Timers;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::{Ending, History, Joining, Peer, Recovery, Room, RoomEvent, Rooms, Since};
use crate::cluster::wire::Delivery;
use crate::metrics::{Metrics, PluginCalls};
use crate::plugin::reload::LivePlugins;
use crate::plugin::{
    MemberId, MemberInfo, Origin, Payload, Plugin, Refused, RoomExists, RoomInstance, Verdict,
};
use crate::types::CloseReason;
use crate::ws::frame::close_code;

/// The most member messages a room handles in one pass (see
/// `RoomActor::message_pass`).
const MESSAGE_BATCH: usize = 64;

/// A room with at least this many members lets messages that are ready arrive before
/// it sends one on its own (see `RoomActor::run`): the wait costs about one `epoll_wait`,
/// a few percent of writing to this many sockets.
pub(super) const GATHER_MEMBERS: usize = 16;

/// How many members a pass writes to before it lets the worker run what is ready
/// (see `RoomActor::message_pass`): about half a millisecond of `send(2)`s on loopback,
/// for the price of one `epoll_wait`.
pub(super) const PASS_SLICE: usize = 128;

/// The sequential owner of a room's behaviour: the default broadcast, or the room's
/// plugin instance.
pub(super) struct RoomActor {
    pub(super) room: Arc<Room>,
    /// For forwarding into other rooms; weak so a room never keeps the registry alive.
    pub(super) rooms: Weak<Rooms>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) plugins: Arc<LivePlugins>,
    /// This node's members in join order, as this actor has been told of them (join
    /// and leave events).
    pub(super) peers: Vec<Arc<Peer>>,
    /// Every member the plugin sees, in join order, so its view matches the order of
    /// its hooks: `peers`' ids, plus in cluster mode the members on other nodes.
    pub(super) ids: Vec<MemberId>,
    pub(super) logic: Logic,
    /// The plugin set generation `logic` was resolved against.
    pub(super) generation: u64,
    /// Pending plugin timers.
    pub(super) timers: Timers,
    pub(super) room_exists: RoomExists,
    /// Cluster mode: the room's role and what it knows beyond this node.
    pub(super) cluster: Option<Clustered>,
    /// Nothing else waited in the inbox when the current event was taken: its
    /// deliveries write through to idle members' sockets. (Under a backlog, messages
    /// are handled in batches, or queued in cluster mode.)
    pub(super) write_through: bool,
    /// An event taken from the inbox while gathering a batch, handled next.
    pub(super) pending: Option<RoomEvent>,
    /// While a batch of messages is handled: deliveries wait here, in order, and go
    /// out member by member, a slice of the members at a time (see
    /// `RoomActor::message_pass`), and all at once before a close.
    pub(super) staging: bool,
    /// Staged deliveries: their recipients and frames (encoded at most once per kind
    /// of member, when the first such recipient is written to).
    pub(super) staged: Vec<(Target, Frames)>,
    /// How many of `staged` each member (by its place in `peers`) was given; missing
    /// places are 0. Cleared with `staged`.
    pub(super) sent: Vec<usize>,
    /// Deliveries ever staged (tells a pass that something new needs writing).
    pub(super) staged_count: u64,
    /// Members whose join is being decided and who await the reply, with its `ref` and
    /// recovery position: admitted, they get `joined` (then what they missed) before
    /// anything their join sends; refused, an `error`.
    pub(super) awaiting: Vec<Awaiting>,
    /// The room's history, when it keeps one (recovery).
    pub(super) history: Option<History>,
    /// What the room's previous owner stored of its history, until the history is
    /// made (cluster mode).
    pub(super) stored_history: Option<Vec<crate::cluster::StoredEntry>>,
    /// Deflate messages of at least this many bytes for members that negotiated
    /// `permessage-deflate` (`None`: compression is off for this room).
    pub(super) compress: Option<usize>,
    /// The join parameters of this node's members that gave any, so that presenting
    /// them again (a new plugin version, a fresh instance, a takeover) shows the same.
    pub(super) params: std::collections::HashMap<MemberId, Arc<str>>,
    /// Members whose join the plugin refused and whose leave has not arrived yet:
    /// what they send meanwhile is dropped.
    pub(super) refused: Vec<MemberId>,
}

/// A member whose join awaits the room's reply.
#[derive(Debug)]
pub(super) struct Awaiting {
    pub(super) id: MemberId,
    /// `None`: no `ref` to echo (a plugin's add, or a member on another node).
    pub(super) reference: Option<u64>,
    pub(super) since: Option<Since>,
}

/// Answer a refused join for `peer`, a member of `room`: an `error` with the join's
/// `ref` if it was awaiting its reply (room-protocol mode), `left` 1008 if it was in
/// the room already, and for a raw member a close with 1008.
pub(super) fn carry_out_refusal(
    peer: &Peer,
    room: &Arc<str>,
    awaiting: Option<Option<u64>>,
    refused: &Refused,
    write_through: bool,
) {
    match (awaiting, peer.tagged) {
        (Some(reference), true) => {
            let frame = crate::protocol::refused(room, &refused.reason, refused.status, reference);
            peer.deliver(&frame, write_through);
            peer.evict(room.clone(), CloseReason::Plugin);
        }
        (None, true) => {
            let frame = crate::protocol::left(room, close_code::POLICY, &refused.reason, None);
            peer.deliver(&frame, write_through);
            peer.evict(room.clone(), CloseReason::Plugin);
        }
        (_, false) => peer.end(Ending::new(CloseReason::Plugin, close_code::POLICY, refused.reason.clone())),
    }
}

/// What a plugin's `join` decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    Admitted,
    Refused,
    /// The call failed; the room recovered (or closed its members).
    Failed,
}

/// What decides where a room's messages go.
// One per room, never moved after it is set: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Logic {
    /// No plugin serves the room: every message goes to every other member.
    Default,
    Plugin {
        instance: RoomInstance,
        calls: Arc<PluginCalls>,
    },
    /// The room's plugin could not start an instance; members are refused with 1011
    /// until the plugin set changes or a new member's join starts one.
    Failed {
        plugin: Arc<Plugin>,
    },
}

impl RoomActor {
    pub(super) fn new(room: Arc<Room>, rooms: &Arc<Rooms>) -> Self {
        let weak = Arc::downgrade(rooms);
        let exists = weak.clone();
        Self {
            room,
            rooms: weak,
            metrics: rooms.metrics.clone(),
            plugins: rooms.plugins.clone(),
            peers: Vec::new(),
            ids: Vec::new(),
            logic: Logic::Default,
            generation: u64::MAX,
            timers: Timers::default(),
            room_exists: Arc::new(move |name: &str| {
                exists.upgrade().is_some_and(|rooms| {
                    rooms.get(name).is_some() || rooms.cluster.as_ref().is_some_and(|c| c.room_known(name))
                })
            }),
            cluster: None,
            write_through: false,
            pending: None,
            staging: false,
            staged: Vec::new(),
            sent: Vec::new(),
            staged_count: 0,
            awaiting: Vec::new(),
            refused: Vec::new(),
            history: None,
            stored_history: None,
            compress: None,
            params: std::collections::HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<RoomEvent>) {
        if let Some(clustered) = &mut self.cluster {
            // The members already in the registry are this node's presence in the
            // room's first heartbeat, before their joins reach the actor.
            for peer in self.room.members() {
                clustered.link.track(&peer.info());
            }
            // Events wait in the inbox until the cluster says who runs the room.
            let role = clustered.link.first_role().await;
            self.role_change(role);
        } else {
            self.refresh_plugin();
        }
        loop {
            if let Some(clustered) = &self.cluster {
                // Backpressure from Redis: take no event the write queue cannot absorb.
                clustered.link.writable().await;
            }
            if self.lease_in_doubt() {
                self.settle_lease().await;
                continue;
            }
            let next_timer = self.timers.next();
            let save_at = self.cluster.as_ref().and_then(|c| c.save_at);
            let retry_at = self.cluster.as_ref().and_then(|c| c.retry_at());
            let event = if let Some(event) = self.pending.take() {
                Some(event)
            } else {
                tokio::select! {
                    event = rx.recv() => event,
                    () = sleep_until_opt(next_timer) => {
                        if self.lease_in_doubt() {
                            continue;
                        }
                        self.write_through = rx.is_empty();
                        self.fire_due_timers();
                        self.after_event();
                        continue;
                    }
                    () = sleep_until_opt(retry_at) => {
                        self.retry_pending();
                        continue;
                    }
                    () = sleep_until_opt(save_at) => {
                        self.save_snapshot();
                        continue;
                    }
                    // Role changes or records from Redis wait in the room's link.
                    () = cluster_woken(self.cluster.as_ref()) => {
                        self.write_through = rx.is_empty();
                        self.cluster_woken();
                        continue;
                    }
                }
            };
            let Some(event) = event else { break };
            if self.lease_in_doubt() {
                // Taken while the lease was sure; kept until the supervisor's word.
                self.pending = Some(event);
                continue;
            }
            self.write_through = rx.is_empty();
            self.role_changes();
            self.refresh_plugin();
            if self.follows() {
                if self.follow(event) {
                    break;
                }
                continue;
            }
            match event {
                RoomEvent::Join(joining) => {
                    self.announce(&joining.peer);
                    self.join(joining)
                }
                RoomEvent::Leave { member, reason, last, handled } => {
                    self.unannounce(member);
                    self.leave(member, reason);
                    // Every event the member sent before is handled: its session may
                    // send its close frame now.
                    drop(handled);
                    if last {
                        self.after_event();
                        break;
                    }
                }
                RoomEvent::Message { from, .. } if self.refused.contains(&from) => {}
                RoomEvent::Message { from, payload } if self.batches() => {
                    if self.write_through && self.peers.len() >= GATHER_MEMBERS {
                        // The sender's task woke this actor, and tokio runs a task
                        // woken that way first, ahead of the other readers that are
                        // ready: without this wait every message would find the inbox
                        // empty and go out alone, one send(2) per member, even on a
                        // saturated core. Deferred until the worker has run every
                        // ready task and polled for I/O, the actor then finds what
                        // arrived meanwhile and sends it as one batch: the busier the
                        // core, the bigger the batches.
                        tokio::task::yield_now().await;
                    }
                    self.message_pass(from, payload, &mut rx).await
                }
                RoomEvent::Message { from, payload } => self.message(Origin::Member(from), payload, 0),
                RoomEvent::Forward { from_room, payload, hops } => {
                    self.message(Origin::Room(from_room.to_string()), payload, hops)
                }
                // The room's plugin decides what a backend's publish becomes.
                RoomEvent::Publish(payload) => self.message(Origin::Server, payload, 0),
                RoomEvent::PluginsChanged => {}
            }
            self.after_event();
        }
        self.finish().await;
        if let (Some(history), Some(rooms)) = (self.history.take(), self.rooms.upgrade()) {
            rooms.retain_history(self.room.name.clone(), history);
        }
        tracing::debug!(room = %self.room.name, "room closed");
    }

    /// Every member (local or on another node) in join order.
    pub(super) fn member_infos(&self) -> Vec<MemberInfo> {
        self.ids.iter().filter_map(|id| self.member_info(*id)).collect()
    }

    pub(super) fn join(&mut self, joining: Joining) {
        let Joining { peer, reference, params, since } = joining;
        let mut info = peer.info();
        if let Some(params) = &params {
            self.params.insert(peer.id, params.clone());
        }
        info.params = params;
        self.ids.push(peer.id);
        self.peers.push(peer);
        self.awaiting.push(Awaiting { id: info.id, reference, since });
        self.joined(&info);
        // Neither admitted nor refused (its room could not start): no reply is due.
        self.awaiting.retain(|awaiting| awaiting.id != info.id);
    }

    /// Tell the logic about a member already added to `ids`.
    pub(super) fn joined(&mut self, info: &MemberInfo) {
        if let Logic::Failed { plugin } = &self.logic {
            // A new member gives the plugin another chance to start.
            let plugin = plugin.clone();
            self.start(plugin, None);
            // `start` presented every member, the new one included.
            if self.ids.contains(&info.id) {
                self.admitted(info.id);
            }
            return;
        }
        self.call_join(info);
    }

    /// Call the plugin's `join` for `info` (a member already in `ids`): admitted, the
    /// member hears `joined` (if it is joining now) before what the call sends;
    /// refused, it is removed again.
    pub(super) fn call_join(&mut self, info: &MemberInfo) -> Admission {
        let result = self.with_instance(|instance, view| instance.join(view, info));
        match result {
            None => {
                self.admitted(info.id);
                Admission::Admitted
            }
            Some(Ok((Ok(()), actions))) => {
                self.admitted(info.id);
                self.apply(actions, 0);
                Admission::Admitted
            }
            Some(Ok((Err(refused), actions))) => {
                self.refuse(info.id, &refused);
                self.apply(actions, 0);
                Admission::Refused
            }
            Some(Err(error)) => {
                self.recover(&error);
                Admission::Failed
            }
        }
    }

    /// Member `id` is in. A local room-protocol client awaiting its reply gets
    /// `joined` (with the room's history position when it keeps history) and, when it
    /// asked with `since`, every message it missed, all in one push and in the room's
    /// order: nothing the room broadcasts can come between, since the room does nothing
    /// else meanwhile. A member on another node is told through its node, which
    /// delivers nothing of the room to it until then (and ignores a second word).
    pub(super) fn admitted(&mut self, id: MemberId) {
        let awaiting = self.awaiting.iter().position(|a| a.id == id).map(|at| self.awaiting.swap_remove(at));
        let remote =
            self.local(id).is_none() && self.cluster.as_ref().is_some_and(|c| c.remote.contains_key(&id));
        let tagged = self.local(id).is_some_and(|peer| peer.tagged);
        if !remote && (awaiting.is_none() || !tagged) {
            return;
        }
        let (reference, since) = awaiting.map_or((None, None), |a| (a.reference, a.since));
        let position = self.history.as_ref().map(|history| (history.epoch().to_owned(), history.last()));
        // While Redis is unreachable a node runs the room for its own members only, and
        // its history holds only what they saw: recovery is off until Redis is back.
        let alone = self.cluster.as_ref().is_some_and(|c| c.role == crate::cluster::Role::Solo);
        let (recovered, missed) = match (since, self.history.as_mut()) {
            (None, _) => (None, Vec::new()),
            (Some(_), _) if alone => (Some(false), Vec::new()),
            (Some(since), Some(history)) => match history.since(&since.epoch, since.offset) {
                Recovery::Recovered(missed) => (Some(true), missed),
                Recovery::NotRecovered => (Some(false), Vec::new()),
            },
            (Some(_), None) => (Some(false), Vec::new()),
        };
        if let Some(recovered) = recovered {
            self.metrics.recovery(recovered);
        }
        if remote {
            if let Some(clustered) = self.cluster.as_mut() {
                clustered.outbox.push(Delivery::Admit {
                    member: id,
                    refused: None,
                    position,
                    recovered,
                    replay: missed,
                });
            }
            return;
        }
        let Some(peer) = self.local(id).cloned() else { return };
        let position = position.as_ref().map(|(epoch, offset)| (epoch.as_str(), *offset));
        let joined = crate::protocol::joined(&self.room.name, reference, position, recovered);
        let mut frames: Vec<&Bytes> = Vec::with_capacity(1 + missed.len());
        frames.push(&joined);
        frames.extend(missed.iter());
        let delivered = peer.deliver_batch(&frames);
        self.metrics.messages_out.fetch_add(delivered.saturating_sub(1), Relaxed);
    }

    /// The plugin refused member `id`: it leaves the plugin's view at once (no `leave`
    /// hook). A member joining now hears an `error` (room-protocol mode) and its
    /// session leaves the room; a raw member, whose only room this is, is closed with
    /// 1008. A member presented again (a new plugin version, a fresh instance) that is
    /// refused loses its membership as if the plugin had closed it. A member on another
    /// node is told through its node, which answers for it the same way.
    pub(super) fn refuse(&mut self, id: MemberId, refused: &Refused) {
        self.ids.retain(|member| *member != id);
        self.params.remove(&id);
        let awaiting = self.awaiting.iter().position(|a| a.id == id).map(|at| self.awaiting.swap_remove(at));
        if let Some(at) = self.peers.iter().position(|p| p.id == id) {
            let peer = self.peers.remove(at);
            self.unannounce(id);
            self.refused.push(id);
            carry_out_refusal(
                &peer,
                &self.room.name,
                awaiting.map(|a| a.reference),
                refused,
                self.write_through,
            );
        } else if let Some(clustered) = self.cluster.as_mut()
            && clustered.remote.remove(&id).is_some()
        {
            clustered.left.insert(id, Instant::now());
            clustered.outbox.push(Delivery::Admit {
                member: id,
                refused: Some((refused.status, refused.reason.clone())),
                position: None,
                recovered: None,
                replay: Vec::new(),
            });
        }
    }

    pub(super) fn leave(&mut self, member: MemberId, reason: CloseReason) {
        if let Some(at) = self.refused.iter().position(|id| *id == member) {
            // Refused at its join: the plugin never counted it a member.
            self.refused.swap_remove(at);
            return;
        }
        self.ids.retain(|id| *id != member);
        self.peers.retain(|p| p.id != member);
        self.params.remove(&member);
        self.left(member, reason);
    }

    /// Tell the logic about a member already removed from `ids`.
    pub(super) fn left(&mut self, member: MemberId, reason: CloseReason) {
        if let Some(result) = self.with_instance(|instance, view| instance.leave(view, member, reason)) {
            match result {
                Ok(actions) => self.apply(actions, 0),
                Err(error) => self.recover(&error),
            }
        }
    }

    pub(super) fn message(&mut self, origin: Origin, payload: Payload, hops: u8) {
        let sender = match origin {
            Origin::Member(id) => Some(id),
            Origin::Room(_) | Origin::Server => None,
        };
        let result = self.with_instance(|instance, view| instance.message(view, origin, &payload));
        match result {
            None => self.deliver_all(&payload, sender),
            Some(Ok((verdict, actions))) => {
                self.apply(actions, hops);
                if verdict == Verdict::Pass {
                    self.deliver_all(&payload, sender);
                }
            }
            // The message that made the plugin fail is dropped.
            Some(Err(error)) => self.recover(&error),
        }
    }

    /// Whether member messages may be handled in batches: no other node to publish to,
    /// and a working room logic.
    pub(super) fn batches(&self) -> bool {
        self.cluster.is_none() && !matches!(self.logic, Logic::Failed { .. })
    }

    /// Take the member messages waiting in the inbox, up to `room` of them and only
    /// while the plugin set is unchanged (so a reload still takes over between two
    /// messages), and handle each as usual, plugin calls included. Another event ends
    /// the taking and is handled next. Returns how many were taken.
    fn take_waiting(&mut self, room: usize, rx: &mut mpsc::Receiver<RoomEvent>) -> usize {
        let mut taken = 0;
        while taken < room && self.pending.is_none() && self.plugins.generation() == self.generation {
            match rx.try_recv() {
                Ok(RoomEvent::Message { from, .. }) if self.refused.contains(&from) => {}
                Ok(RoomEvent::Message { from, payload }) => {
                    self.message(Origin::Member(from), payload, 0);
                    taken += 1;
                }
                Ok(other) => self.pending = Some(other),
                Err(_) => break,
            }
        }
        taken
    }

    /// Member messages, when the room batches: this one and those already waiting in
    /// the inbox are handled as usual (plugin calls included) with their deliveries
    /// staged, and each member gets all the frames it is due with one push: one
    /// `sendmsg(2)` when nothing is queued for it, else queued with one wake-up of its
    /// writer. A lone message in a room of at most [`PASS_SLICE`] members goes the
    /// usual way, written through when the inbox is empty.
    ///
    /// In a larger room, writing one message to every member takes long enough (one
    /// `send(2)` each, about 5 µs on loopback) for the next to arrive meanwhile. So
    /// the staged deliveries are written [`PASS_SLICE`] members at a time; between two
    /// slices the actor lets the worker run what is ready, and a message that arrived
    /// meanwhile is handled and staged at once. Every member then
    /// gets everything staged that it has not had yet, with one push, and the pass
    /// goes round the members until each has everything. A message that arrives
    /// while the previous one is half written thus rides along with it for the rest
    /// of the members instead of waiting for a pass of its own: the nearer the core
    /// is to saturation, the more messages each write carries, and no message waits
    /// longer than about one round. A pass takes at most [`MESSAGE_BATCH`] messages
    /// (then it finishes the round), and none once another event waits, so joins,
    /// leaves and timers wait at most one round.
    pub(super) async fn message_pass(
        &mut self,
        from: MemberId,
        payload: Payload,
        rx: &mut mpsc::Receiver<RoomEvent>,
    ) {
        if rx.is_empty() && self.peers.len() <= PASS_SLICE {
            return self.message(Origin::Member(from), payload, 0);
        }
        self.staging = true;
        self.message(Origin::Member(from), payload, 0);
        let mut taken = 1 + self.take_waiting(MESSAGE_BATCH - 1, rx);
        let mut seen = self.staged_count;
        let mut cursor = 0;
        // Members to write to before every one has everything staged.
        let mut unwritten = self.peers.len();
        while !self.staged.is_empty() && unwritten > 0 {
            if cursor >= self.peers.len() {
                // A plugin's close flushed the stage and took a member out.
                cursor = 0;
            }
            let end = (cursor + PASS_SLICE).min(self.peers.len());
            self.write_staged(cursor..end);
            unwritten = unwritten.saturating_sub(end - cursor);
            cursor = if end == self.peers.len() { 0 } else { end };
            if unwritten == 0 || taken == MESSAGE_BATCH || self.pending.is_some() {
                continue;
            }
            tokio::task::yield_now().await;
            taken += self.take_waiting(MESSAGE_BATCH - taken, rx);
            if self.staged_count != seen {
                // Something new is staged: every member is due it.
                seen = self.staged_count;
                unwritten = self.peers.len();
            }
        }
        self.staging = false;
        self.flush_staged();
        if taken > 1 {
            self.metrics.messages_batched.fetch_add(taken as u64, Relaxed);
        }
    }
}

async fn cluster_woken(cluster: Option<&Clustered>) {
    match cluster {
        Some(clustered) => clustered.link.woken().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
