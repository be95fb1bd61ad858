//! Parked sessions: an idle connection without a task.
//!
//! A plain TCP session that has read nothing, has nothing to write and nothing to carry
//! out for [`super::PARK_AFTER`] gives up its task. What it needs to go on (rooms,
//! heartbeat, connection slot: [`Live`]) moves into its [`Peer`]; its socket leaves
//! tokio's reactor and stays in the peer's queue as a std socket, which rooms still
//! write through to, registered in one shared poll under the member's id. What
//! happens to a parked session:
//!
//! - its socket turns readable: [`keep_time`] reads it if it holds only pongs (the
//!   client is alive; the session stays parked), and wakes the session for anything
//!   else (bytes, the client's FIN, a reset);
//! - its heartbeat deadline comes: [`keep_time`] sends the ping through the queue, or
//!   wakes the session to reap it;
//! - something is queued for it to write or carry out (a frame the kernel refused on
//!   a write-through, a close, an ending, an eviction or an invite): the queue wakes
//!   the peer, which is a [`Waker`];
//! - the server shuts down: [`keep_time`] wakes every parked session.
//!
//! Woken, the session takes its socket back into the reactor, gets a new task and
//! carries on where it stopped. Parking is a hand-over with no gap: the session arms
//! every wake-up first, then checks that nothing is pending, and only then hands
//! itself to the peer; a wake-up in between makes it keep its task (see
//! [`Peer::begin_park`]). TLS sessions never park (their state lives in the task's
//! stream).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;
use std::time::Duration;

use bytes::BytesMut;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{Context, Live, drive};
use crate::room::{MemberId, Peer, Resume};
use crate::ws::heartbeat::{Beat, Heartbeat};
use crate::ws::outbound::Arrived;
use crate::ws::transport::Transport;

/// How late past a deadline the wheel may wake, so that deadlines close together are
/// served by one wake-up.
const SLACK: Duration = Duration::from_millis(20);
/// Readiness events taken from the parked sockets' poll at a time.
const EVENTS: usize = 256;

/// A parked session's place in the wheel: its heartbeat deadline, then its member id.
type Key = (Instant, MemberId);

/// The parked sessions: by heartbeat deadline, by member id (their sockets' token in
/// the poll), and the poll that watches their sockets.
#[derive(Debug)]
pub struct Parking {
    sessions: Mutex<Sessions>,
    /// Tells [`keep_time`] that a deadline earlier than the one it sleeps for arrived.
    earlier: Notify,
    /// The runtime parked sessions resume on, for a wake-up that comes from a thread
    /// outside it (set by [`keep_time`]).
    handle: OnceLock<Handle>,
    /// Whether [`keep_time`] watches the poll and the deadlines: sessions park only
    /// while it does.
    watching: AtomicBool,
    /// Where parked sockets are registered (edge-triggered, readable), each under its
    /// member id; [`keep_time`] takes the poll and waits on it.
    registry: Registry,
    poll: Mutex<Option<Poll>>,
}

#[derive(Debug, Default)]
struct Sessions {
    by_deadline: BTreeSet<Key>,
    by_id: HashMap<MemberId, Arc<Peer>>,
}

impl Parking {
    pub fn new() -> io::Result<Self> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        Ok(Self {
            sessions: Mutex::default(),
            earlier: Notify::new(),
            handle: OnceLock::new(),
            watching: AtomicBool::new(false),
            registry,
            poll: Mutex::new(Some(poll)),
        })
    }

    fn insert(&self, key: Key, peer: Arc<Peer>) {
        let mut sessions = self.sessions.lock().expect("parking lock");
        let earliest = sessions.by_deadline.first().is_none_or(|first| key < *first);
        sessions.by_deadline.insert(key);
        sessions.by_id.insert(key.1, peer);
        drop(sessions);
        if earliest {
            self.earlier.notify_one();
        }
    }

    fn remove(&self, key: &Key) {
        let mut sessions = self.sessions.lock().expect("parking lock");
        sessions.by_deadline.remove(key);
        sessions.by_id.remove(&key.1);
    }

    /// Move a parked session to its new deadline (`old` may be gone: the wheel takes
    /// due keys out before it serves them).
    fn rekey(&self, old: &Key, new: Key) {
        let mut sessions = self.sessions.lock().expect("parking lock");
        sessions.by_deadline.remove(old);
        sessions.by_deadline.insert(new);
    }

    /// A parked session's socket turned readable: a pong is read here and the session
    /// stays parked; anything else is the session's to read, and wakes it.
    fn readable(&self, peer: &Arc<Peer>, now: Instant) {
        let alive = peer.with_parked(|parked| match peer.outbound.take_pongs() {
            Arrived::Nothing => true,
            Arrived::Pongs => {
                let heartbeat = parked.heartbeat();
                let old = (heartbeat.next_wake(), peer.id);
                heartbeat.seen(now);
                self.rekey(&old, (heartbeat.next_wake(), peer.id));
                true
            }
            Arrived::Other => false,
        });
        if alive != Some(true) {
            peer.unpark();
        }
    }

    /// A parked session's heartbeat deadline came (its key is out of the wheel): the
    /// ping is written through from here; a reap, or a ping the kernel refused, is the
    /// session's to carry out, and wakes it.
    fn due(&self, peer: &Arc<Peer>, now: Instant) {
        let kept = peer.with_parked(|parked| {
            let heartbeat = parked.heartbeat();
            let beat = heartbeat.poll(now);
            let next = (heartbeat.next_wake(), peer.id);
            let kept = match beat {
                Beat::Reap => return false,
                Beat::Ping => peer.outbound.push_ping_through(),
                Beat::Idle => true,
            };
            self.rekey(&next, next);
            kept
        });
        if kept != Some(true) {
            peer.unpark();
        }
    }

    /// Watch a parked session's socket: readable (bytes, FIN or reset) wakes it.
    fn arm(&self, socket: &std::net::TcpStream, id: MemberId) -> io::Result<()> {
        let token = Token(usize::try_from(id).map_err(io::Error::other)?);
        self.registry.register(&mut SourceFd(&socket.as_raw_fd()), token, Interest::READABLE)
    }

    fn disarm(&self, socket: &std::net::TcpStream) {
        // Fails only if it was never armed (a failed `arm`).
        let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
    }

    /// The parked sessions of these tokens, or of these member ids.
    fn peers(&self, ids: impl Iterator<Item = MemberId>) -> Vec<Arc<Peer>> {
        let sessions = self.sessions.lock().expect("parking lock");
        ids.filter_map(|id| sessions.by_id.get(&id).cloned()).collect()
    }
}

