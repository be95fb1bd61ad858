//! The load generator's WebSocket client: loopback-only targets, source addresses
//! spread over 127.0.0.x, the opening handshake, and frame encoding and decoding.
//!
//! This is deliberately not a general client: it writes masked frames of one opcode,
//! parses the unmasked frames a server sends, and never allocates per frame. It can
//! offer per-message compression (RFC 7692) and inflate what a server compressed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// Continuation frame opcode.
pub const CONTINUATION: u8 = 0x0;
/// Text frame opcode.
pub const TEXT: u8 = 0x1;
/// Binary frame opcode.
pub const BINARY: u8 = 0x2;
/// Close frame opcode.
pub const CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub const PING: u8 = 0x9;
/// Pong frame opcode.
pub const PONG: u8 = 0xA;

/// Where the load goes: a loopback address, the request path (`/ws/ROOM`, or `/ws` for
/// the room protocol), whether the handshake offers the room protocol, and whether it
/// offers per-message compression.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    /// Offer `Sec-WebSocket-Protocol: roomcast.v1` (Roomcast's room protocol).
    pub room_protocol: bool,
    /// Offer [`DEFLATE_OFFER`] in `Sec-WebSocket-Extensions`.
    pub deflate: bool,
}

impl Target {
    /// Parse `ws://IP:PORT/PATH`, refusing anything that is not a loopback address.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
        let (authority, path) =
            rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
        let addr: SocketAddr =
            authority.parse().with_context(|| format!("`{authority}`: the URL needs an IP:port"))?;
        Self::new(addr, path)
    }

    /// A target on a loopback address; any other address is refused.
    pub fn new(addr: SocketAddr, path: String) -> anyhow::Result<Self> {
        if !addr.ip().is_loopback() {
            bail!("refusing to load a non-loopback address: {addr}");
        }
        Ok(Self { addr, path, room_protocol: false, deflate: false })
    }

    /// The same target, offering the room protocol in the handshake.
    pub fn with_room_protocol(self) -> Self {
        Self { room_protocol: true, ..self }
    }

    /// The same target, offering per-message compression in the handshake.
    pub fn with_deflate(self) -> Self {
        Self { deflate: true, ..self }
    }
}

/// The compression offer: each message compressed on its own both ways, the shape that
/// lets a server compress a broadcast once for everyone (uWebSockets' shared
/// compressor and Node `ws` with `serverNoContextTakeover` accept it too).
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_no_context_takeover; server_no_context_takeover";

/// What a server answered to [`DEFLATE_OFFER`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deflate {
    /// The `permessage-deflate` element of its `Sec-WebSocket-Extensions`, as sent.
    pub response: String,
    /// Every message starts from an empty window: no inflate state between messages.
    pub server_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
}

impl Deflate {
    /// Read the `permessage-deflate` answer from a `Sec-WebSocket-Extensions` value;
    /// `None` if the server accepted no compression. A parameter this client did not
    /// offer (or one RFC 7692 does not define) is an error.
    pub fn from_response(value: &str) -> anyhow::Result<Option<Self>> {
        for element in value.split(',') {
            let mut params = element.split(';').map(str::trim);
            if !params.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
                continue;
            }
            let mut deflate = Deflate { response: element.trim().to_owned(), ..Deflate::default() };
            for param in params.filter(|p| !p.is_empty()) {
                let (name, value) = match param.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                    None => (param, None),
                };
                match (name.to_ascii_lowercase().as_str(), value) {
                    ("server_no_context_takeover", None) => deflate.server_no_context_takeover = true,
                    // Offered: this client never keeps a compression context anyway.
                    ("client_no_context_takeover", None) => {}
                    ("server_max_window_bits", Some(bits)) => {
                        let bits: u8 =
                            bits.parse().ok().filter(|b| (8..=15).contains(b)).with_context(|| {
                                format!("server_max_window_bits={bits} in `{}`", deflate.response)
                            })?;
                        deflate.server_max_window_bits = Some(bits);
                    }
                    // Allowed in an answer only if offered; this client sends raw
                    // deflate with a 15-bit window whatever it says, which any window fits.
                    ("client_max_window_bits", Some(_)) => {}
                    _ => bail!("unexpected parameter `{param}` in `{}`", deflate.response),
                }
            }
            return Ok(Some(deflate));
        }
        Ok(None)
    }
}

/// The subprotocol of Roomcast's room protocol.
pub const ROOM_PROTOCOL: &str = "roomcast.v1";

