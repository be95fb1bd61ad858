//! Rooms: the registry of live rooms, membership kept both ways, and one sequential
//! actor per room that decides where each message goes.
//!
//! Architecture invariant: membership changes only under the registry lock, so the
//! room → members side (here) and the member → rooms side (the session's list of
//! [`Room`]s) change in the same step, and a room with no members is removed from the
//! registry in the step that empties it. The actor never awaits a member: delivery is a
//! push onto each member's bounded [`Outbound`](crate::ws::outbound::Outbound) queue.
//!
//! Files, one concern each: this one holds the registry ([`Rooms`]) and the shared
//! [`Room`]; `peer.rs` the member as rooms see it; `actor.rs` the actor's event loop
//! and member events; `logic.rs` the plugin's lifecycle (start, switch, recover) and
//! the actions a call returns; `delivery.rs` delivery and staging; `timers.rs` plugin
//! timers; `clustered.rs` what the actor does as owner, follower or alone in cluster
//! mode (it uses [`crate::cluster`]; the cluster never names a room).

mod actor;
mod clustered;
mod delivery;
mod gate;
mod history;
mod logic;
mod peer;
mod timers;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::plugin::Payload;
use crate::plugin::reload::LivePlugins;
use crate::types::CloseReason;
use actor::RoomActor;
use clustered::Clustered;

pub use crate::plugin::MemberId;
pub use crate::protocol::Since;
pub use gate::Gate;
pub use history::{History, HistoryBudget, HistoryLimits, Recovery};
pub use peer::{Ending, Invite, Peer, Resume};

/// How many events a room's inbox holds. A member whose message does not fit waits
/// (its reader stops reading its socket) until the room catches up: backpressure on
/// the sender, never on the other members.
pub const ROOM_INBOX: usize = 1024;

/// Forwarding between rooms stops after this many hops.
pub const MAX_FORWARD_HOPS: u8 = 4;

/// What a room's actor is told, in the order it happened.
#[derive(Debug)]
pub enum RoomEvent {
    Join(Joining),
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
}

/// A member on its way into a room.
#[derive(Debug)]
pub struct Joining {
    pub peer: Arc<Peer>,
    /// The `ref` of the client's join (room-protocol mode), echoed by `joined` or
    /// `error`: `Some(0)` for the room in the upgrade's path, `None` when a plugin
    /// added the member.
    pub reference: Option<u64>,
    /// The join's parameters (JSON text), for the room's plugin.
    pub params: Option<Arc<str>>,
    /// Recover what the client missed since this position (room-protocol `since`).
    pub since: Option<Since>,
}

#[cfg(test)]
impl Joining {
    /// A join without a `ref`, parameters or recovery.
    pub fn plain(peer: &Arc<Peer>) -> Self {
        Joining { peer: peer.clone(), reference: None, params: None, since: None }
    }
}

/// The most histories of rooms without members a server keeps (until their messages
/// expire); past it the one closed longest ago goes.
pub const MAX_RETAINED_HISTORIES: usize = 10_000;

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
    /// History of rooms without a plugin (`history_size`, `history_ttl`; `None`: off).
    default_history: Option<crate::plugin::HistorySettings>,
    /// `compression` on: messages from this many bytes up are deflated for members
    /// that negotiated it (`None`: off).
    compression: Option<usize>,
    /// The most bytes one room's history holds: half a member's outbound queue, so
    /// that a replay fits an empty queue.
    history_bytes: usize,
    budget: Arc<HistoryBudget>,
    /// Histories of rooms that emptied, kept for members who come back, oldest
    /// closed first.
    retained: Mutex<RetainedHistories>,
}

#[derive(Debug, Default)]
struct RetainedHistories {
    /// Each with when its room emptied.
    by_room: HashMap<Arc<str>, (History, tokio::time::Instant)>,
    order: std::collections::VecDeque<Arc<str>>,
    /// When expired histories were last dropped.
    swept: Option<tokio::time::Instant>,
}

/// Whether a retained history is still worth keeping: it holds messages, or its room
/// emptied less than a time to live ago (a client that saw it empty can still be told
/// it missed nothing).
fn worth_keeping(history: &mut History, closed: tokio::time::Instant) -> bool {
    !history.is_empty() || closed.elapsed() < history.ttl()
}

impl Rooms {
    pub fn new(metrics: Arc<Metrics>, plugins: Arc<LivePlugins>, tracker: TaskTracker) -> Self {
        let budget = Arc::new(HistoryBudget { limit: 64 << 20, metrics: metrics.clone() });
        Self {
            map: Mutex::new(HashMap::new()),
            metrics,
            plugins,
            tracker,
            cluster: None,
            default_history: None,
            compression: None,
            history_bytes: 512 << 10,
            budget,
            retained: Mutex::default(),
        }
    }

