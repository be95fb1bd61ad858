//! `tungstenite-peer`: the minimal tokio-tungstenite room server Roomcast is compared
//! with; a message to a room goes to every OTHER member of the room.
//!
//! Run with: `cargo run --release -p roomcast-bench --bin tungstenite-peer -- 9003`
//! (`HEARTBEAT_SECS`, default 10, sets the ping interval).
//!
//! What a careful hand-written server does, and no more: a 4 KiB read buffer per
//! connection (tungstenite's 128 KiB default dominates idle memory), one unbounded
//! channel per member fed by the room, and a session task that drains its channel and
//! flushes once per batch. `/ws/{room}` picks the room; nothing is validated beyond
//! the WebSocket handshake.

#[path = "../peer_rooms.rs"]
mod peer_rooms;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

type Rooms = peer_rooms::Rooms<Message>;

fn main() -> anyhow::Result<()> {
    let (port, heartbeat) = peer_rooms::args(9003)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(port, heartbeat))
}

async fn serve(port: u16, heartbeat: Duration) -> anyhow::Result<()> {
    let listener = peer_rooms::listen("tungstenite peer", port)?;
    let rooms = Arc::new(Rooms::default());
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let (stream, _) = listener.accept().await?;
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(session(stream, id, rooms.clone(), heartbeat));
    }
}

async fn session(stream: TcpStream, id: u64, rooms: Arc<Rooms>, heartbeat: Duration) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    let config = WebSocketConfig::default().read_buffer_size(4096);
    // The error type is tungstenite's `Callback` contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let name = path.strip_prefix("/ws/").unwrap_or(&path).to_owned();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let room = rooms.join(&name, id, tx);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    let members = room.lock().expect("room lock");
                    for (other, tx) in members.iter() {
                        if *other != id {
                            let _ = tx.send(message.clone());
                        }
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the close reply when it read the close frame:
                    // send it (RFC 6455, 5.5.1) before the connection is dropped, as the
                    // other servers do.
                    let _ = ws.flush().await;
                    break;
                }
                Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some(message) = rx.recv() => {
                let mut result = ws.feed(message).await;
                while result.is_ok() {
                    match rx.try_recv() {
                        Ok(message) => result = ws.feed(message).await,
                        Err(_) => break,
                    }
                }
                if result.is_err() || ws.flush().await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    rooms.leave(&name, id, &room);
}
