//! `floor-peer`: the least a WebSocket room server can do per delivery, as a reference
//! for the paced fan-out, not a contender. A message to a room goes to every OTHER
//! member of the room, like the other peers.
//!
//! Run with: `cargo run --release -p roomcast-bench --bin floor-peer -- 9005`.
//!
//! One thread, one epoll loop (mio), no async runtime, no heartbeat, no metrics: the
//! upgrade is answered from the `Sec-WebSocket-Key` alone, each complete frame read in a
//! loop iteration is unmasked into a server frame, and at the end of the iteration every
//! member of a room gets all of that iteration's messages from others in one write (one
//! `send(2)` for one message, one `writev(2)` for several), which is the batching
//! uWebSockets does. What the kernel does not take waits in the member's buffer for
//! writability. Bounds: a request head of
//! 16 KiB, a frame of 64 KiB, 64 MiB queued for one member, pongs included (past it the
//! member is cut); fragmented messages and reserved opcodes close the connection. It has
//! no timeouts (a connection that never completes its upgrade keeps its descriptor) and
//! no read budget (a sender that writes faster than the loop reads keeps the loop on
//! its socket, its messages gathering until it pauses): a loopback reference for the
//! load generator, not a server to expose.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};

use base64::Engine;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use sha1::{Digest, Sha1};

const LISTENER: Token = Token(usize::MAX);
const MAX_HEAD: usize = 16 * 1024;
/// The largest frame payload taken; a longer one closes the connection, so a frame
/// waiting to be complete holds at most this much.
const MAX_FRAME: usize = 64 * 1024;
const MAX_QUEUED: usize = 64 * 1024 * 1024;

/// One connection: its socket, what was read and not yet parsed, what the kernel has not
/// taken yet, and its room once upgraded.
struct Conn {
    socket: TcpStream,
    read: Vec<u8>,
    queued: Vec<u8>,
    room: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(9005);
    let mut listener = TcpListener::bind(([127, 0, 0, 1], port).into())?;
    println!("floor peer listening on 127.0.0.1:{port}");
    let mut poll = Poll::new()?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut server = Server::default();
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(error) = poll.poll(&mut events, None) {
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.into());
        }
        for event in &events {
            if event.token() == LISTENER {
                server.accept(&listener, &poll)?;
            } else {
                server.ready(
                    event.token().0,
                    event.is_readable() || event.is_read_closed(),
                    event.is_writable(),
                );
            }
        }
        server.deliver();
        server.close_ended(&poll);
    }
}

#[derive(Default)]
struct Server {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Room name -> its members' slots.
    rooms: HashMap<String, Vec<usize>>,
    /// This loop iteration's messages, by room: (sender's slot, server frame).
    inbox: HashMap<String, Vec<(usize, Vec<u8>)>>,
    ended: Vec<usize>,
    scratch: Vec<u8>,
}

impl Server {
    fn accept(&mut self, listener: &TcpListener, poll: &Poll) -> io::Result<()> {
        loop {
            let (mut socket, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // A connection that failed before it was accepted, or no descriptor left.
                Err(_) => return Ok(()),
            };
            socket.set_nodelay(true)?;
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            poll.registry().register(&mut socket, Token(slot), Interest::READABLE | Interest::WRITABLE)?;
            self.conns[slot] = Some(Conn { socket, read: Vec::new(), queued: Vec::new(), room: None });
        }
    }

    fn ready(&mut self, slot: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else { return };
        if writable && !conn.queued.is_empty() && flush(conn).is_err() {
            self.ended.push(slot);
            return;
        }
        if !readable {
            return;
        }
        self.scratch.resize(64 * 1024, 0);
        loop {
            match conn.socket.read(&mut self.scratch) {
                Ok(0) => break self.ended.push(slot),
                Ok(n) => conn.read.extend_from_slice(&self.scratch[..n]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break self.ended.push(slot),
            }
            if conn.room.is_none() {
                match upgrade(conn) {
                    Ok(Some(room)) => {
                        self.rooms.entry(room.clone()).or_default().push(slot);
                        conn.room = Some(room);
                    }
                    Ok(None) => continue,
                    Err(()) => break self.ended.push(slot),
                }
            }
            let room = conn.room.clone().unwrap_or_default();
            let mut at = 0;
            let mut bad = false;
            while let Some((frame, used)) = parse(&conn.read[at..]) {
                at += used;
                match frame {
                    Frame::Message(out) => self.inbox.entry(room.clone()).or_default().push((slot, out)),
                    Frame::Ping(payload) => {
                        send_or_queue(conn, &[IoSlice::new(&server_frame(0xA, &payload))])
                    }
                    Frame::Ignored => {}
                    Frame::Close | Frame::Bad => {
                        send_or_queue(conn, &[IoSlice::new(&server_frame(0x8, &[]))]);
                        bad = true;
                        break;
                    }
                }
            }
            conn.read.drain(..at);
            // Pongs owed to a client that pings and never reads count against its queue.
            if bad || conn.queued.len() > MAX_QUEUED {
                break self.ended.push(slot);
            }
        }
    }

    /// Every member of each room that had messages gets all of them but its own, in one
    /// write.
    fn deliver(&mut self) {
        for (room, messages) in self.inbox.drain() {
            let Some(members) = self.rooms.get(&room) else { continue };
            for &member in members {
                let Some(conn) = self.conns[member].as_mut() else { continue };
                let frames: Vec<IoSlice<'_>> = messages
                    .iter()
                    .filter(|(from, _)| *from != member)
                    .map(|(_, f)| IoSlice::new(f))
                    .collect();
                if !frames.is_empty() {
                    send_or_queue(conn, &frames);
                    if conn.queued.len() > MAX_QUEUED {
                        self.ended.push(member);
                    }
                }
            }
        }
    }

    fn close_ended(&mut self, poll: &Poll) {
        for slot in std::mem::take(&mut self.ended) {
            let Some(mut conn) = self.conns[slot].take() else { continue };
            let _ = poll.registry().deregister(&mut conn.socket);
            if let Some(room) = conn.room
                && let Some(members) = self.rooms.get_mut(&room)
            {
                members.retain(|&m| m != slot);
                if members.is_empty() {
                    self.rooms.remove(&room);
                }
            }
            self.free.push(slot);
        }
    }
}

/// Answer a complete upgrade request: `Ok(Some(room))` once answered, `Ok(None)` while
/// the head is incomplete, `Err` for a head that is too long or has no key.
fn upgrade(conn: &mut Conn) -> Result<Option<String>, ()> {
    let Some(end) = conn.read.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if conn.read.len() > MAX_HEAD { Err(()) } else { Ok(None) };
    };
    let head = std::str::from_utf8(&conn.read[..end]).map_err(|_| ())?;
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|line| line.split(' ').nth(1)).ok_or(())?;
    let room = path.strip_prefix("/ws/").unwrap_or(path).to_owned();
    let key = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, value)| value.trim())
        .ok_or(())?;
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    conn.read.drain(..end + 4);
    send_or_queue(conn, &[IoSlice::new(answer.as_bytes())]);
    Ok(Some(room))
}

