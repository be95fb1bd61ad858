//! Broadcast without plugins: every other member gets each message unchanged, in
//! order, with its opcode; a member that never reads is cut off as a slow consumer
//! without slowing anyone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use roomcast::config::Config;
use roomcast_tests::*;
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn members_get_every_message_in_order_with_its_opcode() {
    let server = TestServer::start(test_config()).await;
    let mut a = server.connect("lobby").await;
    let mut b = server.connect("lobby").await;
    let mut c = server.connect("lobby").await;
    let mut other_room = server.connect("elsewhere").await;
    server.wait_metric("roomcast_room_members", 4.0, Duration::from_secs(5)).await;

    a.send(Message::text("hello")).await.unwrap();
    a.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    for i in 0..100 {
        a.send(Message::text(format!("n{i}"))).await.unwrap();
    }
    for client in [&mut b, &mut c] {
        assert_eq!(recv(client).await, Message::text("hello"));
        assert_eq!(recv(client).await, Message::binary(vec![1u8, 2, 3]));
        for i in 0..100 {
            assert_eq!(recv_text(client).await, format!("n{i}"));
        }
    }
    // The sender does not get its own message, and other rooms get nothing.
    b.send(Message::text("from b")).await.unwrap();
    assert_eq!(recv_text(&mut a).await, "from b");
    other_room.send(Message::text("x")).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), a.next()).await.is_err());

    assert_eq!(server.metric("roomcast_messages_in_total").await, 104.0);
    assert_eq!(server.metric("roomcast_messages_out_total").await, 2.0 * 102.0 + 2.0);
    assert_eq!(server.metric("roomcast_rooms").await, 2.0);
    server.stop().await;
}

const MEMBERS: usize = 6;
const EACH: usize = 300;

/// Every member of `room` sends EACH messages as fast as it can while reading; returns
/// what each member received (sender, number), once it has `expect` messages.
async fn burst(server: &TestServer, room: &str, expect: usize) -> Vec<(usize, Vec<(usize, usize)>)> {
    let mut clients = Vec::new();
    for _ in 0..MEMBERS {
        clients.push(server.connect(room).await);
    }
    server.wait_metric("roomcast_room_members", MEMBERS as f64, Duration::from_secs(5)).await;
    let mut tasks = Vec::new();
    for (me, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = client.split();
            let send = async move {
                for i in 0..EACH {
                    sink.feed(Message::text(format!("{me}:{i}"))).await.unwrap();
                }
                sink.flush().await.unwrap();
                sink
            };
            let receive = async move {
                let mut seen = Vec::new();
                while seen.len() < expect {
                    let message = tokio::time::timeout(Duration::from_secs(20), stream.next())
                        .await
                        .expect("a message within 20 s")
                        .expect("connection open")
                        .expect("websocket");
                    if let Message::Text(text) = message {
                        let (from, i) = text.split_once(':').unwrap();
                        seen.push((from.parse::<usize>().unwrap(), i.parse::<usize>().unwrap()));
                    }
                }
                seen
            };
            let (_sink, seen) = tokio::join!(send, receive);
            (me, seen)
        }));
    }
    let mut views = Vec::new();
    for task in tasks {
        views.push(task.await.unwrap());
    }
    views
}

/// Each member got every other member's messages in order and none of its own, and any
/// two members agree on the order of the messages they both got.
fn assert_one_order(views: &[(usize, Vec<(usize, usize)>)]) {
    for (me, seen) in views {
        assert!(seen.iter().all(|(from, _)| from != me), "member {me} got its own message");
        for from in (0..MEMBERS).filter(|from| from != me) {
            let numbers: Vec<usize> = seen.iter().filter(|(f, _)| *f == from).map(|(_, i)| *i).collect();
            assert_eq!(numbers, (0..EACH).collect::<Vec<_>>(), "member {me}: messages of {from}");
        }
    }
    for (a, seen_a) in views {
        for (b, seen_b) in views {
            let common = |seen: &Vec<(usize, usize)>| -> Vec<(usize, usize)> {
                seen.iter().copied().filter(|(from, _)| from != a && from != b).collect()
            };
            assert_eq!(common(seen_a), common(seen_b), "members {a} and {b} disagree on the order");
        }
    }
}

/// Members sending all at once: the room takes what waits in its inbox as a batch, and
/// its deliveries go out member by member. Nothing is lost, doubled or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_senders_are_seen_in_one_order_by_everyone() {
    let server = TestServer::start(test_config()).await;
    assert_one_order(&burst(&server, "burst", (MEMBERS - 1) * EACH).await);
    server.stop().await;
}

