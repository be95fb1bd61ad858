//! The HTTP connection watchdog: every wait on a connection that has not upgraded has
//! a deadline.
//!
//! A connection must send a complete request head within the handshake timeout of
//! accept; each request must then be read, handled and its response written within the
//! same time from the moment its head arrived (a body that never arrives, or a client
//! that never reads its response, is cut off); between requests a keep-alive connection
//! may idle for that long. Two kinds of connection are left to themselves: one that
//! upgraded (its session owns the socket and its heartbeat) and one whose response is
//! [`LongLived`] (the dashboard's event stream, which ends with its sign-in session or
//! at shutdown).
//!
//! The server wraps each request in an [`Exchange`] guard and each response body in a
//! [`Tracked`] body that holds the guard until hyper has written the body or dropped
//! it; the [`watchdog`] future reads the shared [`Watch`].
//!
//! [`Pending`] caps how many such connections exist at once. At the cap the server
//! accepts no more (new connections wait in the kernel's listen backlog) until a place
//! frees up, or until the oldest connection has been waiting for [`EVICT_AFTER`], which
//! is then closed to make room. An honest handshake takes milliseconds, so a reconnect
//! storm only queues; connections that stall (slowloris) are the ones closed, and
//! `/healthz` and new clients still get in while the descriptors held stay bounded.

use crate::http::LongLived;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the watchdog knows of one connection.
#[derive(Debug, Default)]
pub struct Watch {
    state: Mutex<State>,
    /// Set once an upgrade is accepted: the session owns the socket's time from then on.
    upgraded: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// When the request now being served arrived; `None` between requests.
    busy_since: Option<Instant>,
    /// Responses being streamed without a deadline.
    long_lived: u32,
    /// When the last exchange finished; `None` while none has.
    last_done: Option<Instant>,
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overstay {
    /// No request was completed within the timeout of accept: a handshake timeout.
    NeverCompleted,
    /// A request (its body, its handling or its response) took longer than the timeout.
    Stalled,
    /// Idle between requests for the timeout.
    Idle,
}

impl Watch {
    /// A request head arrived: the exchange runs until the guard (or the [`Tracked`]
    /// body it moves into) is dropped.
    pub fn begin(self: &Arc<Self>) -> Exchange {
        self.lock().busy_since = Some(Instant::now());
        Exchange { watch: self.clone(), long_lived: false }
    }

    /// The connection upgraded: the watchdog steps aside.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Relaxed);
    }

    /// Whether the connection upgraded.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Relaxed)
    }

    /// Whether a request has been served completely on this connection.
    pub fn completed_any(&self) -> bool {
        self.lock().last_done.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request and its response; finished when dropped.
#[derive(Debug)]
pub struct Exchange {
    watch: Arc<Watch>,
    long_lived: bool,
}

impl Exchange {
    /// The response streams for its session's life: no deadline from now on.
    fn make_long_lived(&mut self) {
        let mut state = self.watch.lock();
        state.busy_since = None;
        state.long_lived += 1;
        self.long_lived = true;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let mut state = self.watch.lock();
        if self.long_lived {
            state.long_lived -= 1;
        } else {
            state.busy_since = None;
        }
        state.last_done = Some(Instant::now());
    }
}

/// A response body that keeps its [`Exchange`] open until hyper is done with it.
#[derive(Debug)]
pub struct Tracked {
    body: Body,
    _exchange: Exchange,
}

impl Tracked {
    /// Wrap `response`'s body; a [`LongLived`] response takes its exchange off the clock.
    pub fn response(
        response: axum::response::Response,
        mut exchange: Exchange,
    ) -> axum::http::Response<Tracked> {
        if response.extensions().get::<LongLived>().is_some() {
            exchange.make_long_lived();
        }
        response.map(|body| Tracked { body, _exchange: exchange })
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How long a connection that has not upgraded is safe from being closed to make
/// room for a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(2);

/// The connections that have not upgraded, oldest first.
#[derive(Debug)]
pub struct Pending {
    max: usize,
    next: AtomicU64,
    /// Admission number → when it was admitted and the token that closes it.
    live: Mutex<BTreeMap<u64, (Instant, CancellationToken)>>,
    /// Woken when a connection leaves.
    freed: Notify,
}

/// A connection's place in [`Pending`]; dropping it gives the place back.
#[derive(Debug)]
pub struct Admitted {
    id: u64,
    pending: Arc<Pending>,
    /// Cancelled when the connection must close to make room.
    pub evicted: CancellationToken,
}

impl Pending {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            next: AtomicU64::new(0),
            live: Mutex::new(BTreeMap::new()),
            freed: Notify::new(),
        })
    }

    /// Wait until there is room for one more connection: below the cap, or once the
    /// oldest has waited [`EVICT_AFTER`] (it is then told to close, and its place is
    /// free once it has closed, so the descriptors held never pass the cap).
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            let wait = {
                let live = self.lock();
                if live.len() < self.max {
                    return;
                }
                let now = Instant::now();
                // The oldest connection not already told to close.
                match live.values().find(|(_, token)| !token.is_cancelled()) {
                    Some((since, token)) if now >= *since + EVICT_AFTER => {
                        token.cancel();
                        None
                    }
                    Some((since, _)) => Some(*since + EVICT_AFTER - now),
                    None => None,
                }
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        () = freed => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                // Closing: its place frees up when it is gone (bounded, in case a
                // wake-up was missed).
                None => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
                }
            }
        }
    }

    /// Admit a new connection (after [`Pending::room`]).
    pub fn admit(self: &Arc<Self>) -> Admitted {
        let id = self.next.fetch_add(1, Relaxed);
        let evicted = CancellationToken::new();
        self.lock().insert(id, (Instant::now(), evicted.clone()));
        Admitted { id, pending: self.clone(), evicted }
    }

    /// Connections admitted that still hold a place.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Instant, CancellationToken)>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.pending.lock().remove(&self.id).is_some() {
            self.pending.freed.notify_one();
        }
    }
}

