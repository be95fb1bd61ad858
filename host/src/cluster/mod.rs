//! Cluster mode: rooms that span several nodes through Redis. Off unless `--redis` is
//! set; without it no code here runs.
//!
//! Each room has one owner node, held as a Redis lease (`SET NX PX`, renewed by the
//! owner's heartbeat). Members connect to any node. A node that does not own a room
//! (a *follower*) publishes its members' joins, leaves and messages on the room's `in`
//! channel; the owner runs the room's plugin on them, delivers to its own members and
//! publishes the remote deliveries on the room's `out` channel, where every follower
//! applies them to its local members. One writer (the owner's room actor) and one
//! publishing connection give every node the same order.
//!
//! This module owns the node-wide side: the Redis connections, the writer task (one
//! bounded queue, pipelined), the subscription dispatcher, and the supervisor that
//! connects, beats, claims leases and decides every room's [`Role`]. The per-room side
//! (what an owner or a follower does with an event) lives in the room actor
//! ([`crate::room`]), which talks to this module through its [`RoomLink`].
//!
//! Architecture invariants:
//!
//! - Only the supervisor task decides roles. It tells a room actor through the room's
//!   [`Entry`] (a short queue of [`RoleChange`]s plus a wake-up event), so no role
//!   change is ever lost to a full inbox.
//! - A node subscribes to a room's `in` channel *before* it tries to take the lease, so
//!   once the lease is taken no event published for the owner goes unheard.
//! - Nothing on a path a client can fill is unbounded: the writer queue and room
//!   inboxes are bounded; what does not fit is dropped and counted
//!   (`roomcast_cluster_dropped_total`).
//! - While Redis is unreachable every room runs [`Role::Solo`]: local members, local
//!   plugin instance. When Redis returns, the lease holder's state wins: a room whose
//!   lease another node holds discards its local instance (with a log line).

pub mod store;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::plugin::{MemberId, MemberInfo, Payload};
use crate::room::{Room, RoomEvent};
use wire::{Delivery, FromOwner, InEvent, OutEvent, Snapshot, ToOwner};

/// How many writes (publishes, presence updates, snapshots) wait for Redis. Past it a
/// write is dropped and counted: a slow or unreachable Redis never grows the host.
pub const WRITE_QUEUE: usize = 16 * 1024;
/// The free write-queue slots a room actor waits for before it takes its next event.
const WRITE_HEADROOM: usize = 64;
/// The most writes sent in one pipeline.
const WRITE_BATCH: usize = 512;
/// The most bytes of records from Redis one room holds before its actor takes them.
/// Pub/sub has no backpressure: past this a record is dropped and counted (and a
/// follower notices the gap in the owner's sequence numbers).
pub const ROOM_BACKLOG_BYTES: usize = 8 << 20;
/// How many role-decision requests (attach, detach, check) wait for the supervisor.
const CONTROL_QUEUE: usize = 8 * 1024;
/// Reconnect back-off bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The default lease: how long a dead owner keeps its rooms before another node
/// takes them over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// A cluster set-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad Redis URL: {0}")]
    Url(#[source] redis::RedisError),
}

/// What a room does on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not decided yet: the room just appeared on this node.
    Pending,
    /// Redis is unreachable: the room serves this node's members alone.
    Solo,
    /// This node holds the lease: it runs the plugin for every member.
    Owner,
    /// Another node holds the lease: members' events go there.
    Follower,
}

/// What the supervisor tells a room actor.
#[derive(Debug)]
pub enum RoleChange {
    /// Redis is unreachable: serve local members alone.
    Solo,
    /// Another node owns the room. An actor that ran an instance discards it; every
    /// actor that was not pending announces its local members to the owner again.
    Follower { owner: String },
    /// This node owns the room. `snapshot` is the latest stored state, `presence` the
    /// members every live node announced, read at `asked`.
    Owner { snapshot: Option<Snapshot>, presence: Vec<(String, MemberInfo)>, asked: Instant },
    /// The owner's heartbeat: live nodes and how many members each announced.
    Nodes(Vec<(String, u64)>),
    /// The members every live node announced, read at `asked` (after a count mismatch).
    Reconcile { presence: Vec<(String, MemberInfo)>, asked: Instant },
}

/// A record from Redis for a room actor. Records wait in the room's [`Entry`]
/// (bounded in bytes, in arrival order), so a burst from Redis does not compete with
/// local members for the inbox; the inbox only gets a [`RoomEvent::ClusterWake`].
#[derive(Debug)]
pub enum Record {
    /// An event for the owner (from the `in` channel).
    In(ToOwner),
    /// Deliveries or a release from the owner (from the `out` channel).
    Out(FromOwner),
    /// An event this node published for the owner reached no subscriber: nobody owns
    /// the room right now. The record is handed back so it is not lost.
    Unheard(Vec<u8>),
}

/// A room as the cluster sees it. Shared by the room's actor (through its
/// [`RoomLink`]), the registry and the supervisor.
#[derive(Debug)]
pub struct Entry {
    name: Arc<str>,
    /// The room's inbox, for dispatching subscription messages to it.
    tx: mpsc::Sender<RoomEvent>,
    /// The room's local members, for rewriting presence after Redis lost it.
    room: Weak<Room>,
    /// The room's role as the supervisor last decided it, or a follower's after its
    /// actor released the lease (read by the supervisor and for `/metrics`).
    role: Mutex<Role>,
    /// Whether this node is subscribed to the room's `in` channel (supervisor only).
    subscribed_in: AtomicBool,
    /// Presence must be written in full and the role re-decided at the next tick.
    resync: AtomicBool,
    /// A `Check` for the room is queued (one at a time is enough).
    checking: AtomicBool,
    changes: Mutex<VecDeque<RoleChange>>,
    pending: AtomicBool,
    /// Records from Redis for the actor, and their size in bytes.
    records: Mutex<(VecDeque<Record>, usize)>,
    has_records: AtomicBool,
    /// Signalled with each change; the actor waits on it for its first role.
    changed: Notify,
}

