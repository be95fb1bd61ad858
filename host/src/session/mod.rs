//! One WebSocket session: what owns an upgraded connection from its first frame to
//! its last byte — a task while the session is busy, parked without one while it is
//! idle ([`park`]).
//!
//! The task runs two futures over the two halves of its [`Transport`]: the reader
//! (decode frames, feed the room, answer pings, watch the heartbeat, park when idle)
//! and the writer (drain what the member's outbound queue holds, up to 64 frames per
//! system call; most frames never get here, written through by the room). Whatever
//! ends the session — a close frame, a reap, an error, an overflow, a plugin, shutdown —
//! the task leaves every room first, then sends its close frame if it has one, and
//! drops the socket.

use std::borrow::Cow;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::plugin::HandshakeRequest;
use crate::plugin::Payload;
use crate::protocol;
use crate::room::{Ending, Gate, Joining, Peer, Room, Rooms};
use crate::types::CloseReason;
use crate::ws::frame::{self, DecodeError, Decoder, Event, close_code};
use crate::ws::heartbeat::{Beat, Heartbeat};
use crate::ws::outbound::Outbound;
use crate::ws::transport::{MAX_FRAMES_PER_WRITE, Reader, Transport, Writer};

pub mod park;

/// Bytes read per `read` call when no frame size is known yet.
const READ_CHUNK: usize = 4096;
/// Bytes the first read after a quiet spell (no read buffer) makes room for: most
/// wake-ups of an idle connection are a pong or one short message, and a read that
/// fills it is followed by reads of [`READ_CHUNK`].
const FIRST_READ: usize = 256;
/// How long a closing session keeps trying to deliver its close frame and wait for
/// the client's answer before it drops the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a plain TCP session waits with nothing read, nothing to write and nothing
/// to carry out before it parks (gives up its task until something happens).
const PARK_AFTER: Duration = Duration::from_millis(100);

/// The settings a session needs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub heartbeat_interval: Duration,
    pub pong_timeout: Duration,
    pub max_message_bytes: usize,
}

/// What every session shares: one pointer in each.
#[derive(Debug)]
pub struct Context {
    pub rooms: Arc<Rooms>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Session tasks, parked sessions (each holds a token) and rooms; the server waits
    /// for them on shutdown.
    pub tracker: TaskTracker,
    /// Parked sessions by heartbeat deadline.
    pub parking: park::Parking,
}