/// Round-robin over 127.0.0.2 ..= 127.0.0.254 so that tens of thousands of
/// connections, and the TIME_WAIT sockets that closed ones leave behind, never exhaust
/// one source address's ephemeral ports (about 28,000 each).
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

fn next_source() -> Ipv4Addr {
    let n = NEXT_SOURCE.fetch_add(1, Relaxed);
    Ipv4Addr::new(127, 0, 0, 2 + (n % 253) as u8)
}

/// Start the source-address rotation at `offset` (worker processes use their index so
/// that they do not all begin on the same address).
pub fn offset_sources(offset: u32) {
    NEXT_SOURCE.store(offset, Relaxed);
}

/// An open WebSocket connection and the bytes that followed the handshake response.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    /// Frames the server sent right behind its `101` response.
    pub pending: Vec<u8>,
    /// Per-message compression, when offered and accepted.
    pub deflate: Option<Deflate>,
}

/// Connect and upgrade, from the next source address, within `timeout`.
pub async fn connect(target: &Target, timeout: Duration) -> anyhow::Result<Conn> {
    tokio::time::timeout(timeout, connect_inner(target)).await.context("connect and handshake timed out")?
}

/// Open `n` connections, at most `concurrency` handshakes at a time, in order.
pub async fn connect_many(
    target: &Target,
    n: usize,
    concurrency: usize,
    timeout: Duration,
) -> Vec<anyhow::Result<Conn>> {
    use futures_util::StreamExt as _;
    futures_util::stream::iter(0..n)
        .map(|_| connect(target, timeout))
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// Open `n` connections; any failure fails the lot.
pub async fn connect_all(target: &Target, n: usize) -> anyhow::Result<Vec<Conn>> {
    connect_many(target, n, 64, Duration::from_secs(10))
        .await
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("connection {i} to {}", target.addr)))
        .collect()
}

async fn connect_inner(target: &Target) -> anyhow::Result<Conn> {
    let stream = open(target).await?;
    upgrade(stream, target).await
}

/// Open a TCP connection to the target from the next source address (no delay on).
pub async fn open(target: &Target) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(next_source()), 0))?;
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The opening handshake on an open stream: a fresh `Sec-WebSocket-Key`, and a `101`
/// whose `Sec-WebSocket-Accept` answers it.
pub async fn upgrade(mut stream: TcpStream, target: &Target) -> anyhow::Result<Conn> {
    let mut extra = String::new();
    if target.room_protocol {
        extra.push_str(&format!("Sec-WebSocket-Protocol: {ROOM_PROTOCOL}\r\n"));
    }
    if target.deflate {
        extra.push_str(&format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n"));
    }
    let key = new_key();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        target.path, target.addr
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    loop {
        if stream.read_buf(&mut head).await? == 0 {
            bail!("closed during the handshake");
        }
        if let Some(end) = find(&head, b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 101") {
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                bail!("upgrade refused: {}", String::from_utf8_lossy(line));
            }
            let accept = header(&head[..end], "sec-websocket-accept");
            if accept.as_deref() != Some(accept_for(&key).as_str()) {
                bail!("Sec-WebSocket-Accept {accept:?} does not answer the key {key}");
            }
            if target.room_protocol && find(&head[..end], ROOM_PROTOCOL.as_bytes()).is_none() {
                bail!("the server did not answer with the {ROOM_PROTOCOL} subprotocol");
            }
            let extensions = header(&head[..end], "sec-websocket-extensions");
            let deflate = match extensions {
                Some(value) => Deflate::from_response(&value)?,
                None => None,
            };
            if deflate.is_some() && !target.deflate {
                bail!("the server answered permessage-deflate, which was not offered");
            }
            let pending = head.split_off(end + 4);
            return Ok(Conn { stream, pending, deflate });
        }
        if head.len() > 16 * 1024 {
            bail!("handshake response too long");
        }
        head.reserve(512);
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 bytes that differ from one handshake to the next
/// (a counter through a mixing function, seeded by the clock), base64.
fn new_key() -> String {
    use base64::Engine as _;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let n = COUNTER.fetch_add(1, Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&splitmix(seed ^ n).to_le_bytes());
    bytes[8..].copy_from_slice(&splitmix(seed.rotate_left(32) ^ !n).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with (RFC 6455, 4.2.2).
pub fn accept_for(key: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut sha = sha1::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The values of every `name:` line of a response head, joined with `, ` (the name in
/// lower case).
fn header(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let values: Vec<&str> = text
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The masking key of every frame this client sends (the RFC asks for a key; the
/// servers under test do not care which).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Append one masked, final frame to `out`.
pub fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
}

/// One frame at the front of a buffer: its opcode, flags and where its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAt {
    pub opcode: u8,
    /// The final frame of its message.
    pub fin: bool,
    /// RSV1: with per-message compression, a compressed message.
    pub compressed: bool,
    pub payload_start: usize,
    pub end: usize,
}

/// Parse the server frame that starts at `buf[0]`, if it is complete.
pub fn parse(buf: &[u8]) -> Option<FrameAt> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    let (fin, compressed) = (buf[0] & 0x80 != 0, buf[0] & 0x40 != 0);
    let masked = buf[1] & 0x80 != 0;
    let (len, mut header): (usize, usize) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let bytes: [u8; 8] = buf[2..10].try_into().ok()?;
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        header += 4;
    }
    let end = header.checked_add(len)?;
    (buf.len() >= end).then_some(FrameAt { opcode, fin, compressed, payload_start: header, end })
}

/// Fill `out` with a text payload of exactly `size` bytes (at least [`STAMP_LEN`])
/// carrying who sent it, its sequence number and when it was sent.
pub fn stamp(sender: u32, seq: u32, sent_ns: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    push_hex(out, sender as u64, 8);
    push_hex(out, seq as u64, 8);
    push_hex(out, sent_ns, 16);
    out.resize(size.max(STAMP_LEN), b'.');
}

/// Bytes of a message taken by the stamp; the rest is padding.
pub const STAMP_LEN: usize = 32;

fn push_hex(out: &mut Vec<u8>, value: u64, digits: u32) {
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[((value >> (i * 4)) & 0xF) as usize]);
    }
}

/// Read back what [`stamp`] wrote: `(sender, seq, sent_ns)`.
pub fn read_stamp(payload: &[u8]) -> Option<(u32, u32, u64)> {
    if payload.len() < STAMP_LEN {
        return None;
    }
    let sender = hex(&payload[0..8])?;
    let seq = hex(&payload[8..16])?;
    let sent = hex(&payload[16..32])?;
    Some((sender as u32, seq as u32, sent))
}

fn hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | v as u64)
    })
}

