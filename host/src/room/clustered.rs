//! Cluster mode: what a room's actor does as owner, follower or alone. The actor
//! holds the room's [`RoomLink`]; the cluster wakes it through that link and never
//! holds the room.

use std::collections::HashMap;

use tokio::time::Instant;

use super::actor::{Logic, RoomActor};
use std::sync::Arc;

use bytes::Bytes;

use super::actor::{Awaiting, carry_out_refusal};
use super::peer::encode_tagged;
use super::{Joining, Peer, RoomEvent, Since};
use crate::cluster::wire::{Delivery, FromOwner, InEvent, OutEvent, Snapshot, ToOwner};
use crate::cluster::{Record, Role, RoleChange, RoomLink};
use crate::plugin::Refused;
use crate::plugin::{MemberId, MemberInfo, Origin};
use crate::types::CloseReason;

/// How long an owner lets its room's state change before it stores a snapshot: what
/// a crash of the owner can lose, against one `snapshot` call and one Redis write per
/// interval for a busy room.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The most records a room keeps while it has no owner to give them to.
const CLUSTER_BACKLOG: usize = 1024;

/// What a room actor knows in cluster mode beyond this node.
pub(super) struct Clustered {
    pub(super) link: RoomLink,
    pub(super) role: Role,
    /// Members on other nodes (owner only), by id.
    pub(super) remote: HashMap<MemberId, Remote>,
    /// Remote members that left, and when (owner), so that a presence read older than
    /// their leave does not bring them back. Pruned as it grows.
    pub(super) left: HashMap<MemberId, Instant>,
    /// Deliveries for other nodes produced by the current event (owner).
    pub(super) outbox: Vec<Delivery>,
    /// This node's records that reached no owner, in order (follower).
    pub(super) unheard: std::collections::VecDeque<Vec<u8>>,
    /// Records for the owner received while a claim is being decided (follower).
    pub(super) early: std::collections::VecDeque<ToOwner>,
    /// Local members whose join the owner has not decided yet (follower): they get
    /// nothing of the room until it does.
    pub(super) pending: Vec<Pending>,
    /// The offset of the last broadcast applied, in a room with history (follower).
    pub(super) applied: Option<u64>,
    /// A gap in the owner's broadcasts being filled from the stored history
    /// (follower): later deliveries wait behind it.
    pub(super) filling: Option<Filling>,
    /// The last delivery batch seen: its owner and number (follower).
    pub(super) last_seq: Option<(String, u64)>,
    /// The highest lease term seen on the owner's deliveries (follower): batches of
    /// an earlier term come from an owner that has lost the room, and are dropped.
    pub(super) term: u64,
    /// When the next snapshot is due (owner, state changed since the last one).
    pub(super) save_at: Option<Instant>,
    pub(super) last_save: Option<Instant>,
}

/// How long a member's node waits for the owner's word on its join before asking
/// again (the word, or the join, may have been published while a subscription was
/// being made or remade).
pub const ADMIT_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a follower waits for the stored history to fill a gap before it gives
/// up on it (counted as missed) and applies what came after.
pub const FILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most delivery batches a follower holds behind a gap it is filling; past it, it
/// gives up on the gap.
const MAX_HELD: usize = 1024;

/// Broadcasts `from..=until` were missed; `held` came after them.
pub(super) struct Filling {
    from: u64,
    until: u64,
    held: Vec<FromOwner>,
    since: Instant,
}

/// A local member waiting for the owner's word on its join (follower).
pub(super) struct Pending {
    pub(super) peer: Arc<Peer>,
    /// What the owner is asked again with, if its word does not come.
    join: InEvent,
    asked: Instant,
}

impl Clustered {
    /// When to ask the owner again about the oldest pending join, or to give up on
    /// filling a gap.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        let fill = self.filling.as_ref().map(|f| f.since + FILL_TIMEOUT);
        self.pending.iter().map(|p| p.asked + ADMIT_RETRY).chain(fill).min()
    }
}

/// A member on another node, as the owner knows it.
pub(super) struct Remote {
    pub(super) node: String,
    pub(super) info: MemberInfo,
    pub(super) joined: Instant,
}

impl Clustered {
    pub(super) fn new(link: RoomLink) -> Self {
        Self {
            link,
            role: Role::Pending,
            remote: HashMap::new(),
            left: HashMap::new(),
            outbox: Vec::new(),
            unheard: Default::default(),
            early: Default::default(),
            pending: Vec::new(),
            applied: None,
            filling: None,
            last_seq: None,
            term: 0,
            save_at: None,
            last_save: None,
        }
    }
}