impl Context {
    pub fn new(
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        limits: Limits,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> io::Result<Self> {
        Ok(Self { rooms, metrics, limits, shutdown, tracker, parking: park::Parking::new()? })
    }
}

/// What a connection in room-protocol mode needs for its joins (boxed in [`Session`]:
/// a raw connection carries one pointer for it).
#[derive(Debug)]
pub struct RoomProtocol {
    /// The upgrade request, for asking each room's plugin about a join.
    pub upgrade: HandshakeRequest,
    pub gate: Arc<Gate>,
    /// Rooms the connection may be in at once.
    pub max_rooms: usize,
}

/// Everything a session task owns.
pub struct Session<C> {
    /// The connection once the HTTP layer hands it over, after the 101: the transport
    /// and the bytes read past the upgrade request (a client's first frames); `None`
    /// when the hand-over failed. The session's own task waits for it: a task that
    /// waited and then ran the session would keep, beside the session's future, the
    /// moved-out values it had captured, for as long as the connection lives.
    pub connection: C,
    pub peer: Arc<Peer>,
    /// The room in the upgrade's path, joined first (`None`: `GET /ws`).
    pub room: Option<String>,
    /// Room-protocol mode (`None`: raw mode).
    pub rooms_mode: Option<Box<RoomProtocol>>,
    pub context: Arc<Context>,
    /// The session's slot under `--max-connections`; released when the session ends.
    pub permit: OwnedSemaphorePermit,
}

/// What a session keeps between its first frame and its last, task or no task.
struct Live {
    /// `None` while the socket is with the peer's queue (parked, or on the way in or
    /// out of parking).
    transport: Option<Transport>,
    member_rooms: Vec<Arc<Room>>,
    rooms_mode: Option<Box<RoomProtocol>>,
    heartbeat: Heartbeat,
    /// The session's slot under `--max-connections`, held until the session ends.
    _permit: OwnedSemaphorePermit,
}

/// How a session's read loop stops.
enum Step {
    End(Ending),
    /// Nothing to do for [`PARK_AFTER`]: give up the task.
    Park,
}

impl<C: Future<Output = Option<(Transport, Bytes)>>> Session<C> {
    /// The session's future. `self` is taken apart before the future is made, so that
    /// each field is stored in it once (an `async fn` would also keep `self`, whose
    /// fields were moved out: 136 bytes more per idle connection).
    pub fn run(self) -> impl Future<Output = ()> {
        let Session { connection, peer, room, rooms_mode, context, permit } = self;
        async move {
            let Some((transport, read_ahead)) = connection.await else { return };
            context.metrics.connections.fetch_add(1, Relaxed);
            if let Some(socket) = transport.direct() {
                peer.outbound.attach(socket);
            }
            let mut member_rooms: Vec<Arc<Room>> = Vec::new();
            if let Some(room) = room {
                // In room-protocol mode, as if the client had sent a join with `ref` 0 (the
                // room answers it); the handshake already ran.
                let reference = rooms_mode.is_some().then_some(0);
                let joining = Joining { peer: peer.clone(), reference, params: None, since: None };
                member_rooms.push(context.rooms.join(&room, joining).await);
            }
            let limits = &context.limits;
            let heartbeat = Heartbeat::new(limits.heartbeat_interval, limits.pong_timeout, Instant::now());
            // Copy what the HTTP layer read ahead (usually nothing) and release its buffer.
            let buf = BytesMut::from(&read_ahead[..]);
            drop(read_ahead);
            let live =
                Live { transport: Some(transport), member_rooms, rooms_mode, heartbeat, _permit: permit };
            drive(context, peer, live, buf).await;
        }
    }
}

/// Run a session until it parks or ends; when it ends, tear it down.
async fn drive(context: Arc<Context>, peer: Arc<Peer>, mut live: Live, mut buf: BytesMut) {
    let ending = loop {
        let transport = match &mut live.transport {
            Some(transport) => transport,
            // Resumed from parking: the socket comes back from the queue into tokio's
            // reactor.
            None => match park::unpark_socket(&context, &peer) {
                Ok(socket) => live.transport.insert(Transport::Plain(socket)),
                Err(error) => {
                    tracing::debug!(member = peer.id, %error, "a parked session lost its socket");
                    break Ending { reason: CloseReason::Reset, close: None };
                }
            },
        };
        let step = {
            let parkable = matches!(transport, Transport::Plain(_));
            let (mut reader, mut writer) = transport.split();
            let heartbeat = &mut live.heartbeat;
            // Boxed in room-protocol mode: a raw connection's task keeps only the raw
            // loop's size.
            let reader = if let Some(mode) = live.rooms_mode.as_deref() {
                let membership = Membership { rooms: &context.rooms, mode };
                let messages = Tagged { member_rooms: &mut live.member_rooms, membership };
                Either::Right(Box::pin(read_loop(
                    &mut reader,
                    buf,
                    &peer,
                    messages,
                    &context,
                    heartbeat,
                    parkable,
                )))
            } else {
                let messages = Raw { room: &live.member_rooms[0] };
                Either::Left(read_loop(&mut reader, buf, &peer, messages, &context, heartbeat, parkable))
            };
            let writer = write_loop(&mut writer, &peer.outbound);
            tokio::select! {
                step = reader => step,
                _ = writer => Step::End(peer.ending().unwrap_or(Ending { reason: CloseReason::Reset, close: None })),
            }
        };
        match step {
            Step::End(ending) => break ending,
            Step::Park => match park::park(&context, &peer, live) {
                Ok(()) => return,
                Err(back) => live = back,
            },
        }
        buf = BytesMut::new();
    };
    teardown(&context, &peer, live, ending).await;
}

/// End a session: leave every room, then send the close frame (if any) and drop the
/// socket.
async fn teardown(context: &Context, peer: &Peer, mut live: Live, ending: Ending) {
    let Context { rooms, metrics, .. } = context;
    // Leave every room before anything else, so no broadcast touches us again. When
    // the client ended the session (a close frame, or a frame that broke the
    // protocol), what it sent before still gets its answers first: wait, within
    // the close grace, until the rooms have handled everything up to the leave.
    let answers_due =
        matches!(ending.reason, CloseReason::Client | CloseReason::Protocol | CloseReason::TooBig);
    let mut handled = Vec::new();
    for room in &live.member_rooms {
        let ack = answers_due.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            handled.push(rx);
            tx
        });
        rooms.leave(room, peer.id, ending.reason, ack).await;
    }
    if !handled.is_empty() {
        let all = Box::pin(async move {
            for rx in handled {
                let _ = rx.await;
            }
        });
        let _ = tokio::time::timeout(CLOSE_GRACE, all).await;
    }
    metrics.closed(ending.reason);
    metrics.connections.fetch_sub(1, Relaxed);
    tracing::debug!(member = peer.id, reason = ending.reason.label(), "session closed");

    // No transport: the socket was lost on its way back from parking; nothing to send.
    if let (Some(transport), Some((code, text))) = (&mut live.transport, &ending.close) {
        let (mut reader, mut writer) = transport.split();
        let frame = frame::encode_close(*code, text);
        if ending.reason == CloseReason::SlowConsumer {
            // What it could not read is dropped; the close goes out first.
            peer.outbound.close(frame);
        } else {
            peer.outbound.close_after_data(frame);
        }
        // The client closed first over plain TCP: it sends nothing more, so once
        // the echo is written the socket is closed at once and the server holds
        // TIME_WAIT (RFC 6455 7.1.1), without a half-close and a wait for the
        // client's FIN.
        let echo_only = ending.reason == CloseReason::Client && writer.is_plain();
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if flush(&mut writer, &peer.outbound).await.is_ok()
                && !echo_only
                && writer.shutdown().await.is_ok()
            {
                // Read and discard until the client closes its side, so the kernel
                // does not answer unread bytes with a reset that would destroy the
                // close frame before the client reads it.
                reader.drain_to_end().await;
            }
        })
        .await;
    }
    // Also drops the queue's waker, which is the peer itself.
    peer.outbound.detach();
    drop(live);
}

