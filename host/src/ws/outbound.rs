//! A member's outbound queue: bounded in bytes, control frames first, never awaited by
//! the sender.
//!
//! Rooms push encoded frames (shared `Bytes`, encoded once per broadcast) and move on;
//! the member's writer task drains the queue and writes each batch with one vectored
//! write. A push that would take the queued data past its byte budget fails with
//! [`Overflow`]: the caller then cuts the member off as a slow consumer.
//!
//! **Control frames** go in three slots that the writer empties before data: one ping,
//! one pong, one close. A newer ping or pong replaces one not yet sent (RFC 6455 5.5.3
//! allows answering only the latest ping), so a ping flood cannot grow the queue. The
//! pongs a client asks for count against the same budget until the writer gets bytes
//! to the socket again: a client that floods pings and never reads owes more than
//! `max_bytes` of pongs and is cut off as a slow consumer, like one that never reads
//! its data.
//!
//! **Frame boundaries.** Whatever was not written stays here, never in a writer's
//! locals: the writer takes a batch, makes one non-blocking write, and gives back what
//! the kernel refused ([`Outbound::requeue`]) before it waits. The rest of a frame the
//! kernel took only part of goes out before anything else, and clearing the queue (an
//! overflow, [`Outbound::close`]) keeps it. So however a session ends, its close frame
//! starts on a frame boundary.
//!
//! **Write-through.** A plain TCP session attaches its socket. A push that asks for it
//! and finds nothing queued and no write in flight is sent on that socket at once, with
//! one non-blocking `send(2)` under the queue's lock (which is what orders it against
//! the writer); only what the kernel refuses is queued, and only then is the writer
//! woken. A room thus costs no task wake-up per recipient; under load it hands each
//! member its whole batch at once ([`Outbound::push_batch`], one `sendmsg(2)`).

use crate::ws::frame;
use crate::ws::transport::send_frames;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The socket a queue writes through to.
#[derive(Debug, Default)]
enum Direct {
    /// TLS, or the session is over.
    #[default]
    None,
    /// The session's socket, in tokio's reactor (the session has a task).
    Tokio(Arc<TcpStream>),
    /// A parked session's socket, out of tokio's reactor (see `session::park`).
    Parked(std::net::TcpStream),
}

/// What a parked session's socket held (see [`Outbound::take_pongs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrived {
    /// Nothing (a stale wake-up).
    Nothing,
    /// Only pongs, now read: the client is alive.
    Pongs,
    /// Something for the session.
    Other,
}

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
    /// Wakes a parked session (one without a task, see `session::park`): whatever
    /// wakes the writer also wakes it, once per registration.
    parked: AtomicWaker,
}

#[derive(Debug, Default)]
struct State {
    /// The unwritten rest of a frame the kernel took part of: it goes out first, and
    /// nothing clears it.
    rest: Option<Bytes>,
    /// The control slots, sent in this order before any data (the server's ping is
    /// always the same empty frame).
    ping: bool,
    pong: Option<Bytes>,
    close: Option<Bytes>,
    /// Bytes of pongs asked for since the socket last took any bytes: counted against
    /// the budget, though only the latest pong is kept.
    pongs_owed: usize,
    data: VecDeque<Bytes>,
    /// Bytes in `rest` and `data`.
    data_bytes: usize,
    /// Set once the member is being closed: data pushes are refused from then on.
    closed: bool,
    /// The session's socket, for write-through; `None` on TLS and once detached.
    direct: Direct,
    /// The writer holds a batch it has not given back yet: a write-through now could
    /// overtake it.
    writing: bool,
}

impl State {
    /// The member overflowed its budget: it is closing, and its queue (a begun frame
    /// aside) and unsent pong are freed, since it will never read them.
    fn overflow(&mut self) -> Overflow {
        self.closed = true;
        self.clear_data();
        self.pong = None;
        Overflow
    }

    /// Drop the queued data, but not the rest of a frame already begun.
    fn clear_data(&mut self) {
        self.data.clear();
        self.data_bytes = self.rest.as_ref().map_or(0, Bytes::len);
    }