/// Cluster mode: what the actor does as owner, follower or alone.
impl RoomActor {
    /// Whether another node runs this room (events go there).
    pub(super) fn follows(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| matches!(c.role, Role::Follower | Role::Pending))
    }

    /// Whether this node runs the room for other nodes too.
    pub(super) fn owns(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.role == Role::Owner)
    }

    /// Announce a local member in the cluster's presence.
    /// Announce a local member in the cluster's presence (alone, only note it: the
    /// resynchronisation after Redis returns announces it).
    pub(super) fn announce(&self, peer: &Peer) {
        match &self.cluster {
            Some(clustered) if clustered.role == Role::Solo => clustered.link.track(&peer.info()),
            Some(clustered) => clustered.link.present(&peer.info()),
            None => {}
        }
    }

    pub(super) fn unannounce(&self, member: MemberId) {
        match &self.cluster {
            Some(clustered) if clustered.role == Role::Solo => clustered.link.untrack(member),
            Some(clustered) => clustered.link.absent(member),
            None => {}
        }
    }

    /// A follower's event: local bookkeeping, then the owner decides. Returns whether
    /// the actor ends (its last local member left).
    pub(super) fn follow(&mut self, event: RoomEvent) -> bool {
        let Some(clustered) = self.cluster.as_mut() else { return false };
        match event {
            RoomEvent::Join(Joining { peer, reference, params, since }) => {
                let mut info = peer.info();
                if let Some(params) = &params {
                    self.params.insert(peer.id, params.clone());
                }
                info.params = params;
                clustered.link.present(&info);
                let asked = since.as_ref().map(|since| (since.epoch.clone(), since.offset));
                let join = InEvent::Join { info, since: asked };
                clustered.link.to_owner(join.clone());
                // The owner's plugin decides; its answer (`Delivery::Admit`) brings the
                // reply and what the member missed, and only then does the member get
                // the room's deliveries.
                self.awaiting.push(Awaiting { id: peer.id, reference, since });
                clustered.pending.push(Pending { peer, join, asked: Instant::now() });
            }
            RoomEvent::Leave { member, reason, last, handled } => {
                clustered.link.absent(member);
                clustered.link.to_owner(InEvent::Leave { member, reason });
                clustered.pending.retain(|p| p.peer.id != member);
                self.awaiting.retain(|a| a.id != member);
                self.params.remove(&member);
                self.ids.retain(|id| *id != member);
                self.peers.retain(|p| p.id != member);
                drop(handled);
                return last;
            }
            RoomEvent::Message { from, payload } => {
                clustered.link.to_owner(InEvent::Message { from, payload })
            }
            RoomEvent::Forward { from_room, payload, hops } => {
                clustered.link.to_owner(InEvent::Forward { from_room: from_room.to_string(), payload, hops })
            }
            RoomEvent::Publish(payload) => clustered.link.to_owner(InEvent::Publish(payload)),
            RoomEvent::PluginsChanged => {}
        }
        false
    }

    /// Whether this node owns the room but can no longer be sure its lease holds (a
    /// renewal is late, or the process was stopped past the lease).
    pub(super) fn lease_in_doubt(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.role == Role::Owner && c.link.lease_lapsed())
    }

    /// While the lease is in doubt, act on nothing (no local event, no record, no
    /// timer): a successor may be running the room. Wait for the supervisor's word
    /// (renewed, lost, or Redis unreachable) and apply it.
    pub(super) async fn settle_lease(&mut self) {
        let Some(clustered) = self.cluster.as_ref() else { return };
        tracing::debug!(room = %self.room.name, "the room's lease may have lapsed: waiting for the supervisor");
        clustered.link.lease_settled().await;
        self.cluster_woken();
    }

    /// The supervisor queued role changes or Redis delivered records: apply them.
    pub(super) fn cluster_woken(&mut self) {
        self.role_changes();
        self.refresh_plugin();
        if !self.follows() {
            self.after_event();
        }
    }

    /// Apply the role changes the supervisor queued, then the records from Redis.
    pub(super) fn role_changes(&mut self) {
        while let Some(change) = self.cluster.as_ref().and_then(|c| c.link.next_change()) {
            self.role_change(change);
        }
        if self.lease_in_doubt() {
            // The records wait until the supervisor's word (see `settle_lease`).
            return;
        }
        let records = self.cluster.as_ref().map(|c| c.link.take_records()).unwrap_or_default();
        for record in records {
            match record {
                Record::In(record) => self.inbound(record),
                Record::Out(record) => self.outbound(record),
                Record::Unheard(data) => self.unheard(data),
                Record::Filled(stored) => self.filled(stored),
            }
            // Deliveries of inbound records go out per record, as for local events.
            self.after_event();
        }
    }

    pub(super) fn role_change(&mut self, change: RoleChange) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let before = clustered.role;
        match change {
            RoleChange::Solo => {
                clustered.role = Role::Solo;
                clustered.outbox.clear();
                match before {
                    Role::Pending | Role::Follower => {
                        // Serve the local members on a local instance until Redis returns.
                        let adopted = self.adopt_pending();
                        self.generation = u64::MAX;
                        self.refresh_plugin();
                        self.admit_adopted(&adopted);
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
                if before == Role::Owner {
                    // What this node delivered as owner is no baseline for the new
                    // owner's offsets. (Alone, it applied none of the owner's, so the
                    // baseline stands and what it missed meanwhile is filled in.)
                    clustered.applied = None;
                    clustered.filling = None;
                }
                if matches!(before, Role::Owner | Role::Solo) {
                    if !matches!(self.logic, Logic::Default) {
                        tracing::info!(room = %self.room.name, %owner, "another node holds the room's lease: discarding the local instance");
                        clustered.link.discarded();
                    }
                    clustered.remote.clear();
                    clustered.outbox.clear();
                    self.logic = Logic::Default;
                    self.timers.clear();
                    self.ids = self.peers.iter().map(|p| p.id).collect();
                }
                if before != Role::Pending {
                    // Announce the local members to the owner again (it ignores the ones
                    // it knows).
                    let clustered = self.cluster.as_ref().expect("clustered");
                    for peer in &self.peers {
                        clustered.link.to_owner(InEvent::Join { info: peer.info(), since: None });
                    }
                }
                self.show_logic();
            }
            RoleChange::Owner { snapshot, presence, asked, history } => {
                clustered.role = Role::Owner;
                if matches!(before, Role::Pending | Role::Follower) {
                    let adopted = self.adopt_pending();
                    // The room's history continues from what the last owner stored.
                    self.history = None;
                    self.stored_history = Some(history);
                    self.take_over(snapshot, presence, asked);
                    self.admit_adopted(&adopted);
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
    pub(super) fn take_over(
        &mut self,
        snapshot: Option<Snapshot>,
        presence: Vec<(String, MemberInfo)>,
        asked: Instant,
    ) {
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
        self.timers.clear();
        let wanted = self.plugins.for_room(&self.room.name);
        let Some(plugin) = wanted else {
            self.logic = Logic::Default;
            self.ids = present;
            self.show_logic();
            // Members on other nodes may await a word their join's first owner never
            // sent; a second word is ignored.
            let remote: Vec<MemberId> =
                self.cluster.as_ref().map(|c| c.remote.keys().copied().collect()).unwrap_or_default();
            for id in remote {
                self.admitted(id);
            }
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

    pub(super) fn member_info(&self, id: MemberId) -> Option<MemberInfo> {
        match self.local(id) {
            Some(peer) => {
                let mut info = peer.info();
                info.params = self.params.get(&id).cloned();
                Some(info)
            }
            None => self.cluster.as_ref()?.remote.get(&id).map(|r| r.info.clone()),
        }
    }

    /// Bring the remote members up to date with a presence read made at `asked` (see
    /// [`presence_diff`]).
    pub(super) fn reconcile(&mut self, presence: Vec<(String, MemberInfo)>, asked: Instant) {
        let Some(clustered) = self.cluster.as_ref() else { return };
        let me = clustered.link.node();
        let local = |id: MemberId| self.local(id).is_some();
        let (gone, new) = presence_diff(&clustered.remote, &clustered.left, local, presence, me, asked);
        for member in gone {
            self.remote_leave(member, CloseReason::Reset);
        }
        for (node, info) in new {
            self.remote_join(node, info, None);
        }
    }

    /// Ask the owner again about joins it has not answered for [`ADMIT_RETRY`]
    /// (follower).
    pub(super) fn retry_pending(&mut self) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let now = Instant::now();
        // While records reach no owner (they wait in `unheard`), asking again would only
        // crowd that bounded backlog: the next owner presents these members itself.
        let heard = clustered.unheard.is_empty();
        for pending in clustered.pending.iter_mut().filter(|p| p.asked + ADMIT_RETRY <= now) {
            if heard {
                clustered.link.to_owner(pending.join.clone());
            }
            pending.asked = now;
        }
        if clustered.filling.as_ref().is_some_and(|f| f.since + FILL_TIMEOUT <= now) {
            self.filled(None);
        }
    }

    /// The stored history came back (or could not be read, or did not in time): apply
    /// the missed broadcasts it holds, in order, to this node's members, count the
    /// rest as missed, then what was held behind them.
    pub(super) fn filled(&mut self, stored: Option<Vec<crate::cluster::StoredEntry>>) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let Some(Filling { from, until, held, .. }) = clustered.filling.take() else { return };
        let mut entries: Vec<crate::cluster::StoredEntry> =
            stored.unwrap_or_default().into_iter().filter(|e| (from..=until).contains(&e.offset)).collect();
        entries.sort_by_key(|e| e.offset);
        entries.dedup_by_key(|e| e.offset);
        let missing = (until - from + 1).saturating_sub(entries.len() as u64);
        if missing > 0 {
            tracing::warn!(room = %self.room.name, missing, "missed broadcasts the stored history no longer holds");
            clustered.link.gap(missing);
        }
        clustered.applied = Some(until);
        for entry in entries {
            let Some(payload) = super::peer::untag(&entry.frame) else { continue };
            self.deliver_except(&payload, &entry.except, Some(entry.frame));
        }
        for record in held {
            self.outbound(record);
        }
    }

    pub(super) fn remote_join(&mut self, node: String, info: MemberInfo, since: Option<Since>) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        if self.ids.contains(&info.id) {
            // Asked again: its node did not hear the word (a second one is ignored).
            if clustered.remote.contains_key(&info.id) {
                self.awaiting.push(Awaiting { id: info.id, reference: None, since });
                self.admitted(info.id);
                self.awaiting.retain(|awaiting| awaiting.id != info.id);
            }
            return;
        }
        clustered.left.remove(&info.id);
        clustered.remote.insert(info.id, Remote { node, info: info.clone(), joined: Instant::now() });
        self.ids.push(info.id);
        self.awaiting.push(Awaiting { id: info.id, reference: None, since });
        self.joined(&info);
        self.awaiting.retain(|awaiting| awaiting.id != info.id);
    }

    /// The owner decided the join of a local member that awaits it (follower): refused,
    /// the member is answered as on the owner; admitted, it gets `joined` and what it
    /// missed, then joins the deliveries. A word about a member that awaits nothing (it
    /// was admitted already, or left) is ignored.
    pub(super) fn admit_pending(
        &mut self,
        member: MemberId,
        refused: Option<(u16, String)>,
        position: Option<(String, u64)>,
        recovered: Option<bool>,
        replay: &[Bytes],
    ) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let Some(at) = clustered.pending.iter().position(|p| p.peer.id == member) else { return };
        let peer = clustered.pending.remove(at).peer;
        let awaiting =
            self.awaiting.iter().position(|a| a.id == member).map(|at| self.awaiting.swap_remove(at));
        if let Some((status, reason)) = refused {
            clustered.link.absent(member);
            let refused = Refused { status, reason };
            carry_out_refusal(&peer, &self.room.name, awaiting.map(|a| a.reference), &refused, false);
            return;
        }
        if peer.tagged {
            // A member the owner met through presence rather than its join record asked
            // in vain.
            let asked = awaiting.as_ref().is_some_and(|a| a.since.is_some());
            let recovered = recovered.or(asked.then_some(false));
            let position = position.as_ref().map(|(epoch, offset)| (epoch.as_str(), *offset));
            let reference = awaiting.and_then(|a| a.reference);
            let joined = crate::protocol::joined(&self.room.name, reference, position, recovered);
            let mut frames: Vec<&Bytes> = Vec::with_capacity(1 + replay.len());
            frames.push(&joined);
            frames.extend(replay.iter());
            let delivered = peer.deliver_batch(&frames);
            self.metrics
                .messages_out
                .fetch_add(delivered.saturating_sub(1), std::sync::atomic::Ordering::Relaxed);
        }
        self.ids.push(member);
        self.peers.push(peer);
    }

    /// Becoming the room's owner or running it alone: the local members awaiting the
    /// old owner's word are this node's to present now. Returns their ids.
    pub(super) fn adopt_pending(&mut self) -> Vec<MemberId> {
        let Some(clustered) = self.cluster.as_mut() else { return Vec::new() };
        let pending = std::mem::take(&mut clustered.pending);
        let ids: Vec<MemberId> = pending.iter().map(|p| p.peer.id).collect();
        for Pending { peer, .. } in pending {
            self.ids.push(peer.id);
            self.peers.push(peer);
        }
        ids
    }

    /// After a takeover: adopted members that no plugin call answered (the room has
    /// no plugin) are admitted now.
    pub(super) fn admit_adopted(&mut self, adopted: &[MemberId]) {
        for id in adopted {
            if self.awaiting.iter().any(|a| a.id == *id) && self.ids.contains(id) {
                self.admitted(*id);
            }
        }
    }

    pub(super) fn remote_leave(&mut self, member: MemberId, reason: CloseReason) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        if clustered.remote.remove(&member).is_none() {
            return;
        }
        clustered.left.insert(member, Instant::now());
        self.ids.retain(|id| *id != member);
        self.left(member, reason);
    }

    /// An event for the owner, from another node (or handed back from this one).
    pub(super) fn inbound(&mut self, record: ToOwner) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        let mine = record.node == clustered.link.node();
        match clustered.role {
            Role::Owner => {}
            // Heard as a stale owner, before the unsubscription: the new owner heard it.
            Role::Follower if !clustered.link.hears_in() => return,
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
            InEvent::Join { info, since } => {
                if !mine {
                    let since = since.map(|(epoch, offset)| Since { epoch, offset });
                    self.remote_join(record.node, info, since);
                }
            }
            InEvent::Leave { member, reason } => {
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
    pub(super) fn outbound(&mut self, record: FromOwner) {
        let Some(clustered) = self.cluster.as_mut() else { return };
        match record.event {
            OutEvent::Released => {
                if clustered.role == Role::Follower {
                    clustered.link.check();
                }
            }
            OutEvent::Deliveries { term, ref items, .. } => {
                if clustered.role == Role::Owner && term > clustered.link.term() {
                    // Another node claimed the room after this one: have the
                    // supervisor decide again now rather than at its next tick.
                    clustered.link.check();
                }
                if clustered.role != Role::Follower {
                    return;
                }
                if term < clustered.term {
                    tracing::debug!(room = %self.room.name, owner = %record.node, "deliveries from an owner that lost the room dropped");
                    clustered.link.stale();
                    return;
                }
                clustered.term = term;
                if let Some(filling) = &mut clustered.filling {
                    // Behind a gap being filled from the stored history: in order, after it.
                    filling.held.push(record);
                    if filling.held.len() >= MAX_HELD {
                        self.filled(None);
                    }
                    return;
                }
                // The room's first broadcast in this batch says, by its offset, whether
                // broadcasts were missed; those the stored history holds are filled in
                // before this batch is applied.
                let first_offset = items.iter().find_map(|item| match item {
                    Delivery::Broadcast { offset, .. } => *offset,
                    _ => None,
                });
                if let (Some(applied), Some(offset)) = (clustered.applied, first_offset)
                    && offset > applied + 1
                {
                    tracing::info!(room = %self.room.name, from = applied + 1, to = offset - 1, "missed broadcasts; filling them from the stored history");
                    clustered.link.fetch_history();
                    clustered.filling = Some(Filling {
                        from: applied + 1,
                        until: offset - 1,
                        held: vec![record],
                        since: Instant::now(),
                    });
                    return;
                }
                let OutEvent::Deliveries { seq, items, .. } = record.event else { return };
                if let Some((owner, last)) = &clustered.last_seq
                    && *owner == record.node
                    && seq > last + 1
                    // A room with history counts what its stored history could not
                    // fill instead (see `filled`).
                    && clustered.applied.is_none()
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
                        Delivery::Broadcast { payload, except, offset } => {
                            if let (Some(offset), Some(clustered)) = (offset, self.cluster.as_mut()) {
                                clustered.applied = Some(offset);
                            }
                            let tagged =
                                offset.map(|offset| encode_tagged(&self.room.name, &payload, Some(offset)));
                            self.deliver_except(&payload, &except, tagged)
                        }
                        Delivery::Admit { member, refused, position, recovered, replay } => {
                            self.admit_pending(member, refused, position, recovered, &replay)
                        }
                        Delivery::Send { to, payload } => {
                            self.deliver_to(to, &payload);
                        }
                        Delivery::Close { member, code, reason, failure } => {
                            let why = if failure { CloseReason::PluginFailure } else { CloseReason::Plugin };
                            self.close_member(member, why, code, &reason);
                        }
                        Delivery::Invite { member, room, params } => self.invite(member, room, params),
                    }
                }
            }
        }
    }

    /// One of this node's records reached no owner.
    pub(super) fn unheard(&mut self, data: Vec<u8>) {
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
    pub(super) fn after_event(&mut self) {
        if self.owns() {
            self.dirty();
            self.flush_outbox();
        }
    }

    pub(super) fn flush_outbox(&mut self) {
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
    pub(super) fn dirty(&mut self) {
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
    pub(super) fn save_snapshot(&mut self) {
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
    pub(super) async fn finish(&mut self) {
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

/// What a presence read made at `asked` changes among an owner's remote members:
/// those gone from it leave (unless they joined after the read); those new in it join
/// (unless they are local, or left after the read). Entries of node `me` are ignored.
fn presence_diff(
    remote: &HashMap<MemberId, Remote>,
    left: &HashMap<MemberId, Instant>,
    is_local: impl Fn(MemberId) -> bool,
    presence: Vec<(String, MemberInfo)>,
    me: &str,
    asked: Instant,
) -> (Vec<MemberId>, Vec<(String, MemberInfo)>) {
    let present: HashMap<MemberId, (String, MemberInfo)> =
        presence.into_iter().filter(|(node, _)| node != me).map(|(n, i)| (i.id, (n, i))).collect();
    let mut gone: Vec<MemberId> = remote
        .iter()
        .filter(|(id, r)| !present.contains_key(id) && r.joined < asked)
        .map(|(id, _)| *id)
        .collect();
    gone.sort_unstable();
    let mut new: Vec<(String, MemberInfo)> = present
        .into_values()
        .filter(|(_, info)| {
            !remote.contains_key(&info.id)
                && !is_local(info.id)
                && left.get(&info.id).is_none_or(|at| *at < asked)
        })
        .collect();
    new.sort_unstable_by_key(|(_, info)| info.id);
    (gone, new)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn info(id: MemberId) -> MemberInfo {
        MemberInfo { id, remote_addr: "127.0.0.1:1".into(), ..MemberInfo::default() }
    }

    fn remote(node: &str, id: MemberId, joined: Instant) -> (MemberId, Remote) {
        (id, Remote { node: node.into(), info: info(id), joined })
    }

    #[test]
    fn a_presence_read_removes_the_absent_and_adds_the_new() {
        let t0 = Instant::now();
        let asked = t0 + Duration::from_secs(1);
        let later = asked + Duration::from_secs(1);
        // 1 joined before the read and is absent from it: gone. 2 joined after: kept.
        let remote: HashMap<_, _> = [remote("b", 1, t0), remote("b", 2, later), remote("b", 3, t0)].into();
        // 4 left after the read (stale entry): not brought back. 5 left before: back.
        let left: HashMap<_, _> = [(4, later), (5, t0)].into();
        let presence = vec![
            ("b".to_owned(), info(3)),
            ("b".to_owned(), info(4)),
            ("b".to_owned(), info(5)),
            ("c".to_owned(), info(6)),
            ("c".to_owned(), info(7)),  // local here: never a remote member
            ("me".to_owned(), info(8)), // this node's own entry
        ];
        let (gone, new) = presence_diff(&remote, &left, |id| id == 7, presence, "me", asked);
        assert_eq!(gone, [1]);
        let new: Vec<(String, MemberId)> = new.into_iter().map(|(node, info)| (node, info.id)).collect();
        assert_eq!(new, [("b".to_owned(), 5), ("c".to_owned(), 6)]);
    }

    #[test]
    fn an_unchanged_presence_changes_nothing() {
        let t0 = Instant::now();
        let remote: HashMap<_, _> = [remote("b", 1, t0), remote("c", 2, t0)].into();
        let presence = vec![("b".to_owned(), info(1)), ("c".to_owned(), info(2))];
        let (gone, new) = presence_diff(&remote, &HashMap::new(), |_| false, presence, "me", t0);
        assert!(gone.is_empty() && new.is_empty(), "{gone:?} {new:?}");
    }
}
