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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::Outbound;
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
        Self { reason, close: Some((code, text.into())) }
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
                self.end(Ending::new(CloseReason::SlowConsumer, close_code::POLICY, "slow consumer"));
                false
            }
        }
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

    pub fn members(&self) -> Arc<Vec<Arc<Peer>>> {
        self.members.lock().expect("room lock").clone()
    }

    /// Hand a member's message to the room, in arrival order; waits while the inbox is
    /// full.
    pub async fn send(&self, from: MemberId, payload: Payload) {
        // The actor only stops after the last member left, so this cannot fail while
        // the sender is a member.
        let _ = self.tx.send(RoomEvent::Message { from, payload }).await;
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
}

impl Rooms {
    pub fn new(metrics: Arc<Metrics>, plugins: Arc<LivePlugins>, tracker: TaskTracker) -> Self {
        Self { map: Mutex::new(HashMap::new()), metrics, plugins, tracker }
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
        let _ = room.tx.send(RoomEvent::Leave { member, reason, last }).await;
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
            .map(|r| RoomSummary { name: r.name.to_string(), members: r.members().len(), plugin: r.plugin() })
            .collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        rooms
    }

    /// Names and member counts of the live rooms.
    pub fn list(&self) -> Vec<(String, usize)> {
        let map = self.map.lock().expect("rooms lock");
        let mut rooms: Vec<_> = map.values().map(|r| (r.name.to_string(), r.members().len())).collect();
        rooms.sort();
        rooms
    }

    fn spawn_room(self: &Arc<Self>, name: &str) -> Arc<Room> {
        let (tx, rx) = mpsc::channel(ROOM_INBOX);
        let room = Arc::new(Room {
            name: Arc::from(name),
            members: Mutex::new(Arc::new(Vec::new())),
            plugin: Mutex::new(None),
            tx,
        });
        let actor = RoomActor::new(room.clone(), self);
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
    /// Members in join order, as this actor has been told of them (join and leave
    /// events), so the plugin's view matches the order of its hooks.
    peers: Vec<Arc<Peer>>,
    ids: Vec<MemberId>,
    logic: Logic,
    /// The plugin set generation `logic` was resolved against.
    generation: u64,
    /// Pending plugin timers: deadline → id, and id → deadline for cancelling.
    timers: BTreeMap<(Instant, u64), ()>,
    timer_deadlines: HashMap<u64, Instant>,
    room_exists: RoomExists,
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
                exists.upgrade().is_some_and(|rooms| rooms.get(name).is_some())
            }),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<RoomEvent>) {
        self.refresh_plugin();
        loop {
            let next_timer = self.timers.keys().next().map(|(at, _)| *at);
            let event = tokio::select! {
                event = rx.recv() => event,
                () = sleep_until_opt(next_timer) => {
                    self.fire_due_timers();
                    continue;
                }
            };
            let Some(event) = event else { break };
            self.refresh_plugin();
            match event {
                RoomEvent::Join(peer) => self.join(peer),
                RoomEvent::Leave { member, reason, last } => {
                    self.leave(member, reason);
                    if last {
                        break;
                    }
                }
                RoomEvent::Message { from, payload } => self.message(Origin::Member(from), payload, 0),
                RoomEvent::Forward { from_room, payload, hops } => {
                    self.message(Origin::Room(from_room.to_string()), payload, hops)
                }
                RoomEvent::PluginsChanged => {}
                RoomEvent::Publish(payload) => self.deliver_all(&payload, None),
            }
        }
        tracing::debug!(room = %self.room.name, "room closed");
    }

    /// Record which plugin and version serve the room, for the admin API.
    fn show_logic(&self) {
        let shown = match &self.logic {
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
            self.switch_plugin();
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
                tracing::info!(room = %self.room.name, plugin = plugin.name(), version = %plugin.info().version, sha256 = plugin.sha256(), "room switches plugin");
                self.start(plugin, state);
            }
        }
    }

    /// Start a fresh instance of `plugin`. With `state`, restore it; without (or if the
    /// restore is refused), present the current members as joins.
    fn start(&mut self, plugin: Arc<Plugin>, state: Option<Vec<u8>>) {
        let calls = self.metrics.plugin_calls(plugin.name());
        let mut instance = match plugin.instantiate(&self.room.name) {
            Ok(instance) => instance,
            Err(error) => {
                calls.count(error.kind.outcome());
                tracing::error!(%error, "plugin instance could not start; closing the room's members");
                self.logic = Logic::Failed { plugin };
                self.close_all_failed();
                return;
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
                                return;
                            }
                        }
                    }
                }
            }
        }
        self.logic = Logic::Plugin { instance, calls };
        self.apply_setup();
        if !restored {
            for peer in self.peers.clone() {
                if !self.call_join(&peer) {
                    return;
                }
            }
        }
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
        if let Logic::Failed { plugin } = &self.logic {
            // A new member gives the plugin another chance to start.
            let plugin = plugin.clone();
            self.start(plugin, None);
            return; // `start` presented every member, the new one included
        }
        self.call_join(&peer);
    }

    /// Call the plugin's `join` for `peer`; `false` if the instance failed.
    fn call_join(&mut self, peer: &Arc<Peer>) -> bool {
        let info = MemberInfo {
            id: peer.id,
            query: peer.query.clone(),
            remote_addr: peer.remote_addr.clone(),
            protocol: peer.protocol.clone(),
        };
        let result = self.with_instance(|instance, view| instance.join(view, &info));
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
            Origin::Room(_) => None,
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
                for peer in self.peers.clone() {
                    let info = MemberInfo {
                        id: peer.id,
                        query: peer.query.clone(),
                        remote_addr: peer.remote_addr.clone(),
                        protocol: peer.protocol.clone(),
                    };
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
    }

    /// Carry out what a successful call asked for.
    fn apply(&mut self, actions: Vec<Action>, hops: u8) {
        for action in actions {
            match action {
                Action::Send { to, payload } => {
                    if let Some(peer) = self.peers.iter().find(|p| p.id == to)
                        && peer.deliver(encode(&payload))
                    {
                        self.metrics.messages_out.fetch_add(1, Relaxed);
                    }
                }
                Action::Broadcast { payload, except } => self.deliver_except(&encode(&payload), &except),
                Action::Forward { room, payload } => self.forward(&room, payload, hops),
                Action::Close { member, code, reason } => {
                    if let Some(peer) = self.peers.iter().find(|p| p.id == member) {
                        peer.end(Ending::new(CloseReason::Plugin, code, reason));
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
    fn deliver_all(&self, payload: &Payload, sender: Option<MemberId>) {
        let except: &[MemberId] = match &sender {
            Some(id) => std::slice::from_ref(id),
            None => &[],
        };
        self.deliver_except(&encode(payload), except);
    }

    /// Queue `frame` for every member except `except`. Never awaits.
    fn deliver_except(&self, frame: &Bytes, except: &[MemberId]) {
        let mut delivered = 0;
        for peer in &self.peers {
            if !except.contains(&peer.id) && peer.deliver(frame.clone()) {
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
