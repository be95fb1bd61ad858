//! Handshake validation over raw TCP: each malformed request gets the right status,
//! header and one-line reason before any upgrade, and is counted by reason; and how the
//! server reads a connection's first head itself (frames sent with it, a head that
//! trickles in, an upgrade after another request, a plugin's refusal).

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use roomcast::config::{Config, OriginPolicy};
use roomcast_tests::*;

struct Case {
    name: &'static str,
    request: String,
    status: u16,
    header: Option<&'static str>,
    metric: Option<&'static str>,
}

fn cases(addr: std::net::SocketAddr) -> Vec<Case> {
    let h = format!("Host: {addr}\r\n");
    let up = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let ver = "Sec-WebSocket-Version: 13\r\n";
    let case = |name, request: String, status, header, metric| Case { name, request, status, header, metric };
    vec![
        case(
            "post",
            format!("POST /ws/room HTTP/1.1\r\n{h}{up}{key}{ver}Content-Length: 0\r\n\r\n"),
            405,
            Some("allow: get"),
            Some("method"),
        ),
        case("other path", format!("GET /nope HTTP/1.1\r\n{h}{up}{key}{ver}\r\n"), 404, None, None),
        case(
            "empty room",
            format!("GET /ws/ HTTP/1.1\r\n{h}{up}{key}{ver}\r\n"),
            400,
            None,
            Some("room_name"),
        ),
        case(
            "room with slash",
            format!("GET /ws/a%2Fb HTTP/1.1\r\n{h}{up}{key}{ver}\r\n"),
            400,
            None,
            Some("room_name"),
        ),
        case(
            "room with space",
            format!("GET /ws/a%20b HTTP/1.1\r\n{h}{up}{key}{ver}\r\n"),
            400,
            None,
            Some("room_name"),
        ),
        case(
            "room too long",
            format!("GET /ws/{} HTTP/1.1\r\n{h}{up}{key}{ver}\r\n", "r".repeat(129)),
            400,
            None,
            Some("room_name"),
        ),
        case(
            "plain http",
            format!("GET /ws/room HTTP/1.1\r\n{h}\r\n"),
            426,
            Some("upgrade: websocket"),
            Some("bad_request"),
        ),
        case(
            "wrong upgrade",
            format!("GET /ws/room HTTP/1.1\r\n{h}Upgrade: h2c\r\nConnection: Upgrade\r\n{key}{ver}\r\n"),
            400,
            None,
            Some("bad_request"),
        ),
        case(
            "no connection upgrade",
            format!(
                "GET /ws/room HTTP/1.1\r\n{h}Upgrade: websocket\r\nConnection: keep-alive\r\n{key}{ver}\r\n"
            ),
            400,
            None,
            Some("bad_request"),
        ),
        case(
            "version 8",
            format!("GET /ws/room HTTP/1.1\r\n{h}{up}{key}Sec-WebSocket-Version: 8\r\n\r\n"),
            426,
            Some("sec-websocket-version: 13"),
            Some("version"),
        ),
        case(
            "no version",
            format!("GET /ws/room HTTP/1.1\r\n{h}{up}{key}\r\n"),
            426,
            Some("sec-websocket-version: 13"),
            Some("version"),
        ),
        case("no key", format!("GET /ws/room HTTP/1.1\r\n{h}{up}{ver}\r\n"), 400, None, Some("bad_request")),
        case(
            "short key",
            format!("GET /ws/room HTTP/1.1\r\n{h}{up}Sec-WebSocket-Key: c2hvcnQ=\r\n{ver}\r\n"),
            400,
            None,
            Some("bad_request"),
        ),
        case(
            "key not base64",
            format!(
                "GET /ws/room HTTP/1.1\r\n{h}{up}Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n{ver}\r\n"
            ),
            400,
            None,
            Some("bad_request"),
        ),
        case(
            "foreign origin",
            format!("GET /ws/room HTTP/1.1\r\n{h}{up}{key}{ver}Origin: https://evil.example\r\n\r\n"),
            403,
            None,
            Some("origin"),
        ),
        case(
            "two hosts",
            format!("GET /ws/room HTTP/1.1\r\n{h}Host: other\r\n{up}{key}{ver}\r\n"),
            400,
            None,
            Some("bad_request"),
        ),
        case(
            "header line too long",
            format!("GET /ws/room HTTP/1.1\r\n{h}{up}{key}{ver}X-Long: {}\r\n\r\n", "a".repeat(9000)),
            431,
            None,
            Some("bad_request"),
        ),
        case(
            "target too long",
            format!("GET /ws/room?{} HTTP/1.1\r\n{h}{up}{key}{ver}\r\n", "a".repeat(9000)),
            414,
            None,
            Some("bad_request"),
        ),
    ]
}