/// The same through plugins, whose calls run one message at a time inside a batch:
/// `relay` passes every message on, `echo` sends each back to its sender only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_through_plugins_keep_every_plugin_decision_in_order() {
    let dir = PluginDir::new(&[("relay", None), ("echo", None)]);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    assert_one_order(&burst(&server, "relay", (MEMBERS - 1) * EACH).await);
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;
    for (me, seen) in burst(&server, "echo", EACH).await {
        let expected: Vec<(usize, usize)> = (0..EACH).map(|i| (me, i)).collect();
        assert_eq!(seen, expected, "member {me} gets its own messages back, in order, and nothing else");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_and_everyone_else_gets_everything() {
    // It measures the resident memory of the process: no other test may run in it.
    if !alone_in_a_process() {
        return;
    }
    let config = roomcast::config::Config { max_queue_bytes: 256 << 10, ..test_config() };
    let server = TestServer::start(config).await;
    const READERS: usize = 50;
    // 3000 x 4 KiB = 12 MiB: many times the 256 KiB budget plus what the kernel's
    // socket buffers absorb for the stalled client.
    const MESSAGES: usize = 3000;
    // Readers keep up: the sender stays at most this many messages ahead of the
    // slowest reader, well inside their budget.
    const WINDOW: usize = 32;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(server.connect("fanout").await);
    }
    // The stalled member completes the handshake with a small receive buffer, then
    // never reads again.
    let mut stalled = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(server.addr).await.unwrap();
        stream.write_all(upgrade_request(server.addr, "/ws/fanout", "").as_bytes()).await.unwrap();
        stream
    };
    let mut sender = server.connect("fanout").await;
    server.wait_metric("roomcast_room_members", (READERS + 2) as f64, Duration::from_secs(5)).await;
    let rss_before = rss_kib();

    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..READERS).map(|_| AtomicUsize::new(0)).collect());
    let mut tasks = Vec::new();
    for (n, mut reader) in readers.into_iter().enumerate() {
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..MESSAGES {
                match recv(&mut reader).await {
                    Message::Binary(data) => {
                        assert_eq!(data.len(), 4096);
                        assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), i as u32, "order");
                    }
                    other => panic!("reader {n} got {other:?} at message {i}"),
                }
                progress[n].store(i + 1, Ordering::Relaxed);
            }
            reader
        }));
    }
    for i in 0..MESSAGES {
        while progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap() + WINDOW < i {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut data = vec![0u8; 4096];
        data[..4].copy_from_slice(&(i as u32).to_be_bytes());
        sender.send(Message::binary(data)).await.unwrap();
    }
    let mut readers = Vec::new();
    for task in tasks {
        readers.push(
            tokio::time::timeout(Duration::from_secs(60), task).await.expect("reader finished").unwrap(),
        );
    }

    server
        .wait_metric(
            "roomcast_connections_closed_total{reason=\"slow_consumer\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    server.wait_metric("roomcast_room_members", (READERS + 1) as f64, Duration::from_secs(5)).await;
    let rss_after = rss_kib();
    println!("RSS (test process, server and clients) before fan-out {rss_before} KiB, after {rss_after} KiB");
    assert!(rss_after < rss_before + 64 * 1024, "memory stayed bounded");
    // The stalled client finds the data that fit as whole frames, in order, then a
    // 1008 close (or the end of the stream, if the close could not be written in time):
    // never a frame cut short and followed by anything else.
    read_upgrade_response(&mut stalled).await.unwrap();
    let mut next = 0u32;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stalled)).await {
            Ok(Ok((0x2, data))) => {
                assert_eq!(data.len(), 4096, "a whole message");
                assert_eq!(u32::from_be_bytes(data[..4].try_into().unwrap()), next, "order");
                next += 1;
            }
            Ok(Ok((0x9, _))) => {}
            Ok(Ok((0x8, payload))) => {
                break payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]]));
            }
            Ok(Ok((opcode, payload))) => {
                panic!("opcode {opcode} ({} bytes) after {next} messages", payload.len())
            }
            _ => break None,
        }
    };
    println!("the stalled client read {next} messages, then close code {code:?}");
    assert!(code == Some(1008) || code.is_none(), "close code {code:?}");
    server.stop().await;
}
