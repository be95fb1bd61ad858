//! What the two Rust peer servers (`tungstenite-peer`, `fastwebsockets-peer`) share:
//! the room registry, the command line and the listening socket. Each binary includes
//! this file as a module of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

/// One room: member id -> that member's outbound channel.
pub type Room<T> = Mutex<HashMap<u64, mpsc::UnboundedSender<T>>>;

/// Every room by name; a room exists while it has members.
pub struct Rooms<T> {
    by_name: Mutex<HashMap<String, Arc<Room<T>>>>,
}

impl<T> Default for Rooms<T> {
    fn default() -> Self {
        Rooms { by_name: Mutex::new(HashMap::new()) }
    }
}

impl<T> Rooms<T> {
    pub fn join(&self, name: &str, id: u64, tx: mpsc::UnboundedSender<T>) -> Arc<Room<T>> {
        let mut rooms = self.by_name.lock().expect("rooms lock");
        let room = rooms.entry(name.to_owned()).or_default().clone();
        room.lock().expect("room lock").insert(id, tx);
        room
    }

    pub fn leave(&self, name: &str, id: u64, room: &Room<T>) {
        let mut rooms = self.by_name.lock().expect("rooms lock");
        let mut members = room.lock().expect("room lock");
        members.remove(&id);
        if members.is_empty() {
            rooms.remove(name);
        }
    }
}

/// The port (first argument, else `default_port`) and the ping interval
/// (`HEARTBEAT_SECS`, default 10).
pub fn args(default_port: u16) -> anyhow::Result<(u16, Duration)> {
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(default_port);
    let heartbeat =
        Duration::from_secs(std::env::var("HEARTBEAT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10));
    Ok((port, heartbeat))
}

/// Listen on 127.0.0.1:`port` with a backlog of 4096, and say so as `name`.
pub fn listen(name: &str, port: u16) -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let listener = socket.listen(4096)?;
    println!("{name} listening on 127.0.0.1:{port}");
    Ok(listener)
}
