//! Per-message compression (RFC 7692) from the outside. The conformance suite
//! (`tests/conformance/permessage_deflate.py`, on the pinned Python client that
//! `scripts/setup --tests` installs) runs its Autobahn-style cases against a server
//! with compression on, over plain TCP and (a quicker pass) over TLS; raw sockets with hand-made frames check what a library client
//! would never send or would hide: the negotiation answer to each kind of offer, read
//! off the 101 response; RSV1 on the wire (the threshold, a broadcast deflated once and
//! the same bytes for every member, plain frames where nothing was negotiated or a
//! plugin turned compression off, recovery replays, members on another node of a
//! cluster); and hostile compressed input (a deflate bomb, bad UTF-8, a corrupt stream,
//! RSV bits where they are not allowed) closed with the right code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use roomcast::config::Config;
use roomcast::ws::frame::{OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, encode_client};
use roomcast_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x5a, 0x13, 0xc7, 0x2e];
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const WAIT: Duration = Duration::from_secs(10);
/// What the server answers to every valid offer (plus `server_max_window_bits=N` when
/// the offer asked for a window).
pub(crate) const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The bytes RFC 7692 has senders strip from the end of a message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

fn compressing(plugins: Option<&PluginDir>) -> Config {
    Config {
        compression: true,
        plugins: plugins.map(|dir| dir.path.clone()),
        plugin_cache: None,
        ..test_config()
    }
}

// --- Deflate, as a client would ----------------------------------------------------------

/// `data` deflated on its own with a `window`-bit window, sync-flushed, its empty
/// stored block stripped (RFC 7692 7.2.1).
pub(crate) fn deflate(data: &[u8], window: u8) -> Vec<u8> {
    let mut deflater = Compress::new_with_window_bits(Compression::default(), false, window);
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    loop {
        let consumed = deflater.total_in() as usize;
        deflater.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync).expect("deflate");
        if deflater.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(1024));
    }
    assert!(out.ends_with(&TAIL), "a sync flush ends with an empty stored block");
    out.truncate(out.len() - TAIL.len());
    out
}

/// A compressed message's payload inflated with a `window`-bit window (a server that
/// used a larger one than it agreed to fails here).
pub(crate) fn inflate(data: &[u8], window: u8) -> Vec<u8> {
    let mut inflater = Decompress::new_with_window_bits(false, window);
    let input = [data, &TAIL[..]].concat();
    let mut out = Vec::with_capacity(data.len() * 4 + 1024);
    loop {
        let consumed = inflater.total_in() as usize;
        let status =
            inflater.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync).unwrap_or_else(
                |e| panic!("the server's deflate stream does not inflate with window {window}: {e}"),
            );
        let done = inflater.total_in() as usize == input.len() && out.len() < out.capacity();
        if done || status == Status::StreamEnd {
            return out;
        }
        out.reserve(out.capacity());
    }
}

// --- Raw frames --------------------------------------------------------------------------

/// A masked client frame with extra bits (RSV1 to RSV3) set in its first byte.
fn frame_with(bits: u8, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = encode_client(fin, opcode, payload, MASK);
    frame[0] |= bits;
    frame
}

fn plain(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(0, fin, opcode, payload)
}

/// The first frame of a compressed message (RSV1 set), carrying deflated bytes.
pub(crate) fn compressed(fin: bool, opcode: u8, deflated: &[u8]) -> Vec<u8> {
    frame_with(RSV1, fin, opcode, deflated)
}

/// One server frame as it came on the wire.
pub(crate) struct Frame {
    pub wire: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn opcode(&self) -> u8 {
        self.wire[0] & 0x0F
    }
    pub fn rsv1(&self) -> bool {
        self.wire[0] & RSV1 != 0
    }
    fn describe(&self) -> String {
        format!("frame {:#04x} of {} bytes", self.wire[0], self.payload.len())
    }
    /// The message it carries, inflated if RSV1 says it is compressed.
    pub fn message(&self, window: u8) -> Vec<u8> {
        assert!(self.wire[0] & 0x80 != 0, "the server fragmented a message: {}", self.describe());
        if self.rsv1() { inflate(&self.payload, window) } else { self.payload.clone() }
    }
}

/// The next server frame that is not a ping or a pong, within [`WAIT`].
pub(crate) async fn next_frame(stream: &mut TcpStream) -> Frame {
    try_next_frame(stream).await.expect("no frame from the server within 10 s")
}

async fn try_next_frame(stream: &mut TcpStream) -> Option<Frame> {
    frame_within(stream, WAIT).await
}

async fn frame_within(stream: &mut TcpStream, bound: Duration) -> Option<Frame> {
    loop {
        let frame = tokio::time::timeout(bound, read_wire_frame(stream)).await.ok()?.ok()?;
        if !matches!(frame.opcode(), OP_PING | OP_PONG) {
            return Some(frame);
        }
    }
}

async fn read_wire_frame(stream: &mut TcpStream) -> std::io::Result<Frame> {
    let mut wire = vec![0u8; 2];
    stream.read_exact(&mut wire).await?;
    assert_eq!(wire[1] & 0x80, 0, "server frames are not masked");
    let len = match wire[1] & 0x7F {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).await?;
            wire.extend_from_slice(&ext);
            u16::from_be_bytes(ext) as usize
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).await?;
            wire.extend_from_slice(&ext);
            u64::from_be_bytes(ext) as usize
        }
        len => len as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    wire.extend_from_slice(&payload);
    Ok(Frame { wire, payload })
}