impl Entry {
    fn push(&self, change: RoleChange) {
        {
            let mut changes = self.changes.lock().expect("entry lock");
            if matches!(change, RoleChange::Nodes(_)) {
                changes.retain(|c| !matches!(c, RoleChange::Nodes(_)));
            }
            changes.push_back(change);
        }
        self.pending.store(true, Relaxed);
        self.changed.notify_one();
        // A full inbox is fine: the actor checks `pending` before every event.
        let _ = self.tx.try_send(RoomEvent::ClusterWake);
    }

    /// Queue a record for the actor; `false` if the backlog is full.
    fn push_record(&self, record: Record, size: usize) -> bool {
        {
            let mut records = self.records.lock().expect("entry lock");
            if records.1 + size > ROOM_BACKLOG_BYTES {
                return false;
            }
            records.0.push_back(record);
            records.1 += size;
            if records.0.len() > 1 {
                return true; // the actor was woken for the first one
            }
        }
        self.has_records.store(true, Relaxed);
        let _ = self.tx.try_send(RoomEvent::ClusterWake);
        true
    }

    fn set_role(&self, role: Role) -> Role {
        std::mem::replace(&mut *self.role.lock().expect("entry lock"), role)
    }

    fn role(&self) -> Role {
        *self.role.lock().expect("entry lock")
    }
}

