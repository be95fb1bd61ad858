//! Rooms: the registry of live rooms, membership kept both ways, and one sequential
//! actor per room that decides where each message goes.
//!
//! Architecture invariant: membership changes only under the registry lock, so the
//! room → members side (here) and the member → rooms side (the session's list of
//! [`Room`]s) change in the same step, and a room with no members is removed from the
//! registry in the step that empties it. The actor never awaits a member: delivery is a
//! push onto each member's bounded [`Outbound`](crate::broadcast::Outbound) queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::broadcast::{Outbound, Overflow};
use crate::cluster::wire::{Delivery, FromOwner, InEvent, OutEvent, Snapshot, ToOwner};
use crate::cluster::{Cluster, Record, Role, RoleChange, RoomLink};
use crate::frame::{self, close_code};
use crate::metrics::{CloseReason, Metrics, PluginCalls};
use crate::plugin::{
    Action, LeaveReason, MemberInfo, Origin, Payload, Plugin, PluginError, RoomExists, RoomInstance,
    RoomView, Verdict,
};
use crate::reload::LivePlugins;

pub use crate::plugin::MemberId;

/// How many events a room's inbox holds. A member whose message does not fit waits
/// (its reader stops reading its socket) until the room catches up: backpressure on
/// the sender, never on the other members.
pub const ROOM_INBOX: usize = 1024;

/// The most member messages a room takes from its inbox at once (see
/// `RoomActor::message_batch`).
const MESSAGE_BATCH: usize = 64;

/// A connection as rooms see it: shared by its session and every room it is in.
#[derive(Debug)]
pub struct Peer {
    pub id: MemberId,
    pub outbound: Outbound,
    /// The member's upgrade query string, remote address and agreed subprotocol.
    pub query: String,
    pub remote_addr: String,
    pub protocol: Option<String>,
    /// Notified when something other than the session itself ends the session (slow
    /// consumer, a plugin's close); the session task owns the teardown.
    kill: tokio::sync::Notify,
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
    ) -> Self {
        Self {
            id,
            outbound: Outbound::new(max_queue_bytes),
            query,
            remote_addr,
            protocol,
            kill: tokio::sync::Notify::new(),
            ending: Mutex::new(None),
        }
    }

    /// End the session from outside. The first call decides the reason.
    pub fn end(&self, ending: Ending) {
        let mut slot = self.ending.lock().expect("peer lock");
        if slot.is_none() {
            *slot = Some(ending);
            // `notify_one` keeps a permit if the session is not waiting right now.
            self.kill.notify_one();
        }
    }

    /// Resolves once [`Peer::end`] was called (at once if it already was). Only the
    /// session task waits on it.
    pub async fn killed(&self) {
        self.kill.notified().await;
    }

    pub fn ending(&self) -> Option<Ending> {
        self.ending.lock().expect("peer lock").clone()
    }

    /// What a plugin's `join` hook is told about this member.
    pub fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id,
            query: self.query.clone(),
            remote_addr: self.remote_addr.clone(),
            protocol: self.protocol.clone(),
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

/// Forwarding between rooms stops after this many hops.
pub const MAX_FORWARD_HOPS: u8 = 4;

/// What a room's actor is told, in the order it happened.
#[derive(Debug)]
pub enum RoomEvent {
    Join(Arc<Peer>),
    /// `last` is set when this leave emptied the room: the actor stops after it.
    Leave {
        member: MemberId,
        reason: CloseReason,
        last: bool,
        /// Dropped once the room has handled the leave, and so every event the member
        /// sent before it: its session waits for that before it sends a close frame.
        handled: Option<oneshot::Sender<()>>,
    },
    Message {
        from: MemberId,
        payload: Payload,
    },
    /// A message another room's plugin forwarded here, `hops` rooms away from the
    /// member who sent it.
    Forward {
        from_room: Arc<str>,
        payload: Payload,
        hops: u8,
    },
    /// The plugin set changed: re-resolve this room's plugin now, not at the next event.
    PluginsChanged,
    /// A backend publishes to the room (admin API): every member gets it, as if the
    /// room had broadcast it.
    Publish(Payload),
    /// Cluster mode: records from Redis or role changes wait in the room's cluster
    /// entry (see [`crate::cluster`]); the actor takes them before every event.
    ClusterWake,
}

/// A live room. Sessions hold it for as long as they are members.
#[derive(Debug)]
pub struct Room {
    name: Arc<str>,
    /// Members in join order: the registry's side of membership (counts, the admin
    /// API, cluster presence). The actor delivers from its own list, kept from the
    /// join and leave events, so no lock is taken on the message path.
    members: Mutex<Vec<Arc<Peer>>>,
    /// The actor's inbox. The actor ends after the `Leave` that empties the room.
    tx: mpsc::Sender<RoomEvent>,
    /// The plugin and version serving the room, as the actor last set it (admin API).
    plugin: Mutex<Option<(String, u64)>>,
}

impl Room {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin name and version serving the room (`None`: default behaviour).
    pub fn plugin(&self) -> Option<(String, u64)> {
        self.plugin.lock().expect("room lock").clone()
    }

    /// A copy of the member list, in join order.
    pub fn members(&self) -> Vec<Arc<Peer>> {
        self.members.lock().expect("room lock").clone()
    }

    pub fn member_count(&self) -> usize {
        self.members.lock().expect("room lock").len()
    }

    /// Hand a member's message to the room, in arrival order; waits while the inbox is
    /// full.
    pub async fn send(&self, from: MemberId, payload: Payload) {
        // The actor only stops after the last member left, so this cannot fail while
        // the sender is a member.
        // Reserve, then send: `Sender::send` would keep a whole `RoomEvent` in this
        // future, and this future sits in every session's.
        if let Ok(permit) = self.tx.reserve().await {
            permit.send(RoomEvent::Message { from, payload });
        }
    }

    /// Queue an event without waiting; `false` if the inbox is full or closed.
    pub fn try_send(&self, event: RoomEvent) -> bool {
        self.tx.try_send(event).is_ok()
    }
}

