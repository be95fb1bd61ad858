//! Delivery: pushes onto members' bounded queues (never awaiting a member), and the
//! staging that lets a batch of messages reach each member with one push.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::actor::RoomActor;
use super::{Peer, encode};
use crate::cluster::wire::Delivery;
use crate::plugin::{MemberId, Payload};

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

    /// The default delivery: every member except the sender.
    pub(super) fn deliver_all(&mut self, payload: &Payload, sender: Option<MemberId>) {
        let except: &[MemberId] = match &sender {
            Some(id) => std::slice::from_ref(id),
            None => &[],
        };
        self.broadcast(payload, except);
    }

    /// Every member except `except`, here and (as the owner) on the other nodes.
    pub(super) fn broadcast(&mut self, payload: &Payload, except: &[MemberId]) {
        self.deliver_except(&encode(payload), except);
        if let Some(clustered) = self.cluster.as_mut().filter(|c| !c.remote.is_empty()) {
            clustered.outbox.push(Delivery::Broadcast { payload: payload.clone(), except: except.to_vec() });
        }
    }

    /// This node's member `id`, if it is one.
    pub(super) fn local(&self, id: MemberId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Queue `payload` for this node's member `to`; `false` if `to` is not one. Never
    /// awaits.
    pub(super) fn deliver_to(&mut self, to: MemberId, payload: &Payload) -> bool {
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
    pub(super) fn deliver_except(&mut self, frame: &Bytes, except: &[MemberId]) {
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