    fn is_empty(&self) -> bool {
        self.rest.is_none()
            && !self.ping
            && self.pong.is_none()
            && self.close.is_none()
            && self.data.is_empty()
    }

    /// The socket took `bytes` bytes: a client that reads owes nothing.
    fn progressed(&mut self, bytes: usize) {
        if bytes > 0 {
            self.pongs_owed = 0;
        }
    }

    /// If nothing is queued and the writer holds no batch, send what the kernel takes
    /// of `frames` now (the rest of a frame it took part of becomes `rest`). Returns
    /// the frames still to queue.
    fn write_through<'a>(&mut self, frames: &'a [&'a Bytes]) -> &'a [&'a Bytes] {
        if self.writing || !self.is_empty() {
            return frames;
        }
        // Refused, or a failed socket (the writer meets the error and ends the
        // session): everything is queued.
        let mut sent = match &self.direct {
            Direct::None => return frames,
            Direct::Tokio(socket) => send_frames(&**socket, frames),
            Direct::Parked(socket) => send_frames(socket, frames),
        }
        .unwrap_or(0);
        self.progressed(sent);
        let mut left = frames;
        while let Some((first, others)) = left.split_first() {
            if sent < first.len() {
                if sent > 0 {
                    self.data_bytes += first.len() - sent;
                    self.rest = Some(first.slice(sent..));
                    left = others;
                }
                break;
            }
            sent -= first.len();
            left = others;
        }
        left
    }

    /// Queue `frames` within `max_bytes`; at the first that does not fit, free the
    /// queue (the member will never read it) and fail.
    fn queue(&mut self, frames: &[&Bytes], max_bytes: usize) -> Result<(), Overflow> {
        for frame in frames {
            if self.data_bytes + frame.len() > max_bytes {
                return Err(self.overflow());
            }
            self.data_bytes += frame.len();
            self.data.push_back((*frame).clone());
        }
        Ok(())
    }
}

impl Outbound {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            parked: AtomicWaker::new(),
        }
    }

    /// Wake the writer, and the session if it is parked.
    fn notify(&self) {
        self.wake.notify_one();
        self.parked.wake();
    }

    /// Wake `waker` at the next push, control frame or close (see [`Outbound::notify`]):
    /// a parked session's way to learn that it has something to write.
    pub fn wake_on_push(&self, waker: &Waker) {
        self.parked.register(waker);
    }

    /// Wake a parked session without queueing anything (its member was ended or
    /// evicted).
    pub fn wake_parked(&self) {
        self.parked.wake();
    }

    /// Nothing is queued, no control frame waits, no write is in flight and the member
    /// is not closing: the session has nothing to write.
    pub fn is_idle(&self) -> bool {
        let state = self.state.lock().expect("outbound lock");
        state.is_empty() && !state.writing && !state.closed
    }

    /// Give the queue the session's socket, for write-through.
    pub fn attach(&self, socket: Arc<TcpStream>) {
        self.state.lock().expect("outbound lock").direct = Direct::Tokio(socket);
    }

    /// Take the socket back: nothing is written through once this returns, and the
    /// queue holds no reference that would keep the connection open (nor a parked
    /// session's waker).
    pub fn detach(&self) {
        self.state.lock().expect("outbound lock").direct = Direct::None;
        drop(self.parked.take());
    }

    /// Hold the session's socket while the session parks: it leaves tokio's reactor
    /// (its registration, 256 bytes, is freed) and the queue writes through to it as a
    /// std socket, whose readability `arm` has watched elsewhere by then. All under the
    /// queue's lock, so no write-through sees it half handed over. `Err` gives the
    /// socket back as it was when something else shares it; `Ok(Err)` says that it
    /// could not leave the reactor (and is lost) or `arm` failed (the queue holds it).
    pub fn park_socket(
        &self,
        socket: Arc<TcpStream>,
        arm: impl FnOnce(&std::net::TcpStream) -> io::Result<()>,
    ) -> Result<io::Result<()>, Arc<TcpStream>> {
        let mut state = self.state.lock().expect("outbound lock");
        state.direct = Direct::None;
        let stream = match Arc::try_unwrap(socket) {
            Ok(stream) => stream,
            Err(shared) => {
                state.direct = Direct::Tokio(shared.clone());
                return Err(shared);
            }
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return Ok(Err(error)),
        };
        let armed = arm(&stream);
        state.direct = Direct::Parked(stream);
        Ok(armed)
    }

    /// Give a parked session its socket back, registered with tokio's reactor again,
    /// once `disarm` has undone `arm` (see [`Outbound::park_socket`]). Needs the
    /// runtime.
    pub fn unpark_socket(&self, disarm: impl FnOnce(&std::net::TcpStream)) -> io::Result<Arc<TcpStream>> {
        let mut state = self.state.lock().expect("outbound lock");
        let Direct::Parked(stream) = std::mem::take(&mut state.direct) else {
            return Err(io::Error::other("the session's socket is not parked"));
        };
        disarm(&stream);
        let socket = Arc::new(TcpStream::from_std(stream)?);
        state.direct = Direct::Tokio(socket.clone());
        Ok(socket)
    }

    /// One data frame: see [`Outbound::push_batch`].
    pub fn push_data(&self, frame: &Bytes, write_through: bool) -> Result<(), Overflow> {
        self.push_batch(&[frame], write_through)
    }

    /// Data frames under one lock (a busy room's batch, or one frame). With
    /// `write_through` and nothing queued before them, they are sent at once (one
    /// `send(2)` or `sendmsg(2)`) and only what the kernel refuses is queued; otherwise
    /// queued, with one wake-up of the writer. Never blocks. The budget bounds what is
    /// queued: at the first frame that would queue past it, the member overflows and
    /// its queue is freed. A closing member silently receives nothing more.
    pub fn push_batch(&self, frames: &[&Bytes], write_through: bool) -> Result<(), Overflow> {
        let mut state = self.state.lock().expect("outbound lock");
        if state.closed {
            return Ok(());
        }
        let left = if write_through { state.write_through(frames) } else { frames };
        if left.is_empty() && state.rest.is_none() {
            return Ok(());
        }
        state.queue(left, self.max_bytes)?;
        drop(state);
        self.notify();
        Ok(())
    }

    /// Queue a ping (an empty one; one not yet sent stays the only one); it goes out
    /// before any queued data.
    pub fn push_ping(&self) {
        self.state.lock().expect("outbound lock").ping = true;
        self.notify();
    }

    /// A parked session's ping: sent at once if nothing is queued (`true`), else
    /// queued without waking anyone (`false`: the caller wakes the session, whose
    /// writer sends it).
    pub fn push_ping_through(&self) -> bool {
        let mut state = self.state.lock().expect("outbound lock");
        let ping = Bytes::from_static(frame::EMPTY_PING);
        let frames = [&ping];
        let queued = !state.write_through(&frames).is_empty();
        if queued {
            state.ping = true;
        }
        !queued && state.rest.is_none()
    }

    /// Read what a parked session's socket holds if it is only the client's pongs
    /// (consumed: [`Arrived::Pongs`]), without the session: anything else stays
    /// unread for the session ([`Arrived::Other`]; also the end of the stream, an
    /// error, or a session that is not parked).
    pub fn take_pongs(&self) -> Arrived {
        /// More than a few pongs at once is not an idle client's heartbeat.
        const PEEK: usize = 128;
        let state = self.state.lock().expect("outbound lock");
        let Direct::Parked(socket) = &state.direct else { return Arrived::Other };
        let mut buf = [0u8; PEEK];
        match socket.peek(&mut buf) {
            Ok(n) if n < PEEK && frame::only_pongs(&buf[..n]) => {
                // Only this reads the socket while the session is parked.
                match io::Read::read(&mut &*socket, &mut buf[..n]) {
                    Ok(read) if read == n => Arrived::Pongs,
                    _ => Arrived::Other,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Arrived::Nothing,
            _ => Arrived::Other,
        }
    }

    /// Queue a pong (replacing one not yet sent); it goes out before any queued data.
    /// Fails with [`Overflow`] (and frees the queue) once the pongs asked for since the
    /// socket last took bytes pass the budget.
    pub fn push_pong(&self, frame: Bytes) -> Result<(), Overflow> {
        {
            let mut state = self.state.lock().expect("outbound lock");
            if state.closed {
                return Ok(());
            }
            state.pongs_owed += frame.len();
            if state.pongs_owed + state.data_bytes > self.max_bytes {
                return Err(state.overflow());
            }
            state.pong = Some(frame);
        }
        self.notify();
        Ok(())
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
        self.notify();
    }

    /// Drop queued data and queue a close frame as the last thing this member gets
    /// (after the rest of a frame already begun).
    pub fn close(&self, frame: Bytes) {
        {
            let mut state = self.state.lock().expect("outbound lock");
            state.closed = true;
            state.clear_data();
            state.close = Some(frame);
        }
        self.notify();
    }

    /// Whether the member is closing (set by [`Outbound::close`] or an overflow).
    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("outbound lock").closed
    }

    /// Move up to `max_frames` queued frames into `batch`: the rest of a frame begun,
    /// then control frames, then data. The caller counts as writing until it gives
    /// back what it did not write with [`Outbound::requeue`].
    pub fn drain(&self, batch: &mut Vec<Bytes>, max_frames: usize) {
        let mut state = self.state.lock().expect("outbound lock");
        if let Some(rest) = state.rest.take() {
            state.data_bytes -= rest.len();
            batch.push(rest);
        }
        if state.ping && batch.len() < max_frames {
            state.ping = false;
            batch.push(Bytes::from_static(frame::EMPTY_PING));
        }
        let State { pong, close, .. } = &mut *state;
        for slot in [pong, close] {
            if batch.len() < max_frames
                && let Some(frame) = slot.take()
            {
                batch.push(frame);
            }
        }
        while batch.len() < max_frames {
            let Some(frame) = state.data.pop_front() else {
                break;
            };
            state.data_bytes -= frame.len();
            batch.push(frame);
        }
        state.writing = !batch.is_empty();
        // An idle member keeps no queue memory: a data queue that grew during a burst
        // is given back.
        if state.data.is_empty() && state.data.capacity() > 64 {
            state.data = VecDeque::new();
        }
    }

    /// Give back what was not written of a batch from [`Outbound::drain`], `written`
    /// bytes of which went out: it goes out first next time, in the same order. Empties
    /// `batch`.
    pub fn requeue(&self, batch: &mut Vec<Bytes>, mut written: usize) {
        let progress = written;
        let mut first = batch.len();
        for (index, frame) in batch.iter().enumerate() {
            if written < frame.len() {
                first = index;
                break;
            }
            written -= frame.len();
        }
        let mut state = self.state.lock().expect("outbound lock");
        state.writing = false;
        state.progressed(progress);
        if first < batch.len() {
            // Nothing queued is older than the batch: it goes back in front, and its
            // first frame (begun or not) ahead even of control frames queued meanwhile.
            for frame in batch.drain(first + 1..).rev() {
                state.data_bytes += frame.len();
                state.data.push_front(frame);
            }
            let frame = batch.pop().expect("the first unwritten frame");
            state.data_bytes += frame.len() - written;
            state.rest = Some(frame.slice(written..));
        }
        batch.clear();
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
    fn a_batch_is_queued_in_order_within_the_budget() {
        let out = Outbound::new(10);
        let frames = [Bytes::from_static(b"123"), Bytes::from_static(b"456")];
        assert_eq!(out.push_batch(&[&frames[0], &frames[1]], true), Ok(()));
        assert_eq!(out.queued_bytes(), 6);
        let mut batch = Vec::new();
        out.drain(&mut batch, 64);
        assert_eq!(batch, frames);
        let more = [Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh"), Bytes::from_static(b"ijkl")];
        assert_eq!(out.push_batch(&[&more[0], &more[1], &more[2]], false), Err(Overflow), "past the budget");
        assert!(out.is_closed());
        assert_eq!(out.queued_bytes(), 0, "an overflowing member's queue is freed");
    }

    #[test]
    fn budget_and_priority() {
        let out = Outbound::new(10);
        out.push_data(&Bytes::from_static(b"12345"), true).unwrap();
        out.push_data(&Bytes::from_static(b"6789"), true).unwrap();
        out.push_ping();
        let mut batch = Vec::new();
        out.drain(&mut batch, 2);
        assert_eq!(batch, [Bytes::from_static(frame::EMPTY_PING), Bytes::from_static(b"12345")]);
        assert_eq!(out.queued_bytes(), 4);
        out.push_data(&Bytes::from_static(b"abcdef"), true).unwrap();
        assert_eq!(out.push_data(&Bytes::from_static(b"x"), false), Err(Overflow));
        assert_eq!(out.queued_bytes(), 0, "an overflowing member's queue is freed");
        assert!(out.is_closed());
        assert_eq!(
            out.push_data(&Bytes::from_static(b"y"), false),
            Ok(()),
            "later pushes are dropped quietly"
        );
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn pongs_replace_each_other_and_count_until_the_socket_takes_bytes() {
        let out = Outbound::new(10);
        for n in 0..4u8 {
            out.push_pong(Bytes::from(vec![n; 2])).unwrap();
        }
        out.push_ping();
        let mut batch = Vec::new();
        out.drain(&mut batch, 64);
        assert_eq!(
            batch,
            [Bytes::from_static(frame::EMPTY_PING), Bytes::from(vec![3u8; 2])],
            "only the latest pong"
        );
        // The socket took the ping and the pong: nothing is owed.
        out.requeue(&mut batch, 4);
        for n in 0..5u8 {
            out.push_pong(Bytes::from(vec![n; 2])).unwrap();
        }
        // The socket takes nothing: the sixth pong owed passes the budget.
        out.drain(&mut batch, 64);
        out.requeue(&mut batch, 0);
        assert_eq!(out.push_pong(Bytes::from_static(b"xx")), Err(Overflow));
        assert!(out.is_closed());
        out.drain(&mut batch, 64);
        assert_eq!(batch, [Bytes::from(vec![4u8; 2])], "only the frame handed back stays");
    }

    /// A connected pair on loopback: the server side (attached to a queue) and the client.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // The reactor has seen the new socket writable.
        server.writable().await.unwrap();
        (Arc::new(server), client)
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0; n];
        client.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn write_through_only_when_nothing_is_ahead() {
        let (server, mut client) = pair().await;
        let out = Outbound::new(1 << 20);
        out.attach(Arc::clone(&server));

        out.push_data(&Bytes::from_static(b"one"), true).unwrap();
        assert_eq!(out.queued_bytes(), 0, "written through");
        assert_eq!(read_exactly(&mut client, 3).await, b"one");

        out.push_data(&Bytes::from_static(b"two"), false).unwrap();
        assert_eq!(out.queued_bytes(), 3, "queued when the room asks for no write-through");
        out.push_data(&Bytes::from_static(b"three"), true).unwrap();
        assert_eq!(out.queued_bytes(), 8, "queued behind a queued frame");

        let mut batch = Vec::new();
        out.drain(&mut batch, 64);
        assert_eq!(batch, [Bytes::from_static(b"two"), Bytes::from_static(b"three")]);
        out.push_data(&Bytes::from_static(b"four"), true).unwrap();
        assert_eq!(out.queued_bytes(), 4, "queued behind a batch being written");
        // The writer got "two" and 2 bytes of "three" out.
        server.try_write(b"twoth").unwrap();
        out.requeue(&mut batch, 5);
        assert!(batch.is_empty());
        assert_eq!(out.queued_bytes(), 3 + 4, "the rest of \"three\" and \"four\"");
        // A control frame queued now still waits for the frame begun.
        out.push_ping();
        out.drain(&mut batch, 64);
        assert_eq!(
            batch,
            [Bytes::from_static(b"ree"), Bytes::from_static(frame::EMPTY_PING), Bytes::from_static(b"four")]
        );
        server.try_write(b"ree\x89\x00four").unwrap();
        out.requeue(&mut batch, 9);
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(read_exactly(&mut client, 14).await, b"twothree\x89\x00four");

        out.push_data(&Bytes::from_static(b"five"), true).unwrap();
        assert_eq!(out.queued_bytes(), 0, "written through again once the writer is done");
        assert_eq!(read_exactly(&mut client, 4).await, b"five");

        out.detach();
        assert_eq!(Arc::strong_count(&server), 1, "detach lets the socket go");
        out.push_data(&Bytes::from_static(b"six"), true).unwrap();
        assert_eq!(out.queued_bytes(), 3, "no socket, no write-through");
    }

    #[tokio::test]
    async fn a_parked_socket_is_written_through_and_given_back() {
        let (server, mut client) = pair().await;
        let out = Outbound::new(1 << 20);
        out.attach(Arc::clone(&server));
        // Shared with someone else: given back as it was.
        let shared = out.park_socket(Arc::clone(&server), |_| Ok(())).unwrap_err();
        assert_eq!(Arc::strong_count(&shared), 3, "the caller's, the queue's and this one");
        drop(shared);
        let mut armed = false;
        let parked = out.park_socket(server, |_| {
            armed = true;
            Ok(())
        });
        assert!(matches!(parked, Ok(Ok(()))) && armed);
        out.push_data(&Bytes::from_static(b"parked"), true).unwrap();
        assert_eq!(out.queued_bytes(), 0, "written through to the parked socket");
        assert_eq!(read_exactly(&mut client, 6).await, b"parked");

        let mut disarmed = false;
        let socket = out.unpark_socket(|_| disarmed = true).unwrap();
        assert!(disarmed);
        assert_eq!(Arc::strong_count(&socket), 2, "the queue holds the socket again");
        out.push_data(&Bytes::from_static(b"back"), true).unwrap();
        assert_eq!(read_exactly(&mut client, 4).await, b"back");
        assert!(out.unpark_socket(|_| {}).is_err(), "not parked any more");
    }

    #[tokio::test]
    async fn a_parked_socket_is_pinged_and_its_pongs_read_without_the_session() {
        use tokio::io::AsyncWriteExt as _;
        let (server, mut client) = pair().await;
        let out = Outbound::new(1 << 20);
        out.attach(Arc::clone(&server));
        assert_eq!(out.take_pongs(), Arrived::Other, "not parked: the session reads");
        assert!(matches!(out.park_socket(server, |_| Ok(())), Ok(Ok(()))));
        assert_eq!(out.take_pongs(), Arrived::Nothing);

        assert!(out.push_ping_through(), "sent at once");
        assert_eq!(read_exactly(&mut client, 2).await, frame::EMPTY_PING);
        assert_eq!(out.queued_bytes(), 0);

        // Bytes on loopback are there once the write returns; the loop only guards
        // against a slow kernel.
        let arrived = |out: &Outbound| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match out.take_pongs() {
                    Arrived::Nothing if std::time::Instant::now() < deadline => std::thread::yield_now(),
                    arrived => return arrived,
                }
            }
        };
        client.write_all(&[0x8A, 0x80, 1, 2, 3, 4]).await.unwrap();
        assert_eq!(arrived(&out), Arrived::Pongs);
        assert_eq!(out.take_pongs(), Arrived::Nothing, "the pong was read");
        // A pong and a message: both stay for the session.
        client.write_all(&[0x8A, 0x80, 1, 2, 3, 4, 0x81, 0x80, 1, 2, 3, 4]).await.unwrap();
        assert_eq!(arrived(&out), Arrived::Other);
        assert_eq!(out.take_pongs(), Arrived::Other, "nothing was read");
        let socket = out.unpark_socket(|_| {}).unwrap();
        let mut buf = [0u8; 12];
        socket.readable().await.unwrap();
        assert_eq!(socket.try_read(&mut buf).unwrap(), 12);
    }

    /// A client that floods pongs at a parked session is not read from outside the
    /// session: past 128 bytes what the socket holds is left to the session (which
    /// reads under the message limit and the heartbeat like any other).
    #[tokio::test]
    async fn a_pong_flood_is_left_to_the_session() {
        use tokio::io::AsyncWriteExt as _;
        let (server, mut client) = pair().await;
        let out = Outbound::new(1 << 20);
        out.attach(Arc::clone(&server));
        assert!(matches!(out.park_socket(server, |_| Ok(())), Ok(Ok(()))));
        let flood: Vec<u8> = [0x8A, 0x80, 1, 2, 3, 4].repeat(30);
        client.write_all(&flood).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut arrived = out.take_pongs();
        while arrived == Arrived::Nothing && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            arrived = out.take_pongs();
        }
        assert_eq!(arrived, Arrived::Other);
        let socket = out.unpark_socket(|_| {}).unwrap();
        let mut buf = vec![0u8; flood.len()];
        socket.readable().await.unwrap();
        assert_eq!(socket.try_read(&mut buf).unwrap(), flood.len(), "nothing was taken");
    }

    #[tokio::test]
    async fn a_batch_is_written_through_with_one_call_or_queued_behind_what_waits() {
        let (server, mut client) = pair().await;
        let out = Outbound::new(1 << 20);
        out.attach(Arc::clone(&server));
        let (a, b) = (Bytes::from_static(b"aa"), Bytes::from_static(b"bbb"));
        assert_eq!(out.push_batch(&[&a, &b], true), Ok(()));
        assert_eq!(out.queued_bytes(), 0, "written through");
        assert_eq!(read_exactly(&mut client, 5).await, b"aabbb");

        out.push_data(&Bytes::from_static(b"q"), false).unwrap();
        assert_eq!(out.push_batch(&[&a, &b], true), Ok(()));
        assert_eq!(out.queued_bytes(), 6, "queued behind the waiting frame");
        let mut batch = Vec::new();
        out.drain(&mut batch, 64);
        assert_eq!(batch, [Bytes::from_static(b"q"), a, b]);
    }

    #[tokio::test]
    async fn a_refused_write_through_is_queued_and_a_begun_frame_survives_a_close() {
        let (server, mut client) = pair().await;
        let out = Outbound::new(64 << 20);
        out.attach(Arc::clone(&server));
        // The client reads nothing: write through until the kernel takes only part of a
        // frame or none of it.
        let frame = Bytes::from(vec![7u8; 256 << 10]);
        let mut sent = 0;
        while out.queued_bytes() == 0 {
            out.push_data(&frame, true).unwrap();
            sent += 1;
            assert!(sent < 1000, "the kernel kept taking 256 KiB frames");
        }
        let begun = out.queued_bytes() < frame.len();
        // More goes behind it.
        out.push_data(&frame, true).unwrap();
        let queued = out.queued_bytes();
        assert!(queued > frame.len());

        // Closing drops the queued frames but keeps the rest of a begun one, then the close.
        out.close(Bytes::from_static(b"CLOSE"));
        assert!(out.is_closed());
        assert_eq!(out.queued_bytes(), if begun { queued - frame.len() } else { 0 });
        let mut batch = Vec::new();
        out.drain(&mut batch, 64);
        let last = batch.pop().unwrap();
        assert_eq!(last, Bytes::from_static(b"CLOSE"));
        assert_eq!(batch.len(), usize::from(begun));

        // The frames the kernel took whole reach the client.
        let body = read_exactly(&mut client, (sent - 1) * frame.len()).await;
        assert!(body.iter().all(|&b| b == 7));
    }
}