/// A write for the writer task.
#[derive(Debug)]
enum Write {
    Cmd(redis::Cmd),
    /// A publish; for an event sent to an owner (`unheard` set), a reply of zero
    /// receivers hands the record back to the room.
    Publish {
        channel: String,
        data: Vec<u8>,
        unheard: Option<Arc<str>>,
    },
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
enum Control {
    Attach(Arc<Entry>),
    /// The room ended here; answered once its channels are unsubscribed.
    Detach(Arc<Entry>, oneshot::Sender<()>),
    /// Re-decide this room's role now (its owner seems gone).
    Check(Arc<Entry>),
    /// Read the room's presence in full for its owner.
    Reconcile(Arc<Entry>),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    dropped_queue: AtomicU64,
    dropped_redis: AtomicU64,
    dropped_inbox: AtomicU64,
    dropped_unheard: AtomicU64,
    resyncs: AtomicU64,
    gaps: AtomicU64,
    takeovers: AtomicU64,
    discarded: AtomicU64,
}

/// The node's cluster membership: connections, tasks and the rooms it has.
#[derive(Debug)]
pub struct Cluster {
    node: String,
    client: redis::Client,
    lease: Duration,
    /// The commands connection while Redis is reachable (cloned for each use; the
    /// supervisor replaces it after a reconnect).
    conn: Mutex<Option<MultiplexedConnection>>,
    /// The subscription connection's command side (the supervisor's only).
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    up: AtomicBool,
    /// Rooms live on this node, by name.
    entries: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    /// Rooms live anywhere in the cluster (refreshed every heartbeat), for `forward`
    /// and the admin API's publish.
    known: RwLock<HashSet<String>>,
    writes: mpsc::Sender<Write>,
    control: mpsc::Sender<Control>,
    /// Taken by `start`.
    receivers: Mutex<Option<(mpsc::Receiver<Write>, mpsc::Receiver<Control>)>>,
    /// The writer tells the supervisor that Redis stopped answering.
    write_failed: Notify,
    stats: Stats,
    /// Cancelled by `stop`; the tasks end.
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// A cluster member for the Redis at `url`, not connected yet (see [`Self::start`]).
    pub fn new(url: &str, lease: Duration) -> Result<Arc<Self>, ClusterError> {
        let client = redis::Client::open(url).map_err(ClusterError::Url)?;
        let (writes, write_rx) = mpsc::channel(WRITE_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        Ok(Arc::new(Self {
            node: format!("{:016x}", random_u64()),
            client,
            lease,
            conn: Mutex::new(None),
            sink: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            entries: Mutex::new(HashMap::new()),
            known: RwLock::new(HashSet::new()),
            writes,
            control,
            receivers: Mutex::new(Some((write_rx, control_rx))),
            write_failed: Notify::new(),
            stats: Stats::default(),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// This node's id (the value of the leases it holds).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How long one Redis round trip may take before Redis counts as unreachable.
    fn op_timeout(&self) -> Duration {
        (self.lease / 2).max(Duration::from_millis(500))
    }

    fn presence_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Stored snapshots outlive their owner long enough for a successor to take over.
    fn state_ms(&self) -> u64 {
        (self.lease * 10).max(Duration::from_secs(60)).as_millis() as u64
    }

    /// Whether Redis is reachable right now.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Start the writer and the supervisor, and pick this node's member-id base: a
    /// distinct prefix from Redis (`INCR`) when it answers, a random one otherwise.
    /// Member ids stay below 2^53 so JavaScript clients read them exactly.
    pub async fn start(self: &Arc<Self>) -> u64 {
        let Some((write_rx, control_rx)) = self.receivers.lock().expect("cluster lock").take() else {
            return 1;
        };
        let prefix = match tokio::time::timeout(self.op_timeout() * 2, self.next_node_seq()).await {
            Ok(Ok(seq)) => (seq as u64 % ((1 << 20) - 1)) + 1,
            _ => {
                tracing::warn!("Redis did not answer at start-up; using a random member-id prefix");
                (random_u64() % ((1 << 20) - 1)) + 1
            }
        };
        tracing::info!(node = %self.node, lease = ?self.lease, "cluster mode: joining through Redis");
        let writer = tokio::spawn(self.clone().write_loop(write_rx));
        let supervisor = tokio::spawn(self.clone().supervise(control_rx));
        self.tasks.lock().expect("cluster lock").extend([writer, supervisor]);
        (prefix << 32) | 1
    }

    async fn next_node_seq(&self) -> RedisResult<i64> {
        let mut conn = self.connect_commands().await?;
        redis::cmd("INCR").arg(store::NODE_SEQ_KEY).query_async(&mut conn).await
    }

    /// Graceful stop, after every room actor ended (their releases are queued): flush
    /// the writer, forget the node, end the tasks.
    pub async fn stop(&self) {
        let (done, flushed) = oneshot::channel();
        if self.writes.try_send(Write::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(self.op_timeout() * 2, flushed).await;
        }
        let conn = self.conn.lock().expect("cluster lock").clone();
        if let Some(mut conn) = conn {
            let mut del = redis::cmd("DEL");
            del.arg(store::node_key(&self.node));
            let _ = tokio::time::timeout(self.op_timeout(), del.query_async::<()>(&mut conn)).await;
        }
        self.stop.cancel();
        for task in self.tasks.lock().expect("cluster lock").drain(..) {
            task.abort();
        }
        tracing::info!(node = %self.node, "left the cluster");
    }

    /// Register a room that just appeared on this node. Its actor waits for its first
    /// role with [`RoomLink::first_role`].
    pub(crate) fn link(self: &Arc<Self>, room: &Arc<Room>, tx: mpsc::Sender<RoomEvent>) -> RoomLink {
        let entry = Arc::new(Entry {
            name: Arc::from(room.name()),
            tx,
            room: Arc::downgrade(room),
            role: Mutex::new(Role::Pending),
            subscribed_in: AtomicBool::new(false),
            resync: AtomicBool::new(true),
            checking: AtomicBool::new(false),
            changes: Mutex::new(VecDeque::new()),
            pending: AtomicBool::new(false),
            records: Mutex::new((VecDeque::new(), 0)),
            has_records: AtomicBool::new(false),
            changed: Notify::new(),
        });
        self.entries.lock().expect("cluster lock").insert(entry.name.clone(), entry.clone());
        RoomLink { cluster: self.clone(), entry, seq: 0, attached: false }
    }

    /// Whether a room is live anywhere in the cluster (as of the last heartbeat).
    pub fn room_known(&self, name: &str) -> bool {
        self.known.read().expect("cluster lock").contains(name)
    }

    /// Publish to a room that has no members on this node (admin API): its owner
    /// delivers it. `false` if Redis is unreachable or the write queue is full.
    pub fn publish_remote(&self, room: &str, payload: Payload) -> bool {
        if !self.is_up() {
            return false;
        }
        let record = ToOwner { node: self.node.clone(), event: InEvent::Publish(payload) };
        self.write(Write::Publish { channel: store::in_channel(room), data: record.encode(), unheard: None })
    }

    /// Every live room of the cluster with its owner and members per node, for
    /// `/admin/rooms`; `None` if Redis does not answer.
    pub async fn overview(&self) -> Option<Vec<RoomOverview>> {
        let conn = self.conn.lock().expect("cluster lock").clone();
        let mut conn = conn?;
        let mut eval = redis::cmd("EVAL");
        eval.arg(store::OVERVIEW).arg(1).arg(store::ROOMS_KEY).arg("roomcast:room:");
        let value =
            tokio::time::timeout(self.op_timeout(), eval.query_async::<Value>(&mut conn)).await.ok()?.ok()?;
        let mut rooms = Vec::new();
        for item in array(value) {
            let mut fields = array(item).into_iter();
            let (Some(name), Some(owner), Some(nodes)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let mut members = Vec::new();
            let mut nodes = array(nodes).into_iter();
            while let (Some(node), Some(ids)) = (nodes.next(), nodes.next()) {
                let node = text(node);
                let mut ids: Vec<MemberId> =
                    array(ids).into_iter().filter_map(|id| text(id).parse().ok()).collect();
                ids.sort_unstable();
                members.push((node, ids));
            }
            let owner = text(owner);
            rooms.push(RoomOverview {
                name: text(name),
                owner: (!owner.is_empty()).then_some(owner),
                members,
            });
        }
        Some(rooms)
    }

    /// The cluster's series for `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let owned =
            self.entries.lock().expect("cluster lock").values().filter(|e| e.role() == Role::Owner).count();
        metrics::gauge(
            &mut out,
            "roomcast_cluster_up",
            "Whether Redis is reachable (cluster mode).",
            u8::from(self.is_up()),
        );
        metrics::gauge(&mut out, "roomcast_cluster_owned_rooms", "Rooms whose lease this node holds.", owned);
        metrics::header(
            &mut out,
            "roomcast_cluster_dropped_total",
            "Cluster records dropped, by reason.",
            "counter",
        );
        for (reason, counter) in [
            ("queue", &self.stats.dropped_queue),
            ("redis", &self.stats.dropped_redis),
            ("inbox", &self.stats.dropped_inbox),
            ("unheard", &self.stats.dropped_unheard),
        ] {
            let _ = writeln!(
                out,
                "roomcast_cluster_dropped_total{{reason=\"{reason}\"}} {}",
                counter.load(Relaxed)
            );
        }
        for (name, help, counter) in [
            (
                "roomcast_cluster_resyncs_total",
                "Resynchronisations after Redis or the subscription connection came back.",
                &self.stats.resyncs,
            ),
            (
                "roomcast_cluster_gaps_total",
                "Delivery batches a follower noticed it missed.",
                &self.stats.gaps,
            ),
            ("roomcast_cluster_takeovers_total", "Leases this node took.", &self.stats.takeovers),
            (
                "roomcast_cluster_discarded_instances_total",
                "Local instances discarded because another node held the lease.",
                &self.stats.discarded,
            ),
        ] {
            metrics::counter(&mut out, name, help, counter.load(Relaxed));
        }
        out
    }

    /// Queue a write; `false` (counted) if the queue is full.
    fn write(&self, write: Write) -> bool {
        match self.writes.try_send(write) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped_queue.fetch_add(1, Relaxed);
                false
            }
        }
    }

    async fn connect_commands(&self) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout()))
            .set_response_timeout(Some(self.op_timeout()));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }

