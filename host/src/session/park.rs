//! Parked sessions: an idle connection without a task.
//!
//! A plain TCP session that has read nothing, has nothing to write and nothing to carry
//! out for [`super::PARK_AFTER`] gives up its task. What it needs to go on (its socket,
//! rooms, heartbeat, connection slot: [`Live`]) moves into its [`Peer`], and three
//! things can start it again, all through the peer as a [`Waker`]:
//!
//! - its socket turning readable (bytes, the client's FIN or a reset): the peer is the
//!   waker in the socket's read slot;
//! - anything for it to write or carry out (a frame the kernel refused on a
//!   write-through, a control frame, a close, an ending, an eviction or an invite): the
//!   peer is the waker in its outbound queue;
//! - its heartbeat deadline (time to ping, or to reap): [`Parking`] keeps every parked
//!   session by deadline, and one task ([`keep_time`]) wakes each when its time comes,
//!   and every one of them when the server shuts down.
//!
//! Woken, the session gets a new task and carries on where it stopped. Parking is
//! a hand-over with no gap: the session registers every wake-up first, then checks
//! that nothing is pending, and only then hands itself to the peer; a wake-up in
//! between makes it keep its task (see [`Peer::begin_park`]). A room's write-through
//! needs no task, so a member that only receives stays parked while messages reach it.
//! TLS sessions never park (their state lives in the task's stream).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;
use std::time::Duration;

use bytes::BytesMut;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{Context, Live, drive};
use crate::room::{MemberId, Peer, Resume};
use crate::ws::transport::Transport;

/// How late past a deadline the wheel may wake, so that deadlines close together are
/// served by one wake-up.
const SLACK: Duration = Duration::from_millis(20);

/// A parked session's place in the wheel: its heartbeat deadline, then its member id.
type Key = (Instant, MemberId);

/// The parked sessions, by heartbeat deadline.
#[derive(Debug, Default)]
pub struct Parking {
    wheel: Mutex<BTreeMap<Key, Arc<Peer>>>,
    /// Tells [`keep_time`] that a deadline earlier than the one it sleeps for arrived.
    earlier: Notify,
    /// The runtime parked sessions resume on (set by [`keep_time`]), for a wake-up that
    /// comes from a thread outside it.
    handle: OnceLock<Handle>,
}

impl Parking {
    fn insert(&self, key: Key, peer: Arc<Peer>) {
        let mut wheel = self.wheel.lock().expect("parking lock");
        let earliest = wheel.first_key_value().is_none_or(|(first, _)| key < *first);
        wheel.insert(key, peer);
        drop(wheel);
        if earliest {
            self.earlier.notify_one();
        }
    }

    fn remove(&self, key: &Key) {
        self.wheel.lock().expect("parking lock").remove(key);
    }
}

/// Wake each parked session when its heartbeat deadline comes, and all of them when
/// the server shuts down. Runs for the server's life.
pub async fn keep_time(context: Arc<Context>) {
    let parking = &context.parking;
    let _ = parking.handle.set(Handle::current());
    loop {
        let next = parking.wheel.lock().expect("parking lock").first_key_value().map(|((at, _), _)| *at);
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at + SLACK).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = context.shutdown.cancelled() => break,
            () = parking.earlier.notified() => continue,
            () = due => {}
        }
        let now = Instant::now();
        let due = {
            let mut wheel = parking.wheel.lock().expect("parking lock");
            let later = wheel.split_off(&(now, MemberId::MAX));
            std::mem::replace(&mut *wheel, later)
        };
        for peer in due.into_values() {
            peer.unpark();
        }
    }
    // Every parked session resumes, and finds the server shutting down. A session that
    // parks from now on sees the cancellation and keeps its task.
    let all = std::mem::take(&mut *parking.wheel.lock().expect("parking lock"));
    for peer in all.into_values() {
        peer.unpark();
    }
}

/// Park the session: hand `live` to the peer and let the task end (`Ok`), or give it
/// back (`Err`) if the session has something to do after all or cannot park (TLS).
pub(super) fn park(context: &Arc<Context>, peer: &Arc<Peer>, live: Live) -> Result<(), Live> {
    let Transport::Plain(socket) = &live.transport else { return Err(live) };
    let socket = socket.clone();
    peer.begin_park();
    // Every wake-up first, then the checks: what happens after a check wakes the peer.
    let waker = Waker::from(peer.clone());
    let readable = socket.poll_read_ready(&mut std::task::Context::from_waker(&waker)).is_ready();
    peer.outbound.wake_on_push(&waker);
    let key = (live.heartbeat.next_wake(), peer.id);
    context.parking.insert(key, peer.clone());
    let busy =
        readable || !peer.outbound.is_idle() || peer.has_departures() || context.shutdown.is_cancelled();
    let mut live = Some(live);
    if busy {
        peer.cancel_park();
    } else if peer.finish_park(|| {
        let live = live.take().expect("the session's state");
        Box::new(Parked { context: context.clone(), live, _token: context.tracker.token() })
    }) {
        context.metrics.connections_parked.fetch_add(1, Relaxed);
        return Ok(());
    }
    context.parking.remove(&key);
    Err(live.expect("the session's state, not parked"))
}

/// A session without a task.
struct Parked {
    context: Arc<Context>,
    live: Live,
    /// Keeps the server's shutdown waiting for the session, which has no task.
    _token: TaskTrackerToken,
}

impl Resume for Parked {
    fn resume(self: Box<Self>, peer: Arc<Peer>) {
        let Parked { context, live, _token } = *self;
        // Its place in the wheel, as when it parked: the heartbeat did not change since.
        context.parking.remove(&(live.heartbeat.next_wake(), peer.id));
        context.metrics.connections_parked.fetch_sub(1, Relaxed);
        let Some(handle) = Handle::try_current().ok().or_else(|| context.parking.handle.get().cloned())
        else {
            // Only before the server runs: nothing parks then.
            tracing::error!(member = peer.id, "a parked session woke with no runtime to resume on");
            return;
        };
        let tracker = context.tracker.clone();
        tracker.spawn_on(drive(context, peer, live, BytesMut::new()), &handle);
    }
}