/// What a session does with a complete message, in raw mode ([`Raw`]: the one room
/// gets it) or room-protocol mode ([`Tagged`]: the envelope says).
trait Messages {
    /// The one room every message goes to, unchanged (raw mode).
    fn room(&self) -> Option<&Room>;

    /// Hand `payload` on when there is no one room; `Some` ends the session.
    fn message(
        &mut self,
        peer: &Arc<Peer>,
        text: bool,
        payload: Bytes,
    ) -> impl Future<Output = Option<Ending>>;

    /// The session was woken without an ending: a room ended a membership.
    fn departures(&mut self, peer: &Arc<Peer>) -> impl Future<Output = ()>;
}

/// Raw mode: every message goes to the connection's one room, unchanged.
struct Raw<'a> {
    room: &'a Room,
}

impl Messages for Raw<'_> {
    fn room(&self) -> Option<&Room> {
        Some(self.room)
    }

    /// Never called ([`Self::room`] answers); a future with no state, so the raw
    /// loop's task stays as small as it was before room-protocol mode.
    fn message(&mut self, _: &Arc<Peer>, _: bool, _: Bytes) -> impl Future<Output = Option<Ending>> {
        std::future::ready(None)
    }

    fn departures(&mut self, _: &Arc<Peer>) -> impl Future<Output = ()> {
        std::future::ready(())
    }
}

/// Room-protocol mode: operations and messages in the `roomcast.v1` envelope.
struct Tagged<'a> {
    member_rooms: &'a mut Vec<Arc<Room>>,
    membership: Membership<'a>,
}

impl Messages for Tagged<'_> {
    fn room(&self) -> Option<&Room> {
        None
    }

    async fn message(&mut self, peer: &Arc<Peer>, text: bool, payload: Bytes) -> Option<Ending> {
        let (at, payload) = match route(text, payload, self.member_rooms) {
            Route::Send(at, payload) => (at, payload),
            Route::Reply(frame) => {
                peer.deliver(&frame, false);
                return None;
            }
            Route::Join(join) => {
                self.membership.join(peer, self.member_rooms, join).await;
                return None;
            }
            Route::Leave(room, reference) => {
                self.membership.leave(peer, self.member_rooms, &room, reference).await;
                return None;
            }
            Route::Close => {
                return Some(Ending::new(
                    CloseReason::Protocol,
                    close_code::PROTOCOL,
                    "not a room-protocol operation",
                ));
            }
        };
        let send = self.member_rooms[at].send(peer.id, payload);
        tokio::pin!(send);
        tokio::select! {
            biased;
            () = peer.killed() => {
                if let Some(ending) = peer.ending() {
                    return Some(ending);
                }
                // A membership ended elsewhere: finish this send, then the read loop
                // is woken again to carry the ending out.
                peer.rewake();
                send.await;
            }
            () = &mut send => {}
        }
        None
    }

    async fn departures(&mut self, peer: &Arc<Peer>) {
        self.membership.evicted(peer, self.member_rooms).await;
        for invite in peer.take_invites() {
            let join = Join {
                room: invite.room,
                reference: None,
                params: invite.params,
                since: None,
                invited: true,
            };
            self.membership.join(peer, self.member_rooms, join).await;
        }
    }
}

