//! The first request head on a plain TCP connection, read by the server itself.
//!
//! Nearly every connection to a WebSocket server makes one request, its upgrade, and
//! nothing else over HTTP. So on plain TCP the server reads the first head and parses it
//! with `httparse` (the parser hyper uses); a `GET /ws…` upgrade of HTTP/1.1 with no
//! body is then checked and answered by [`crate::http::upgrade`] directly, and the
//! socket goes to its session without hyper's connection task, dispatcher and upgrade
//! hand-over in between. Everything else (another path, a request with a body, a head
//! that is malformed, has more than [`MAX_HEADERS`] headers or outgrows
//! [`MAX_HEAD_BYTES`], an upgrade that fails a check) goes to hyper with the bytes read
//! so far in front of the socket ([`Prefixed`]): every other endpoint and every
//! rejection of a check is served by the one HTTP implementation, as before.
//!
//! The head is read within the handshake timeout of accept, like hyper's, into a
//! buffer of 1 KiB, or of [`MAX_HEAD_BYTES`] and a byte once a head is longer: what
//! hyper gets in front of the socket is at most that.
//!
//! [`Prefixed`]: crate::ws::transport::Prefixed

use std::io;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::PathAndQuery;
use bytes::BytesMut;
use tokio::net::TcpStream;

use super::MAX_HEAD_BYTES;
use crate::ws::transport::try_read_emptying;

/// The most headers the server parses itself; a request with more goes to hyper
/// (which takes up to 100).
pub const MAX_HEADERS: usize = 48;
/// The first read's room; a longer head moves to a buffer of [`MAX_HEAD_BYTES`] and a byte.
const FIRST_READ: usize = 1024;

/// A complete upgrade request head: a `GET` of HTTP/1.1.
#[derive(Debug)]
pub struct Head {
    pub target: PathAndQuery,
    pub headers: HeaderMap,
    /// Its length in bytes, the blank line included: what follows is the client's.
    pub len: usize,
}

impl Head {
    pub fn path(&self) -> &str {
        self.target.path()
    }

    pub fn query(&self) -> &str {
        self.target.query().unwrap_or("")
    }
}

/// What the first bytes of a connection turned out to be.
#[derive(Debug)]
pub enum First {
    /// A WebSocket upgrade the server answers itself (after its checks).
    Upgrade(Head),
    /// Anything else: for hyper, with the bytes read so far.
    Other,
    /// The client closed before a whole head arrived.
    Closed,
}