    async fn connect(&self) -> Result<(MultiplexedConnection, PubSubSink, PubSubStream), String> {
        let conn = self.connect_commands().await.map_err(|e| e.to_string())?;
        let pubsub = tokio::time::timeout(self.op_timeout(), self.client.get_async_pubsub())
            .await
            .map_err(|_| "timed out connecting".to_owned())?
            .map_err(|e| e.to_string())?;
        let (sink, stream) = pubsub.split();
        Ok((conn, sink, stream))
    }

    /// The writer: drain the queue in pipelines, in order, over one connection.
    async fn write_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        loop {
            if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut flushes = Vec::new();
            // Per command: the room and record to hand back if nobody hears it.
            let mut unheard = Vec::new();
            for write in batch.drain(..) {
                match write {
                    Write::Cmd(cmd) => {
                        pipe.add_command(cmd);
                        unheard.push(None);
                    }
                    Write::Publish { channel, data, unheard: room } => {
                        pipe.cmd("PUBLISH").arg(channel).arg(&data);
                        unheard.push(room.map(|room| (room, data)));
                    }
                    Write::Flush(done) => flushes.push(done),
                }
            }
            if !unheard.is_empty() {
                let conn = if self.is_up() { self.conn.lock().expect("cluster lock").clone() } else { None };
                let failed = match conn {
                    None => true,
                    Some(mut conn) => {
                        let sent = pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn);
                        match tokio::time::timeout(self.op_timeout(), sent).await {
                            Ok(Ok(replies)) => {
                                for (reply, keep) in replies.into_iter().zip(unheard.iter_mut()) {
                                    if let (Ok(Value::Int(0)), Some((room, data))) = (reply, keep.take()) {
                                        self.hand_back(&room, data);
                                    }
                                }
                                false
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "Redis write failed");
                                self.write_failed.notify_one();
                                true
                            }
                            Err(_) => {
                                tracing::warn!("Redis write timed out");
                                self.write_failed.notify_one();
                                true
                            }
                        }
                    }
                };
                if failed {
                    // Events for an owner go back to their room, which runs them itself
                    // once it is alone; everything else is lost and counted.
                    let mut lost = unheard.len() as u64;
                    for (room, data) in unheard.into_iter().flatten() {
                        lost -= 1;
                        self.hand_back(&room, data);
                    }
                    self.stats.dropped_redis.fetch_add(lost, Relaxed);
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// An event published for a room's owner reached nobody: give it back to the room
    /// and re-decide its role now.
    fn hand_back(&self, room: &str, data: Vec<u8>) {
        let entry = self.entries.lock().expect("cluster lock").get(room).cloned();
        let Some(entry) = entry else {
            self.stats.dropped_unheard.fetch_add(1, Relaxed);
            return;
        };
        let size = data.len();
        if !entry.push_record(Record::Unheard(data), size) {
            self.stats.dropped_inbox.fetch_add(1, Relaxed);
        }
        self.check(entry);
    }

    /// Re-decide a room's role soon (at most one request queued per room).
    fn check(&self, entry: Arc<Entry>) {
        if !entry.checking.swap(true, Relaxed)
            && self.control.try_send(Control::Check(entry.clone())).is_err()
        {
            entry.checking.store(false, Relaxed);
        }
    }

    /// Hand every subscription message to its room's record backlog, until the
    /// connection ends. An owner hears its own deliveries on the `out` channel: they
    /// were delivered here already and are skipped before decoding.
    async fn dispatch(self: Arc<Self>, mut stream: PubSubStream) {
        while let Some(message) = stream.next().await {
            let Some((room, direction)) = store::parse_channel(message.get_channel_name()) else {
                continue;
            };
            let data = message.get_payload_bytes();
            if direction == store::Direction::Out && wire::publisher(data) == Some(self.node.as_bytes()) {
                continue;
            }
            let Some(entry) = self.entries.lock().expect("cluster lock").get(room).cloned() else {
                continue;
            };
            let record = match direction {
                store::Direction::In => ToOwner::decode(data).map(Record::In),
                store::Direction::Out => FromOwner::decode(data).map(Record::Out),
            };
            match record {
                Ok(record) => {
                    if !entry.push_record(record, data.len()) {
                        self.stats.dropped_inbox.fetch_add(1, Relaxed);
                    }
                }
                Err(error) => tracing::warn!(%room, %error, "undecodable cluster record ignored"),
            }
        }
    }

    /// Connect, resubscribe, beat, decide roles; on any connection loss go solo, back
    /// off and start again.
    async fn supervise(self: Arc<Self>, mut control: mpsc::Receiver<Control>) {
        let mut backoff = MIN_BACKOFF;
        let mut outage: Option<Instant> = None;
        let mut connected_once = false;
        loop {
            let connected = tokio::select! {
                () = self.stop.cancelled() => return,
                connected = self.connect() => connected,
            };
            let (conn, sink, stream) = match connected {
                Ok(conns) => conns,
                Err(error) => {
                    if outage.is_none() {
                        tracing::warn!(%error, "Redis is unreachable: every room serves this node's members alone; retrying");
                        outage = Some(Instant::now());
                    }
                    self.go_solo();
                    let wait = tokio::time::sleep(backoff);
                    tokio::pin!(wait);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    loop {
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = &mut wait => break,
                            control = control.recv() => match control {
                                Some(control) => self.control_while_down(control),
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            *self.conn.lock().expect("cluster lock") = Some(conn);
            *self.sink.lock().await = Some(sink);
            let mut dispatcher = tokio::spawn(self.clone().dispatch(stream));
            let entries = self.entries();
            for entry in &entries {
                entry.subscribed_in.store(false, Relaxed);
                entry.resync.store(true, Relaxed);
            }
            self.up.store(true, Relaxed);
            if let Some(since) = outage.take() {
                tracing::info!(down_for = ?since.elapsed(), rooms = entries.len(), "Redis is reachable again: resynchronising");
            }
            if connected_once {
                self.stats.resyncs.fetch_add(1, Relaxed);
            }
            connected_once = true;
            let mut result = self.subscribe_out(&entries).await;
            if result.is_ok() {
                result = self.tick(&entries).await;
            }
            let mut interval = tokio::time::interval(self.lease / 3);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.reset();
            while result.is_ok() {
                result = tokio::select! {
                    () = self.stop.cancelled() => {
                        dispatcher.abort();
                        return;
                    }
                    _ = &mut dispatcher => Err("the subscription connection closed".to_owned()),
                    () = self.write_failed.notified() => Err("a write failed".to_owned()),
                    _ = interval.tick() => self.tick(&self.entries()).await,
                    next = control.recv() => match next {
                        Some(first) => {
                            let mut rest = control_batch(&mut control);
                            self.control(first, &mut rest).await
                        }
                        None => return,
                    },
                };
            }
            let error = result.err().unwrap_or_default();
            tracing::warn!(%error, "lost the connection to Redis; reconnecting and resynchronising");
            outage = Some(Instant::now());
            dispatcher.abort();
            self.up.store(false, Relaxed);
            *self.conn.lock().expect("cluster lock") = None;
            *self.sink.lock().await = None;
        }
    }

    /// Every room serves its local members alone until Redis returns.
    fn go_solo(&self) {
        self.up.store(false, Relaxed);
        for entry in self.entries() {
            if entry.set_role(Role::Solo) != Role::Solo {
                entry.push(RoleChange::Solo);
            }
            entry.resync.store(true, Relaxed);
        }
    }

    fn control_while_down(&self, control: Control) {
        match control {
            Control::Attach(entry) => {
                entry.set_role(Role::Solo);
                entry.push(RoleChange::Solo);
            }
            Control::Detach(entry, done) => {
                self.forget(&entry);
                let _ = done.send(());
            }
            Control::Check(entry) => entry.checking.store(false, Relaxed),
            Control::Reconcile(_) => {}
        }
    }

    /// Remove a room that ended on this node from the registry (unless a new room of
    /// the same name replaced it); `true` if its channels are no longer wanted.
    fn forget(&self, entry: &Arc<Entry>) -> bool {
        let mut entries = self.entries.lock().expect("cluster lock");
        match entries.get(&entry.name) {
            Some(current) if Arc::ptr_eq(current, entry) => {
                entries.remove(&entry.name);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    async fn control(&self, first: Control, rest: &mut Vec<Control>) -> Result<(), String> {
        let mut attach = Vec::new();
        let mut check = Vec::new();
        for control in std::iter::once(first).chain(rest.drain(..)) {
            match control {
                Control::Attach(entry) => attach.push(entry),
                Control::Check(entry) => {
                    entry.checking.store(false, Relaxed);
                    check.push(entry);
                }
                Control::Detach(entry, done) => {
                    let result = if self.forget(&entry) {
                        let mut channels = vec![store::out_channel(&entry.name)];
                        if entry.subscribed_in.swap(false, Relaxed) {
                            channels.push(store::in_channel(&entry.name));
                        }
                        self.unsubscribe(channels).await
                    } else {
                        Ok(())
                    };
                    let _ = done.send(());
                    result?;
                }
                Control::Reconcile(entry) => {
                    let asked = Instant::now();
                    let presence = self.members(&entry.name).await?;
                    entry.push(RoleChange::Reconcile { presence, asked });
                }
            }
        }
        if !attach.is_empty() {
            self.subscribe_out(&attach).await?;
            self.tick(&attach).await?;
        }
        if !check.is_empty() {
            self.tick(&check).await?;
        }
        Ok(())
    }

    async fn subscribe_out(&self, entries: &[Arc<Entry>]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let channels: Vec<String> = entries.iter().map(|e| store::out_channel(&e.name)).collect();
        self.subscribe(channels).await
    }

    async fn subscribe(&self, channels: Vec<String>) -> Result<(), String> {
        let mut sink = self.sink.lock().await;
        let Some(sink) = sink.as_mut() else { return Err("not connected".into()) };
        for chunk in channels.chunks(1024) {
            tokio::time::timeout(self.op_timeout(), sink.subscribe(chunk))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), String> {
        let mut sink = self.sink.lock().await;
        let Some(sink) = sink.as_mut() else { return Err("not connected".into()) };
        tokio::time::timeout(self.op_timeout(), sink.unsubscribe(channels))
            .await
            .map_err(|_| "UNSUBSCRIBE timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, String> {
        let conn = self.conn.lock().expect("cluster lock").clone();
        let Some(mut conn) = conn else { return Err("not connected".into()) };
        tokio::time::timeout(self.op_timeout(), pipe.query_async::<T>(&mut conn))
            .await
            .map_err(|_| "Redis timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// One heartbeat for `entries`: refresh presence (in full where Redis may have lost
    /// it), renew or inspect each lease, claim vacant ones, and tell rooms whose role
    /// changed.
    async fn tick(&self, entries: &[Arc<Entry>]) -> Result<(), String> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(store::node_key(&self.node)).arg(1).arg("PX").arg(self.presence_ms()).ignore();
        let mut ticked = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(room) = entry.room.upgrade() else { continue };
            let name = &entry.name;
            let members_key = store::members_key(name, &self.node);
            if entry.resync.load(Relaxed) {
                // Rewrite this node's presence for the room from the registry.
                pipe.cmd("DEL").arg(&members_key).ignore();
                for peer in room.members().iter() {
                    pipe.cmd("HSET")
                        .arg(&members_key)
                        .arg(peer.id)
                        .arg(wire::encode_member(&peer.info()))
                        .ignore();
                }
            }
            pipe.cmd("EVAL")
                .arg(store::TICK)
                .arg(5)
                .arg(store::owner_key(name))
                .arg(store::state_key(name))
                .arg(store::nodes_key(name))
                .arg(&members_key)
                .arg(store::ROOMS_KEY)
                .arg(&self.node)
                .arg(self.lease.as_millis() as u64)
                .arg(self.presence_ms())
                .arg(&**name)
                .arg(store::members_prefix(name))
                .arg(self.state_ms());
            ticked.push(entry.clone());
        }
        let full = entries.len() > 1 || ticked.is_empty();
        if full {
            pipe.cmd("EVAL").arg(store::KNOWN).arg(1).arg(store::ROOMS_KEY);
        }
        let mut replies: Vec<Value> = self.query(&pipe).await?;
        if full && let Some(known) = replies.pop() {
            let known: HashSet<String> = array(known).into_iter().map(text).collect();
            *self.known.write().expect("cluster lock") = known;
        }
        let mut to_claim = Vec::new();
        for (entry, reply) in ticked.into_iter().zip(replies) {
            let resync = entry.resync.load(Relaxed);
            let mut fields = array(reply).into_iter();
            let status = fields.next().map(text).unwrap_or_default();
            match status.as_str() {
                "mine" if entry.role() == Role::Owner && !resync => {
                    let mut nodes = Vec::new();
                    while let (Some(node), Some(count)) = (fields.next(), fields.next()) {
                        nodes.push((text(node), int(count)));
                    }
                    entry.push(RoleChange::Nodes(nodes));
                }
                "mine" | "vacant" => to_claim.push(entry),
                "other" => {
                    let owner = fields.next().map(text).unwrap_or_default();
                    self.follow(&entry, owner).await?;
                }
                other => return Err(format!("unexpected heartbeat reply `{other}`")),
            }
        }
        if !to_claim.is_empty() {
            self.claim(&to_claim).await?;
        }
        Ok(())
    }

    /// Another node owns the room.
    async fn follow(&self, entry: &Arc<Entry>, owner: String) -> Result<(), String> {
        let resync = entry.resync.swap(false, Relaxed);
        if entry.subscribed_in.swap(false, Relaxed) {
            self.unsubscribe(vec![store::in_channel(&entry.name)]).await?;
        }
        let before = entry.set_role(Role::Follower);
        if before != Role::Follower || resync {
            entry.push(RoleChange::Follower { owner });
        }
        Ok(())
    }

    /// Take the leases of `entries` (vacant, or ours while the room does not know):
    /// subscribe to their `in` channels first, then claim, read the stored snapshot and
    /// every node's members.
    async fn claim(&self, entries: &[Arc<Entry>]) -> Result<(), String> {
        let channels: Vec<String> = entries
            .iter()
            .filter(|e| !e.subscribed_in.swap(true, Relaxed))
            .map(|e| store::in_channel(&e.name))
            .collect();
        if !channels.is_empty() {
            self.subscribe(channels).await?;
        }
        let asked = Instant::now();
        let mut pipe = redis::pipe();
        for entry in entries {
            let name = &entry.name;
            pipe.cmd("EVAL")
                .arg(store::CLAIM)
                .arg(1)
                .arg(store::owner_key(name))
                .arg(&self.node)
                .arg(self.lease.as_millis() as u64);
            pipe.cmd("GET").arg(store::state_key(name));
            members_cmd(&mut pipe, name);
        }
        let replies: Vec<Value> = self.query(&pipe).await?;
        let mut replies = replies.into_iter();
        for entry in entries {
            let (Some(claim), Some(state), Some(members)) = (replies.next(), replies.next(), replies.next())
            else {
                return Err("short reply to a claim".into());
            };
            let mut fields = array(claim).into_iter();
            let status = fields.next().map(text).unwrap_or_default();
            if status == "other" {
                let owner = fields.next().map(text).unwrap_or_default();
                self.follow(entry, owner).await?;
                continue;
            }
            entry.resync.store(false, Relaxed);
            let snapshot = match state {
                Value::BulkString(data) => match Snapshot::decode(&data) {
                    Ok(snapshot) => Some(snapshot),
                    Err(error) => {
                        tracing::warn!(room = %entry.name, %error, "stored snapshot unreadable; ignoring it");
                        None
                    }
                },
                _ => None,
            };
            if status == "claimed" {
                self.stats.takeovers.fetch_add(1, Relaxed);
                tracing::debug!(room = %entry.name, restored = snapshot.is_some(), "took the room's lease");
            }
            entry.set_role(Role::Owner);
            entry.push(RoleChange::Owner { snapshot, presence: presence(members), asked });
        }
        Ok(())
    }

    /// Every live node's members of `room`.
    async fn members(&self, room: &str) -> Result<Vec<(String, MemberInfo)>, String> {
        let mut pipe = redis::pipe();
        members_cmd(&mut pipe, room);
        let mut replies: Vec<Value> = self.query(&pipe).await?;
        Ok(presence(replies.pop().unwrap_or(Value::Nil)))
    }

    /// The rooms live on this node, at this moment.
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries.lock().expect("cluster lock").values().cloned().collect()
    }
}

/// Add a `MEMBERS` read of `room` (every live node's members) to `pipe`.
fn members_cmd(pipe: &mut redis::Pipeline, room: &str) {
    pipe.cmd("EVAL").arg(store::MEMBERS).arg(1).arg(store::nodes_key(room)).arg(store::members_prefix(room));
}

/// Drain further control messages that are already queued, to batch them.
fn control_batch(control: &mut mpsc::Receiver<Control>) -> Vec<Control> {
    let mut rest = Vec::new();
    while rest.len() < 1024 {
        match control.try_recv() {
            Ok(c) => rest.push(c),
            Err(_) => break,
        }
    }
    rest
}

/// One live room as `/admin/rooms` shows it in cluster mode.
#[derive(Debug)]
pub struct RoomOverview {
    pub name: String,
    pub owner: Option<String>,
    /// Member ids per node.
    pub members: Vec<(String, Vec<MemberId>)>,
}

/// A room actor's handle on the cluster.
#[derive(Debug)]
pub struct RoomLink {
    cluster: Arc<Cluster>,
    entry: Arc<Entry>,
    /// Delivery batches this node published as the room's owner.
    seq: u64,
    attached: bool,
}

impl RoomLink {
    pub fn node(&self) -> &str {
        &self.cluster.node
    }

    /// Ask the supervisor for this room's role and wait for it (events queue in the
    /// room's inbox meanwhile). Solo if no answer comes in time.
    pub async fn first_role(&mut self) -> RoleChange {
        if !self.attached {
            self.attached = true;
            if self.cluster.control.send(Control::Attach(self.entry.clone())).await.is_err() {
                return RoleChange::Solo;
            }
        }
        let bound = self.cluster.op_timeout() * 4;
        let deadline = Instant::now() + bound;
        loop {
            if let Some(change) = self.next_change() {
                return change;
            }
            if tokio::time::timeout_at(deadline, self.entry.changed.notified()).await.is_err() {
                tracing::warn!(room = %self.entry.name, "no role decided in time; serving local members alone");
                return RoleChange::Solo;
            }
        }
    }

    /// The next role change, if any is waiting (cheap when none is).
    pub fn next_change(&self) -> Option<RoleChange> {
        if !self.entry.pending.load(Relaxed) {
            return None;
        }
        let mut changes = self.entry.changes.lock().expect("entry lock");
        let change = changes.pop_front();
        if changes.is_empty() {
            self.entry.pending.store(false, Relaxed);
        }
        change
    }

    /// Wait until the write queue has room for the writes of a few events: a room
    /// whose events Redis cannot absorb stops taking them, so its members' inbox fills
    /// and their senders wait, as on one node, instead of writes being dropped.
    pub async fn writable(&self) {
        if self.cluster.is_up() {
            let _ = self.cluster.writes.reserve_many(WRITE_HEADROOM).await;
        }
    }

    /// The records from Redis waiting for the actor, in arrival order.
    pub fn take_records(&self) -> VecDeque<Record> {
        if !self.entry.has_records.swap(false, Relaxed) {
            return VecDeque::new();
        }
        let mut records = self.entry.records.lock().expect("entry lock");
        records.1 = 0;
        std::mem::take(&mut records.0)
    }

    /// Announce a local member (before its join is published, so a new owner that
    /// reads presence after subscribing misses nobody).
    pub fn present(&self, member: &MemberInfo) {
        let key = store::members_key(&self.entry.name, &self.cluster.node);
        let ttl = self.cluster.presence_ms();
        let mut hset = redis::cmd("HSET");
        hset.arg(&key).arg(member.id).arg(wire::encode_member(member));
        self.cluster.write(Write::Cmd(hset));
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(ttl);
        self.cluster.write(Write::Cmd(expire));
        let mut sadd = redis::cmd("SADD");
        sadd.arg(store::nodes_key(&self.entry.name)).arg(&self.cluster.node);
        self.cluster.write(Write::Cmd(sadd));
    }

    pub fn absent(&self, member: MemberId) {
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(store::members_key(&self.entry.name, &self.cluster.node)).arg(member);
        self.cluster.write(Write::Cmd(hdel));
    }

    /// Send an event to the room's owner.
    pub fn to_owner(&self, event: InEvent) {
        let record = ToOwner { node: self.cluster.node.clone(), event };
        self.republish(record.encode());
    }

    /// Send an encoded event to the room's owner again.
    pub fn republish(&self, data: Vec<u8>) {
        self.cluster.write(Write::Publish {
            channel: store::in_channel(&self.entry.name),
            data,
            unheard: Some(self.entry.name.clone()),
        });
    }

    /// Forward into another room through its owner (it has no actor here).
    pub fn forward(&self, target: &str, event: InEvent) {
        let record = ToOwner { node: self.cluster.node.clone(), event };
        self.cluster.write(Write::Publish {
            channel: store::in_channel(target),
            data: record.encode(),
            unheard: None,
        });
    }

    /// Publish the owner's deliveries for the other nodes' members.
    pub fn deliver(&mut self, items: Vec<Delivery>) {
        self.seq += 1;
        let record = FromOwner {
            node: self.cluster.node.clone(),
            event: OutEvent::Deliveries { seq: self.seq, items },
        };
        self.cluster.write(Write::Publish {
            channel: store::out_channel(&self.entry.name),
            data: record.encode(),
            unheard: None,
        });
    }

    /// Store the room's state, if the lease is still ours.
    pub fn save(&self, snapshot: &Snapshot) {
        let mut save = redis::cmd("EVAL");
        save.arg(store::SAVE)
            .arg(2)
            .arg(store::owner_key(&self.entry.name))
            .arg(store::state_key(&self.entry.name))
            .arg(&self.cluster.node)
            .arg(snapshot.encode())
            .arg(self.cluster.state_ms());
        self.cluster.write(Write::Cmd(save));
    }

    /// Give the lease up at once. With `keep_state`, the stored snapshot stays for the
    /// successor and followers are told to claim now; without, the state is deleted.
    pub fn release(&self, keep_state: bool) {
        let mut release = redis::cmd("EVAL");
        release
            .arg(store::RELEASE)
            .arg(2)
            .arg(store::owner_key(&self.entry.name))
            .arg(store::state_key(&self.entry.name))
            .arg(&self.cluster.node)
            .arg(if keep_state { "keep" } else { "drop" });
        self.cluster.write(Write::Cmd(release));
        if keep_state {
            let record = FromOwner { node: self.cluster.node.clone(), event: OutEvent::Released };
            self.cluster.write(Write::Publish {
                channel: store::out_channel(&self.entry.name),
                data: record.encode(),
                unheard: None,
            });
        }
        self.entry.set_role(Role::Follower);
    }

    /// Re-decide the room's role now (its owner seems gone).
    pub fn check(&self) {
        self.cluster.check(self.entry.clone());
    }

    /// Ask for every node's members of the room (the owner's counts disagree).
    pub fn reconcile(&self) {
        let _ = self.cluster.control.try_send(Control::Reconcile(self.entry.clone()));
    }

    /// A follower missed `count` delivery batches.
    pub fn gap(&self, count: u64) {
        self.cluster.stats.gaps.fetch_add(count, Relaxed);
    }

    /// A local instance was discarded because another node holds the lease.
    pub fn discarded(&self) {
        self.cluster.stats.discarded.fetch_add(1, Relaxed);
    }

    /// A record handed back as unheard could not be kept.
    pub fn dropped_unheard(&self) {
        self.cluster.stats.dropped_unheard.fetch_add(1, Relaxed);
    }

    /// The room ended on this node: stop hearing its channels (waits until done, or
    /// for a bounded time).
    pub async fn detach_and_wait(&self) {
        let (done, detached) = oneshot::channel();
        let bound = self.cluster.op_timeout() * 2;
        let _ = tokio::time::timeout(bound, async {
            if self.cluster.control.send(Control::Detach(self.entry.clone(), done)).await.is_ok() {
                let _ = detached.await;
            }
        })
        .await;
    }
}

/// Parse a `MEMBERS` reply.
fn presence(value: Value) -> Vec<(String, MemberInfo)> {
    let mut out = Vec::new();
    let mut items = array(value).into_iter();
    while let (Some(node), Some(entries)) = (items.next(), items.next()) {
        let node = text(node);
        for entry in array(entries) {
            if let Value::BulkString(data) = entry
                && let Ok(member) = wire::decode_member(&data)
            {
                out.push((node.clone(), member));
            }
        }
    }
    out
}

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

fn text(value: Value) -> String {
    match value {
        Value::BulkString(data) => String::from_utf8_lossy(&data).into_owned(),
        Value::SimpleString(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn int(value: Value) -> u64 {
    match value {
        Value::Int(i) => i.max(0) as u64,
        other => text(other).parse().unwrap_or(0),
    }
}

/// 64 random bits from the standard library's per-process hash keys, the clock and
/// the process id (node ids and member-id prefixes only need to differ).
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}