/// Wake each parked session when its socket turns readable or its heartbeat deadline
/// comes, and all of them when the server shuts down. Runs for the server's life.
pub async fn keep_time(context: Arc<Context>) {
    let parking = &context.parking;
    let Some(poll) = parking.poll.lock().expect("parking lock").take() else { return };
    // The safe constructor, deprecated because a type could change its descriptor
    // while registered; `Poll` owns its epoll descriptor for its whole life.
    #[allow(deprecated)]
    let watched = AsyncFd::with_interest(poll, tokio::io::Interest::READABLE);
    let mut poll = match watched {
        Ok(poll) => poll,
        Err(error) => {
            // Then no session parks: see `park`.
            tracing::error!(%error, "cannot watch parked sessions' sockets");
            return;
        }
    };
    // From now on sessions may park (see `park`).
    let _ = parking.handle.set(Handle::current());
    parking.watching.store(true, SeqCst);
    let mut events = Events::with_capacity(EVENTS);
    loop {
        let next = parking.sessions.lock().expect("parking lock").by_deadline.first().map(|(at, _)| *at);
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at + SLACK).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = context.shutdown.cancelled() => break,
            ready = poll.readable_mut() => {
                let Ok(mut ready) = ready else {
                    tracing::error!("the poll of parked sessions' sockets failed: sessions no longer park");
                    break;
                };
                loop {
                    if ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)).is_err() {
                        break;
                    }
                    let now = Instant::now();
                    for peer in parking.peers(events.iter().map(|event| event.token().0 as MemberId)) {
                        parking.readable(&peer, now);
                    }
                    if events.iter().count() < EVENTS {
                        break;
                    }
                }
                ready.clear_ready();
                continue;
            }
            () = parking.earlier.notified() => continue,
            () = due => {}
        }
        let now = Instant::now();
        let due = {
            let mut sessions = parking.sessions.lock().expect("parking lock");
            let later = sessions.by_deadline.split_off(&(now, MemberId::MAX));
            std::mem::replace(&mut sessions.by_deadline, later)
        };
        for peer in parking.peers(due.into_iter().map(|(_, id)| id)) {
            parking.due(&peer, now);
        }
    }
    // Every parked session resumes (at shutdown, to find the server shutting down). A
    // session that parks from now on sees that nothing watches and keeps its task.
    parking.watching.store(false, SeqCst);
    let all = std::mem::take(&mut *parking.sessions.lock().expect("parking lock"));
    for peer in all.by_id.into_values() {
        peer.unpark();
    }
}

/// Park the session: hand `live` to the peer and let the task end (`Ok`), or give it
/// back (`Err`) if the session has something to do after all or cannot park (TLS).
/// Given back, its transport may be `None`: the socket is then in the peer's queue, and
/// [`unpark_socket`] takes it back.
pub(super) fn park(context: &Arc<Context>, peer: &Arc<Peer>, mut live: Live) -> Result<(), Live> {
    let parking = &context.parking;
    if !parking.watching.load(SeqCst) {
        return Err(live);
    }
    let socket = match live.transport.take() {
        Some(Transport::Plain(socket)) => socket,
        other => {
            live.transport = other;
            return Err(live);
        }
    };
    peer.begin_park();
    // Every wake-up first, then the checks: what happens after a check wakes the peer.
    let key = (live.heartbeat.next_wake(), peer.id);
    parking.insert(key, peer.clone());
    let armed = match peer.outbound.park_socket(socket, |socket| parking.arm(socket, peer.id)) {
        Ok(armed) => armed,
        Err(shared) => {
            peer.cancel_park();
            parking.remove(&key);
            live.transport = Some(Transport::Plain(shared));
            return Err(live);
        }
    };
    peer.outbound.wake_on_push(&Waker::from(peer.clone()));
    let busy = armed.is_err()
        || !peer.outbound.is_idle()
        || peer.has_departures()
        || context.shutdown.is_cancelled()
        || !parking.watching.load(SeqCst);
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
    parking.remove(&key);
    Err(live.expect("the session's state, not parked"))
}

/// Take a parked (or half-parked) session's socket back from its queue into tokio's
/// reactor.
pub(super) fn unpark_socket(context: &Context, peer: &Peer) -> io::Result<Arc<TcpStream>> {
    peer.outbound.unpark_socket(|socket| context.parking.disarm(socket))
}

/// A session without a task; its socket is in its peer's queue.
struct Parked {
    context: Arc<Context>,
    live: Live,
    /// Keeps the server's shutdown waiting for the session, which has no task.
    _token: TaskTrackerToken,
}

impl Resume for Parked {
    fn heartbeat(&mut self) -> &mut Heartbeat {
        &mut self.live.heartbeat
    }

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