/// Read the first request head of `stream` into `buf`. Cancel-safe: bytes read stay in
/// `buf`. The head is parsed once a read may have ended it (a blank line in what it
/// brought) or it is past its bound, so a head that trickles in costs one parse, not
/// one per read.
pub async fn read(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<First> {
    loop {
        let before = buf.len();
        stream.readable().await?;
        if buf.len() == buf.capacity() {
            // Room for a usual head first; past it, one allocation for the longest
            // head and a byte (to tell that it is longer), never more.
            let room = if buf.capacity() == 0 { FIRST_READ } else { MAX_HEAD_BYTES + 1 };
            let mut grown = BytesMut::with_capacity(room);
            grown.extend_from_slice(buf);
            *buf = grown;
        }
        // A short read clears readiness, so the session's first read waits for bytes
        // instead of costing a `recvfrom` that finds none.
        let read = try_read_emptying(stream, buf);
        match read {
            Ok(0) => return Ok(First::Closed),
            Ok(_) if !ends_head(&buf[before.saturating_sub(2)..]) && buf.len() <= MAX_HEAD_BYTES => {}
            Ok(_) => match parse(buf) {
                Parsed::Partial => {}
                Parsed::Upgrade(head) => return Ok(First::Upgrade(head)),
                Parsed::Other => return Ok(First::Other),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether `bytes` hold the blank line that ends a head (`\n\n` or `\n\r\n`: httparse,
/// like hyper, also takes lines that end in a bare `\n`).
fn ends_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

enum Parsed {
    Partial,
    Upgrade(Head),
    Other,
}

/// Parse `bytes` as the start of an HTTP/1.1 request: a whole upgrade head the server
/// takes itself, or not yet whole, or for hyper.
fn parse(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Partial) if bytes.len() <= MAX_HEAD_BYTES => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return Parsed::Other;
    }
    let Some(Ok(target)) = request.path.map(PathAndQuery::try_from) else { return Parsed::Other };
    let path = target.path();
    if path != "/ws" && !path.starts_with("/ws/") {
        return Parsed::Other;
    }
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(field.name.as_bytes()), HeaderValue::from_bytes(field.value))
        else {
            return Parsed::Other;
        };
        map.append(name, value);
    }
    // A body, or a head hyper refuses outright (431, 414, two `Host`s): hyper's.
    if map.contains_key(header::CONTENT_LENGTH)
        || map.contains_key(header::TRANSFER_ENCODING)
        || super::refused(target.as_str().len(), &map).is_some()
    {
        return Parsed::Other;
    }
    Parsed::Upgrade(Head { target, headers: map, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws/chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn upgrade(bytes: &[u8]) -> Option<Head> {
        match parse(bytes) {
            Parsed::Upgrade(head) => Some(head),
            _ => None,
        }
    }

    #[test]
    fn an_upgrade_head_is_taken_with_what_follows_left_over() {
        let mut bytes = UPGRADE.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x80frame");
        let head = upgrade(&bytes).expect("an upgrade");
        assert_eq!(head.len, UPGRADE.len());
        assert_eq!((head.path(), head.query()), ("/ws/chat", "x=1"));
        assert_eq!(head.headers.get("sec-websocket-version").unwrap(), "13");
        assert_eq!(head.headers.len(), 5);
    }

    /// The read that took the head emptied the socket: the session's first read then
    /// waits for bytes instead of trying (a `recvfrom` that finds nothing).
    #[tokio::test]
    async fn after_the_head_the_socket_waits_for_bytes() {
        use std::task::Poll;
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        client.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut buf = BytesMut::new();
        assert!(matches!(read(&stream, &mut buf).await.unwrap(), First::Upgrade(_)));
        let readable = stream.readable();
        tokio::pin!(readable);
        let polled = std::future::poll_fn(|cx| Poll::Ready(readable.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the socket is empty: a read waits ({polled:?})");
        client.write_all(b"\x88\x80abcd").await.unwrap();
        readable.await.unwrap();
    }

    /// The head is parsed when its blank line arrives, also when that line is split
    /// between two reads or its lines end in a bare `\n`.
    #[tokio::test]
    async fn a_head_is_read_whichever_way_its_end_arrives() {
        use tokio::io::AsyncWriteExt as _;
        let bare = UPGRADE.replace("\r\n", "\n");
        for (head, cut) in [(UPGRADE.to_owned(), UPGRADE.len() - 1), (bare.clone(), bare.len() - 1)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            client.write_all(&head.as_bytes()[..cut]).await.unwrap();
            let mut buf = BytesMut::new();
            let reading = read(&stream, &mut buf);
            tokio::pin!(reading);
            let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut reading).await;
            assert!(early.is_err(), "a head without its last byte is not whole: {early:?}");
            client.write_all(&head.as_bytes()[cut..]).await.unwrap();
            let whole = tokio::time::timeout(std::time::Duration::from_secs(5), reading).await;
            match whole.expect("the last byte ends the head").unwrap() {
                First::Upgrade(read) => assert_eq!(read.len, head.len()),
                other => panic!("{other:?} for {head:?}"),
            }
        }
    }

    #[test]
    fn a_head_cut_anywhere_waits_for_more() {
        for cut in 0..UPGRADE.len() {
            assert!(matches!(parse(&UPGRADE.as_bytes()[..cut]), Parsed::Partial), "cut at {cut}");
        }
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        let other = |head: String| matches!(parse(head.as_bytes()), Parsed::Other);
        let with = |from: &str, to: &str| UPGRADE.replacen(from, to, 1);
        assert!(other(with("/ws/chat", "/healthz")), "another path");
        assert!(other(with("/ws/chat", "/wsx")), "a path that only starts like /ws");
        assert!(other(with("GET", "POST")), "another method");
        assert!(other(with("HTTP/1.1", "HTTP/1.0")), "HTTP/1.0");
        assert!(other(with("Host: a\r\n", "Host: a\r\nContent-Length: 3\r\n")), "a body");
        assert!(other(with("Host: a\r\n", "Host: a\r\nTransfer-Encoding: chunked\r\n")), "a chunked body");
        assert!(other(with("Host: a\r\n", "Host: a\r\nHost: b\r\n")), "two hosts");
        assert!(other(with("Host: a", "Host a")), "a malformed header");
        assert!(other(with("Host: a", "Host: a\x01")), "a control byte in a value");
        let long = format!("X-Long: {}", "a".repeat(super::super::MAX_HEADER_LINE));
        assert!(other(with("Host: a", &format!("Host: a\r\n{long}"))), "a header line too long");
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(other(with("Host: a\r\n", &format!("Host: a\r\n{many}"))), "too many headers");
        let big = format!("X-Big: {}\r\n", "a".repeat(6000));
        let unfinished = format!("GET /ws/chat HTTP/1.1\r\n{}", big.repeat(3));
        assert!(matches!(parse(&unfinished.as_bytes()[..MAX_HEAD_BYTES]), Parsed::Partial));
        assert!(other(unfinished), "a head past the limit that has not ended");
    }
}
