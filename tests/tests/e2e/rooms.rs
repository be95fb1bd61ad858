//! Room-protocol mode (`roomcast.v1`): one connection in many rooms, joins gated by the
//! rooms' plugins, refusals that keep the connection, a plugin's close that ends one
//! membership, and leaving every room in one step.

use std::time::Duration;

use futures_util::SinkExt as _;
use roomcast_tests::roomcast::config::Config;
use roomcast_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn send_json(client: &mut Client, value: Value) {
    send_text(client, &value.to_string()).await;
}

/// The room prefix of a binary message: one byte of length, then the name.
fn prefixed(room: &str, payload: &[u8]) -> Vec<u8> {
    let mut message = vec![room.len() as u8];
    message.extend_from_slice(room.as_bytes());
    message.extend_from_slice(payload);
    message
}

async fn recv_binary(client: &mut Client) -> Vec<u8> {
    match recv(client).await {
        Message::Binary(data) => data.to_vec(),
        other => panic!("expected binary, got {other:?}"),
    }
}

/// Nothing but pings arrives for `wait`.
async fn quiet(client: &mut Client, wait: Duration) -> bool {
    match tokio::time::timeout(wait, recv(client)).await {
        Err(_) => true,
        Ok(message) => panic!("expected nothing, got {message:?}"),
    }
}

#[tokio::test]
async fn one_connection_is_in_several_rooms_at_once() {
    let server = TestServer::start(test_config()).await;
    let mut multi = connect_rooms(server.addr, "/ws").await;
    send_json(&mut multi, json!({"join": "a", "ref": 1})).await;
    assert_eq!(recv_json(&mut multi).await, json!({"joined": "a", "ref": 1}));
    send_json(&mut multi, json!({"join": "b", "ref": 2})).await;
    assert_eq!(recv_json(&mut multi).await, json!({"joined": "b", "ref": 2}));
    // Raw members of each room see the multi-room member as one of theirs.
    let mut in_a = server.connect("a").await;
    let mut in_b = server.connect("b").await;
    server.wait_metric("roomcast_room_members", 4.0, Duration::from_secs(5)).await;

    send_text(&mut in_a, "hello a").await;
    assert_eq!(recv_json(&mut multi).await, json!({"room": "a", "text": "hello a"}));
    in_b.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv_binary(&mut multi).await, prefixed("b", &[1, 2, 3]));

    send_json(&mut multi, json!({"send": "a", "text": "to a, \"quoted\""})).await;
    assert_eq!(recv_text(&mut in_a).await, "to a, \"quoted\"");
    multi.send(Message::binary(prefixed("b", b"\x00\xff"))).await.unwrap();
    assert_eq!(recv_binary(&mut in_b).await, b"\x00\xff");
    assert!(quiet(&mut in_b, Duration::from_millis(200)).await, "room a's message stayed in a");

    // Closing the connection leaves both rooms in one step.
    multi.close(None).await.unwrap();
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test]
async fn the_room_in_the_path_is_joined_first() {
    let server = TestServer::start(test_config()).await;
    let mut multi = connect_rooms(server.addr, "/ws/lobby").await;
    assert_eq!(recv_json(&mut multi).await, json!({"joined": "lobby", "ref": 0}));
    let mut raw = server.connect("lobby").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    send_text(&mut raw, "hi").await;
    assert_eq!(recv_json(&mut multi).await, json!({"room": "lobby", "text": "hi"}));
    server.stop().await;
}

#[tokio::test]
async fn refusals_answer_and_keep_the_connection() {
    let config = Config { max_rooms_per_connection: 2, ..test_config() };
    let server = TestServer::start(config).await;
    let mut client = connect_rooms(server.addr, "/ws").await;
    let cases = [
        (
            json!({"send": "a", "text": "x", "ref": 1}),
            json!({"error": "not in room", "status": 404, "ref": 1}),
        ),
        (json!({"join": "no spaces", "ref": 2}), json!({"error": "bad room name", "status": 400, "ref": 2})),
        (json!({"leave": "a", "ref": 3}), json!({"error": "not in room", "status": 404, "ref": 3})),
        (json!({"join": 7, "ref": 4}), json!({"error": "malformed operation", "status": 400, "ref": 4})),
    ];
    for (request, answer) in cases {
        send_json(&mut client, request).await;
        assert_eq!(recv_json(&mut client).await, answer);
    }
    send_json(&mut client, json!({"join": "a", "ref": 5})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "a", "ref": 5}));
    send_json(&mut client, json!({"join": "a", "ref": 6})).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"error": "already in room", "status": 409, "room": "a", "ref": 6})
    );
    send_json(&mut client, json!({"join": "b", "ref": 7})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "b", "ref": 7}));
    send_json(&mut client, json!({"join": "c", "ref": 8})).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"error": "too many rooms", "status": 429, "room": "c", "ref": 8})
    );
    // A binary message for a room the client is not in is refused too.
    client.send(Message::binary(prefixed("c", b"x"))).await.unwrap();
    assert_eq!(recv_json(&mut client).await, json!({"error": "not in room", "status": 404}));
    server.stop().await;
}

