//! Delivery: pushes onto members' bounded queues (never awaiting a member), and the
//! staging that lets a batch of messages reach each member with one push, member by
//! member, so that a message staged while a batch is half written joins it for the
//! members not yet written to.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::actor::RoomActor;
use super::peer::{Frames, encode_tagged};
use super::{Ending, Peer};
use crate::cluster::wire::Delivery;
use crate::plugin::{MemberId, Payload};
use crate::types::CloseReason;

/// Who a staged frame is for.
pub(super) enum Target {
    /// Every member but these.
    Except(Vec<MemberId>),
    One(MemberId),
}

impl Target {
    pub(super) fn includes(&self, member: MemberId) -> bool {
        match self {
            Target::Except(except) => !except.contains(&member),
            Target::One(one) => *one == member,
        }
    }
}

impl RoomActor {
    /// Stage a delivery (see `RoomActor::staged`).
    fn stage(&mut self, target: Target, frames: Frames) {
        self.staged.push((target, frames));
        self.staged_count += 1;
    }

    /// Give each member in `members` (indices into `peers`) the staged frames meant for
    /// it that it has not had yet, in order, with one push.
    pub(super) fn write_staged(&mut self, members: std::ops::Range<usize>) {
        // Membership does not change while frames are staged (a close flushes first):
        // a member's place in `peers` is its place in `sent`.
        debug_assert!(self.sent.len() <= self.peers.len(), "members left while frames were staged");
        self.sent.resize(self.peers.len(), 0);
        let room = &self.room.name;
        // Each staged payload encoded (and deflated) once per kind of member present.
        for (peer, from) in self.peers[members.clone()].iter().zip(&self.sent[members.clone()]) {
            for (target, frames) in &mut self.staged[*from..] {
                if target.includes(peer.id) {
                    frames.prepare(room, peer);
                }
            }
        }
        let mut frames = Vec::with_capacity(self.staged.len());
        let mut delivered = 0;
        for (peer, from) in self.peers[members.clone()].iter().zip(&mut self.sent[members]) {
            frames.clear();
            frames.extend(
                self.staged[*from..]
                    .iter()
                    .filter(|(target, _)| target.includes(peer.id))
                    .map(|(_, frames)| frames.get(peer)),
            );
            *from = self.staged.len();
            if !frames.is_empty() {
                delivered += peer.deliver_batch(&frames);
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
    }

    /// Deliver everything staged to every member that has not had it yet, and empty
    /// the stage.
    pub(super) fn flush_staged(&mut self) {
        if !self.staged.is_empty() {
            self.write_staged(0..self.peers.len());
        }
        // Both keep their allocations for the next batch.
        self.staged.clear();
        self.sent.clear();
    }

    /// The default delivery: every member except the sender.
    pub(super) fn deliver_all(&mut self, payload: &Payload, sender: Option<MemberId>) {
        let except: &[MemberId] = match &sender {
            Some(id) => std::slice::from_ref(id),
            None => &[],
        };
        self.broadcast(payload, except);
    }

    /// Every member except `except`, here and (as the owner) on the other nodes. In a
    /// room that keeps history, the broadcast takes the next offset and its tagged
    /// frame is kept.
    pub(super) fn broadcast(&mut self, payload: &Payload, except: &[MemberId]) {
        let room = &self.room.name;
        let recorded = self
            .history
            .as_mut()
            .map(|history| history.record(|offset| encode_tagged(room, payload, Some(offset))));
        if let (Some((offset, frame)), Some(history), Some(clustered)) = (
            &recorded,
            &self.history,
            self.cluster
                .as_ref()
                .filter(|c| matches!(c.role, crate::cluster::Role::Owner | crate::cluster::Role::Solo)),
        ) {
            // Stored before the deliveries are published (one write queue, in order), so
            // whatever a member on another node receives is in the stored history.
            let limits = history.limits();
            clustered.link.record_history(history.epoch(), *offset, frame, except, limits.size, limits.ttl);
        }
        let (offset, tagged) = recorded.unzip();
        self.deliver_except(payload, except, tagged);
        if let Some(clustered) = self.cluster.as_mut().filter(|c| !c.remote.is_empty()) {
            let except = except.to_vec();
            clustered.outbox.push(Delivery::Broadcast { payload: payload.clone(), except, offset });
        }
    }

    /// End a local member's membership on a plugin's word (or its failure). A member in
    /// room-protocol mode leaves this room only: it is told (`left`), gets nothing more
    /// from the room, and its session leaves the room; a raw member's session ends.
    pub(super) fn close_member(&mut self, member: MemberId, why: CloseReason, code: u16, reason: &str) {
        let Some(at) = self.peers.iter().position(|p| p.id == member) else { return };
        let peer = &self.peers[at];
        if !peer.tagged {
            peer.end(Ending::new(why, code, reason.to_owned()));
            return;
        }
        let left = crate::protocol::left(&self.room.name, code, reason, None);
        peer.deliver(&left, self.write_through);
        peer.evict(self.room.name.clone(), why);
        // Its plugin still counts it a member until the leave arrives.
        self.peers.remove(at);
    }

    /// This node's member `id`, if it is one.
    pub(super) fn local(&self, id: MemberId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Queue `payload` for this node's member `to`; `false` if `to` is not one. Never
    /// awaits.
    pub(super) fn deliver_to(&mut self, to: MemberId, payload: &Payload) -> bool {
        let Some(peer) = self.local(to) else { return false };
        if self.staging {
            self.stage(Target::One(to), Frames::new(payload.clone(), self.compress));
        } else if peer.deliver(
            Frames::new(payload.clone(), self.compress).for_peer(&self.room.name, peer),
            self.write_through,
        ) {
            self.metrics.messages_out.fetch_add(1, Relaxed);
        }
        true
    }

    /// Queue `payload` for every member except `except`, each kind of frame encoded
    /// once (`tagged`: the room-protocol frame, already encoded). Never awaits.
    pub(super) fn deliver_except(&mut self, payload: &Payload, except: &[MemberId], tagged: Option<Bytes>) {
        let mut frames = Frames::with_tagged(payload.clone(), tagged, self.compress);
        if self.staging {
            self.stage(Target::Except(except.to_vec()), frames);
            return;
        }
        let mut delivered = 0;
        let room = &self.room.name;
        for peer in &self.peers {
            if !except.contains(&peer.id) && peer.deliver(frames.for_peer(room, peer), self.write_through) {
                delivered += 1;
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
    }
}
