//! A room's side of the cluster: its [`Entry`] (shared with the supervisor) and the
//! [`RoomLink`] its actor holds. The cluster never holds a room: it learns the room's
//! local members from the link's calls and wakes its actor through the entry.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::wire::{self, Delivery, FromOwner, InEvent, OutEvent, Snapshot, ToOwner};
use super::{Cluster, Control, ROOM_BACKLOG_BYTES, Record, Role, RoleChange, WRITE_HEADROOM, Write, store};
use crate::plugin::{MemberId, MemberInfo};

/// A room as the cluster sees it. Shared by the room's actor (through its
/// [`RoomLink`]), the registry and the supervisor.
#[derive(Debug)]
pub struct Entry {
    pub(super) name: Arc<str>,
    /// Wakes the room's actor for role changes and records (it waits on it beside
    /// its inbox).
    pub(super) wake: Notify,
    /// The room's members on this node, as its actor announced them, for rewriting
    /// presence after Redis lost it.
    pub(super) local: Mutex<HashMap<MemberId, MemberInfo>>,
    /// The room's actor dropped its link: the room ended here.
    pub(super) closed: AtomicBool,
    /// The room's role as the supervisor last decided it, or a follower's after its
    /// actor released the lease (read by the supervisor and for `/metrics`).
    pub(super) role: Mutex<Role>,
    /// Whether this node is subscribed to the room's `in` channel (supervisor only).
    pub(super) subscribed_in: AtomicBool,
    /// Presence must be written in full and the role re-decided at the next tick.
    pub(super) resync: AtomicBool,
    /// A `Check` for the room is queued (one at a time is enough).
    pub(super) checking: AtomicBool,
    pub(super) changes: Mutex<VecDeque<RoleChange>>,
    pub(super) pending: AtomicBool,
    /// Records from Redis for the actor, and their size in bytes.
    pub(super) records: Mutex<(VecDeque<Record>, usize)>,
    pub(super) has_records: AtomicBool,
    /// Signalled with each change; the actor waits on it for its first role.
    pub(super) changed: Notify,
    /// The lease term of this node's claim (owner): its deliveries carry it.
    pub(super) term: AtomicU64,
    /// Until when this node's lease surely holds (owner), by this node's clock: the
    /// time the renewal was sent plus the lease. Past it (a renewal is late, or the
    /// process was stopped) another node may have taken the room over.
    pub(super) lease_until: Mutex<Option<Instant>>,
}

