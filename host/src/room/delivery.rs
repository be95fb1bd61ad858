//! Delivery: pushes onto members' bounded queues (never awaiting a member), and the
//! staging that lets a batch of messages reach each member with one push.

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
    /// Deliver the staged frames: each member gets the ones meant for it, in order,
    /// with one push.
    pub(super) fn flush_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        // Each staged payload encoded (and deflated) once per kind of member present.
        let mut encoded: Vec<Frames> = self
            .staged
            .iter()
            .map(|(payload, _, preset)| {
                Frames::with_tagged(&self.room.name, payload, preset.clone(), self.compress)
            })
            .collect();
        for peer in &self.peers {
            for (frames, (_, target, _)) in encoded.iter_mut().zip(&self.staged) {
                if target.includes(peer.id) {
                    frames.prepare(peer);
                }
            }
        }
        let mut frames = Vec::with_capacity(self.staged.len());
        let mut delivered = 0;
        for peer in &self.peers {
            frames.clear();
            frames.extend(
                self.staged
                    .iter()
                    .zip(&encoded)
                    .filter(|((_, target, _), _)| target.includes(peer.id))
                    .map(|(_, frames)| frames.get(peer)),
            );
            if !frames.is_empty() {
                delivered += peer.deliver_batch(&frames);
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
        // Keeps its allocation for the next batch.
        self.staged.clear();
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
            self.staged.push((payload.clone(), Target::One(to), None));
        } else if peer
            .deliver(Frames::new(&self.room.name, payload, self.compress).for_peer(peer), self.write_through)
        {
            self.metrics.messages_out.fetch_add(1, Relaxed);
        }
        true
    }

    /// Queue `payload` for every member except `except`, each kind of frame encoded
    /// once (`tagged`: the room-protocol frame, already encoded). Never awaits.
    pub(super) fn deliver_except(&mut self, payload: &Payload, except: &[MemberId], tagged: Option<Bytes>) {
        if self.staging {
            self.staged.push((payload.clone(), Target::Except(except.to_vec()), tagged));
            return;
        }
        let mut frames = Frames::with_tagged(&self.room.name, payload, tagged, self.compress);
        let mut delivered = 0;
        for peer in &self.peers {
            if !except.contains(&peer.id) && peer.deliver(frames.for_peer(peer), self.write_through) {
                delivered += 1;
            }
        }
        self.metrics.messages_out.fetch_add(delivered, Relaxed);
    }
}