/// Inflates compressed messages (RFC 7692): the payload, then `00 00 ff ff`, through
/// raw inflate. Without context takeover every message starts afresh, so one inflater
/// can serve every connection; with it, each connection needs its own.
pub struct Inflater {
    inner: flate2::Decompress,
    /// Reset before each message (`server_no_context_takeover`).
    reset: bool,
    input: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("reset", &self.reset).finish_non_exhaustive()
    }
}

/// The most an inflated message may grow to before it is taken for garbage.
const MAX_INFLATED: usize = 16 << 20;

impl Inflater {
    pub fn new(no_context_takeover: bool) -> Self {
        Self {
            inner: flate2::Decompress::new(false),
            reset: no_context_takeover,
            input: Vec::with_capacity(4096),
            out: Vec::with_capacity(8192),
        }
    }

    /// Inflate one compressed message's payload (all its frames' payloads, in order).
    pub fn inflate(&mut self, payload: &[u8]) -> anyhow::Result<&[u8]> {
        use flate2::{FlushDecompress, Status};
        if self.reset {
            self.inner.reset(false);
        }
        self.input.clear();
        self.input.extend_from_slice(payload);
        self.input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        self.out.clear();
        let mut consumed = 0;
        loop {
            if self.out.capacity() - self.out.len() < 1024 {
                self.out.reserve(self.out.capacity().max(8192));
            }
            let before = self.inner.total_in();
            let status = self
                .inner
                .decompress_vec(&self.input[consumed..], &mut self.out, FlushDecompress::Sync)
                .context("inflating a compressed message")?;
            consumed += (self.inner.total_in() - before) as usize;
            let room_left = self.out.len() < self.out.capacity();
            if matches!(status, Status::StreamEnd) || (consumed == self.input.len() && room_left) {
                break;
            }
            if self.out.len() > MAX_INFLATED {
                bail!("a compressed message inflated past {MAX_INFLATED} bytes");
            }
            if matches!(status, Status::BufError) && room_left {
                bail!("a compressed message ended early");
            }
        }
        Ok(&self.out)
    }
}