impl Entry {
    pub(super) fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            wake: Notify::new(),
            local: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            role: Mutex::new(Role::Pending),
            subscribed_in: AtomicBool::new(false),
            resync: AtomicBool::new(true),
            checking: AtomicBool::new(false),
            changes: Mutex::new(VecDeque::new()),
            pending: AtomicBool::new(false),
            records: Mutex::new((VecDeque::new(), 0)),
            has_records: AtomicBool::new(false),
            changed: Notify::new(),
            term: AtomicU64::new(0),
            lease_until: Mutex::new(None),
        }
    }

    /// The lease is ours until at least `until`.
    pub(super) fn renewed(&self, until: Instant) {
        *self.lease_until.lock().expect("entry lock") = Some(until);
        self.changed.notify_one();
    }

    pub(super) fn push(&self, change: RoleChange) {
        {
            let mut changes = self.changes.lock().expect("entry lock");
            if matches!(change, RoleChange::Nodes(_)) {
                changes.retain(|c| !matches!(c, RoleChange::Nodes(_)));
            }
            changes.push_back(change);
        }
        self.pending.store(true, Relaxed);
        self.changed.notify_one();
        self.wake.notify_one();
    }

    /// Queue a record for the actor; `false` if the backlog is full.
    pub(super) fn push_record(&self, record: Record, size: usize) -> bool {
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
        self.wake.notify_one();
        true
    }

    /// This node's members of the room, as announced.
    pub(super) fn local_members(&self) -> Vec<MemberInfo> {
        self.local.lock().expect("entry lock").values().cloned().collect()
    }

    pub(super) fn set_role(&self, role: Role) -> Role {
        std::mem::replace(&mut *self.role.lock().expect("entry lock"), role)
    }

    pub(super) fn role(&self) -> Role {
        *self.role.lock().expect("entry lock")
    }
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
    pub(super) fn new(cluster: Arc<Cluster>, entry: Arc<Entry>) -> Self {
        Self { cluster, entry, seq: 0, attached: false }
    }

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

    /// Wait until the supervisor queued a role change or Redis delivered records for
    /// the room (see [`Self::next_change`], [`Self::take_records`]).
    pub async fn woken(&self) {
        self.entry.wake.notified().await;
    }

    /// Note a local member without announcing it (the room serves its members alone
    /// while Redis is unreachable); the next resynchronisation announces it.
    pub fn track(&self, member: &MemberInfo) {
        self.entry.local.lock().expect("entry lock").insert(member.id, member.clone());
    }

    /// Forget a local member without announcing it (see [`Self::track`]).
    pub fn untrack(&self, member: MemberId) {
        self.entry.local.lock().expect("entry lock").remove(&member);
    }

    /// Announce a local member (before its join is published, so a new owner that
    /// reads presence after subscribing misses nobody).
    pub fn present(&self, member: &MemberInfo) {
        self.track(member);
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
        self.untrack(member);
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
            event: OutEvent::Deliveries { term: self.entry.term.load(Relaxed), seq: self.seq, items },
        };
        self.cluster.write(Write::Publish {
            channel: store::out_channel(&self.entry.name),
            data: record.encode(),
            unheard: None,
        });
    }

    /// The term of this node's claim of the room's lease (owner).
    pub fn term(&self) -> u64 {
        self.entry.term.load(Relaxed)
    }

    /// Whether this node, as the room's owner, can no longer be sure its lease holds
    /// (see [`Entry::lease_until`]).
    pub fn lease_lapsed(&self) -> bool {
        self.entry.lease_until.lock().expect("entry lock").is_none_or(|until| Instant::now() >= until)
    }

    /// Wait until the supervisor renewed the lease or queued a role change (it decides
    /// within an operation timeout: renewed, lost, or Redis unreachable).
    pub async fn lease_settled(&self) {
        while self.lease_lapsed() && !self.entry.pending.load(Relaxed) {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), self.entry.changed.notified())
                .await;
        }
    }

    /// Count a delivery batch dropped because its owner had lost the room.
    pub fn stale(&self) {
        self.cluster.stats.stale.fetch_add(1, Relaxed);
    }

    /// Whether this node hears the room's `in` channel: it owns the room or is
    /// claiming it (events heard otherwise are a stale owner's backlog).
    pub fn hears_in(&self) -> bool {
        self.entry.subscribed_in.load(Relaxed)
    }

    /// Append a broadcast to the room's stored history (owner): trimmed to about
    /// `size` entries, expiring `ttl` after the last one.
    pub fn record_history(
        &self,
        epoch: &str,
        offset: u64,
        frame: &[u8],
        except: &[MemberId],
        size: usize,
        ttl: std::time::Duration,
    ) {
        let key = store::history_key(&self.entry.name);
        let mut add = redis::cmd("XADD");
        add.arg(&key).arg("MAXLEN").arg("~").arg(size).arg("*");
        add.arg("e").arg(epoch).arg("o").arg(offset).arg("f").arg(frame);
        if !except.is_empty() {
            let ids: Vec<String> = except.iter().map(MemberId::to_string).collect();
            add.arg("x").arg(ids.join(","));
        }
        self.cluster.write(Write::Cmd(add));
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(ttl.as_millis() as u64);
        self.cluster.write(Write::Cmd(expire));
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
    /// Read the room's stored history in the background; it comes back as a
    /// [`Record::Filled`] (follower, to fill a gap in the owner's deliveries).
    pub fn fetch_history(&self) {
        let (cluster, entry) = (self.cluster.clone(), self.entry.clone());
        tokio::spawn(async move {
            let read = cluster.read_history(&entry.name).await;
            if let Err(error) = &read {
                tracing::warn!(room = %entry.name, %error, "cannot read the room's history to fill a gap");
            }
            let size = read.as_ref().map_or(0, |entries| entries.iter().map(|e| e.frame.len()).sum());
            entry.push_record(Record::Filled(read.ok()), size);
        });
    }

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

impl Drop for RoomLink {
    fn drop(&mut self) {
        self.entry.closed.store(true, Relaxed);
    }
}
