//! Handshake timeouts, idle keep-alive, heartbeats and zombie reaping, on real sockets
//! with short settings (the bounds are the issue's: a reap within interval + timeout
//! + 1 s of the last sign of life).

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt as _;
use roomcast::config::Config;
use roomcast_tests::*;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Whether the server closes `stream` within `bound` (EOF or reset on read).
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_connections_are_closed_and_counted() {
    let server =
        TestServer::start(Config { handshake_timeout: Duration::from_secs(1), ..test_config() }).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let trickle = tokio::spawn({
        let addr = server.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = upgrade_request(addr, "/ws/room", "");
            for byte in request.as_bytes() {
                if stream.write_all(&[*byte]).await.is_err() {
                    return true; // closed under us
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        }
    });
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await, "silent connection still open");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), trickle).await.unwrap().unwrap(),
        "trickling connection was never closed"
    );
    server
        .wait_metric("roomcast_handshakes_rejected_total{reason=\"timeout\"}", 2.0, Duration::from_secs(2))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_sockets_do_not_stop_new_clients() {
    let server =
        TestServer::start(Config { handshake_timeout: Duration::from_secs(3), ..test_config() }).await;
    let mut stalled = Vec::new();
    for i in 0..1000 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            stream.write_all(b"GET /ws/room HTTP/1.1\r\nHost: x\r\n").await.unwrap(); // never finished
        }
        stalled.push(stream);
    }
    // A real client still gets in and talks while they hang.
    let mut a = server.connect("live").await;
    let mut b = server.connect("live").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    send_text(&mut a, "still serving").await;
    assert_eq!(recv_text(&mut b).await, "still serving");
    // Every stalled socket is closed by the timeout.
    for stream in &mut stalled {
        assert!(closed_within(stream, Duration::from_secs(6)).await, "a stalled socket stayed open");
    }
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"timeout\"}").await, 1000.0);
    server.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_is_closed_but_not_counted_as_a_timeout() {
    let server =
        TestServer::start(Config { handshake_timeout: Duration::from_secs(1), ..test_config() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await, "idle keep-alive stayed open");
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"timeout\"}").await, 0.0);
    server.stop().await;
}

fn heartbeat_config() -> Config {
    Config {
        heartbeat_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
        ..test_config()
    }
}

/// interval + timeout + 1 s, measured from the last sign of life.
const REAP_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_or_answers_is_reaped() {
    let server = TestServer::start(heartbeat_config()).await;
    let _zombie = raw_ws(server.addr, "room").await.unwrap();
    server.wait_metric("roomcast_connections", 1.0, Duration::from_secs(1)).await;
    server.wait_metric("roomcast_connections_closed_total{reason=\"heartbeat\"}", 1.0, REAP_BOUND).await;
    assert_eq!(server.metric("roomcast_connections").await, 0.0);
    assert_eq!(server.metric("roomcast_room_members").await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responsive_client_is_kept() {
    let server = TestServer::start(heartbeat_config()).await;
    let mut client = server.connect("room").await;
    // tungstenite answers pings while it reads.
    let reading = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(4), client.next()).await;
        client
    });
    let _client = reading.await.unwrap();
    assert_eq!(server.metric("roomcast_connections").await, 1.0);
    assert_eq!(server.metric("roomcast_connections_closed_total{reason=\"heartbeat\"}").await, 0.0);
    server.stop().await;
}

/// A client process that completes the handshake, then is frozen with SIGSTOP: the
/// kernel keeps its TCP connection alive, but nothing answers pings.
const FROZEN_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /ws/room HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
print(head.split(b" ")[1].decode(), flush=True)
while True:
    s.recv(4096)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_process_is_reaped() {
    let server = TestServer::start(heartbeat_config()).await;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", FROZEN_CLIENT, &server.addr.port().to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 is installed");
    let mut status = String::new();
    tokio::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut status).await.unwrap();
    assert_eq!(status.trim(), "101");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    server.wait_metric("roomcast_connections_closed_total{reason=\"heartbeat\"}", 1.0, REAP_BOUND).await;
    assert_eq!(server.metric("roomcast_connections").await, 0.0);
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    server.stop().await;
}