/// An [`Inflater`] for servers that keep no context between messages, which remembers
/// what it inflated lately: a broadcast arrives as the same compressed bytes at every
/// member, and inflating it again would give the same text, so a frame byte-for-byte
/// equal to a recent one takes that one's text (each delivery's stamp is still read
/// from it). A frame that differs in any byte is inflated. This keeps the load
/// generator's cost per delivery near that of an uncompressed one.
#[derive(Debug)]
pub struct MemoInflater {
    inflater: Inflater,
    /// A cheap hash of the compressed bytes → (those bytes, their inflated text).
    recent: std::collections::HashMap<u64, (Vec<u8>, Vec<u8>)>,
    /// Messages inflated, and deliveries that reused a recent inflation.
    pub inflated: u64,
    pub reused: u64,
}

/// Entries kept before the memory is emptied (far more than messages in flight).
const MEMO_ENTRIES: usize = 4096;

impl Default for MemoInflater {
    fn default() -> Self {
        Self { inflater: Inflater::new(true), recent: Default::default(), inflated: 0, reused: 0 }
    }
}

impl MemoInflater {
    pub fn inflate(&mut self, payload: &[u8]) -> anyhow::Result<&[u8]> {
        let key = sample_hash(payload);
        let known = self.recent.get(&key).is_some_and(|(compressed, _)| compressed[..] == *payload);
        if !known {
            let text = self.inflater.inflate(payload)?.to_vec();
            self.inflated += 1;
            if self.recent.len() >= MEMO_ENTRIES {
                self.recent.clear();
            }
            self.recent.insert(key, (payload.to_vec(), text));
        } else {
            self.reused += 1;
        }
        Ok(&self.recent[&key].1)
    }
}

