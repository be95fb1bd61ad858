//! `fastwebsockets-peer`: the minimal fastwebsockets room server Roomcast is compared
//! with; a message to a room goes to every OTHER member of the room.
//!
//! Run with: `cargo run --release -p roomcast-bench --bin fastwebsockets-peer -- 9004`
//! (`HEARTBEAT_SECS`, default 10, sets the ping interval).
//!
//! What a careful hand-written server does, and no more, the same as `tungstenite-peer`:
//! the handshake through hyper 1 (fastwebsockets' `upgrade`), then one task per
//! connection. fastwebsockets' reads are not cancel-safe, so the socket is split (its
//! `unstable-split`, over `tokio::io::split`): the read half reads frames and hands each
//! message to the room, which puts it on every other member's unbounded channel; the
//! write half drains its own channel and flushes once per batch. Frames gather in a
//! write buffer allocated on first use (tungstenite's behaves the same way), so that a
//! batch goes out in one write and an idle connection holds none. The read buffer is
//! fastwebsockets' own (8 KiB; it has no setting). `/ws/{room}` picks the room; nothing
//! is validated beyond the WebSocket handshake.

#[path = "../peer_rooms.rs"]
mod peer_rooms;

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::{self, UpgradeFut};
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketWrite};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A frame on its way to a member: a message from the room, or what the read half owes
/// the client (a pong, the answer to a close).
#[derive(Clone)]
struct Out {
    opcode: OpCode,
    payload: Bytes,
}

type Rooms = peer_rooms::Rooms<Out>;
type Room = peer_rooms::Room<Out>;

fn main() -> anyhow::Result<()> {
    let (port, heartbeat) = peer_rooms::args(9004)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(port, heartbeat))
}

async fn serve(port: u16, heartbeat: Duration) -> anyhow::Result<()> {
    let listener = peer_rooms::listen("fastwebsockets peer", port)?;
    let rooms = Arc::new(Rooms::default());
    let next_id = AtomicU64::new(1);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let rooms = rooms.clone();
        // hyper reads the upgrade request, answers it, and hands the socket over.
        let service = service_fn(move |mut request: Request<Incoming>| {
            let response = match upgrade::upgrade(&mut request) {
                Ok((response, upgraded)) => {
                    let path = request.uri().path();
                    let name = path.strip_prefix("/ws/").unwrap_or(path).to_owned();
                    tokio::spawn(session(upgraded, name, id, rooms.clone(), heartbeat));
                    response
                }
                Err(_) => {
                    let mut response = Response::new(Empty::new());
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    response
                }
            };
            std::future::ready(Ok::<_, Infallible>(response))
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades());
    }
}

async fn session(upgraded: UpgradeFut, name: String, id: u64, rooms: Arc<Rooms>, heartbeat: Duration) {
    let Ok(ws) = upgraded.await else {
        return;
    };
    let (reader, mut writer) = ws.split(|io| {
        let (read, write) = tokio::io::split(io);
        (read, Batched::new(write))
    });
    // Every frame goes through the batch buffer: a vectored write would pass it by.
    writer.set_writev(false);
    let reader = FragmentCollectorRead::new(reader);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let room = rooms.join(&name, id, tx.clone());
    let reading = read_loop(reader, &room, id, tx);
    let writing = write_loop(&mut writer, &mut rx, heartbeat);
    tokio::pin!(reading, writing);
    let read_ended = tokio::select! {
        () = &mut reading => true,
        () = &mut writing => false,
    };
    rooms.leave(&name, id, &room);
    if read_ended {
        // Out of the room and with the read half's sender gone, the channel closes once
        // what is queued (the answer to a close) is written.
        writing.await;
    }
}

/// Read messages and hand each to every other member of the room, until the client
/// closes or the connection fails.
async fn read_loop<S: AsyncRead + Unpin>(
    mut reader: FragmentCollectorRead<S>,
    room: &Room,
    id: u64,
    tx: mpsc::UnboundedSender<Out>,
) {
    // What the read half owes the client (a pong, the answer to a close) goes through
    // the member's own channel to the write half.
    let mut owed = |frame: Frame<'_>| {
        let out = Out { opcode: frame.opcode, payload: Bytes::copy_from_slice(&frame.payload) };
        std::future::ready(tx.send(out).map_err(|_| "connection closed"))
    };
    loop {
        let Ok(frame) = reader.read_frame(&mut owed).await else {
            return;
        };
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                let message = Out { opcode: frame.opcode, payload: Bytes::copy_from_slice(&frame.payload) };
                let members = room.lock().expect("room lock");
                for (other, tx) in members.iter() {
                    if *other != id {
                        let _ = tx.send(message.clone());
                    }
                }
            }
            OpCode::Close => return,
            _ => {}
        }
    }
}

/// Drain the member's channel, one flush per batch, and ping every `heartbeat`, until the
/// channel closes or a write fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    writer: &mut WebSocketWrite<W>,
    rx: &mut mpsc::UnboundedReceiver<Out>,
    heartbeat: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else {
                    return;
                };
                let mut result = write(writer, &out).await;
                while result.is_ok() {
                    match rx.try_recv() {
                        Ok(out) => result = write(writer, &out).await,
                        Err(_) => break,
                    }
                }
                if result.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                let ping = Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[]));
                if writer.write_frame(ping).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(
    writer: &mut WebSocketWrite<W>,
    out: &Out,
) -> Result<(), fastwebsockets::WebSocketError> {
    writer.write_frame(Frame::new(true, out.opcode, None, Payload::Borrowed(&out.payload))).await
}

/// Write out what is buffered once it holds this much, as tungstenite does (its
/// `write_buffer_size`).
const BATCH_LIMIT: usize = 128 * 1024;

/// A write half that keeps what is written until `flush` (or until it holds
/// [`BATCH_LIMIT`]): a batch of frames goes out in one write. Its buffer is allocated on
/// first use and kept.
struct Batched<W> {
    inner: W,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already written.
    written: usize,
}

impl<W: AsyncWrite + Unpin> Batched<W> {
    fn new(inner: W) -> Self {
        Self { inner, buffer: Vec::new(), written: 0 }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buffer.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Batched<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buffer.len() >= BATCH_LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        this.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