/// Read frames until the session must end (says why) or may park (`parkable`: it
/// can wait without a task once [`PARK_AFTER`] passes with nothing to do).
async fn read_loop(
    reader: &mut Reader<'_>,
    mut buf: BytesMut,
    peer: &Arc<Peer>,
    mut messages: impl Messages,
    context: &Context,
    heartbeat: &mut Heartbeat,
    parkable: bool,
) -> Step {
    let Context { metrics, limits, shutdown, .. } = context;
    let mut decoder = match peer.deflate {
        Some(_) => Decoder::with_inflate(limits.max_message_bytes),
        None => Decoder::new(limits.max_message_bytes),
    };
    // The timer serves the heartbeat and parking; it is not moved on every read, but
    // when it fires early it is set again for what is then due.
    let park_after = |now: Instant| parkable.then(|| now + PARK_AFTER);
    let mut park_at = park_after(Instant::now());
    let wake_at = |heartbeat: &Heartbeat, park_at: Option<Instant>| {
        park_at.map_or(heartbeat.next_wake(), |at| at.min(heartbeat.next_wake()))
    };
    let sleep = tokio::time::sleep_until(wake_at(heartbeat, park_at));
    tokio::pin!(sleep);

    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Event::Message { text, payload })) => {
                    metrics.messages_in.fetch_add(1, Relaxed);
                    let ending = match messages.room() {
                        Some(room) => tokio::select! {
                            biased;
                            () = peer.killed() => peer.ending(),
                            () = room.send(peer.id, if text { Payload::Text(payload) } else { Payload::Binary(payload) }) => None,
                        },
                        None => messages.message(peer, text, payload).await,
                    };
                    if let Some(ending) = ending {
                        return Step::End(ending);
                    }
                }
                Ok(Some(Event::Ping(payload))) => {
                    // A client that asks for more pongs than it reads is a slow consumer.
                    if peer.outbound.push_pong(frame::encode(frame::OP_PONG, &payload)).is_err() {
                        return Step::End(Ending::slow_consumer());
                    }
                }
                Ok(Some(Event::Pong(_))) => {}
                Ok(Some(Event::Close { code, .. })) => {
                    // Echo the client's code (RFC 6455 5.5.1); an empty close gets 1000.
                    let code = code.unwrap_or(close_code::NORMAL);
                    return Step::End(Ending::new(CloseReason::Client, code, ""));
                }
                Ok(None) => break,
                Err(error) => {
                    let reason = match error {
                        DecodeError::TooBig(_) => CloseReason::TooBig,
                        DecodeError::Protocol(_) | DecodeError::InvalidUtf8 | DecodeError::Corrupt => {
                            CloseReason::Protocol
                        }
                    };
                    return Step::End(Ending::new(reason, error.close_code(), error.to_string()));
                }
            }
        }
        if buf.is_empty() && buf.capacity() > 0 {
            // An idle connection keeps no read buffer.
            buf = BytesMut::new();
        }

        let chunk = if buf.capacity() == 0 { FIRST_READ } else { READ_CHUNK };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                return Step::End(Ending::new(CloseReason::Shutdown, close_code::GOING_AWAY, "server shutting down"));
            }
            () = peer.killed() => match peer.ending() {
                Some(ending) => return Step::End(ending),
                None => messages.departures(peer).await,
            },
            () = &mut sleep => {
                let now = Instant::now();
                match heartbeat.poll(now) {
                    Beat::Reap => return Step::End(Ending { reason: CloseReason::Heartbeat, close: None }),
                    Beat::Ping => peer.outbound.push_ping(),
                    Beat::Idle => {}
                }
                if park_at.is_some_and(|at| now >= at) {
                    if buf.is_empty() && decoder.is_idle() && peer.outbound.is_idle() && !peer.has_departures() {
                        return Step::Park;
                    }
                    park_at = park_after(now);
                }
                sleep.as_mut().reset(wake_at(heartbeat, park_at));
            }
            read = reader.read_buf(&mut buf, chunk) => match read {
                Ok(0) => return Step::End(Ending { reason: CloseReason::Reset, close: None }),
                Ok(_) => {
                    let now = Instant::now();
                    heartbeat.seen(now);
                    park_at = park_after(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Step::End(Ending { reason: CloseReason::Reset, close: None }),
            }
        }
    }
}

