//! Rooms never leak: thousands of connections leave through every way a session can
//! end, and afterwards no connection, room or member is left behind.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::SinkExt as _;
use roomcast::config::Config;
use roomcast::types::CloseReason;
use roomcast::ws::frame::{OP_BINARY, OP_TEXT, encode_client};
use roomcast_tests::*;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

const MASK: [u8; 4] = [9, 8, 7, 6];

/// Run `count` copies of `f(i)` with at most 100 at a time.
async fn batched<F, Fut>(count: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = Vec::new();
    for i in 0..count {
        tasks.push(tokio::spawn(f(i)));
        if tasks.len() == 100 {
            for task in tasks.drain(..) {
                task.await.unwrap();
            }
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_leaving_leaves_nothing_behind() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(500),
        pong_timeout: Duration::from_millis(500),
        max_message_bytes: 1024,
        max_queue_bytes: 64 << 10,
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let room = |i: usize| format!("churn-{}", i % 37);

    // Clean close by the client.
    batched(1500, |i| async move {
        let (mut client, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{}", room(i))).await.unwrap();
        client.send(Message::text("hi")).await.unwrap();
        client.close(None).await.unwrap();
        // Finish the close handshake, so unread data cannot turn our close into a reset.
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
    })
    .await;
    // TCP dropped without a close frame.
    batched(1000, |i| async move {
        let stream = raw_ws(addr, &room(i)).await.unwrap();
        drop(stream);
    })
    .await;
    // A message over the limit (1009) and a protocol error (1002).
    batched(300, |i| async move {
        let mut stream = raw_ws(addr, &room(i)).await.unwrap();
        stream.write_all(&encode_client(true, OP_BINARY, &[0; 2048], MASK)).await.unwrap();
        assert_eq!(read_close(&mut stream).await, Some(1009));
    })
    .await;
    batched(300, |i| async move {
        let mut stream = raw_ws(addr, &room(i)).await.unwrap();
        let mut bad = encode_client(true, OP_TEXT, b"x", MASK);
        bad[0] |= 0x40;
        stream.write_all(&bad).await.unwrap();
        assert_eq!(read_close(&mut stream).await, Some(1002));
    })
    .await;
    // Zombies reaped by the heartbeat.
    let mut zombies = Vec::new();
    for i in 0..300 {
        zombies.push(raw_ws(addr, &room(i)).await.unwrap());
    }
    server
        .wait_metric("roomcast_connections_closed_total{reason=\"heartbeat\"}", 300.0, Duration::from_secs(5))
        .await;
    drop(zombies);
    // Slow consumers: members that never read while the room floods.
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(upgrade_request(addr, "/ws/flood", "").as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let mut flooder = server.connect("flood").await;
    server.wait_metric("roomcast_room_members", 6.0, Duration::from_secs(5)).await;
    while server.metrics.closed_count(CloseReason::SlowConsumer) < 5 {
        flooder.send(Message::binary(vec![0u8; 1000])).await.unwrap();
    }
    flooder.close(None).await.unwrap();
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut flooder).await {}

    server.wait_metric("roomcast_connections", 0.0, Duration::from_secs(5)).await;
    server.wait_metric("roomcast_rooms", 0.0, Duration::from_secs(5)).await;
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;

    // Shutdown: sessions still open when the server stops leave too. Each client reads
    // (and so answers the 500 ms heartbeat) until the server closes it.
    let mut open = Vec::new();
    for i in 0..500 {
        let mut client = server.connect(&room(i)).await;
        open.push(tokio::spawn(async move {
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
        }));
    }
    server.wait_metric("roomcast_connections", 500.0, Duration::from_secs(5)).await;
    let metrics = server.metrics.clone();
    server.stop().await;
    assert_eq!(metrics.closed_count(CloseReason::Shutdown), 500);
    assert_eq!(metrics.connections.load(Relaxed), 0);
    assert_eq!(metrics.rooms.load(Relaxed), 0);
    assert_eq!(metrics.room_members.load(Relaxed), 0);
    assert_eq!(metrics.closed_count(CloseReason::Client), 1501);
    assert_eq!(metrics.closed_count(CloseReason::Reset), 1000);
    assert_eq!(metrics.closed_count(CloseReason::TooBig), 300);
    assert_eq!(metrics.closed_count(CloseReason::Protocol), 300);
    assert_eq!(metrics.closed_count(CloseReason::Heartbeat), 300);
    assert_eq!(metrics.closed_count(CloseReason::SlowConsumer), 5);
}

#[tokio::test]
async fn shutdown_turns_healthz_503_then_sends_1001() {
    let server = TestServer::start(Config { drain_delay: Duration::from_secs(1), ..test_config() }).await;
    let mut member = raw_ws(server.addr, "room").await.unwrap();
    server.wait_metric("roomcast_connections", 1.0, Duration::from_secs(5)).await;
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    // During the drain delay: health checks fail and upgrades are refused.
    let mut saw_503 = false;
    for _ in 0..50 {
        if http_get(addr, "/healthz").await.ok().map(|(status, _)| status) == Some(503) {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/healthz never answered 503 during the drain");
    let refused = raw_request(addr, upgrade_request(addr, "/ws/room", "").as_bytes()).await.unwrap();
    assert_eq!(status_of(&refused), Some(503), "{refused}");
    // Then the member gets 1001 and run returns.
    assert_eq!(read_close(&mut member).await, Some(1001));
    drop(member);
    tokio::time::timeout(Duration::from_secs(5), stopping).await.expect("run returned").unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_many_rooms_leave_every_room_whichever_way_they_end() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(500),
        pong_timeout: Duration::from_millis(500),
        max_message_bytes: 1024,
        ..test_config()
    };
    let server = TestServer::start(config).await;
    let addr = server.addr;
    // Each client joins 10 of 23 rooms (overlapping), then ends its own way: a close,
    // a dropped TCP connection, a leave of some rooms first, a protocol error, a
    // message over the limit.
    batched(600, |i| async move {
        let mut client = connect_rooms(addr, "/ws").await;
        for k in 0..10 {
            let room = format!("multi-{}", (i + k * 7) % 23);
            client.send(Message::text(format!(r#"{{"join":"{room}","ref":{k}}}"#))).await.unwrap();
            let joined = recv_json(&mut client).await;
            assert_eq!(joined["joined"], room.as_str(), "{joined}");
        }
        match i % 5 {
            0 => {
                client.close(None).await.unwrap();
                while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
            }
            1 => drop(client),
            2 => {
                for k in 0..3 {
                    let room = format!("multi-{}", (i + k * 7) % 23);
                    client.send(Message::text(format!(r#"{{"leave":"{room}","ref":{k}}}"#))).await.unwrap();
                }
                drop(client);
            }
            3 => {
                client.send(Message::text("not an operation")).await.unwrap();
                while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
            }
            _ => {
                let big = format!(r#"{{"send":"multi-{}","text":"{}"}}"#, i % 23, "x".repeat(2000));
                let _ = client.send(Message::text(big)).await;
                while let Some(Ok(_)) = futures_util::StreamExt::next(&mut client).await {}
            }
        }
    })
    .await;
    server.wait_metric("roomcast_connections", 0.0, Duration::from_secs(5)).await;
    server.wait_metric("roomcast_rooms", 0.0, Duration::from_secs(5)).await;
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;
    let metrics = server.metrics.clone();
    server.stop().await;
    assert_eq!(metrics.closed_count(CloseReason::Protocol), 120);
    assert_eq!(metrics.closed_count(CloseReason::TooBig), 120);
}