/// Upgrade `path` with one `Sec-WebSocket-Extensions` line per element of `offers`
/// (and `extra` header lines); the stream after the 101 and the response head.
pub(crate) async fn upgrade(
    addr: SocketAddr,
    path: &str,
    offers: &[&str],
    extra: &str,
) -> (TcpStream, String) {
    let mut lines: String =
        offers.iter().map(|offer| format!("Sec-WebSocket-Extensions: {offer}\r\n")).collect();
    lines.push_str(extra);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(upgrade_request(addr, path, &lines).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte)).await.expect("a response").unwrap();
        assert_eq!(n, 1, "closed during the handshake: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an ASCII head");
    assert_eq!(status_of(&head), Some(101), "{path} with {offers:?}: {head}");
    (stream, head)
}

/// The `Sec-WebSocket-Extensions` answer of a response head, if any (one line at most).
pub(crate) fn answer_of(head: &str) -> Option<&str> {
    let lines: Vec<&str> = head
        .lines()
        .filter(|line| line.to_ascii_lowercase().starts_with("sec-websocket-extensions:"))
        .collect();
    assert!(lines.len() <= 1, "more than one extensions line: {head}");
    header(head, "sec-websocket-extensions")
}

/// Compressible text of `size` bytes: JSON chat messages, cut to size.
pub(crate) fn chat_json(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 100);
    let mut n = 0;
    while out.len() < size {
        out.extend_from_slice(
            format!(
                "{{\"type\":\"say\",\"name\":\"member-{}\",\"text\":\"message number {n} about room {}\",\"at\":{}}}\n",
                n % 17,
                n % 5,
                1_700_000_000_000u64 + n * 7919
            )
            .as_bytes(),
        );
        n += 1;
    }
    out.truncate(size);
    out
}

/// Bytes that do not compress (xorshift), `size` of them.
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

// --- The conformance suite ---------------------------------------------------------------

/// The suite's folder and the Python of its virtual environment.
fn conformance() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup --tests (it installs the suite's pinned client)",
        python.display()
    );
    (dir, python)
}

/// A server with compression on and the `echo` plugin, set for the suite's messages of
/// up to 4 MiB echoed back (the limits, and the echo plugin's); `tls` serves wss://.
async fn suite_server(plugins: &PluginDir, tls: Option<&tls::Issued>) -> TestServer {
    TestServer::start(Config {
        max_message_bytes: 8 << 20,
        max_queue_bytes: 64 << 20,
        tls_cert: tls.map(|cert| cert.cert_file.clone()),
        tls_key: tls.map(|cert| cert.key_file.clone()),
        ..compressing(Some(plugins))
    })
    .await
}

fn echo_plugin() -> PluginDir {
    PluginDir::new(&[("echo", Some("[limits]\nmemory = \"128MiB\"\ndeadline = \"1s\"\n"))])
}

/// Run the suite with `args`; fails with its output unless every case passed.
async fn run_suite(args: &[&str]) {
    let (dir, python) = conformance();
    let run = tokio::process::Command::new(&python)
        .arg(dir.join("permessage_deflate.py"))
        .args(["--room-prefix", "echo:", "--threshold", "256"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20 * 60), run)
        .await
        .expect("the suite finished within 20 minutes")
        .expect("run the suite's Python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout.lines() {
        println!("  {line}");
    }
    assert!(
        output.status.success() && stdout.contains("conformance: ") && !stdout.contains("\nFAIL "),
        "the conformance suite: {}\n{stdout}\n{stderr}",
        output.status
    );
}

/// The whole suite against a server with compression on and the echo plugin: every
/// case's negotiation, every echo byte for byte, RSV1 where it belongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permessage_deflate_conformance_suite_passes() {
    let plugins = echo_plugin();
    let server = suite_server(&plugins, None).await;
    run_suite(&["--url", &format!("ws://{}", server.addr)]).await;
    server.stop().await;
}

/// Over TLS (where the session writes through rustls instead of `send(2)`): sizes,
/// the server's windows and fragmented messages, with fewer messages per case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_over_tls() {
    let plugins = echo_plugin();
    let ca = tls::TestCa::new();
    let cert = ca.issue(&plugins.path, "server");
    let ca_file = plugins.path.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = suite_server(&plugins, Some(&cert)).await;
    let url = format!("wss://127.0.0.1:{}", server.addr.port());
    let ca_file = ca_file.to_string_lossy();
    run_suite(&[
        "--url", &url, "--cafile", &ca_file, "--quick", "--only", "12.", "--only", "13.2.", "--only", "14.",
    ])
    .await;
    server.stop().await;
}

// --- Negotiation -------------------------------------------------------------------------

