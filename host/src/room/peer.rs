//! A member as rooms see it, and why its session ends.

use std::sync::Mutex;

use bytes::Bytes;

use crate::plugin::{MemberId, MemberInfo, Payload};
use crate::types::CloseReason;
use crate::ws::frame::{self, close_code};
use crate::ws::outbound::{Outbound, Overflow};

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