#[tokio::test]
async fn malformed_upgrades_are_rejected_with_the_right_status() {
    let server = TestServer::start(test_config()).await;
    let mut expected = std::collections::HashMap::<&str, f64>::new();
    for case in cases(server.addr) {
        let response = raw_request(server.addr, case.request.as_bytes()).await.unwrap();
        assert_eq!(status_of(&response), Some(case.status), "{}: {response}", case.name);
        let lower = response.to_ascii_lowercase();
        if let Some(header) = case.header {
            assert!(lower.contains(header), "{}: missing `{header}` in {response}", case.name);
        }
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        assert!(
            !body.trim().is_empty() && body.trim().lines().count() == 1,
            "{}: one-line reason, got {body:?}",
            case.name
        );
        if let Some(metric) = case.metric {
            *expected.entry(metric).or_default() += 1.0;
        }
    }
    for (reason, count) in expected {
        assert_eq!(
            server.metric(&format!("roomcast_handshakes_rejected_total{{reason=\"{reason}\"}}")).await,
            count,
            "{reason}"
        );
    }
    assert_eq!(server.metric("roomcast_connections").await, 0.0);
    server.stop().await;
}

#[tokio::test]
async fn a_valid_upgrade_gets_the_rfc_accept_key() {
    let server = TestServer::start(test_config()).await;
    let request =
        upgrade_request(server.addr, "/ws/chat%3Alobby", &format!("Origin: http://{}\r\n", server.addr));
    let response = raw_request(server.addr, request.as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(101), "{response}");
    assert!(response.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn origins_follow_the_configured_list() {
    let config = Config {
        allowed_origins: OriginPolicy::parse("https://app.example.com,https://*.example.org").unwrap(),
        ..test_config()
    };
    let server = TestServer::start(config).await;
    for (origin, status) in [
        ("https://app.example.com", 101),
        ("https://a.example.org", 101),
        ("https://example.org", 403),
        (&format!("http://{}", server.addr) as &str, 403),
    ] {
        let request = upgrade_request(server.addr, "/ws/room", &format!("Origin: {origin}\r\n"));
        let response = raw_request(server.addr, request.as_bytes()).await.unwrap();
        assert_eq!(status_of(&response), Some(status), "{origin}: {response}");
    }
    // Non-browser clients send no Origin and pass.
    let response =
        raw_request(server.addr, upgrade_request(server.addr, "/ws/room", "").as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(101));
    server.stop().await;
}

#[tokio::test]
async fn at_capacity_an_upgrade_is_refused_at_once_with_503() {
    let server = TestServer::start(Config { max_connections: 2, ..test_config() }).await;
    let _a = server.connect("room").await;
    let _b = server.connect("room").await;
    let response =
        raw_request(server.addr, upgrade_request(server.addr, "/ws/room", "").as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(503), "{response}");
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"capacity\"}").await, 1.0);
    drop(_a);
    // The slot comes back once the session ends.
    server.wait_metric("roomcast_connections", 1.0, Duration::from_secs(5)).await;
    let response =
        raw_request(server.addr, upgrade_request(server.addr, "/ws/room", "").as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(101), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let server = TestServer::start(test_config()).await;
    assert_eq!(http_get(server.addr, "/healthz").await.unwrap().0, 200);
    let metrics = server.metrics().await;
    for series in [
        "roomcast_connections 0",
        "roomcast_rooms 0",
        "roomcast_room_members 0",
        "roomcast_messages_in_total 0",
        "roomcast_messages_out_total 0",
        "roomcast_connections_closed_total{reason=\"slow_consumer\"} 0",
        "roomcast_connections_closed_total{reason=\"plugin_failure\"} 0",
        "roomcast_handshakes_rejected_total{reason=\"timeout\"} 0",
        "roomcast_handshakes_rejected_total{reason=\"plugin\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == series), "missing `{series}` in\n{metrics}");
    }
    server.stop().await;
}

/// A client's text frame: FIN, opcode 1, masked.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).expect("a short text")];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A server with one member listening in `room`, joined.
async fn server_with_listener(room: &str) -> (TestServer, Client) {
    let server = TestServer::start(test_config()).await;
    let listener = server.connect(room).await;
    server.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
    (server, listener)
}

/// Frames a client writes together with its upgrade request (in the same packet) are
/// the session's first input: the server reads them with the head and hands them on.
#[tokio::test]
async fn frames_sent_with_the_upgrade_request_reach_the_room() {
    let (server, mut listener) = server_with_listener("eager").await;
    let mut bytes = upgrade_request(server.addr, "/ws/eager", "").into_bytes();
    bytes.extend(masked_text("first"));
    bytes.extend(masked_text("second"));
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    read_upgrade_response(&mut stream).await.unwrap();
    assert_eq!(recv_text(&mut listener).await, "first");
    assert_eq!(recv_text(&mut listener).await, "second");
    server.stop().await;
}

/// One whole response off a keep-alive connection: the head and its `content-length`
/// body.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = header(&head, "content-length").expect("a length").parse().unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// The server answers a connection's first upgrade itself and hands anything else to
/// its HTTP implementation with the bytes it read; an upgrade that comes later on the
/// same keep-alive connection still gets its session, with the frames sent after it.
#[tokio::test]
async fn an_upgrade_after_another_request_on_the_same_connection() {
    let (server, mut listener) = server_with_listener("later").await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let health = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
    stream.write_all(health.as_bytes()).await.unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(status_of(&response), Some(200), "{response}");
    let mut bytes = upgrade_request(server.addr, "/ws/later", "").into_bytes();
    bytes.extend(masked_text("after health"));
    stream.write_all(&bytes).await.unwrap();
    read_upgrade_response(&mut stream).await.unwrap();
    assert_eq!(recv_text(&mut listener).await, "after health");
    server.stop().await;
}

/// A head that arrives a byte at a time (well within the handshake timeout) is read
/// to its end and answered.
#[tokio::test]
async fn an_upgrade_head_that_trickles_in_is_answered() {
    let (server, mut listener) = server_with_listener("slow").await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for byte in upgrade_request(server.addr, "/ws/slow", "").bytes() {
        stream.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    read_upgrade_response(&mut stream).await.unwrap();
    stream.write_all(&masked_text("made it")).await.unwrap();
    assert_eq!(recv_text(&mut listener).await, "made it");
    server.stop().await;
}

/// A plugin's refusal of an upgrade the server answers itself: the status and the
/// reason, then the server closes the connection (it does not wait for more requests).
#[tokio::test]
async fn a_plugins_refusal_is_answered_and_the_connection_closed() {
    let (_dir, config) = gate_setup();
    let server = TestServer::start(config).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes =
        upgrade_request(server.addr, "/ws/gate?token=guess", "Origin: https://app.example.com\r\n")
            .into_bytes();
    // Bytes the refused client sent on: they must not turn the close into a reset.
    bytes.extend(masked_text("never read"));
    stream.write_all(&bytes).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the server closes the connection")
        .expect("a clean close, not a reset");
    let response = String::from_utf8(response).unwrap();
    assert_eq!(status_of(&response), Some(403), "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"), "{response}");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(body.contains("bad token"), "{response}");
    assert_eq!(header(head, "content-length"), Some(body.len().to_string().as_str()), "{response}");
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"plugin\"}").await, 1.0);
    server.stop().await;
}

