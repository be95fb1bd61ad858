//! Handshake validation over raw TCP: each malformed request gets the right status,
//! header and one-line reason before any upgrade, and is counted by reason.

use std::time::Duration;

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