    /// Keep history: for rooms without a plugin per `default` (`None`: not them), each
    /// room's at most `room_bytes`, all together at most `memory` bytes.
    pub fn with_history(
        mut self,
        default: Option<crate::plugin::HistorySettings>,
        room_bytes: usize,
        memory: usize,
    ) -> Self {
        self.default_history = default;
        self.history_bytes = room_bytes;
        self.budget = Arc::new(HistoryBudget { limit: memory, metrics: self.metrics.clone() });
        self
    }

    /// Compress messages of at least `threshold` bytes for members that negotiated
    /// `permessage-deflate` (`None`: never).
    pub fn with_compression(mut self, threshold: Option<usize>) -> Self {
        self.compression = threshold;
        self
    }

    /// The compression threshold of a room served by `plugin` (`None`: its messages go
    /// uncompressed: compression is off, or the plugin's `NAME.toml` turned it off).
    pub(crate) fn compression_for(&self, plugin: Option<&crate::plugin::Plugin>) -> Option<usize> {
        self.compression.filter(|_| plugin.is_none_or(|plugin| plugin.compression()))
    }

    /// Whether an upgrade to `room` (`None`: `GET /ws`, rooms joined later) may
    /// negotiate `permessage-deflate`: compression is on and, for a room, its plugin
    /// does not turn it off.
    pub(crate) fn negotiates_compression(&self, room: Option<&str>) -> bool {
        match room {
            Some(room) => self.compression_for(self.plugins.for_room(room).as_deref()).is_some(),
            None => self.compression.is_some(),
        }
    }

    /// The history limits of room `name` served by `plugin` (`None`: no history).
    pub(crate) fn history_limits(&self, plugin: Option<&crate::plugin::Plugin>) -> Option<HistoryLimits> {
        let settings = match plugin {
            Some(plugin) => plugin.history(),
            None => self.default_history,
        }?;
        Some(HistoryLimits { size: settings.size, ttl: settings.ttl, bytes: self.history_bytes })
    }

    /// The history room `name` continues (kept since it emptied), or a new one.
    pub(crate) fn history_for(&self, name: &str, limits: HistoryLimits) -> History {
        let mut retained = self.retained.lock().expect("history lock");
        let kept = retained.by_room.remove(name).and_then(|(mut history, closed)| {
            retained.order.retain(|room| &**room != name);
            worth_keeping(&mut history, closed).then_some(history)
        });
        match kept {
            Some(mut history) => {
                history.set_limits(limits);
                history
            }
            None => History::new(limits, self.budget.clone()),
        }
    }

    /// A history continued from what a room's previous owner stored (cluster mode).
    pub(crate) fn restore_history(
        &self,
        limits: HistoryLimits,
        stored: &[crate::cluster::StoredEntry],
    ) -> Option<History> {
        History::restore(limits, self.budget.clone(), stored)
    }

    /// Keep the history of a room that emptied, for as long as it is worth keeping.
    pub(crate) fn retain_history(&self, name: Arc<str>, history: History) {
        let closed = tokio::time::Instant::now();
        let mut retained = self.retained.lock().expect("history lock");
        let RetainedHistories { by_room, order, swept } = &mut *retained;
        // Expired ones go first (a sweep at most once a second: it reads them all);
        // then the oldest while over the cap.
        if swept.is_none_or(|at| closed.duration_since(at) >= std::time::Duration::from_secs(1)) {
            *swept = Some(closed);
            by_room.retain(|_, (history, closed)| worth_keeping(history, *closed));
            order.retain(|room| by_room.contains_key(room));
        }
        while order.len() >= MAX_RETAINED_HISTORIES {
            if let Some(oldest) = order.pop_front() {
                by_room.remove(&oldest);
            }
        }
        if by_room.contains_key(&name) {
            order.retain(|room| *room != name);
        }
        order.push_back(name.clone());
        by_room.insert(name, (history, closed));
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

    /// Add `joining.peer` to room `name`, creating the room (and its actor) if it is
    /// not live. The room's plugin may still refuse it: the actor then answers the
    /// client and evicts it (room-protocol mode), or ends its session (raw mode).
    pub async fn join(self: &Arc<Self>, name: &str, joining: Joining) -> Arc<Room> {
        let peer = &joining.peer;
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
        let _ = room.tx.send(RoomEvent::Join(joining)).await;
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
            actor.cluster = Some(Clustered::new(cluster.link(name)));
        }
        self.tracker.spawn(actor.run(rx));
        room
    }
}