/// A head longer than 16 KiB (each line within its own bound) is refused with 431,
/// whether it ends or not, and the connection closed.
#[tokio::test]
async fn a_head_past_16_kib_gets_431() {
    let server = TestServer::start(test_config()).await;
    let padding: String = (0..20).map(|i| format!("X-Pad-{i}: {}\r\n", "a".repeat(1000))).collect();
    for end in ["\r\n", ""] {
        let request = format!("{}{padding}{end}", upgrade_request(server.addr, "/ws/room", "").trim_end());
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
        let response = String::from_utf8_lossy(&response);
        assert_eq!(status_of(&response), Some(431), "ended: {}: {response}", !end.is_empty());
    }
    assert_eq!(server.metric("roomcast_connections").await, 0.0);
    server.stop().await;
}

/// A client refused by a plugin that then neither reads on nor closes keeps its place
/// under `max_http_connections` only until a new connection needs it (after 2 s), like
/// any connection that has not upgraded: it cannot keep new clients out for the whole
/// handshake timeout.
#[tokio::test]
async fn a_refused_client_that_lingers_makes_room_for_a_new_one() {
    let (_dir, config) = gate_setup();
    let config = Config { max_http_connections: 1, handshake_timeout: Duration::from_secs(60), ..config };
    let server = TestServer::start(config).await;
    let mut lingering = TcpStream::connect(server.addr).await.unwrap();
    let request = upgrade_request(server.addr, "/ws/gate?token=guess", "Origin: https://app.example.com\r\n");
    lingering.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0u8; 12];
    lingering.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 403");
    // The one place is taken; a health check gets in once the lingering client has
    // been closed to make room (raw requests give up after 5 s).
    let (status, _) = http_get(server.addr, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), lingering.read_to_end(&mut rest))
        .await
        .expect("the lingering connection was closed")
        .unwrap();
    server.stop().await;
}