/// Resolve when the connection has overstayed (see [`Overstay`]). Never resolves once
/// it upgraded, nor while a [`LongLived`] response streams.
pub async fn watchdog(watch: &Watch, accepted: Instant, timeout: Duration) -> Overstay {
    let mut deadline = accepted + timeout;
    loop {
        tokio::time::sleep_until(deadline).await;
        if watch.upgraded.load(Relaxed) {
            std::future::pending::<()>().await;
        }
        let state = watch.lock();
        let now = Instant::now();
        if state.long_lived > 0 {
            deadline = now + timeout;
            continue;
        }
        let (since, overstay) = match (state.busy_since, state.last_done) {
            (Some(since), None) => (since, Overstay::NeverCompleted),
            (Some(since), Some(_)) => (since, Overstay::Stalled),
            (None, None) => (accepted, Overstay::NeverCompleted),
            (None, Some(done)) => (done, Overstay::Idle),
        };
        if now >= since + timeout {
            return overstay;
        }
        deadline = since + timeout;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_wait_for_a_place_or_evict_the_oldest_once_it_is_old_enough() {
        let pending = Pending::new(2);
        pending.room().await;
        let first = pending.admit();
        tokio::time::sleep(Duration::from_millis(500)).await;
        pending.room().await;
        let second = pending.admit();
        assert_eq!(pending.count(), 2);

        // Full: a place that frees up is taken at once.
        let start = Instant::now();
        let room = pending.room();
        tokio::pin!(room);
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut room).await.is_err(), "waits");
        drop(second);
        room.await;
        assert!(Instant::now() < start + Duration::from_millis(200));
        assert!(!first.evicted.is_cancelled());
        let third = pending.admit();

        // Full again: the oldest is told to close once it has waited EVICT_AFTER, and
        // its place is free once it has closed.
        let room = pending.room();
        tokio::pin!(room);
        let early = Duration::from_millis(1700); // past the oldest's 2 s, before the third's
        assert!(tokio::time::timeout(early, &mut room).await.is_err(), "waits for the close");
        assert!(first.evicted.is_cancelled(), "the oldest was told to close");
        assert!(Instant::now() >= start - Duration::from_millis(500) + EVICT_AFTER);
        assert!(!third.evicted.is_cancelled());
        assert_eq!(pending.count(), 2, "it holds its place until it is gone");
        drop(first);
        room.await;
        assert_eq!(pending.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_request_is_a_handshake_timeout() {
        let watch = Arc::new(Watch::default());
        let start = Instant::now();
        assert_eq!(watchdog(&watch, start, T).await, Overstay::NeverCompleted);
        assert_eq!(Instant::now(), start + T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_finishes_is_cut_off() {
        let watch = Arc::new(Watch::default());
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let _exchange = watch.begin(); // head arrived; the body never does
        assert_eq!(watchdog(&watch, start, T).await, Overstay::NeverCompleted);
        assert_eq!(Instant::now(), start + Duration::from_secs(16));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_after_a_response_then_stalled_in_the_next() {
        let watch = Arc::new(Watch::default());
        let start = Instant::now();
        drop(watch.begin());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let exchange = watch.begin();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(exchange);
        assert_eq!(watchdog(&watch, start, T).await, Overstay::Idle);
        assert_eq!(Instant::now(), start + Duration::from_secs(15));

        let _stalled = watch.begin();
        let at = Instant::now();
        assert_eq!(watchdog(&watch, at, T).await, Overstay::Stalled);
        assert_eq!(Instant::now(), at + T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_lived_response_has_no_deadline_until_it_ends() {
        let watch = Arc::new(Watch::default());
        let start = Instant::now();
        let mut response = axum::response::Response::new(Body::empty());
        response.extensions_mut().insert(LongLived);
        let body = Tracked::response(response, watch.begin());
        let dog = watchdog(&watch, start, T);
        tokio::pin!(dog);
        assert!(tokio::time::timeout(Duration::from_secs(3600), &mut dog).await.is_err(), "no deadline");
        drop(body);
        let ended = Instant::now();
        assert_eq!(dog.await, Overstay::Idle);
        assert!(Instant::now() <= ended + T + T, "idle after the stream ended");
    }
}
