//! A member's outbound queue: bounded in bytes, control frames first, never awaited by
//! the sender.
//!
//! Rooms push encoded frames (shared `Bytes`, encoded once per broadcast) and move on;
//! the member's writer task drains the queue and writes each batch with one vectored
//! write. A push that would take the queued data past its byte budget fails with
//! [`Overflow`]: the caller then cuts the member off as a slow consumer. Pings and close
//! frames go in a separate lane that the writer always empties first and that is not
//! counted against the budget (it is bounded by the session, which queues at most one
//! ping per heartbeat interval and one close).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// The data queue would exceed its byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

#[derive(Debug)]
pub struct Outbound {
    max_bytes: usize,
    state: Mutex<State>,
    /// Wakes the writer task. `notify_one` stores a permit, so a push that happens
    /// while the writer is busy is never missed.
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    control: VecDeque<Bytes>,
    data: VecDeque<Bytes>,
    data_bytes: usize,
    /// Set once the member is being closed: data pushes are refused from then on.
    closed: bool,
}

impl Outbound {
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, state: Mutex::new(State::default()), wake: Notify::new() }
    }

    /// Queue a data frame. Never blocks; fails when the budget would be exceeded or the
    /// member is closing (a closing member silently receives nothing more).
    pub fn push_data(&self, frame: Bytes) -> Result<(), Overflow> {
        {
            let mut state = self.state.lock().expect("outbound lock");
            if state.closed {
                return Ok(());
            }
            if state.data_bytes + frame.len() > self.max_bytes {
                // Free what the member will never read.
                state.closed = true;
                state.data.clear();
                state.data_bytes = 0;
                return Err(Overflow);
            }
            state.data_bytes += frame.len();
            state.data.push_back(frame);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Queue a ping or pong; it goes out before any queued data.
    pub fn push_control(&self, frame: Bytes) {
        self.state.lock().expect("outbound lock").control.push_back(frame);
        self.wake.notify_one();
    }

    /// Queue a close frame after the data already queued (a plugin's last words reach
    /// the member before its close); nothing more is accepted after it.
    pub fn close_after_data(&self, frame: Bytes) {
        {
            let mut state = self.state.lock().expect("outbound lock");
            state.closed = true;
            state.data_bytes += frame.len();
            state.data.push_back(frame);
        }
        self.wake.notify_one();
    }

    /// Drop queued data and queue a close frame as the last thing this member gets.
    pub fn close(&self, frame: Bytes) {
        {
            let mut state = self.state.lock().expect("outbound lock");
            state.closed = true;
            state.data.clear();
            state.data_bytes = 0;
            state.control.push_back(frame);
        }
        self.wake.notify_one();
    }

    /// Whether the member is closing (set by [`Outbound::close`] or an overflow).
    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("outbound lock").closed
    }

    /// Move up to `max_frames` queued frames, control frames first, into `batch`.
    pub fn drain(&self, batch: &mut Vec<Bytes>, max_frames: usize) {
        let mut state = self.state.lock().expect("outbound lock");
        while batch.len() < max_frames {
            let Some(frame) = state.control.pop_front() else {
                break;
            };
            batch.push(frame);
        }
        while batch.len() < max_frames {
            let Some(frame) = state.data.pop_front() else {
                break;
            };
            state.data_bytes -= frame.len();
            batch.push(frame);
        }
        // An idle member keeps no queue memory: the control lane is used once per
        // heartbeat, and a data queue that grew during a burst is given back.
        if state.control.is_empty() && state.control.capacity() > 0 {
            state.control = VecDeque::new();
        }
        if state.data.is_empty() && state.data.capacity() > 64 {
            state.data = VecDeque::new();
        }
    }

    /// Wait until something may have been queued.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    /// Bytes of data currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().expect("outbound lock").data_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_and_priority() {
        let out = Outbound::new(10);
        out.push_data(Bytes::from_static(b"12345")).unwrap();
        out.push_data(Bytes::from_static(b"6789")).unwrap();
        out.push_control(Bytes::from_static(b"ping"));
        let mut batch = Vec::new();
        out.drain(&mut batch, 2);
        assert_eq!(batch, [Bytes::from_static(b"ping"), Bytes::from_static(b"12345")]);
        assert_eq!(out.queued_bytes(), 4);
        out.push_data(Bytes::from_static(b"abcdef")).unwrap();
        assert_eq!(out.push_data(Bytes::from_static(b"x")), Err(Overflow));
        assert_eq!(out.queued_bytes(), 0, "an overflowing member's queue is freed");
        assert!(out.is_closed());
        assert_eq!(out.push_data(Bytes::from_static(b"y")), Ok(()), "later pushes are dropped quietly");
        assert_eq!(out.queued_bytes(), 0);
    }
}
