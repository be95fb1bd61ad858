//! Hostile WebSocket clients: a ping flood that never reads, a valid message followed
//! by a broken frame, and invalid UTF-8 in the middle of a fragmented message.

use std::time::Duration;

use crate::support::{RawWs, Server, TempDir, eventually, metric};

const OP_TEXT: u8 = 0x1;
const OP_CONTINUATION: u8 = 0x0;
const OP_PING: u8 = 0x9;

/// A client that floods pings and never reads owes more pongs than its queue may
/// hold: it is cut off as a slow consumer, and the server's memory stays put.
#[test]
fn a_ping_flood_that_never_reads_is_a_slow_consumer() {
    let server = Server::start(&["--max-queue-bytes", "64KiB"]);
    let before = server.rss_kib();
    let mut client = RawWs::connect_with_small_window(server.addr, "flood");
    client.stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload = [b'p'; 125];
    let mut sent: u64 = 0;
    let mut peak = before;
    // At most 3 M pings (393 MB): far more than kernel buffers and the queue hold.
    while sent < 3_000_000 {
        if client.send(true, OP_PING, &payload).is_err() {
            break;
        }
        sent += 1;
        if sent.is_multiple_of(20_000) {
            peak = peak.max(server.rss_kib());
        }
    }
    assert!(sent < 3_000_000, "the server never cut off a client that reads nothing");
    let grown = peak.saturating_sub(before);
    assert!(grown < 32 << 10, "{sent} pings grew the server by {grown} KiB");
    let cut = eventually(Duration::from_secs(5), || {
        metric(server.addr, "roomcast_connections_closed_total{reason=\"slow_consumer\"}") == Some(1.0)
    });
    assert!(cut, "closed as a slow consumer");
    assert_eq!(server.healthz(), Some(200));
}

/// A client that sends a message and then a frame that breaks the protocol gets the
/// answers to its message before the close frame.
#[test]
fn answers_to_a_message_precede_the_close_for_a_protocol_error() {
    let plugins = TempDir::new("echo");
    std::fs::copy(roomcast_plugin_build::built_plugins().join("echo.wasm"), plugins.path().join("echo.wasm"))
        .unwrap();
    let server = Server::start(&["--plugins", plugins.path().to_str().unwrap()]);
    for round in 0..20 {
        let mut client = RawWs::connect(server.addr, "echo");
        let mut wire =
            roomcast::ws::frame::encode_client(true, OP_TEXT, format!("hello {round}").as_bytes(), [9; 4]);
        // Reserved bits without an extension: a protocol error.
        wire.extend([0xF1, 0x80, 0, 0, 0, 0]);
        std::io::Write::write_all(&mut client.stream, &wire).unwrap();
        let (opcode, payload) = client.read().expect("the echo");
        assert_eq!((opcode, payload), (OP_TEXT, format!("hello {round}").into_bytes()), "round {round}");
        assert_eq!(client.read_close(), Some(1002));
    }
}

/// RFC 6455 8.1: a fragmented text message fails as soon as a fragment makes it
/// invalid UTF-8, without waiting for its last fragment.
#[test]
fn invalid_utf8_fails_at_the_fragment_that_breaks_it() {
    let server = Server::start(&[]);
    let mut client = RawWs::connect(server.addr, "utf8");
    client.send(false, OP_TEXT, "caf".as_bytes()).unwrap();
    client.send(false, OP_CONTINUATION, &[0xC3, 0x28]).unwrap(); // a broken two-byte sequence
    // No final fragment is ever sent.
    assert_eq!(client.read_close(), Some(1007));
}