enum Frame {
    /// A text or binary message, as the server frame that carries it on.
    Message(Vec<u8>),
    Ping(Vec<u8>),
    Close,
    /// Pongs.
    Ignored,
    /// A fragment, a reserved opcode, an unmasked or oversized frame.
    Bad,
}

/// One complete client frame at the start of `bytes` and its length, or `None` if it
/// has not all arrived.
fn parse(bytes: &[u8]) -> Option<(Frame, usize)> {
    let (&first, rest) = bytes.split_first()?;
    let (&second, rest) = rest.split_first()?;
    let (len, rest) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)), &rest[2..]),
        127 => (usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?, &rest[8..]),
        len => (usize::from(len), rest),
    };
    if second & 0x80 == 0 || first & 0x80 == 0 || first & 0x70 != 0 || len > MAX_FRAME {
        return Some((Frame::Bad, bytes.len()));
    }
    let mask = rest.get(..4)?;
    let payload = rest.get(4..4 + len)?;
    let unmasked: Vec<u8> = payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    let used = bytes.len() - rest.len() + 4 + len;
    let frame = match first & 0x0f {
        op @ (0x1 | 0x2) => Frame::Message(server_frame(op, &unmasked)),
        0x8 => Frame::Close,
        0x9 => Frame::Ping(unmasked),
        0xA => Frame::Ignored,
        _ => Frame::Bad,
    };
    Some((frame, used))
}

/// An unmasked, final server frame.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(len as u8),
        len @ 126..=0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// Write `frames` at once if nothing waits for the member, and queue what the kernel
/// did not take.
fn send_or_queue(conn: &mut Conn, frames: &[IoSlice<'_>]) {
    let written = if conn.queued.is_empty() {
        let result =
            if let [frame] = frames { conn.socket.write(frame) } else { conn.socket.write_vectored(frames) };
        result.unwrap_or(0)
    } else {
        0
    };
    let mut skip = written;
    for frame in frames {
        if skip >= frame.len() {
            skip -= frame.len();
        } else {
            conn.queued.extend_from_slice(&frame[skip..]);
            skip = 0;
        }
    }
}

/// Hand the kernel what waits for a member, as far as it takes it.
fn flush(conn: &mut Conn) -> io::Result<()> {
    while !conn.queued.is_empty() {
        match conn.socket.write(&conn.queued) {
            Ok(n) => drop(conn.queued.drain(..n)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: final, masked with `mask`.
    fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[test]
    fn a_masked_message_becomes_the_server_frame_that_carries_it() {
        let payload = vec![b'x'; 300];
        let mut bytes = client_frame(0x1, &payload, [1, 2, 3, 4]);
        let whole = bytes.len();
        bytes.extend_from_slice(&client_frame(0x2, b"next", [9, 9, 9, 9]));
        let Some((Frame::Message(out), used)) = parse(&bytes) else { panic!("no message") };
        assert_eq!(used, whole);
        assert_eq!(out, server_frame(0x1, &payload));
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        let Some((Frame::Message(next), _)) = parse(&bytes[used..]) else { panic!("no second message") };
        assert_eq!(next, [0x82, 4, b'n', b'e', b'x', b't']);
    }

    #[test]
    fn an_incomplete_frame_waits_for_the_rest() {
        let bytes = client_frame(0x1, b"hello", [7, 7, 7, 7]);
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_none(), "parsed from {cut} of {} bytes", bytes.len());
        }
        let Some((Frame::Ping(payload), _)) = parse(&client_frame(0x9, b"hb", [1, 1, 1, 1])) else {
            panic!("no ping")
        };
        assert_eq!(payload, b"hb");
    }

    #[test]
    fn fragments_unmasked_and_oversized_frames_are_refused() {
        let mut fragment = client_frame(0x1, b"part", [1, 2, 3, 4]);
        fragment[0] &= 0x7f;
        let mut unmasked = client_frame(0x1, b"data", [0, 0, 0, 0]);
        unmasked[1] &= 0x7f;
        let mut oversized = vec![0x82, 0x80 | 127];
        oversized.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        let reserved = client_frame(0x3, b"", [1, 2, 3, 4]);
        for bytes in [fragment, unmasked, oversized, reserved] {
            assert!(matches!(parse(&bytes), Some((Frame::Bad, _))), "{bytes:?} was taken");
        }
    }
}