/// What a room-protocol frame asks of the session.
enum Route {
    /// A message for the member room at this index.
    Send(usize, Payload),
    Join(Join),
    Leave(String, Option<u64>),
    /// An answer for the client (a refusal); the connection stays up.
    Reply(Bytes),
    /// Not a room-protocol operation: the connection closes with 1002.
    Close,
}

/// Read a room-protocol message. A send's text is not copied: it is a slice of the
/// frame, unless the client escaped characters in it.
fn route(text: bool, payload: Bytes, member_rooms: &[Arc<Room>]) -> Route {
    let member = |room: &str, reference| match member_rooms.iter().position(|r| r.name() == room) {
        Some(at) => Ok(at),
        None => Err(Route::Reply(protocol::error("not in room", 404, reference))),
    };
    if !text {
        return match protocol::parse_binary(&payload) {
            Ok(Ok((room, data))) => match member(room, None) {
                Ok(at) => Route::Send(at, Payload::Binary(payload.slice_ref(data))),
                Err(reply) => reply,
            },
            Ok(Err(refusal)) => Route::Reply(refusal.frame()),
            Err(_) => Route::Close,
        };
    }
    let Ok(json) = std::str::from_utf8(&payload) else { return Route::Close };
    match protocol::parse(json) {
        Ok(Ok(protocol::Request::Send { room, text, reference })) => match member(&room, reference) {
            Ok(at) => {
                let bytes = match text {
                    Cow::Borrowed(text) => payload.slice_ref(text.as_bytes()),
                    Cow::Owned(text) => Bytes::from(text.into_bytes()),
                };
                Route::Send(at, Payload::Text(bytes))
            }
            Err(reply) => reply,
        },
        Ok(Ok(protocol::Request::Join { room, reference, params, since })) => Route::Join(Join {
            room: room.into_owned(),
            reference,
            params: params.map(Arc::from),
            since,
            invited: false,
        }),
        Ok(Ok(protocol::Request::Leave { room, reference })) => Route::Leave(room.into_owned(), reference),
        Ok(Err(refusal)) => Route::Reply(refusal.frame()),
        Err(_) => Route::Close,
    }
}

/// Joining and leaving rooms in room-protocol mode.
struct Membership<'a> {
    rooms: &'a Arc<Rooms>,
    mode: &'a RoomProtocol,
}

/// A join the client asked for, or a plugin (`invited`).
struct Join {
    room: String,
    reference: Option<u64>,
    /// The join's parameters (JSON text), for the room's plugin.
    params: Option<Arc<str>>,
    /// Recover what the client missed since this position.
    since: Option<protocol::Since>,
    /// A plugin added the member (`add-to-room`): no `ref`, and a member already in
    /// the room is left as it is.
    invited: bool,
}