/// What the admin API shows of a room.
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub name: String,
    pub members: usize,
    /// The plugin name and version serving it (`None`: default behaviour).
    pub plugin: Option<(String, u64)>,
}

/// Every live room on this host.
#[derive(Debug)]
pub struct Rooms {
    map: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    metrics: Arc<Metrics>,
    plugins: Arc<LivePlugins>,
    /// Room actors are tracked so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cluster mode (`--redis`): rooms are shared with other nodes through it.
    cluster: Option<Arc<Cluster>>,
}

impl Rooms {
    pub fn new(metrics: Arc<Metrics>, plugins: Arc<LivePlugins>, tracker: TaskTracker) -> Self {
        Self { map: Mutex::new(HashMap::new()), metrics, plugins, tracker, cluster: None }
    }

    /// Share rooms with other nodes through `cluster`.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn plugins(&self) -> &Arc<LivePlugins> {
        &self.plugins
    }

    /// Tell every live room that the plugin set changed. A room whose inbox is full
    /// notices at its next event anyway.
    pub fn plugins_changed(&self) {
        let map = self.map.lock().expect("rooms lock");
        for room in map.values() {
            room.try_send(RoomEvent::PluginsChanged);
        }
    }

    /// Add `peer` to room `name`, creating the room (and its actor) if it is not live.
    pub async fn join(self: &Arc<Self>, name: &str, peer: &Arc<Peer>) -> Arc<Room> {
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
            room.members.lock().expect("room lock").push(peer.clone());
            self.metrics.room_members.fetch_add(1, Relaxed);
            room
        };
        let _ = room.tx.send(RoomEvent::Join(peer.clone())).await;
        room
    }

    /// Remove `member` from `room`; the step that empties a room also removes it.
    /// `handled` is dropped once the room's actor has handled the leave.
    pub async fn leave(
        &self,
        room: &Arc<Room>,
        member: MemberId,
        reason: CloseReason,
        handled: Option<oneshot::Sender<()>>,
    ) {
        let last = {
            let mut map = self.map.lock().expect("rooms lock");
            let mut members = room.members.lock().expect("room lock");
            let Some(at) = members.iter().position(|p| p.id == member) else {
                return; // not a member (already left)
            };
            members.remove(at);
            let last = members.is_empty();
            self.metrics.room_members.fetch_sub(1, Relaxed);
            if last && map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
                map.remove(&room.name);
                self.metrics.rooms.fetch_sub(1, Relaxed);
            }
            last
        };
        let _ = room.tx.send(RoomEvent::Leave { member, reason, last, handled }).await;
    }

    /// The live room called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.map.lock().expect("rooms lock").get(name).cloned()
    }

    /// Name, member count and plugin (name, version) of every live room, sorted.
    pub fn list_with_plugins(&self) -> Vec<RoomSummary> {
        let map = self.map.lock().expect("rooms lock");
        let mut rooms: Vec<_> = map
            .values()
            .map(|r| RoomSummary { name: r.name.to_string(), members: r.member_count(), plugin: r.plugin() })
            .collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        rooms
    }

    fn spawn_room(self: &Arc<Self>, name: &str) -> Arc<Room> {
        let (tx, rx) = mpsc::channel(ROOM_INBOX);
        let room = Arc::new(Room {
            name: Arc::from(name),
            members: Mutex::new(Vec::new()),
            plugin: Mutex::new(None),
            tx,
        });
        let mut actor = RoomActor::new(room.clone(), self);
        if let Some(cluster) = &self.cluster {
            actor.cluster = Some(Clustered::new(cluster.link(&room, room.tx.clone())));
        }
        self.tracker.spawn(actor.run(rx));
        room
    }
}

/// The sequential owner of a room's behaviour: the default broadcast, or the room's
/// plugin instance.
struct RoomActor {
    room: Arc<Room>,
    /// For forwarding into other rooms; weak so a room never keeps the registry alive.
    rooms: Weak<Rooms>,
    metrics: Arc<Metrics>,
    plugins: Arc<LivePlugins>,
    /// This node's members in join order, as this actor has been told of them (join
    /// and leave events).
    peers: Vec<Arc<Peer>>,
    /// Every member the plugin sees, in join order, so its view matches the order of
    /// its hooks: `peers`' ids, plus in cluster mode the members on other nodes.
    ids: Vec<MemberId>,
    logic: Logic,
    /// The plugin set generation `logic` was resolved against.
    generation: u64,
    /// Pending plugin timers: deadline → id, and id → deadline for cancelling.
    timers: BTreeMap<(Instant, u64), ()>,
    timer_deadlines: HashMap<u64, Instant>,
    room_exists: RoomExists,
    /// Cluster mode: the room's role and what it knows beyond this node.
    cluster: Option<Clustered>,
    /// Nothing else waited in the inbox when the current event was taken: its
    /// deliveries write through to idle members' sockets. (Under a backlog, messages
    /// are handled in batches, or queued in cluster mode.)
    write_through: bool,
    /// An event taken from the inbox while gathering a batch, handled next.
    pending: Option<RoomEvent>,
    /// While a batch of messages is handled: deliveries wait here, in order, and go
    /// out member by member at the end of the batch (or before a close).
    staging: bool,
    staged: Vec<(Bytes, Target)>,
}

/// Who a staged frame is for.
enum Target {
    /// Every member but these.
    Except(Vec<MemberId>),
    One(MemberId),
}

impl Target {
    fn includes(&self, member: MemberId) -> bool {
        match self {
            Target::Except(except) => !except.contains(&member),
            Target::One(one) => *one == member,
        }
    }
}

