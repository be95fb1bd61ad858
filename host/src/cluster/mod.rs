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

mod link;
pub mod store;
mod supervisor;
pub mod wire;

pub use link::{Entry, RoomLink};

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisResult, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plugin::{MemberId, MemberInfo, Payload};
use supervisor::{RedisFailure, array, text};
use wire::{FromOwner, InEvent, Snapshot, ToOwner};

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

/// One entry of a room's stored history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub epoch: String,
    pub offset: u64,
    pub frame: bytes::Bytes,
    /// The members the broadcast skipped.
    pub except: Vec<MemberId>,
    /// How long ago it was written (from its stream id, Redis's clock).
    pub age: std::time::Duration,
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
    Owner {
        snapshot: Option<Snapshot>,
        presence: Vec<(String, MemberInfo)>,
        asked: Instant,
        /// The room's stored history, oldest first.
        history: Vec<StoredEntry>,
    },
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
    /// The room's stored history, read to fill a gap in the owner's deliveries
    /// (`None`: it could not be read).
    Filled(Option<Vec<StoredEntry>>),
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
    stale: AtomicU64,
    takeovers: AtomicU64,
    discarded: AtomicU64,
}

/// The cluster's series in `/metrics`: gauges computed and counters read when scraped.
/// Counter names without `_total`, which the encoder appends.
#[derive(Debug)]
struct ClusterMetrics(Weak<Cluster>);

impl Collector for ClusterMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(cluster) = self.0.upgrade() else { return Ok(()) };
        let stats = &cluster.stats;
        let entries = cluster.entries.lock().expect("cluster lock");
        let owned = entries.values().filter(|e| e.role() == Role::Owner).count() as i64;
        drop(entries);
        let up = i64::from(cluster.is_up());
        for (name, help, value) in [
            ("roomcast_cluster_up", "Whether Redis is reachable (cluster mode).", up),
            ("roomcast_cluster_owned_rooms", "Rooms whose lease this node holds.", owned),
        ] {
            let series = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(series)?;
        }
        let help = "Cluster records dropped, by reason.";
        let mut dropped =
            encoder.encode_descriptor("roomcast_cluster_dropped", help, None, MetricType::Counter)?;
        for (reason, counter) in [
            ("queue", &stats.dropped_queue),
            ("redis", &stats.dropped_redis),
            ("inbox", &stats.dropped_inbox),
            ("unheard", &stats.dropped_unheard),
        ] {
            ConstCounter::new(counter.load(Relaxed)).encode(dropped.encode_family(&[("reason", reason)])?)?;
        }
        for (name, help, counter) in [
            (
                "roomcast_cluster_resyncs",
                "Resynchronisations after Redis or the subscription connection came back.",
                &stats.resyncs,
            ),
            ("roomcast_cluster_gaps", "Delivery batches a follower noticed it missed.", &stats.gaps),
            (
                "roomcast_cluster_stale",
                "Delivery batches dropped because their owner had lost the room (a later lease term was seen).",
                &stats.stale,
            ),
            ("roomcast_cluster_takeovers", "Leases this node took.", &stats.takeovers),
            (
                "roomcast_cluster_discarded_instances",
                "Local instances discarded because another node held the lease.",
                &stats.discarded,
            ),
        ] {
            let series = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(counter.load(Relaxed)).encode(series)?;
        }
        Ok(())
    }
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
    /// Read room `room`'s stored history (and Redis's clock, for its entries' ages).
    async fn read_history(&self, room: &str) -> Result<Vec<StoredEntry>, RedisFailure> {
        let mut pipe = redis::pipe();
        store::read_history_cmd(&mut pipe, room);
        pipe.cmd("TIME");
        let conn = self.conn.lock().expect("cluster lock").clone();
        let Some(mut conn) = conn else { return Err(RedisFailure::NotConnected) };
        let (entries, now): (redis::Value, redis::Value) =
            tokio::time::timeout(self.op_timeout(), pipe.query_async(&mut conn))
                .await
                .map_err(|_| RedisFailure::Timeout("reading a history"))?
                .map_err(RedisFailure::from)?;
        Ok(supervisor::stored_history(entries, now))
    }

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
    pub fn link(self: &Arc<Self>, room: &str) -> RoomLink {
        let entry = Arc::new(Entry::new(room));
        self.entries.lock().expect("cluster lock").insert(entry.name.clone(), entry.clone());
        RoomLink::new(self.clone(), entry)
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

    /// The cluster's series for `/metrics`, read when scraped.
    pub fn metrics_collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(ClusterMetrics(Arc::downgrade(self)))
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

    async fn connect(&self) -> Result<(MultiplexedConnection, PubSubSink, PubSubStream), RedisFailure> {
        let conn = self.connect_commands().await?;
        let pubsub = tokio::time::timeout(self.op_timeout(), self.client.get_async_pubsub())
            .await
            .map_err(|_| RedisFailure::Timeout("connecting"))??;
        let (sink, stream) = pubsub.split();
        Ok((conn, sink, stream))
    }
}

/// One live room as `/admin/rooms` shows it in cluster mode.
#[derive(Debug)]
pub struct RoomOverview {
    pub name: String,
    pub owner: Option<String>,
    /// Member ids per node.
    pub members: Vec<(String, Vec<MemberId>)>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// The series the cluster adds to `/metrics`, from a node that never reached Redis;
    /// gone with the cluster.
    #[test]
    fn series_in_metrics() {
        let cluster = Cluster::new("redis://127.0.0.1:1/", Duration::from_secs(5)).unwrap();
        let metrics = Metrics::default();
        metrics.register_collector(cluster.metrics_collector());
        cluster.stats.dropped_inbox.fetch_add(2, Relaxed);
        cluster.stats.takeovers.fetch_add(1, Relaxed);
        let text = metrics.render();
        for line in [
            "# TYPE roomcast_cluster_up gauge",
            "roomcast_cluster_up 0",
            "roomcast_cluster_owned_rooms 0",
            "# TYPE roomcast_cluster_dropped_total counter",
            "roomcast_cluster_dropped_total{reason=\"queue\"} 0",
            "roomcast_cluster_dropped_total{reason=\"inbox\"} 2",
            "roomcast_cluster_resyncs_total 0",
            "roomcast_cluster_gaps_total 0",
            "roomcast_cluster_stale_total 0",
            "# HELP roomcast_cluster_takeovers_total Leases this node took.",
            "roomcast_cluster_takeovers_total 1",
            "roomcast_cluster_discarded_instances_total 0",
            "roomcast_connections 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        drop(cluster);
        assert!(!metrics.render().contains("roomcast_cluster"));
    }
}
