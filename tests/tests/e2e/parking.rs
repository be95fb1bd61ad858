//! Parked sessions: an idle plain-TCP connection gives up its task, and still gets what
//! every connection gets (broadcasts, its own messages through, pings, a reap when it
//! stops answering, the shutdown's close), on real sockets.

use std::time::Duration;

use futures_util::SinkExt as _;
use roomcast::config::Config;
use roomcast_tests::*;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

const PARKED: &str = "roomcast_connections_parked";
/// A session parks 100 ms after its last activity; the bound is generous.
const PARK_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_park_and_still_send_and_receive() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.connect("room").await;
    let mut b = server.connect("room").await;
    server.wait_metric(PARKED, 2.0, PARK_BOUND).await;
    for round in 0..3 {
        a.send(Message::text(format!("hello {round}"))).await.unwrap();
        assert_eq!(recv_text(&mut b).await, format!("hello {round}"));
        // Both wait without a task again: the sender once its message is handled, the
        // receiver all along (the room wrote to its socket).
        server.wait_metric(PARKED, 2.0, PARK_BOUND).await;
    }
    b.send(Message::text("back")).await.unwrap();
    assert_eq!(recv_text(&mut a).await, "back");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_hold_no_task() {
    let server = TestServer::start(test_config()).await;
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let _first = raw_ws(server.addr, "idle").await.unwrap();
    server.wait_metric(PARKED, 1.0, PARK_BOUND).await;
    let before = tasks();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(raw_ws(server.addr, "idle").await.unwrap());
    }
    server.wait_metric(PARKED, 201.0, PARK_BOUND).await;
    let after = tasks();
    assert!(after < before + 20, "{after} tasks with 201 parked connections, {before} with one");
    assert_eq!(server.metric("roomcast_room_members").await, 201.0);
    server.stop().await;
}

/// A masked, empty pong, as a client sends it.
const PONG: [u8; 6] = [0x8A, 0x80, 1, 2, 3, 4];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_pinged_and_kept_while_it_answers_then_reaped() {
    let config = Config {
        heartbeat_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(1),
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let mut stream = raw_ws(server.addr, "room").await.unwrap();
    for _ in 0..3 {
        server.wait_metric(PARKED, 1.0, PARK_BOUND).await;
        // The ping comes within the interval (plus the wheel's slack) of the last pong.
        let (opcode, _) = tokio::time::timeout(Duration::from_secs(2), read_frame(&mut stream))
            .await
            .expect("a ping within the interval")
            .unwrap();
        assert_eq!(opcode, 0x9, "a ping");
        stream.write_all(&PONG).await.unwrap();
    }
    assert_eq!(server.metric("roomcast_connections").await, 1.0);
    assert_eq!(server.metric("roomcast_connections_closed_total{reason=\"heartbeat\"}").await, 0.0);
    // It stops answering: reaped within interval + timeout + 1 s of its last pong.
    server
        .wait_metric("roomcast_connections_closed_total{reason=\"heartbeat\"}", 1.0, Duration::from_secs(3))
        .await;
    assert_eq!(server.metric("roomcast_room_members").await, 0.0);
    assert_eq!(server.metric(PARKED).await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wakes_parked_connections_with_1001() {
    let server = TestServer::start(test_config()).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(raw_ws(server.addr, "room").await.unwrap());
    }
    server.wait_metric(PARKED, 20.0, PARK_BOUND).await;
    let stopping = tokio::spawn(server.stop());
    for stream in &mut streams {
        assert_eq!(read_close(stream).await, Some(1001));
    }
    drop(streams);
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("the server stops").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_member_that_never_reads_is_cut_off_as_a_slow_consumer() {
    let config = Config { max_queue_bytes: 64 * 1024, ..test_config() };
    let server = TestServer::start(config).await;
    let mut sender = server.connect("room").await;
    let _never_reads = raw_ws(server.addr, "room").await.unwrap();
    server.wait_metric(PARKED, 2.0, PARK_BOUND).await;
    let chunk = "x".repeat(16 * 1024);
    // The kernel's buffers take several megabytes before the queue fills.
    for _ in 0..4000 {
        if sender.send(Message::text(chunk.clone())).await.is_err() {
            break;
        }
        if server.metrics.closed_count(roomcast::types::CloseReason::SlowConsumer) > 0 {
            break;
        }
    }
    server
        .wait_metric(
            "roomcast_connections_closed_total{reason=\"slow_consumer\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(server.metric("roomcast_room_members").await, 1.0);
    server.stop().await;
}