/// What decides where a room's messages go.
// One per room, never moved after it is set: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Logic {
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
    fn new(room: Arc<Room>, rooms: &Arc<Rooms>) -> Self {
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
            timers: BTreeMap::new(),
            timer_deadlines: HashMap::new(),
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
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<RoomEvent>) {
        if let Some(clustered) = &mut self.cluster {
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
            let next_timer = self.timers.keys().next().map(|(at, _)| *at);
            let save_at = self.cluster.as_ref().and_then(|c| c.save_at);
            let event = if let Some(event) = self.pending.take() {
                Some(event)
            } else {
                tokio::select! {
                    event = rx.recv() => event,
                    () = sleep_until_opt(next_timer) => {
                        self.write_through = rx.is_empty();
                        self.fire_due_timers();
                        self.after_event();
                        continue;
                    }
                    () = sleep_until_opt(save_at) => {
                        self.save_snapshot();
                        continue;
                    }
                }
            };
            let Some(event) = event else { break };
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
                RoomEvent::Join(peer) => {
                    self.announce(&peer);
                    self.join(peer)
                }
                RoomEvent::Leave { member, reason, last, handled: _ } => {
                    self.unannounce(member);
                    self.leave(member, reason);
                    if last {
                        self.after_event();
                        break;
                    }
                }
                RoomEvent::Message { from, payload } if self.batches() => {
                    self.message_batch(from, payload, &mut rx)
                }
                RoomEvent::Message { from, payload } => self.message(Origin::Member(from), payload, 0),
                RoomEvent::Forward { from_room, payload, hops } => {
                    self.message(Origin::Room(from_room.to_string()), payload, hops)
                }
                // The room's plugin decides what a backend's publish becomes.
                RoomEvent::Publish(payload) => self.message(Origin::Server, payload, 0),
                RoomEvent::PluginsChanged | RoomEvent::ClusterWake => {}
            }
            self.after_event();
        }
        self.finish().await;
        tracing::debug!(room = %self.room.name, "room closed");
    }

    /// Record which plugin and version serve the room, for the admin API.
    fn show_logic(&self) {
        let shown = match &self.logic {
            // A follower runs no instance; it shows the plugin its owner runs.
            Logic::Default if self.follows() => self
                .plugins
                .for_room(&self.room.name)
                .map(|plugin| (plugin.name().to_owned(), self.plugins.version_of(&plugin))),
            Logic::Default => None,
            Logic::Plugin { instance, .. } => {
                let plugin = instance.plugin();
                Some((plugin.name().to_owned(), self.plugins.version_of(plugin)))
            }
            Logic::Failed { plugin } => Some((plugin.name().to_owned(), self.plugins.version_of(plugin))),
        };
        *self.room.plugin.lock().expect("room lock") = shown;
    }

    /// Switch to the plugin that now serves this room, if the plugin set changed.
    /// Runs between two events, never during one.
    fn refresh_plugin(&mut self) {
        if self.plugins.generation() != self.generation {
            if self.follows() {
                // The owner runs the plugin; a follower only shows which.
                self.generation = self.plugins.generation();
            } else {
                self.switch_plugin();
            }
            self.show_logic();
        }
    }

    fn switch_plugin(&mut self) {
        let generation = self.plugins.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let wanted = self.plugins.for_room(&self.room.name);
        let current = match &self.logic {
            Logic::Default => None,
            Logic::Plugin { instance, .. } => Some(instance.plugin().clone()),
            Logic::Failed { plugin } => Some(plugin.clone()),
        };
        let same = match (&wanted, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        // Carry the room's state over when the old version can snapshot.
        let state = match &mut self.logic {
            Logic::Plugin { instance, calls } if wanted.is_some() => match instance.snapshot() {
                Ok(state) => {
                    calls.ok();
                    state
                }
                Err(error) => {
                    self.failed_call(&error);
                    None
                }
            },
            _ => None,
        };
        self.clear_timers();
        match wanted {
            None => {
                if let Some(old) = current {
                    tracing::info!(room = %self.room.name, plugin = old.name(), "room returns to the default behaviour");
                }
                self.logic = Logic::Default;
            }
            Some(plugin) => {
                match &current {
                    // A reload (or a new plugin claiming the room) changed what serves it.
                    Some(old) => tracing::info!(
                        room = %self.room.name,
                        plugin = plugin.name(),
                        from = %format!("{} {}", old.name(), old.info().version),
                        to = %format!("{} {}", plugin.name(), plugin.info().version),
                        sha256 = plugin.sha256(),
                        "room switches plugin"
                    ),
                    // A new room starting on its plugin: routine.
                    None => {
                        tracing::debug!(room = %self.room.name, plugin = plugin.name(), "room starts its plugin")
                    }
                }
                self.start(plugin, state);
            }
        }
    }

    /// Start a fresh instance of `plugin`. With `state`, restore it; without (or if the
    /// restore is refused), present the current members as joins. Returns whether the
    /// state was restored.
    fn start(&mut self, plugin: Arc<Plugin>, state: Option<Vec<u8>>) -> bool {
        let calls = self.metrics.plugin_calls(plugin.name());
        let mut instance = match plugin.instantiate(&self.room.name) {
            Ok(instance) => instance,
            Err(error) => {
                calls.count(error.kind.outcome());
                tracing::error!(%error, "plugin instance could not start; closing the room's members");
                self.logic = Logic::Failed { plugin };
                self.close_all_failed();
                return false;
            }
        };
        calls.ok();
        let mut restored = false;
        if let Some(state) = state {
            match instance.restore(&state) {
                Ok(()) => {
                    calls.ok();
                    restored = true;
                }
                Err(error) => {
                    calls.count(error.kind.outcome());
                    tracing::warn!(%error, "restore refused; the room starts fresh");
                    if instance.failure().is_some() {
                        match plugin.instantiate(&self.room.name) {
                            Ok(fresh) => instance = fresh,
                            Err(error) => {
                                tracing::error!(%error, "plugin instance could not start");
                                self.logic = Logic::Failed { plugin };
                                self.close_all_failed();
                                return false;
                            }
                        }
                    }
                }
            }
        }
        self.logic = Logic::Plugin { instance, calls };
        self.apply_setup();
        if !restored {
            for member in self.member_infos() {
                if !self.call_join(&member) {
                    return false;
                }
            }
        }
        restored
    }

    /// Every member (local or on another node) in join order.
    fn member_infos(&self) -> Vec<MemberInfo> {
        self.ids.iter().filter_map(|id| self.member_info(*id)).collect()
    }

    /// Apply the timers a new instance set in `init` or `restore`.
    fn apply_setup(&mut self) {
        if let Logic::Plugin { instance, .. } = &mut self.logic {
            let actions = instance.take_setup_actions();
            self.apply(actions, 0);
        }
    }

    fn join(&mut self, peer: Arc<Peer>) {
        self.ids.push(peer.id);
        self.peers.push(peer.clone());
        self.joined(&peer.info());
    }

    /// Tell the logic about a member already added to `ids`.
    fn joined(&mut self, info: &MemberInfo) {
        if let Logic::Failed { plugin } = &self.logic {
            // A new member gives the plugin another chance to start.
            let plugin = plugin.clone();
            self.start(plugin, None);
            return; // `start` presented every member, the new one included
        }
        self.call_join(info);
    }

    /// Call the plugin's `join` for `info`; `false` if the instance failed.
    fn call_join(&mut self, info: &MemberInfo) -> bool {
        let result = self.with_instance(|instance, view| instance.join(view, info));
        match result {
            None => true,
            Some(Ok(actions)) => {
                self.apply(actions, 0);
                true
            }
            Some(Err(error)) => {
                self.recover(&error);
                false
            }
        }
    }

    fn leave(&mut self, member: MemberId, reason: CloseReason) {
        self.ids.retain(|id| *id != member);
        self.peers.retain(|p| p.id != member);
        self.left(member, reason);
    }

    /// Tell the logic about a member already removed from `ids`.
    fn left(&mut self, member: MemberId, reason: CloseReason) {
        let reason = leave_reason(reason);
        if let Some(result) = self.with_instance(|instance, view| instance.leave(view, member, reason)) {
            match result {
                Ok(actions) => self.apply(actions, 0),
                Err(error) => self.recover(&error),
            }
        }
    }

    fn message(&mut self, origin: Origin, payload: Payload, hops: u8) {
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
    fn batches(&self) -> bool {
        self.cluster.is_none() && !matches!(self.logic, Logic::Failed { .. })
    }

    /// Messages under load: take the member messages already waiting in the inbox (up
    /// to [`MESSAGE_BATCH`], and only while the plugin set is unchanged, so a reload
    /// still takes over between two messages) and handle them one by one as usual,
    /// plugin calls included, but stage their deliveries; then give each member all
    /// the frames it is due with one push: one `sendmsg(2)` when nothing is queued for
    /// it, else queued with one wake-up of its writer. A lone message goes the usual
    /// way, written through when the inbox is empty.
    fn message_batch(&mut self, from: MemberId, payload: Payload, rx: &mut mpsc::Receiver<RoomEvent>) {
        let mut more = Vec::new();
        while more.len() + 1 < MESSAGE_BATCH && self.plugins.generation() == self.generation {
            match rx.try_recv() {
                Ok(RoomEvent::Message { from, payload }) => more.push((from, payload)),
                Ok(other) => {
                    self.pending = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        if more.is_empty() {
            return self.message(Origin::Member(from), payload, 0);
        }
        self.staging = true;
        self.message(Origin::Member(from), payload, 0);
        for (from, payload) in more {
            self.message(Origin::Member(from), payload, 0);
        }
        self.staging = false;
        self.flush_staged();
    }

    /// Deliver the staged frames: each member gets the ones meant for it, in order,
    /// with one push.
    fn flush_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let mut frames = Vec::with_capacity(self.staged.len());
        let mut delivered = 0;
        for peer in &self.peers {
            frames.clear();
            frames.extend(
                self.staged.iter().filter(|(_, target)| target.includes(peer.id)).map(|(frame, _)| frame),
            );
            if !frames.is_empty() {
                delivered += peer.deliver_batch(&frames);
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
        // Keeps its allocation for the next batch.
        self.staged.clear();
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.timers.keys().next() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, id));
            self.timer_deadlines.remove(&id);
            if let Some(result) = self.with_instance(|instance, view| instance.timer(view, id)) {
                match result {
                    Ok(actions) => self.apply(actions, 0),
                    Err(error) => self.recover(&error),
                }
            }
        }
    }

    /// Run `call` on the plugin instance, counting its outcome; `None` when the room
    /// has no live instance.
    fn with_instance<T>(
        &mut self,
        call: impl FnOnce(&mut RoomInstance, &RoomView<'_>) -> Result<T, PluginError>,
    ) -> Option<Result<T, PluginError>> {
        let Logic::Plugin { instance, calls } = &mut self.logic else {
            return None;
        };
        let view = RoomView { room: &self.room.name, members: &self.ids, room_exists: &self.room_exists };
        let result = call(instance, &view);
        match &result {
            Ok(_) => calls.ok(),
            Err(error) => calls.count(error.kind.outcome()),
        }
        Some(result)
    }

    fn failed_call(&self, error: &PluginError) {
        tracing::warn!(plugin = %error.plugin, room = %self.room.name, outcome = error.kind.outcome(), %error, "plugin call failed");
    }

    /// After a failed call: the instance is gone; the room continues on a fresh one,
    /// which is told about every current member. If that fails too, the members are
    /// closed with 1011.
    fn recover(&mut self, error: &PluginError) {
        self.flush_staged();
        self.failed_call(error);
        let Logic::Plugin { instance, .. } = &self.logic else {
            return;
        };
        let plugin = instance.plugin().clone();
        self.clear_timers();
        self.logic = Logic::Default;
        let attempt = plugin.instantiate(&self.room.name);
        let calls = self.metrics.plugin_calls(plugin.name());
        match attempt {
            Ok(instance) => {
                calls.ok();
                tracing::info!(room = %self.room.name, plugin = plugin.name(), "room continues on a fresh plugin instance");
                self.logic = Logic::Plugin { instance, calls };
                self.apply_setup();
                for info in self.member_infos() {
                    match self.with_instance(|instance, view| instance.join(view, &info)) {
                        Some(Ok(actions)) => self.apply(actions, 0),
                        Some(Err(error)) => {
                            self.failed_call(&error);
                            self.logic = Logic::Failed { plugin };
                            self.close_all_failed();
                            return;
                        }
                        None => {}
                    }
                }
            }
            Err(error) => {
                calls.count(error.kind.outcome());
                self.failed_call(&error);
                self.logic = Logic::Failed { plugin };
                self.close_all_failed();
            }
        }
    }

    fn close_all_failed(&mut self) {
        for peer in &self.peers {
            peer.end(Ending::new(CloseReason::PluginFailure, close_code::INTERNAL, "plugin failure"));
        }
        if let Some(clustered) = &mut self.cluster {
            for &member in clustered.remote.keys() {
                clustered.outbox.push(Delivery::Close {
                    member,
                    code: close_code::INTERNAL,
                    reason: "plugin failure".into(),
                    failure: true,
                });
            }
        }
    }

    /// Carry out what a successful call asked for.
    fn apply(&mut self, actions: Vec<Action>, hops: u8) {
        for action in actions {
            match action {
                Action::Send { to, payload } => {
                    if !self.deliver_to(to, &payload)
                        && let Some(clustered) = self.cluster.as_mut().filter(|c| c.remote.contains_key(&to))
                    {
                        clustered.outbox.push(Delivery::Send { to, payload });
                    }
                }
                Action::Broadcast { payload, except } => self.broadcast(&payload, &except),
                Action::Forward { room, payload } => self.forward(&room, payload, hops),
                Action::Close { member, code, reason } => {
                    // What the member was sent before its close reaches it first.
                    self.flush_staged();
                    if let Some(peer) = self.local(member) {
                        peer.end(Ending::new(CloseReason::Plugin, code, reason));
                    } else if let Some(clustered) =
                        self.cluster.as_mut().filter(|c| c.remote.contains_key(&member))
                    {
                        clustered.outbox.push(Delivery::Close { member, code, reason, failure: false });
                    }
                }
                Action::SetTimer { id, after } => {
                    let at = Instant::now() + after;
                    if let Some(old) = self.timer_deadlines.insert(id, at) {
                        self.timers.remove(&(old, id));
                    }
                    self.timers.insert((at, id), ());
                }
                Action::CancelTimer { id } => {
                    if let Some(at) = self.timer_deadlines.remove(&id) {
                        self.timers.remove(&(at, id));
                    }
                }
            }
        }
    }

    fn forward(&self, target: &str, payload: Payload, hops: u8) {
        let hops = hops.saturating_add(1);
        if hops > MAX_FORWARD_HOPS {
            tracing::debug!(from = %self.room.name, to = target, "forward dropped after {MAX_FORWARD_HOPS} hops");
            return;
        }
        let Some(room) = self.rooms.upgrade().and_then(|rooms| rooms.get(target)) else {
            // Not live here: its owner is elsewhere in the cluster, if anywhere.
            if let Some(clustered) = self.cluster.as_ref().filter(|c| c.role != Role::Solo) {
                let event = InEvent::Forward { from_room: self.room.name.to_string(), payload, hops };
                clustered.link.forward(target, event);
            }
            return;
        };
        let event = RoomEvent::Forward { from_room: self.room.name.clone(), payload, hops };
        // Never wait on another room: a full inbox drops the forward.
        if !room.try_send(event) {
            tracing::warn!(from = %self.room.name, to = target, "forward dropped: the target room is busy");
        }
    }

    fn clear_timers(&mut self) {
        self.timers.clear();
        self.timer_deadlines.clear();
    }

    /// The default delivery: every member except the sender.
    fn deliver_all(&mut self, payload: &Payload, sender: Option<MemberId>) {
        let except: &[MemberId] = match &sender {
            Some(id) => std::slice::from_ref(id),
            None => &[],
        };
        self.broadcast(payload, except);
    }

    /// Every member except `except`, here and (as the owner) on the other nodes.
    fn broadcast(&mut self, payload: &Payload, except: &[MemberId]) {
        self.deliver_except(&encode(payload), except);
        if let Some(clustered) = self.cluster.as_mut().filter(|c| !c.remote.is_empty()) {
            clustered.outbox.push(Delivery::Broadcast { payload: payload.clone(), except: except.to_vec() });
        }
    }

    /// This node's member `id`, if it is one.
    fn local(&self, id: MemberId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Queue `payload` for this node's member `to`; `false` if `to` is not one. Never
    /// awaits.
    fn deliver_to(&mut self, to: MemberId, payload: &Payload) -> bool {
        let Some(peer) = self.local(to) else { return false };
        let frame = encode(payload);
        if self.staging {
            self.staged.push((frame, Target::One(to)));
        } else if peer.deliver(&frame, self.write_through) {
            self.metrics.messages_out.fetch_add(1, Relaxed);
        }
        true
    }

    /// Queue `frame` for every member except `except`. Never awaits.
    fn deliver_except(&mut self, frame: &Bytes, except: &[MemberId]) {
        if self.staging {
            self.staged.push((frame.clone(), Target::Except(except.to_vec())));
            return;
        }
        let mut delivered = 0;
        for peer in &self.peers {
            if !except.contains(&peer.id) && peer.deliver(frame, self.write_through) {
                delivered += 1;
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
    }
}

fn leave_reason(reason: CloseReason) -> LeaveReason {
    match reason {
        CloseReason::Client => LeaveReason::Client,
        CloseReason::Heartbeat => LeaveReason::Heartbeat,
        CloseReason::SlowConsumer => LeaveReason::SlowConsumer,
        CloseReason::TooBig => LeaveReason::TooBig,
        CloseReason::Protocol => LeaveReason::Protocol,
        CloseReason::Reset => LeaveReason::Reset,
        CloseReason::Shutdown => LeaveReason::Shutdown,
        CloseReason::Plugin => LeaveReason::ClosedByPlugin,
        CloseReason::PluginFailure => LeaveReason::PluginFailure,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long an owner lets its room's state change before it stores a snapshot: what
/// a crash of the owner can lose, against one `snapshot` call and one Redis write per
/// interval for a busy room.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The most records a room keeps while it has no owner to give them to.
const CLUSTER_BACKLOG: usize = 1024;

/// What a room actor knows in cluster mode beyond this node.
struct Clustered {
    link: RoomLink,
    role: Role,
    /// Members on other nodes (owner only), by id.
    remote: HashMap<MemberId, Remote>,
    /// Remote members that left, and when (owner), so that a presence read older than
    /// their leave does not bring them back. Pruned as it grows.
    left: HashMap<MemberId, Instant>,
    /// Deliveries for other nodes produced by the current event (owner).
    outbox: Vec<Delivery>,
    /// This node's records that reached no owner, in order (follower).
    unheard: std::collections::VecDeque<Vec<u8>>,
    /// Records for the owner received while a claim is being decided (follower).
    early: std::collections::VecDeque<ToOwner>,
    /// The last delivery batch seen: its owner and number (follower).
    last_seq: Option<(String, u64)>,
    /// When the next snapshot is due (owner, state changed since the last one).
    save_at: Option<Instant>,
    last_save: Option<Instant>,
}

/// A member on another node, as the owner knows it.
struct Remote {
    node: String,
    info: MemberInfo,
    joined: Instant,
}

impl Clustered {
    fn new(link: RoomLink) -> Self {
        Self {
            link,
            role: Role::Pending,
            remote: HashMap::new(),
            left: HashMap::new(),
            outbox: Vec::new(),
            unheard: Default::default(),
            early: Default::default(),
            last_seq: None,
            save_at: None,
            last_save: None,
        }
    }
}

/// Cluster mode: what the actor does as owner, follower or alone.
impl RoomActor {
    /// Whether another node runs this room (events go there).
    fn follows(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| matches!(c.role, Role::Follower | Role::Pending))
    }

    /// Whether this node runs the room for other nodes too.
    fn owns(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.role == Role::Owner)
    }

    /// Announce a local member in the cluster's presence.
    fn announce(&self, peer: &Peer) {
        if let Some(clustered) = self.cluster.as_ref().filter(|c| c.role != Role::Solo) {
            clustered.link.present(&peer.info());
        }
    }

    fn unannounce(&self, member: MemberId) {
        if let Some(clustered) = self.cluster.as_ref().filter(|c| c.role != Role::Solo) {
            clustered.link.absent(member);
        }
    }

    /// A follower's event: local bookkeeping, then the owner decides. Returns whether
    /// the actor ends (its last local member left).
    fn follow(&mut self, event: RoomEvent) -> bool {
        let Some(clustered) = self.cluster.as_mut() else { return false };
        match event {
            RoomEvent::Join(peer) => {
                let info = peer.info();
                clustered.link.present(&info);
                clustered.link.to_owner(InEvent::Join(info));
                self.ids.push(peer.id);
                self.peers.push(peer);
            }
            RoomEvent::Leave { member, reason, last, handled: _ } => {
                clustered.link.absent(member);
                clustered.link.to_owner(InEvent::Leave { member, reason: reason.label().to_owned() });
                self.ids.retain(|id| *id != member);
                self.peers.retain(|p| p.id != member);
                return last;
            }
            RoomEvent::Message { from, payload } => {
                clustered.link.to_owner(InEvent::Message { from, payload })
            }
            RoomEvent::Forward { from_room, payload, hops } => {
                clustered.link.to_owner(InEvent::Forward { from_room: from_room.to_string(), payload, hops })
            }
            RoomEvent::Publish(payload) => clustered.link.to_owner(InEvent::Publish(payload)),
            RoomEvent::PluginsChanged | RoomEvent::ClusterWake => {}
        }
        false
    }

    /// Apply the role changes the supervisor queued, then the records from Redis.
    fn role_changes(&mut self) {
        while let Some(change) = self.cluster.as_ref().and_then(|c| c.link.next_change()) {
            self.role_change(change);
        }
        let records = self.cluster.as_ref().map(|c| c.link.take_records()).unwrap_or_default();
        for record in records {
            match record {
                Record::In(record) => self.inbound(record),
                Record::Out(record) => self.outbound(record),
                Record::Unheard(data) => self.unheard(data),
            }
            // Deliveries of inbound records go out per record, as for local events.
            self.after_event();
        }
    }

    fn role_change(&mut self, change: RoleChange) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let before = clustered.role;
        match change {
            RoleChange::Solo => {
                clustered.role = Role::Solo;
                clustered.outbox.clear();
                match before {
                    Role::Pending | Role::Follower => {
                        // Serve the local members on a local instance until Redis returns.
                        self.generation = u64::MAX;
                        self.refresh_plugin();
                    }
                    Role::Owner => {
                        let remote: Vec<MemberId> = clustered.remote.keys().copied().collect();
                        for member in remote {
                            self.remote_leave(member, CloseReason::Reset);
                        }
                    }
                    Role::Solo => {}
                }
                let unheard: Vec<Vec<u8>> =
                    self.cluster.as_mut().map(|c| c.unheard.drain(..).collect()).unwrap_or_default();
                for data in unheard {
                    self.unheard(data);
                }
            }
            RoleChange::Follower { owner } => {
                clustered.role = Role::Follower;
                clustered.early.clear();
                clustered.save_at = None;
                if matches!(before, Role::Owner | Role::Solo) {
                    if !matches!(self.logic, Logic::Default) {
                        tracing::info!(room = %self.room.name, %owner, "another node holds the room's lease: discarding the local instance");
                        clustered.link.discarded();
                    }
                    clustered.remote.clear();
                    clustered.outbox.clear();
                    self.logic = Logic::Default;
                    self.clear_timers();
                    self.ids = self.peers.iter().map(|p| p.id).collect();
                }
                if before != Role::Pending {
                    // Announce the local members to the owner again (it ignores the ones
                    // it knows).
                    let clustered = self.cluster.as_ref().expect("clustered");
                    for peer in &self.peers {
                        clustered.link.to_owner(InEvent::Join(peer.info()));
                    }
                }
                self.show_logic();
            }
            RoleChange::Owner { snapshot, presence, asked } => {
                clustered.role = Role::Owner;
                if matches!(before, Role::Pending | Role::Follower) {
                    self.take_over(snapshot, presence, asked);
                } else {
                    self.reconcile(presence, asked);
                }
                let clustered = self.cluster.as_mut().expect("clustered");
                let early: Vec<ToOwner> = clustered.early.drain(..).collect();
                let unheard: Vec<Vec<u8>> = clustered.unheard.drain(..).collect();
                for record in early {
                    self.inbound(record);
                }
                for data in unheard {
                    self.unheard(data);
                }
                self.dirty();
                self.flush_outbox();
            }
            RoleChange::Nodes(nodes) => {
                if before != Role::Owner {
                    return;
                }
                let mut counts: HashMap<&str, u64> = HashMap::new();
                for remote in clustered.remote.values() {
                    *counts.entry(remote.node.as_str()).or_default() += 1;
                }
                let me = clustered.link.node();
                let theirs: HashMap<&str, u64> =
                    nodes.iter().filter(|(n, _)| n != me).map(|(n, c)| (n.as_str(), *c)).collect();
                if counts != theirs {
                    clustered.link.reconcile();
                }
                let horizon = Instant::now() - std::time::Duration::from_secs(60);
                clustered.left.retain(|_, at| *at > horizon);
            }
            RoleChange::Reconcile { presence, asked } => {
                if before == Role::Owner {
                    self.reconcile(presence, asked);
                    self.flush_outbox();
                }
            }
        }
    }

    /// Become the owner of a room this node did not run: restore the stored state (if
    /// the same plugin made it) and bring it up to date with who is present now, or
    /// start fresh with every present member.
    fn take_over(&mut self, snapshot: Option<Snapshot>, presence: Vec<(String, MemberInfo)>, asked: Instant) {
        let clustered = self.cluster.as_mut().expect("clustered");
        let me = clustered.link.node().to_owned();
        let local: Vec<MemberId> = self.peers.iter().map(|p| p.id).collect();
        clustered.remote.clear();
        let mut remote_order = Vec::new();
        for (node, info) in presence {
            if node != me && !local.contains(&info.id) && !clustered.remote.contains_key(&info.id) {
                remote_order.push(info.id);
                clustered.remote.insert(info.id, Remote { node, info, joined: asked });
            }
        }
        let present: Vec<MemberId> = local.iter().chain(remote_order.iter()).copied().collect();
        self.generation = self.plugins.generation();
        self.clear_timers();
        let wanted = self.plugins.for_room(&self.room.name);
        let Some(plugin) = wanted else {
            self.logic = Logic::Default;
            self.ids = present;
            self.show_logic();
            return;
        };
        let stored = snapshot.filter(|s| s.plugin == plugin.name()).and_then(|s| Some((s.members, s.state?)));
        match stored {
            Some((members, state)) => {
                // The state's view first: the members it knows that are still here.
                self.ids = members.iter().copied().filter(|id| present.contains(id)).collect();
                tracing::info!(room = %self.room.name, plugin = plugin.name(), "took the room over from its stored snapshot");
                // A restored state hears who left since; a fresh start (restore
                // refused) has met `self.ids` as joins already.
                if self.start(plugin, Some(state)) {
                    for gone in members.iter().filter(|id| !present.contains(id)) {
                        self.left(*gone, CloseReason::Reset);
                    }
                }
                // The members the state does not know join.
                for id in present.iter().filter(|id| !members.contains(id)) {
                    self.ids.push(*id);
                    if let Some(info) = self.member_info(*id) {
                        self.joined(&info);
                    }
                }
            }
            None => {
                self.ids = present;
                tracing::info!(room = %self.room.name, plugin = plugin.name(), "took the room over with a fresh instance");
                self.start(plugin, None);
            }
        }
        self.show_logic();
    }

    fn member_info(&self, id: MemberId) -> Option<MemberInfo> {
        match self.local(id) {
            Some(peer) => Some(peer.info()),
            None => self.cluster.as_ref()?.remote.get(&id).map(|r| r.info.clone()),
        }
    }

    /// Bring the remote members up to date with a presence read made at `asked`:
    /// members gone from it leave (unless they joined after the read), members new in
    /// it join (unless they left after the read).
    fn reconcile(&mut self, presence: Vec<(String, MemberInfo)>, asked: Instant) {
        let Some(clustered) = self.cluster.as_ref() else { return };
        let me = clustered.link.node().to_owned();
        let present: HashMap<MemberId, (String, MemberInfo)> =
            presence.into_iter().filter(|(node, _)| *node != me).map(|(n, i)| (i.id, (n, i))).collect();
        let gone: Vec<MemberId> = clustered
            .remote
            .iter()
            .filter(|(id, r)| !present.contains_key(id) && r.joined < asked)
            .map(|(id, _)| *id)
            .collect();
        let new: Vec<(String, MemberInfo)> = present
            .into_values()
            .filter(|(_, info)| {
                !clustered.remote.contains_key(&info.id)
                    && self.local(info.id).is_none()
                    && clustered.left.get(&info.id).is_none_or(|at| *at < asked)
            })
            .collect();
        for member in gone {
            self.remote_leave(member, CloseReason::Reset);
        }
        for (node, info) in new {
            self.remote_join(node, info);
        }
    }

    fn remote_join(&mut self, node: String, info: MemberInfo) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        if self.ids.contains(&info.id) {
            return;
        }
        clustered.left.remove(&info.id);
        clustered.remote.insert(info.id, Remote { node, info: info.clone(), joined: Instant::now() });
        self.ids.push(info.id);
        self.joined(&info);
    }

    fn remote_leave(&mut self, member: MemberId, reason: CloseReason) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        if clustered.remote.remove(&member).is_none() {
            return;
        }
        clustered.left.insert(member, Instant::now());
        self.ids.retain(|id| *id != member);
        self.left(member, reason);
    }

    /// An event for the owner, from another node (or handed back from this one).
    fn inbound(&mut self, record: ToOwner) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let mine = record.node == clustered.link.node();
        match clustered.role {
            Role::Owner => {}
            // A claim is being decided: keep it for when it is.
            Role::Pending | Role::Follower => {
                if clustered.early.len() >= CLUSTER_BACKLOG {
                    clustered.early.pop_front();
                    clustered.link.dropped_unheard();
                }
                clustered.early.push_back(record);
                return;
            }
            // Alone, only this node's own records are ours to run.
            Role::Solo if mine => {}
            Role::Solo => return,
        }
        match record.event {
            InEvent::Join(info) => {
                if !mine {
                    self.remote_join(record.node, info);
                }
            }
            InEvent::Leave { member, reason } => {
                let reason =
                    CloseReason::ALL.into_iter().find(|r| r.label() == reason).unwrap_or(CloseReason::Reset);
                self.remote_leave(member, reason);
            }
            InEvent::Message { from, payload } => {
                if self.ids.contains(&from) {
                    self.message(Origin::Member(from), payload, 0);
                } else {
                    tracing::debug!(room = %self.room.name, member = from, "message from an unknown member dropped");
                }
            }
            InEvent::Forward { from_room, payload, hops } => {
                self.message(Origin::Room(from_room), payload, hops)
            }
            InEvent::Publish(payload) => self.message(Origin::Server, payload, 0),
        }
    }

    /// Deliveries from another node, the owner, for this node's members (a node's
    /// own never reach it: see `Cluster::dispatch`).
    fn outbound(&mut self, record: FromOwner) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        match record.event {
            OutEvent::Released => {
                if clustered.role == Role::Follower {
                    clustered.link.check();
                }
            }
            OutEvent::Deliveries { seq, items } => {
                if clustered.role != Role::Follower {
                    return;
                }
                if let Some((owner, last)) = &clustered.last_seq
                    && *owner == record.node
                    && seq > last + 1
                {
                    let missed = seq - last - 1;
                    tracing::warn!(room = %self.room.name, missed, "missed deliveries from the room's owner");
                    clustered.link.gap(missed);
                }
                clustered.last_seq = Some((record.node, seq));
                // The owner is alive and listening: give it what it did not hear.
                for data in clustered.unheard.drain(..) {
                    clustered.link.republish(data);
                }
                for item in items {
                    match item {
                        Delivery::Broadcast { payload, except } => {
                            self.deliver_except(&encode(&payload), &except)
                        }
                        Delivery::Send { to, payload } => {
                            self.deliver_to(to, &payload);
                        }
                        Delivery::Close { member, code, reason, failure } => {
                            if let Some(peer) = self.local(member) {
                                let why =
                                    if failure { CloseReason::PluginFailure } else { CloseReason::Plugin };
                                peer.end(Ending::new(why, code, reason));
                            }
                        }
                    }
                }
            }
        }
    }

    /// One of this node's records reached no owner.
    fn unheard(&mut self, data: Vec<u8>) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        match clustered.role {
            Role::Pending | Role::Follower => {
                if clustered.unheard.len() >= CLUSTER_BACKLOG {
                    clustered.unheard.pop_front();
                    clustered.link.dropped_unheard();
                }
                clustered.unheard.push_back(data);
            }
            Role::Owner | Role::Solo => match ToOwner::decode(&data) {
                Ok(record) => self.inbound(record),
                Err(error) => tracing::warn!(%error, "unreadable record dropped"),
            },
        }
    }

    /// After each event: publish the remote deliveries it produced, and schedule a
    /// snapshot if the owner's plugin state may have changed.
    fn after_event(&mut self) {
        if self.owns() {
            self.dirty();
            self.flush_outbox();
        }
    }

    fn flush_outbox(&mut self) {
        if let Some(clustered) = self.cluster.as_mut()
            && !clustered.outbox.is_empty()
        {
            let items = std::mem::take(&mut clustered.outbox);
            if clustered.role == Role::Owner {
                clustered.link.deliver(items);
            }
        }
    }

    /// The state may have changed: store a snapshot within [`SNAPSHOT_EVERY`].
    fn dirty(&mut self) {
        if !matches!(self.logic, Logic::Plugin { .. }) {
            return;
        }
        if let Some(clustered) = self.cluster.as_mut()
            && clustered.save_at.is_none()
        {
            let now = Instant::now();
            let due = clustered.last_save.map_or(now, |at| (at + SNAPSHOT_EVERY).max(now));
            clustered.save_at = Some(due);
        }
    }

    /// Store the owner's plugin state for a successor.
    fn save_snapshot(&mut self) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        clustered.save_at = None;
        clustered.last_save = Some(Instant::now());
        if clustered.role != Role::Owner {
            return;
        }
        let Logic::Plugin { instance, calls } = &mut self.logic else { return };
        let plugin = instance.plugin().name().to_owned();
        match instance.snapshot() {
            Ok(state) => {
                calls.ok();
                clustered.link.save(&Snapshot { plugin, members: self.ids.clone(), state });
            }
            Err(error) => {
                calls.count(error.kind.outcome());
                self.recover(&error);
            }
        }
    }

    /// The room's last local member left: an owner hands the room over (or, when
    /// nobody is left anywhere, deletes its state); then the room leaves the cluster.
    async fn finish(&mut self) {
        let owns = self.owns();
        let empty = self.cluster.as_ref().is_some_and(|c| c.remote.is_empty());
        if owns && !empty {
            self.save_snapshot();
        }
        let Some(clustered) = self.cluster.take() else { return };
        // Stop hearing the room's events first, so that those sent after the release
        // are handed back to their senders instead of being lost here.
        let link = clustered.link;
        link.detach_and_wait().await;
        if owns {
            link.release(!empty);
        }
    }
}