#[tokio::test]
async fn a_frame_that_is_not_an_operation_closes_with_1002() {
    let server = TestServer::start(test_config()).await;
    for bad in ["hello", "[1]", r#"{"publish":"a"}"#] {
        let mut client = connect_rooms(server.addr, "/ws").await;
        send_text(&mut client, bad).await;
        let code = match recv(&mut client).await {
            Message::Close(frame) => frame.map(|f| u16::from(f.code)),
            other => panic!("expected a close for {bad:?}, got {other:?}"),
        };
        assert_eq!(code, Some(1002), "{bad:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn get_ws_without_the_room_protocol_is_not_found() {
    let server = TestServer::start(test_config()).await;
    let response =
        raw_request(server.addr, upgrade_request(server.addr, "/ws", "").as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(404), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn leave_answers_left_and_the_room_sends_nothing_after() {
    let server = TestServer::start(test_config()).await;
    let mut client = connect_rooms(server.addr, "/ws").await;
    send_json(&mut client, json!({"join": "a", "ref": 1})).await;
    recv_json(&mut client).await;
    let mut other = server.connect("a").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    send_json(&mut client, json!({"leave": "a", "ref": 2})).await;
    assert_eq!(recv_json(&mut client).await, json!({"left": "a", "ref": 2, "code": 1000, "reason": ""}));
    server.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
    send_text(&mut other, "after the leave").await;
    assert!(quiet(&mut client, Duration::from_millis(300)).await);
    // The connection is still up: it can join again.
    send_json(&mut client, json!({"join": "a", "ref": 3})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "a", "ref": 3}));
    server.stop().await;
}

#[tokio::test]
async fn joins_go_through_the_rooms_plugin() {
    let manifest = "[config]\ntoken = \"s3cret\"\n";
    let dir = PluginDir::new(&[("gate", Some(manifest))]);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    let mut without = connect_rooms(server.addr, "/ws").await;
    send_json(&mut without, json!({"join": "gate", "ref": 1})).await;
    assert_eq!(
        recv_json(&mut without).await,
        json!({"error": "bad token", "status": 403, "room": "gate", "ref": 1})
    );
    // A room without a plugin is open to the same connection.
    send_json(&mut without, json!({"join": "open", "ref": 2})).await;
    assert_eq!(recv_json(&mut without).await, json!({"joined": "open", "ref": 2}));
    // The upgrade's query is what the plugin sees for every join.
    let mut with = connect_rooms(server.addr, "/ws?token=s3cret").await;
    send_json(&mut with, json!({"join": "gate", "ref": 1})).await;
    assert_eq!(recv_json(&mut with).await, json!({"joined": "gate", "ref": 1}));
    server.stop().await;
}

#[tokio::test]
async fn a_plugins_close_ends_that_membership_only() {
    let manifest = r#"
[config]
rate_limit = { messages = 1, per_ms = 60000 }
close_after = 1
"#;
    let dir = PluginDir::new(&[("moderation", Some(manifest))]);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    let mut client = connect_rooms(server.addr, "/ws").await;
    for (room, reference) in [("moderation", 1), ("other", 2)] {
        send_json(&mut client, json!({"join": room, "ref": reference})).await;
        recv_json(&mut client).await;
    }
    let mut peer = server.connect("other").await;
    server.wait_metric("roomcast_room_members", 3.0, Duration::from_secs(5)).await;
    // One message per minute: the second is a violation, and one violation closes.
    send_json(&mut client, json!({"send": "moderation", "text": "one"})).await;
    send_json(&mut client, json!({"send": "moderation", "text": "two"})).await;
    let notice = recv_json(&mut client).await;
    assert_eq!(notice["room"], "moderation", "{notice}");
    let left = recv_json(&mut client).await;
    assert_eq!(left, json!({"left": "moderation", "code": 1008, "reason": "rate limit"}));
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    // The connection and its other room go on.
    send_json(&mut client, json!({"send": "other", "text": "still here"})).await;
    assert_eq!(recv_text(&mut peer).await, "still here");
    send_json(&mut client, json!({"send": "moderation", "text": "x", "ref": 9})).await;
    assert_eq!(recv_json(&mut client).await, json!({"error": "not in room", "status": 404, "ref": 9}));
    server.stop().await;
}

/// Every refusal is an answer queued for the client: one that floods refused
/// operations and never reads fills its outbound queue and is cut as a slow consumer,
/// like one that never reads a room's messages.
#[tokio::test]
async fn a_client_that_floods_refusals_and_never_reads_is_cut() {
    use roomcast::types::CloseReason;
    use roomcast::ws::frame::{OP_TEXT, encode_client};
    use tokio::io::AsyncWriteExt as _;

    let server = TestServer::start(Config { max_queue_bytes: 64 << 10, ..test_config() }).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let upgrade = upgrade_request(server.addr, "/ws", "Sec-WebSocket-Protocol: roomcast.v1\r\n");
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let refused = encode_client(true, OP_TEXT, br#"{"send":"nowhere","text":"x","ref":1}"#, [1, 2, 3, 4]);
    let burst: Vec<u8> = refused.iter().copied().cycle().take(refused.len() * 1000).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.metrics.closed_count(CloseReason::SlowConsumer) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never cut as a slow consumer");
        // A write error means the server closed the connection: check the count again.
        if stream.write_all(&burst).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.wait_metric("roomcast_connections", 0.0, Duration::from_secs(5)).await;
    server.stop().await;
}