/// A hash of a payload's length and of 16 of its 8-byte words, spread over it: cheap,
/// and a match is confirmed by comparing every byte.
fn sample_hash(payload: &[u8]) -> u64 {
    let mut h = payload.len() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    if payload.len() >= 8 {
        let last = payload.len() - 8;
        for i in 0..16 {
            let at = last * i / 15;
            let word = u64::from_le_bytes(payload[at..at + 8].try_into().unwrap_or_default());
            h = (h ^ word).wrapping_mul(0x100_0000_01B3).rotate_left(29);
        }
    } else {
        for &b in payload {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
    }
    h
}

/// Compress one message for a server (RSV1 set on its frame): raw deflate, a sync
/// flush, the trailing `00 00 ff ff` taken off; no context kept between messages.
pub fn deflate_message(
    compress: &mut flate2::Compress,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    use flate2::FlushCompress;
    compress.reset();
    out.clear();
    out.reserve(payload.len() + 64);
    let mut consumed = 0;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        let before = compress.total_in();
        compress
            .compress_vec(&payload[consumed..], out, FlushCompress::Sync)
            .context("deflating a message")?;
        consumed += (compress.total_in() - before) as usize;
        if consumed == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    if !out.ends_with(&[0, 0, 0xff, 0xff]) {
        bail!("a sync flush that did not end in 00 00 ff ff");
    }
    out.truncate(out.len() - 4);
    Ok(())
}

/// Append one masked, final, compressed (RSV1) frame to `out`.
pub fn encode_compressed(opcode: u8, compressed: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    encode(opcode, compressed, out);
    out[start] |= 0x40;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_loopback_targets() {
        assert!(Target::parse("ws://127.0.0.1:8080/ws/a").is_ok());
        assert!(Target::parse("ws://[::1]:8080/ws/a").is_ok());
        assert!(Target::parse("ws://10.0.0.1:8080/ws/a").is_err());
        assert!(Target::parse("ws://example.com:80/ws/a").is_err());
        assert!(Target::parse("wss://127.0.0.1:8080/ws/a").is_err());
    }

    #[test]
    fn stamps_round_trip() {
        let mut out = Vec::new();
        stamp(7, 1234, 987_654_321_000, 64, &mut out);
        assert_eq!(out.len(), 64);
        assert!(std::str::from_utf8(&out).is_ok());
        assert_eq!(read_stamp(&out), Some((7, 1234, 987_654_321_000)));
    }

    #[test]
    fn parses_frames_of_every_length_form() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let mut frame = vec![0x81];
            if len < 126 {
                frame.push(len as u8);
            } else if len <= 65535 {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
            frame.extend_from_slice(&payload);
            let at = parse(&frame).expect("complete");
            assert_eq!((at.opcode, at.end - at.payload_start), (TEXT, len));
            assert_eq!(at.end, frame.len());
            assert_eq!(parse(&frame[..frame.len() - 1]), None);
        }
    }

    #[test]
    fn reads_the_deflate_answer() {
        assert_eq!(Deflate::from_response("x-webkit-deflate-frame").unwrap(), None);
        let d = Deflate::from_response(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        )
        .unwrap()
        .unwrap();
        assert!(d.server_no_context_takeover);
        assert_eq!(d.server_max_window_bits, None);
        let d =
            Deflate::from_response("foo, permessage-deflate;server_max_window_bits=\"10\"").unwrap().unwrap();
        assert!(!d.server_no_context_takeover);
        assert_eq!(d.server_max_window_bits, Some(10));
        assert!(Deflate::from_response("permessage-deflate; server_max_window_bits=7").is_err());
        assert!(Deflate::from_response("permessage-deflate; mystery").is_err());
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     sec-websocket-extensions: permessage-deflate\r\nX: y";
        assert_eq!(header(head, "Sec-WebSocket-Extensions").as_deref(), Some("permessage-deflate"));
        assert_eq!(header(head, "sec-websocket-protocol"), None);
    }

    #[test]
    fn inflates_what_it_deflates_with_and_without_context() {
        let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
        let mut stateless = Inflater::new(true);
        let mut framed = Vec::new();
        for n in [1usize, 100, 5000, 100_000] {
            let text: Vec<u8> = (0..n).map(|i| b"the quick brown fox "[i % 20] ^ (i / 7 % 3) as u8).collect();
            deflate_message(&mut compress, &text, &mut framed).unwrap();
            assert!(!framed.ends_with(&[0, 0, 0xff, 0xff]));
            assert_eq!(stateless.inflate(&framed).unwrap(), &text[..]);
            // The same frame again: nothing of the last message is needed.
            assert_eq!(stateless.inflate(&framed).unwrap(), &text[..]);
        }
        // A server keeping its context: the second message refers to the first.
        let mut server = flate2::Compress::new(flate2::Compression::default(), false);
        let mut takeover = Inflater::new(false);
        let message = b"{\"user\":\"maria\",\"text\":\"hello hello hello\"}".repeat(3);
        for _ in 0..3 {
            let mut out = Vec::with_capacity(1024);
            let before = server.total_out();
            server.compress_vec(&message, &mut out, flate2::FlushCompress::Sync).unwrap();
            assert_eq!(server.total_out() - before, out.len() as u64);
            out.truncate(out.len() - 4);
            assert_eq!(takeover.inflate(&out).unwrap(), &message[..]);
        }
        assert!(Inflater::new(true).inflate(b"\xff\xff\xff").is_err());

        // Remembered: the same bytes inflate once; different bytes of the same hash
        // sample are inflated on their own.
        let mut memo = MemoInflater::default();
        let (a, b) = (b"abcdefgh-one-abcdefgh".repeat(20), b"abcdefgh-two-abcdefgh".repeat(20));
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        deflate_message(&mut compress, &a, &mut fa).unwrap();
        deflate_message(&mut compress, &b, &mut fb).unwrap();
        for _ in 0..3 {
            assert_eq!(memo.inflate(&fa).unwrap(), &a[..]);
            assert_eq!(memo.inflate(&fb).unwrap(), &b[..]);
        }
        assert_eq!((memo.inflated, memo.reused), (2, 4));
        let mut twisted = fa.clone();
        twisted[fa.len() / 2 + 1] ^= 0x01;
        if sample_hash(&twisted) == sample_hash(&fa) {
            assert_ne!(memo.inflate(&twisted).ok(), Some(&a[..]));
        }
        assert!(memo.inflate(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn answers_keys_as_rfc_6455_does() {
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
    }

    #[test]
    fn encodes_masked_frames() {
        let mut out = Vec::new();
        encode(TEXT, b"hi", &mut out);
        assert_eq!(out[..2], [0x81, 0x82]);
        assert_eq!(out[6] ^ MASK[0], b'h');
        assert_eq!(out[7] ^ MASK[1], b'i');
        let at = parse(&[0xC1, 0x01, 0x00]).unwrap();
        assert!(at.fin && at.compressed);
        let at = parse(&[0x01, 0x01, 0x00]).unwrap();
        assert!(!at.fin && !at.compressed);
        let mut compressed = Vec::new();
        encode_compressed(TEXT, b"x", &mut compressed);
        assert_eq!(compressed[0], 0xC1);
    }
}