/// The 101 answer to each kind of offer: the first valid one wins; an unknown or
/// repeated parameter, a value out of 8..15, a value where none is taken, or
/// `server_max_window_bits` without one makes an offer invalid, and the next is tried.
#[tokio::test]
async fn each_offer_gets_the_answer_rfc_7692_allows() {
    let server = TestServer::start(compressing(None)).await;
    let with = |bits: u8| Some(format!("{ANSWER}; server_max_window_bits={bits}"));
    let plain = Some(ANSWER.to_owned());
    let cases: Vec<(&str, Vec<&str>, Option<String>)> = vec![
        ("the plain offer", vec!["permessage-deflate"], plain.clone()),
        ("Chromium's and Firefox's offer", vec!["permessage-deflate; client_max_window_bits"], plain.clone()),
        ("no spaces", vec!["permessage-deflate;client_max_window_bits"], plain.clone()),
        (
            "both no_context_takeover parameters",
            vec!["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
            plain.clone(),
        ),
        (
            "a client window is never answered",
            vec!["permessage-deflate; client_max_window_bits=10"],
            plain.clone(),
        ),
        ("a server window is echoed", vec!["permessage-deflate; server_max_window_bits=10"], with(10)),
        ("the smallest server window", vec!["permessage-deflate; server_max_window_bits=8"], with(8)),
        ("the largest server window", vec!["permessage-deflate; server_max_window_bits=15"], with(15)),
        (
            "all four parameters",
            vec![
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12; client_max_window_bits=9",
            ],
            with(12),
        ),
        ("a quoted value", vec!["permessage-deflate; server_max_window_bits=\"11\""], with(11)),
        ("an unknown extension first", vec!["x-webkit-deflate-frame, permessage-deflate"], plain.clone()),
        (
            "an invalid alternative, then a valid one",
            vec!["permessage-deflate; foo=1, permessage-deflate; server_max_window_bits=9"],
            with(9),
        ),
        (
            "two valid alternatives: the first",
            vec!["permessage-deflate; server_max_window_bits=10, permessage-deflate"],
            with(10),
        ),
        (
            "two valid alternatives, the plain one first",
            vec!["permessage-deflate, permessage-deflate; server_max_window_bits=10"],
            plain.clone(),
        ),
        (
            "alternatives over two header lines",
            vec![
                "permessage-deflate; server_max_window_bits=16",
                "permessage-deflate; server_max_window_bits=13",
            ],
            with(13),
        ),
        (
            "every invalid shape, then a valid one",
            vec![
                "permessage-deflate; foo, permessage-deflate; server_no_context_takeover; server_no_context_takeover, \
                 permessage-deflate; server_max_window_bits=7, permessage-deflate; client_no_context_takeover=1, \
                 permessage-deflate; server_max_window_bits, permessage-deflate; client_max_window_bits=14",
            ],
            plain.clone(),
        ),
    ];
    let invalid: Vec<(&str, &str)> = vec![
        ("an unknown parameter", "permessage-deflate; foo"),
        ("an unknown parameter with a value", "permessage-deflate; foo=1"),
        (
            "a duplicate parameter",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        ),
        ("a duplicate window", "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10"),
        ("a duplicate client window", "permessage-deflate; client_max_window_bits; client_max_window_bits=9"),
        ("a server window of 7", "permessage-deflate; server_max_window_bits=7"),
        ("a server window of 16", "permessage-deflate; server_max_window_bits=16"),
        ("a server window of 0", "permessage-deflate; server_max_window_bits=0"),
        ("a client window of 7", "permessage-deflate; client_max_window_bits=7"),
        ("a client window of 16", "permessage-deflate; client_max_window_bits=16"),
        ("a window with a leading zero", "permessage-deflate; server_max_window_bits=010"),
        ("a window that is not a number", "permessage-deflate; server_max_window_bits=ten"),
        ("an empty window", "permessage-deflate; client_max_window_bits="),
        ("a value on server_no_context_takeover", "permessage-deflate; server_no_context_takeover=1"),
        ("a value on client_no_context_takeover", "permessage-deflate; client_no_context_takeover=true"),
        ("server_max_window_bits without a value", "permessage-deflate; server_max_window_bits"),
        ("another extension only", "x-webkit-deflate-frame"),
    ];
    let cases =
        cases.into_iter().chain(invalid.into_iter().map(|(name, offer)| (name, vec![offer], None))).chain([
            (
                "several invalid alternatives",
                vec!["permessage-deflate; foo, permessage-deflate; server_max_window_bits"],
                None,
            ),
            ("no offer", vec![], None),
        ]);
    let mut failures = Vec::new();
    for (name, offers, expected) in cases {
        let (stream, head) = upgrade(server.addr, "/ws/negotiation", &offers, "").await;
        drop(stream);
        if answer_of(&head) != expected.as_deref() {
            failures.push(format!(
                "{name}: offered {offers:?}, answered {:?}, expected {expected:?}",
                answer_of(&head)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // With compression off, nothing is negotiated.
    let off = TestServer::start(test_config()).await;
    let (_, head) = upgrade(off.addr, "/ws/negotiation", &["permessage-deflate"], "").await;
    assert_eq!(answer_of(&head), None, "compression is off by default");
    off.stop().await;
    server.stop().await;
}

// --- What goes compressed ----------------------------------------------------------------

/// Through the echo plugin: a message under the threshold comes back plain, one at
/// or over it compressed (RSV1) and inflating to itself; a server window asked for is
/// the one used; a client that offered nothing gets no extension and plain frames.
#[tokio::test]
async fn the_threshold_and_the_offer_decide_what_goes_compressed() {
    let plugins = PluginDir::new(&[("echo", None)]);
    let server = TestServer::start(compressing(Some(&plugins))).await;
    let (mut client, head) = upgrade(server.addr, "/ws/echo:threshold", &["permessage-deflate"], "").await;
    assert_eq!(answer_of(&head), Some(ANSWER));
    for (size, should) in [(16, false), (255, false), (256, true), (4096, true), (60_000, true)] {
        let text = chat_json(size);
        client.write_all(&compressed(true, OP_TEXT, &deflate(&text, 15))).await.unwrap();
        let echo = next_frame(&mut client).await;
        assert_eq!(echo.opcode(), OP_TEXT);
        assert_eq!(echo.rsv1(), should, "a {size}-byte message: {}", echo.describe());
        assert_eq!(echo.message(15), text, "a {size}-byte message");
        if should {
            assert!(echo.payload.len() < size / 2, "{size} bytes of JSON deflated to {}", echo.payload.len());
        }
    }
    // Binary too, and a message sent plain on a compressed connection.
    let bytes = chat_json(3000);
    client.write_all(&plain(true, OP_BINARY, &bytes)).await.unwrap();
    let echo = next_frame(&mut client).await;
    assert!(echo.opcode() == OP_BINARY && echo.rsv1());
    assert_eq!(echo.message(15), bytes);
    // Bytes that do not compress may go either way, but arrive intact.
    let random = noise(5000, 7);
    client.write_all(&plain(true, OP_BINARY, &random)).await.unwrap();
    assert_eq!(next_frame(&mut client).await.message(15), random);

    // A window of 2^9 bytes asked for: what the server sends inflates with it.
    let (mut small, head) =
        upgrade(server.addr, "/ws/echo:window", &["permessage-deflate; server_max_window_bits=9"], "").await;
    assert_eq!(answer_of(&head), Some(format!("{ANSWER}; server_max_window_bits=9").as_str()));
    // Random blocks of 600 bytes of 16 symbols (which deflate shrinks in any window), each
    // twice: a window larger than agreed would refer 600 bytes back.
    let periodic: Vec<u8> = (0..40)
        .flat_map(|n| {
            noise(600, n + 1)
                .iter()
                .map(|b| b"0123456789abcdef"[usize::from(b & 15)])
                .collect::<Vec<u8>>()
                .repeat(2)
        })
        .collect();
    let text = chat_json(20_000);
    for message in [&periodic, &text] {
        small.write_all(&plain(true, OP_BINARY, message)).await.unwrap();
        let echo = next_frame(&mut small).await;
        assert!(echo.rsv1(), "{}", echo.describe());
        assert_eq!(&echo.message(9), message);
    }
    // A 256-byte window: accepted, and answered with plain frames.
    let (mut tiny, head) =
        upgrade(server.addr, "/ws/echo:tiny", &["permessage-deflate; server_max_window_bits=8"], "").await;
    assert_eq!(answer_of(&head), Some(format!("{ANSWER}; server_max_window_bits=8").as_str()));
    tiny.write_all(&compressed(true, OP_TEXT, &deflate(&text, 15))).await.unwrap();
    let echo = next_frame(&mut tiny).await;
    assert!(!echo.rsv1(), "server_max_window_bits=8 is answered plain: {}", echo.describe());
    assert_eq!(echo.payload, text);

    // No offer: no extension, plain frames.
    let (mut bare, head) = upgrade(server.addr, "/ws/echo:bare", &[], "").await;
    assert_eq!(answer_of(&head), None);
    bare.write_all(&plain(true, OP_TEXT, &text)).await.unwrap();
    let echo = next_frame(&mut bare).await;
    assert!(!echo.rsv1(), "{}", echo.describe());
    assert_eq!(echo.payload, text);
    // Only invalid offers: the same.
    let (mut declined, head) =
        upgrade(server.addr, "/ws/echo:declined", &["permessage-deflate; server_max_window_bits=20"], "")
            .await;
    assert_eq!(answer_of(&head), None);
    declined.write_all(&plain(true, OP_TEXT, &text)).await.unwrap();
    let echo = next_frame(&mut declined).await;
    assert!(!echo.rsv1(), "{}", echo.describe());
    assert_eq!(echo.payload, text);
    server.stop().await;
}

/// A broadcast is deflated once: every member that negotiated the same window gets the
/// same bytes on the wire; one that asked for a smaller window gets a frame that
/// inflates with it, and a member without compression (or with the 256-byte window)
/// the plain frame. A backend's publish too.
#[tokio::test]
async fn a_broadcast_is_the_same_bytes_for_every_compressed_member() {
    const TOKEN: &str = "compression-admin";
    let server = TestServer::start(Config { admin_token: Some(TOKEN.into()), ..compressing(None) }).await;
    let room = "/ws/fanout";
    let (mut ann, _) = upgrade(server.addr, room, &["permessage-deflate"], "").await;
    let (mut ben, _) = upgrade(server.addr, room, &["permessage-deflate; client_max_window_bits"], "").await;
    let (mut cat, _) =
        upgrade(server.addr, room, &["permessage-deflate; server_max_window_bits=10"], "").await;
    let (mut dan, _) = upgrade(server.addr, room, &[], "").await;
    let (mut eve, _) =
        upgrade(server.addr, room, &["permessage-deflate; server_max_window_bits=8"], "").await;
    let (mut sender, _) = upgrade(server.addr, room, &["permessage-deflate"], "").await;
    server.wait_metric("roomcast_room_members", 6.0, WAIT).await;

    for (n, (opcode, message)) in
        [(OP_TEXT, chat_json(8000)), (OP_BINARY, chat_json(60_000))].into_iter().enumerate()
    {
        sender.write_all(&compressed(true, opcode, &deflate(&message, 15))).await.unwrap();
        let (a, b) = (next_frame(&mut ann).await, next_frame(&mut ben).await);
        assert!(a.rsv1() && a.opcode() == opcode, "message {n}: {}", a.describe());
        assert!(a.wire == b.wire, "message {n}: two members with the same window got different bytes");
        assert_eq!(a.message(15), message);
        let c = next_frame(&mut cat).await;
        assert!(c.rsv1(), "message {n}: {}", c.describe());
        assert_eq!(c.message(10), message, "message {n}: window 10");
        let (d, e) = (next_frame(&mut dan).await, next_frame(&mut eve).await);
        assert!(!d.rsv1() && d.opcode() == opcode, "no offer, message {n}: {}", d.describe());
        assert_eq!(d.payload, message, "no offer, message {n}");
        assert!(d.wire == e.wire, "message {n}: window 8 gets the same plain frame as no offer");
    }

    // A backend's publish is a broadcast like any other, the sender's socket included.
    let body = String::from_utf8(chat_json(6000)).unwrap();
    let publish = format!(
        "POST /admin/rooms/fanout/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(status_of(&raw_request(server.addr, publish.as_bytes()).await.unwrap()), Some(202));
    let (a, b, s) = (next_frame(&mut ann).await, next_frame(&mut ben).await, next_frame(&mut sender).await);
    assert!(a.rsv1() && a.wire == b.wire && a.wire == s.wire, "a publish: {}", a.describe());
    assert_eq!(a.message(15), body.as_bytes());
    assert_eq!(next_frame(&mut cat).await.message(10), body.as_bytes());
    let (d, e) = (next_frame(&mut dan).await, next_frame(&mut eve).await);
    assert!(
        !d.rsv1() && d.wire == e.wire && d.payload == body.as_bytes(),
        "a publish, plain: {}",
        d.describe()
    );
    server.stop().await;
}

/// A plugin whose `NAME.toml` says `compression = false`: a raw connection to its room
/// does not negotiate it (and RSV1 from it is a protocol error), and a room-protocol
/// connection that did negotiate gets that room's messages plain and another room's
/// compressed.
#[tokio::test]
async fn a_plugin_can_turn_compression_off_for_its_rooms() {
    let plugins = PluginDir::new(&[("echo", None)]);
    plugins.install("echo", "quiet");
    std::fs::write(plugins.path.join("quiet.toml"), "compression = false\n").unwrap();
    let server = TestServer::start(compressing(Some(&plugins))).await;
    let text = chat_json(5000);

    let (mut raw, head) = upgrade(server.addr, "/ws/quiet:raw", &["permessage-deflate"], "").await;
    assert_eq!(answer_of(&head), None, "quiet's rooms do not negotiate compression");
    raw.write_all(&plain(true, OP_TEXT, &text)).await.unwrap();
    let echo = next_frame(&mut raw).await;
    assert!(!echo.rsv1(), "{}", echo.describe());
    assert_eq!(echo.payload, text);
    raw.write_all(&compressed(true, OP_TEXT, &deflate(&text, 15))).await.unwrap();
    assert_eq!(read_close(&mut raw).await, Some(1002), "RSV1 without compression negotiated");

    // One connection in both rooms.
    let (mut rooms, head) =
        upgrade(server.addr, "/ws", &["permessage-deflate"], "Sec-WebSocket-Protocol: roomcast.v1\r\n").await;
    assert_eq!(answer_of(&head), Some(ANSWER));
    for (n, room) in ["quiet:both", "echo:both"].iter().enumerate() {
        rooms
            .write_all(&plain(true, OP_TEXT, format!("{{\"join\":\"{room}\",\"ref\":{n}}}").as_bytes()))
            .await
            .unwrap();
        let joined = next_frame(&mut rooms).await;
        let joined: serde_json::Value = serde_json::from_slice(&joined.message(15)).unwrap();
        assert_eq!(joined["joined"], *room, "{joined}");
    }
    let text = String::from_utf8(text).unwrap();
    for (room, should) in [("quiet:both", false), ("echo:both", true)] {
        let send = serde_json::json!({ "send": room, "text": text }).to_string();
        rooms.write_all(&compressed(true, OP_TEXT, &deflate(send.as_bytes(), 15))).await.unwrap();
        let echo = next_frame(&mut rooms).await;
        assert_eq!(echo.rsv1(), should, "{room}: {}", echo.describe());
        let echo: serde_json::Value = serde_json::from_slice(&echo.message(15)).unwrap();
        assert_eq!((echo["room"].as_str(), echo["text"].as_str()), (Some(room), Some(text.as_str())));
        // Binary: one byte of length, the room, the payload; the same both ways.
        let mut binary = vec![room.len() as u8];
        binary.extend_from_slice(room.as_bytes());
        binary.extend_from_slice(text.as_bytes());
        rooms.write_all(&compressed(true, OP_BINARY, &deflate(&binary, 15))).await.unwrap();
        let echo = next_frame(&mut rooms).await;
        assert_eq!((echo.opcode(), echo.rsv1()), (OP_BINARY, should), "{room}, binary: {}", echo.describe());
        assert_eq!(echo.message(15), binary, "{room}, binary");
    }
    server.stop().await;
}

/// A room-protocol client that negotiated compression and joins `room` (with `since`);
/// the `joined` reply.
async fn join_compressed(
    addr: SocketAddr,
    room: &str,
    since: Option<serde_json::Value>,
) -> (TcpStream, serde_json::Value) {
    let (mut client, head) =
        upgrade(addr, "/ws", &["permessage-deflate"], "Sec-WebSocket-Protocol: roomcast.v1\r\n").await;
    assert_eq!(answer_of(&head), Some(ANSWER));
    let mut join = serde_json::json!({ "join": room, "ref": 1 });
    if let Some(since) = since {
        join["since"] = since;
    }
    client.write_all(&plain(true, OP_TEXT, join.to_string().as_bytes())).await.unwrap();
    let joined = serde_json::from_slice(&next_frame(&mut client).await.message(15)).unwrap();
    (client, joined)
}

/// A delivery to a room-protocol client: its text and offset, and whether it came
/// compressed.
fn delivery(frame: &Frame) -> (String, u64, bool) {
    let message: serde_json::Value = serde_json::from_slice(&frame.message(15)).unwrap();
    let text = message["text"].as_str().unwrap_or_else(|| panic!("a text delivery: {message}")).to_owned();
    (text, message["offset"].as_u64().unwrap_or_default(), frame.rsv1())
}

/// A room with history, on a compressed connection: live deliveries come compressed,
/// and what a member missed is replayed intact after a join with `since`.
#[tokio::test]
async fn a_recovery_on_a_compressed_connection_replays_intact() {
    let server = TestServer::start(Config { history_size: 100, ..compressing(None) }).await;
    let (mut first, joined) = join_compressed(server.addr, "annals", None).await;
    let epoch = joined["epoch"].as_str().expect("an epoch").to_owned();
    let (mut publisher, _) = upgrade(server.addr, "/ws/annals", &[], "").await;
    server.wait_metric("roomcast_room_members", 2.0, WAIT).await;
    let text = |n: usize| format!("{n}: {}", String::from_utf8(chat_json(3000 + n)).unwrap());
    publisher.write_all(&plain(true, OP_TEXT, text(1).as_bytes())).await.unwrap();
    assert_eq!(delivery(&next_frame(&mut first).await), (text(1), 1, true));
    drop(first);
    server.wait_metric("roomcast_room_members", 1.0, WAIT).await;
    for n in 2..=4 {
        publisher.write_all(&plain(true, OP_TEXT, text(n).as_bytes())).await.unwrap();
    }
    server.wait_metric("roomcast_history_messages", 4.0, WAIT).await;

    let since = serde_json::json!({ "epoch": epoch, "offset": 1 });
    let (mut back, joined) = join_compressed(server.addr, "annals", Some(since)).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    for n in 2..=4 {
        let (got, offset, _) = delivery(&next_frame(&mut back).await);
        assert_eq!((got, offset), (text(n), n as u64), "replayed");
    }
    publisher.write_all(&plain(true, OP_TEXT, text(5).as_bytes())).await.unwrap();
    assert_eq!(delivery(&next_frame(&mut back).await), (text(5), 5, true), "live again, compressed");
    server.stop().await;
}

/// Cluster mode: members on the node that does not own the room get compressed frames
/// too (or plain ones, without an offer), inflating to what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_another_node_get_compressed_frames() {
    let redis = Redis::start().await;
    let clustered = || Config { redis: Some(redis.url()), ..compressing(None) };
    let (one, two) = (TestServer::start(clustered()).await, TestServer::start(clustered()).await);
    let room = "/ws/spread";
    let (mut sender, _) = upgrade(one.addr, room, &["permessage-deflate"], "").await;
    let (mut near, _) = upgrade(one.addr, room, &["permessage-deflate"], "").await;
    let (mut far, _) = upgrade(two.addr, room, &["permessage-deflate"], "").await;
    let (mut far_plain, _) = upgrade(two.addr, room, &[], "").await;
    // Until the room spans both nodes: a probe, again, until the far side hears it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        sender.write_all(&plain(true, OP_TEXT, b"probe")).await.unwrap();
        if frame_within(&mut far, Duration::from_millis(200)).await.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the far node never heard the room");
    }
    let message = chat_json(9000);
    sender.write_all(&compressed(true, OP_TEXT, &deflate(&message, 15))).await.unwrap();
    for (who, stream, should) in
        [("near", &mut near, true), ("far", &mut far, true), ("far, plain", &mut far_plain, false)]
    {
        let frame = loop {
            let frame = next_frame(stream).await;
            if frame.message(15) != b"probe" {
                break frame;
            }
        };
        assert_eq!(frame.rsv1(), should, "{who}: {}", frame.describe());
        assert_eq!(frame.message(15), message, "{who}");
    }
    one.stop().await;
    two.stop().await;
}

// --- Compressed input --------------------------------------------------------------------

/// What a case sends on a fresh connection that offered `permessage-deflate`, and what
/// an observer without compression in the same room must then receive (followed by an
/// end marker), or the close code the sender must get.
enum Expect {
    Delivered(Vec<(u8, Vec<u8>)>),
    Close(u16),
}

struct Case {
    name: String,
    offer: bool,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, frames: &[Vec<u8>], expect: Expect) -> Case {
    Case { name: name.into(), offer: true, bytes: frames.concat(), expect }
}

const LIMIT: usize = 64 << 10;

async fn run(cases: Vec<Case>) {
    let server = TestServer::start(Config { max_message_bytes: LIMIT as u64, ..compressing(None) }).await;
    let mut failures = Vec::new();
    for case in cases {
        let room = "/ws/inbound";
        let (mut observer, _) = upgrade(server.addr, room, &[], "").await;
        let offers: &[&str] = if case.offer { &["permessage-deflate"] } else { &[] };
        let (mut sender, head) = upgrade(server.addr, room, offers, "").await;
        assert_eq!(answer_of(&head).is_some(), case.offer, "{}", case.name);
        server.wait_metric("roomcast_room_members", 2.0, WAIT).await;
        sender.write_all(&case.bytes).await.unwrap();
        match case.expect {
            Expect::Delivered(messages) => {
                sender.write_all(&plain(true, OP_TEXT, b"end")).await.unwrap();
                for (opcode, payload) in messages.iter().chain([&(OP_TEXT, b"end".to_vec())]) {
                    let Some(frame) = try_next_frame(&mut observer).await else {
                        let closed = read_close(&mut sender).await;
                        failures.push(format!(
                            "{}: nothing delivered; the sender's close: {closed:?}",
                            case.name
                        ));
                        break;
                    };
                    if (frame.opcode(), frame.rsv1(), &frame.payload) != (*opcode, false, payload) {
                        failures.push(format!(
                            "{}: the observer got {} ({:?}...), expected opcode {opcode} with {} bytes",
                            case.name,
                            frame.describe(),
                            String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(40)]),
                            payload.len()
                        ));
                        break;
                    }
                }
            }
            Expect::Close(code) => {
                let got = read_close(&mut sender).await;
                if got != Some(code) {
                    failures.push(format!("{}: closed with {got:?}, expected {code}", case.name));
                }
            }
        }
        drop((sender, observer));
        server.wait_metric("roomcast_room_members", 0.0, WAIT).await;
    }
    server.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Compressed client messages reach the room inflated: whole or fragmented (RSV1 on
/// the first fragment only), with any window, empty, exactly at the message limit,
/// with a ping between fragments; a message sent plain on a compressed connection too.
#[tokio::test]
async fn compressed_client_messages_are_delivered_inflated() {
    let json = chat_json(10_000);
    let deflated = deflate(&json, 15);
    let (head, rest) = deflated.split_at(deflated.len() / 3);
    let (middle, last) = rest.split_at(rest.len() / 2);
    let at_limit = chat_json(LIMIT);
    let mut cases = vec![
        case(
            "compressed text",
            &[compressed(true, OP_TEXT, &deflated)],
            Expect::Delivered(vec![(OP_TEXT, json.clone())]),
        ),
        case(
            "compressed binary",
            &[compressed(true, OP_BINARY, &deflate(&json, 15))],
            Expect::Delivered(vec![(OP_BINARY, json.clone())]),
        ),
        case(
            "compressed text in three fragments",
            &[
                compressed(false, OP_TEXT, head),
                plain(false, OP_CONTINUATION, middle),
                plain(true, OP_CONTINUATION, last),
            ],
            Expect::Delivered(vec![(OP_TEXT, json.clone())]),
        ),
        case(
            "a ping between compressed fragments",
            &[
                compressed(false, OP_BINARY, head),
                plain(true, OP_PING, b"p"),
                plain(true, OP_CONTINUATION, rest),
            ],
            Expect::Delivered(vec![(OP_BINARY, json.clone())]),
        ),
        case(
            "an empty compressed message",
            &[compressed(true, OP_TEXT, &deflate(b"", 15)), compressed(true, OP_BINARY, &[0x00])],
            Expect::Delivered(vec![(OP_TEXT, vec![]), (OP_BINARY, vec![])]),
        ),
        case(
            "a compressed message exactly at the limit",
            &[compressed(true, OP_TEXT, &deflate(&at_limit, 15))],
            Expect::Delivered(vec![(OP_TEXT, at_limit.clone())]),
        ),
        case(
            "a plain message on a compressed connection, between compressed ones",
            &[
                compressed(true, OP_TEXT, &deflate(b"one", 15)),
                plain(true, OP_TEXT, b"two"),
                plain(false, OP_BINARY, b"thr"),
                plain(true, OP_CONTINUATION, b"ee"),
                compressed(true, OP_TEXT, &deflate(b"four", 15)),
            ],
            Expect::Delivered(vec![
                (OP_TEXT, b"one".to_vec()),
                (OP_TEXT, b"two".to_vec()),
                (OP_BINARY, b"three".to_vec()),
                (OP_TEXT, b"four".to_vec()),
            ]),
        ),
        case(
            "multi-byte characters, the deflate stream in 7-byte fragments",
            &{
                let text = "é中😀".repeat(500).into_bytes();
                let deflated = deflate(&text, 15);
                let frames: Vec<Vec<u8>> = deflated
                    .chunks(7)
                    .enumerate()
                    .map(|(n, chunk)| {
                        let fin = (n + 1) * 7 >= deflated.len();
                        if n == 0 {
                            compressed(fin, OP_TEXT, chunk)
                        } else {
                            plain(fin, OP_CONTINUATION, chunk)
                        }
                    })
                    .collect();
                vec![frames.concat()]
            },
            Expect::Delivered(vec![(OP_TEXT, "é中😀".repeat(500).into_bytes())]),
        ),
    ];
    // A sender may end a message with a final block (RFC 7692 7.2.3.3) instead of a
    // sync flush.
    let finished = {
        let mut deflater = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(json.len() + 64);
        deflater.compress_vec(&json, &mut out, FlushCompress::Finish).unwrap();
        out
    };
    cases.push(case(
        "a message that ends with a final block",
        &[compressed(true, OP_TEXT, &finished)],
        Expect::Delivered(vec![(OP_TEXT, json.clone())]),
    ));
    for window in 9..=15 {
        cases.push(case(
            format!("compressed with a {window}-bit window"),
            &[compressed(true, OP_BINARY, &deflate(&json, window))],
            Expect::Delivered(vec![(OP_BINARY, json.clone())]),
        ));
    }
    run(cases).await;
}

/// The message limit is on the inflated size: a message that does not compress,
/// exactly at the limit, is delivered although its deflate stream (stored blocks) is a
/// few bytes longer than the limit.
#[tokio::test]
async fn the_limit_is_on_the_inflated_size() {
    let random = noise(LIMIT, 11);
    let deflated = deflate(&random, 15);
    assert!(deflated.len() > LIMIT, "{} bytes deflated to {}", LIMIT, deflated.len());
    run(vec![case(
        format!("an incompressible message of {LIMIT} bytes (the limit), {} bytes deflated", deflated.len()),
        &[compressed(true, OP_BINARY, &deflated)],
        Expect::Delivered(vec![(OP_BINARY, random)]),
    )])
    .await;
}

/// Compressed input the server must refuse, and the code it closes with: a deflate
/// bomb is 1009 at the limit; bad UTF-8 inside a compressed text and a stream that
/// does not inflate are 1007; RSV1 where RFC 7692 does not allow it, RSV2 and RSV3 are
/// 1002.
#[tokio::test]
async fn hostile_compressed_input_is_closed_with_the_right_code() {
    // Eight MiB of zeros deflate to about eight KiB.
    let bomb = deflate(&vec![0u8; 8 << 20], 15);
    assert!(bomb.len() < 16 << 10, "{}", bomb.len());
    let (bomb_head, bomb_rest) = bomb.split_at(bomb.len() / 2);
    let mut bad_utf8 = chat_json(3000);
    bad_utf8[1500] = 0xff;
    let mut cut_char = "é".repeat(1000).into_bytes();
    cut_char.pop();
    let json = deflate(&chat_json(2000), 15);
    let mut cases = vec![
        case("a deflate bomb", &[compressed(true, OP_BINARY, &bomb)], Expect::Close(1009)),
        case("a deflate bomb of text", &[compressed(true, OP_TEXT, &bomb)], Expect::Close(1009)),
        case(
            "a deflate bomb in two fragments",
            &[compressed(false, OP_BINARY, bomb_head), plain(true, OP_CONTINUATION, bomb_rest)],
            Expect::Close(1009),
        ),
        case(
            "one byte over the limit, inflated",
            &[compressed(true, OP_TEXT, &deflate(&chat_json(LIMIT + 1), 15))],
            Expect::Close(1009),
        ),
        case(
            "invalid UTF-8 in a compressed text",
            &[compressed(true, OP_TEXT, &deflate(&bad_utf8, 15))],
            Expect::Close(1007),
        ),
        case(
            "a compressed text that ends inside a character",
            &[compressed(true, OP_TEXT, &deflate(&cut_char, 15))],
            Expect::Close(1007),
        ),
        case(
            "an overlong encoding, compressed",
            &[compressed(true, OP_TEXT, &deflate(b"a\xc0\xafb", 15))],
            Expect::Close(1007),
        ),
        case(
            "a corrupt deflate stream",
            &[compressed(true, OP_BINARY, &[0xff, 0xff, 0xff, 0xff])],
            Expect::Close(1007),
        ),
        case("a reserved block type", &[compressed(true, OP_TEXT, &[0x07, 0x00])], Expect::Close(1007)),
        case(
            "RSV1 on a continuation",
            &[
                compressed(false, OP_TEXT, &json[..100]),
                frame_with(RSV1, true, OP_CONTINUATION, &json[100..]),
            ],
            Expect::Close(1002),
        ),
        case(
            "RSV1 on the continuation of a plain message",
            &[plain(false, OP_TEXT, b"abc"), frame_with(RSV1, true, OP_CONTINUATION, &deflate(b"def", 15))],
            Expect::Close(1002),
        ),
        case("RSV1 on a ping", &[frame_with(RSV1, true, OP_PING, b"")], Expect::Close(1002)),
        case("RSV1 on a pong", &[frame_with(RSV1, true, OP_PONG, b"")], Expect::Close(1002)),
        case(
            "RSV1 on a close",
            &[frame_with(RSV1, true, OP_CLOSE, &1000u16.to_be_bytes())],
            Expect::Close(1002),
        ),
        case(
            "RSV1 on a ping between compressed fragments",
            &[compressed(false, OP_TEXT, &json[..100]), frame_with(RSV1, true, OP_PING, b"")],
            Expect::Close(1002),
        ),
        case("RSV2", &[frame_with(RSV2, true, OP_TEXT, b"x")], Expect::Close(1002)),
        case("RSV3", &[frame_with(RSV3, true, OP_BINARY, b"x")], Expect::Close(1002)),
        case("RSV1 and RSV2", &[frame_with(RSV1 | RSV2, true, OP_TEXT, &json)], Expect::Close(1002)),
    ];
    // A client that keeps its context although the server answered
    // client_no_context_takeover: its second message refers back into the first.
    let (first, second) = {
        let message = chat_json(2000);
        let mut deflater = Compress::new(Compression::default(), false);
        let take = |deflater: &mut Compress| {
            let mut out = Vec::with_capacity(4096);
            deflater.compress_vec(&message, &mut out, FlushCompress::Sync).unwrap();
            out.truncate(out.len() - TAIL.len());
            out
        };
        (take(&mut deflater), take(&mut deflater))
    };
    assert!(second.len() < first.len() / 4, "the second refers to the first");
    cases.push(case(
        "context takeover the server declined",
        &[compressed(true, OP_TEXT, &first), compressed(true, OP_TEXT, &second)],
        Expect::Close(1007),
    ));
    let mut without =
        case("RSV1 without compression negotiated", &[compressed(true, OP_TEXT, &json)], Expect::Close(1002));
    without.offer = false;
    cases.push(without);
    run(cases).await;
}