impl Membership<'_> {
    /// Join `join.room` if the limit allows: the room's plugin then decides, and the
    /// room answers `joined` (then its messages) or an `error`. Refusals here get an
    /// `error` naming the room.
    async fn join(&self, peer: &Arc<Peer>, member_rooms: &mut Vec<Arc<Room>>, join: Join) {
        let Join { room, reference, params, since, invited } = join;
        let refuse =
            |status, reason: &str| peer.deliver(&protocol::refused(&room, reason, status, reference), false);
        if member_rooms.iter().any(|r| r.name() == room) {
            if !invited {
                refuse(409, "already in room");
            }
            return;
        }
        if member_rooms.len() >= self.mode.max_rooms {
            refuse(429, "too many rooms");
            return;
        }
        if let Err(rejection) = self.mode.gate.decide_join(&self.mode.upgrade, &room).await {
            refuse(rejection.status.as_u16(), &rejection.message);
            return;
        }
        let joining = Joining { peer: peer.clone(), reference, params, since };
        member_rooms.push(self.rooms.join(&room, joining).await);
    }

    /// Leave `room`: once the room has handled everything the client sent it before,
    /// `left` with the leave's `ref`.
    async fn leave(
        &self,
        peer: &Arc<Peer>,
        member_rooms: &mut Vec<Arc<Room>>,
        room: &str,
        reference: Option<u64>,
    ) {
        let Some(at) = member_rooms.iter().position(|r| r.name() == room) else {
            peer.deliver(&protocol::error("not in room", 404, reference), false);
            return;
        };
        let left = member_rooms.swap_remove(at);
        let (handled, done) = tokio::sync::oneshot::channel();
        self.rooms.leave(&left, peer.id, CloseReason::Client, Some(handled)).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, done).await;
        peer.deliver(&protocol::left(room, close_code::NORMAL, "", reference), false);
    }

    /// Leave the rooms that ended the membership (they told the client already).
    async fn evicted(&self, peer: &Arc<Peer>, member_rooms: &mut Vec<Arc<Room>>) {
        for (room, why) in peer.take_evictions() {
            if let Some(at) = member_rooms.iter().position(|r| r.name() == &*room) {
                let left = member_rooms.swap_remove(at);
                self.rooms.leave(&left, peer.id, why, None).await;
            }
        }
    }
}

/// Write whatever the outbound queue holds, batch by batch, forever. Returns only on
/// a socket error.
async fn write_loop(writer: &mut Writer<'_>, outbound: &Outbound) -> io::Error {
    loop {
        if let Err(e) = flush(writer, outbound).await {
            return e;
        }
        outbound.wait().await;
    }
}

/// Write until the outbound queue is empty. No frame is held across an await: what
/// the kernel refuses goes back to the queue before waiting, so dropping this future
/// (the session ending) loses nothing and leaves the stream on a frame boundary.
async fn flush(writer: &mut Writer<'_>, outbound: &Outbound) -> io::Result<()> {
    let mut batch = Vec::new();
    loop {
        outbound.drain(&mut batch, MAX_FRAMES_PER_WRITE);
        if batch.is_empty() {
            return writer.flush().await;
        }
        let total: usize = batch.iter().map(Bytes::len).sum();
        let mut attempt = Attempt { outbound, batch: &mut batch, written: 0 };
        attempt.written = writer.write_some(attempt.batch).await?;
        let refused = attempt.written < total;
        drop(attempt);
        if refused {
            writer.ready().await?;
        }
    }
}

/// A drained batch on its way to the socket; dropping it (written, failed or
/// cancelled) gives back what was not written.
struct Attempt<'a> {
    outbound: &'a Outbound,
    batch: &'a mut Vec<Bytes>,
    written: usize,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.outbound.requeue(self.batch, self.written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::HostCaps;
    use crate::plugin::reload::LivePlugins;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::task::TaskTracker;

    /// A session's task lives while the session is busy (an idle one parks without
    /// it): its size is most of the memory of a busy connection. The task is this
    /// future plus tokio's header and trailer, in mimalloc's size classes of 1,536,
    /// 1,792 and 2,048 bytes. It was 1,440 bytes when every idle connection kept its
    /// task; parking (the session's state held across park and resume, the loop
    /// around the read loop) took it to 1,632, in the 1,792 class.
    #[tokio::test]
    async fn the_session_future_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let plugins = Arc::new(LivePlugins::load(None, HostCaps::default(), None, metrics.clone()).unwrap());
        let rooms = Arc::new(Rooms::new(metrics.clone(), plugins, TaskTracker::new()));
        let limits = Limits {
            heartbeat_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            max_message_bytes: 1 << 20,
        };
        let context =
            Context::new(rooms, metrics, limits, CancellationToken::new(), TaskTracker::new()).unwrap();
        let session = Session {
            connection: std::future::ready(Some((Transport::Plain(Arc::new(stream)), Bytes::new()))),
            peer: Arc::new(Peer::new(1, 1 << 20, String::new(), String::new(), None, None, None)),
            room: Some("room".to_owned()),
            rooms_mode: None,
            context: Arc::new(context),
            permit: Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.unwrap(),
        };
        let future = session.run();
        let size = std::mem::size_of_val(&future);
        eprintln!("session future: {size} bytes");
        assert!(size <= 1632, "the session future grew to {size} bytes");
    }
}
