//! The example plugins end to end: a real server loads the real `.wasm` files, real
//! clients talk through them, and misbehaving plugins lose only their room's instance.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use roomcast::config::Config;
use roomcast_tests::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

async fn server_with(plugins: &PluginDir) -> TestServer {
    TestServer::start(Config { plugins: Some(plugins.path.clone()), ..test_config() }).await
}

async fn silent(client: &mut Client) -> bool {
    tokio::time::timeout(Duration::from_millis(300), client.next()).await.is_err()
}

#[tokio::test]
async fn echo_answers_only_the_sender() {
    let dir = PluginDir::new(&[("echo", None)]);
    let server = server_with(&dir).await;
    let mut a = server.connect("echo").await;
    let mut b = server.connect("echo:other").await;
    let mut c = server.connect("echo").await;
    a.send(Message::text("hello")).await.unwrap();
    a.send(Message::binary(vec![0u8, 159, 146, 150])).await.unwrap();
    assert_eq!(recv(&mut a).await, Message::text("hello"));
    assert_eq!(recv(&mut a).await, Message::binary(vec![0u8, 159, 146, 150]));
    assert!(silent(&mut c).await, "echo does not broadcast");
    b.send(Message::text("b")).await.unwrap();
    assert_eq!(recv_text(&mut b).await, "b", "echo:other is served by echo too");
    let ok_calls = server.metric("roomcast_plugin_calls_total{plugin=\"echo\",outcome=\"ok\"}").await;
    assert!(ok_calls > 0.0);
    server.stop().await;
}

#[tokio::test]
async fn rooms_without_a_plugin_keep_the_default() {
    let dir = PluginDir::new(&[("echo", None)]);
    let server = server_with(&dir).await;
    let mut a = server.connect("plain").await;
    let mut b = server.connect("plain").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    a.send(Message::text("hi")).await.unwrap();
    assert_eq!(recv_text(&mut b).await, "hi");
    server.stop().await;
}

#[tokio::test]
async fn chat_names_members_and_routes_direct_messages() {
    let dir = PluginDir::new(&[("chat", None)]);
    let server = server_with(&dir).await;
    let (mut ann, _) =
        tokio_tungstenite::connect_async(format!("{}?name=ann", server.url("chat:lobby"))).await.unwrap();
    let welcome = recv_json(&mut ann).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["name"], "ann");
    let ann_id = welcome["id"].as_u64().unwrap();
    let (mut bob, _) =
        tokio_tungstenite::connect_async(format!("{}?name=bob%20b", server.url("chat:lobby"))).await.unwrap();
    let welcome = recv_json(&mut bob).await;
    let bob_id = welcome["id"].as_u64().unwrap();
    assert_eq!(welcome["members"], json!([{"id": ann_id, "name": "ann"}, {"id": bob_id, "name": "bob b"}]));
    assert_eq!(recv_json(&mut ann).await, json!({"type": "join", "id": bob_id, "name": "bob b"}));

    send_text(&mut ann, r#"{"say":"hi all"}"#).await;
    let said = json!({"type": "say", "from": ann_id, "name": "ann", "text": "hi all"});
    assert_eq!(recv_json(&mut ann).await, said);
    assert_eq!(recv_json(&mut bob).await, said);

    let (mut cat, _) =
        tokio_tungstenite::connect_async(format!("{}?name=cat", server.url("chat:lobby"))).await.unwrap();
    let cat_id = recv_json(&mut cat).await["id"].as_u64().unwrap();
    recv_json(&mut ann).await; // cat joined
    recv_json(&mut bob).await;
    send_text(&mut bob, &format!(r#"{{"to":{ann_id},"say":"psst"}}"#)).await;
    let direct = recv_json(&mut ann).await;
    assert_eq!(direct["type"], "direct");
    assert_eq!(direct["text"], "psst");
    assert_eq!(recv_json(&mut bob).await["type"], "direct", "the sender gets its copy");
    assert!(silent(&mut cat).await, "a direct message reaches nobody else");

    send_text(&mut bob, r#"{"to":999999,"say":"?"}"#).await;
    assert_eq!(recv_json(&mut bob).await["type"], "error");
    cat.close(None).await.unwrap();
    assert_eq!(recv_json(&mut ann).await, json!({"type": "leave", "id": cat_id, "name": "cat"}));
    server.stop().await;
}

#[tokio::test]
async fn moderation_drops_banned_words_long_texts_and_floods() {
    let manifest = r#"
[config]
banned_words = ["spam"]
max_length = 20
rate_limit = { messages = 3, per_ms = 60000 }
close_after = 1
"#;
    let dir = PluginDir::new(&[("moderation", Some(manifest))]);
    let server = server_with(&dir).await;
    let mut a = server.connect("moderation").await;
    let mut b = server.connect("moderation").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    send_text(&mut a, "buy SPAM now").await;
    assert_eq!(recv_json(&mut a).await, json!({"type": "moderation", "reason": "banned word"}));
    send_text(&mut a, &"x".repeat(21)).await;
    assert_eq!(recv_json(&mut a).await, json!({"type": "moderation", "reason": "too long"}));
    send_text(&mut a, "fine").await;
    assert_eq!(recv_text(&mut b).await, "fine", "clean messages pass");
    // The rate limit (3 per minute) is spent by now; sustained excess closes with 1008.
    send_text(&mut a, "one more").await;
    assert_eq!(recv_json(&mut a).await, json!({"type": "moderation", "reason": "rate limited"}));
    let mut closed = None;
    for _ in 0..5 {
        if a.send(Message::text("again")).await.is_err() {
            break;
        }
    }
    while let Some(Ok(message)) = a.next().await {
        if let Message::Close(frame) = message {
            closed = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(closed, Some(1008));
    assert!(silent(&mut b).await, "nothing dropped reached the other member");
    server
        .wait_metric("roomcast_connections_closed_total{reason=\"plugin\"}", 1.0, Duration::from_secs(5))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn gate_checks_origin_and_token() {
    let (_dir, config) = gate_setup();
    let server = TestServer::start(config).await;
    let attempt = |origin: &'static str, query: &'static str| {
        let request =
            upgrade_request(server.addr, &format!("/ws/gate{query}"), &format!("Origin: {origin}\r\n"));
        let addr = server.addr;
        async move { raw_request(addr, request.as_bytes()).await.unwrap() }
    };
    let ok = attempt("https://app.example.com", "?token=s3cret").await;
    assert_eq!(status_of(&ok), Some(101), "{ok}");
    let bad_origin = attempt("https://evil.example", "?token=s3cret").await;
    assert_eq!(status_of(&bad_origin), Some(403));
    assert!(bad_origin.contains("origin not allowed"), "{bad_origin}");
    let bad_token = attempt("https://app.example.com", "?token=guess").await;
    assert_eq!(status_of(&bad_token), Some(403));
    assert!(bad_token.contains("bad token"), "{bad_token}");
    let no_token = attempt("https://app.example.com", "").await;
    assert_eq!(status_of(&no_token), Some(403));
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"plugin\"}").await, 3.0);
    server.stop().await;
}

#[tokio::test]
async fn lobby_forwards_into_a_chat_room() {
    let dir = PluginDir::new(&[("lobby", None), ("chat", None)]);
    let server = server_with(&dir).await;
    let (mut listener, _) =
        tokio_tungstenite::connect_async(format!("{}?name=lis", server.url("chat:x"))).await.unwrap();
    recv_json(&mut listener).await; // welcome
    let mut sender = server.connect("lobby").await;
    send_text(&mut sender, r#"{"room":"chat:x","say":"hello from the lobby"}"#).await;
    assert_eq!(recv_json(&mut sender).await, json!({"type": "forwarded", "room": "chat:x"}));
    assert_eq!(
        recv_json(&mut listener).await,
        json!({"type": "say", "from_room": "lobby", "text": "hello from the lobby"})
    );
    send_text(&mut sender, r#"{"room":"chat:nobody","say":"?"}"#).await;
    assert_eq!(recv_json(&mut sender).await["type"], "error");
    server.stop().await;
}

#[tokio::test]
async fn subprotocols_are_only_those_a_plugin_chooses() {
    // Without a plugin choosing one, no subprotocol is agreed.
    let server = TestServer::start(test_config()).await;
    let mut request = server.url("room").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "v1.chat".parse().unwrap());
    let result = tokio_tungstenite::connect_async(request).await;
    // tungstenite refuses a server that ignores an offered protocol; either way the
    // server did not invent one.
    if let Ok((_, response)) = result {
        assert!(response.headers().get("sec-websocket-protocol").is_none());
    }
    server.stop().await;
}

/// The misbehaving plugin: a room whose plugin loops, allocates without end, panics
/// or bursts loses only that instance; the room continues on a fresh one, and other
/// rooms never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_plugin_loses_only_its_instance() {
    let dir = PluginDir::new(&[("chaos", None)]);
    // The same plugin as `hog`, with a small memory cap and a deadline long enough
    // for the allocation to reach it (a debug host grows memory slowly).
    dir.install("chaos", "hog");
    std::fs::write(dir.path.join("hog.toml"), "[limits]\nmemory = \"4MiB\"\ndeadline = \"1s\"\n").unwrap();
    let server = server_with(&dir).await;
    let mut bystander_a = server.connect("bystander").await;
    let mut bystander_b = server.connect("bystander").await;
    let mut other_chaos = server.connect("chaos:calm").await;
    server.wait_metric("roomcast_room_members", 3.0, Duration::from_secs(5)).await;

    for (room, command, plugin, outcome) in [
        ("chaos", "spin", "chaos", "timeout"),
        ("hog", "hog", "hog", "memory"),
        ("chaos", "panic", "chaos", "trap"),
        ("chaos:burst", "burst", "chaos", "timeout"),
    ] {
        let mut victim = server.connect(room).await;
        let mut witness = server.connect(room).await;
        let series = format!("roomcast_plugin_calls_total{{plugin=\"{plugin}\",outcome=\"{outcome}\"}}");
        let before = server.metric(&series).await;
        send_text(&mut victim, command).await;
        server.wait_metric(&series, before + 1.0, Duration::from_secs(10)).await;
        // The room continues on a fresh instance that knows both members.
        send_text(&mut victim, "members").await;
        let members: Vec<u64> = serde_json::from_str(&recv_text(&mut victim).await).unwrap();
        assert_eq!(members.len(), 2, "after {command}: {members:?}");
        send_text(&mut victim, &format!("after {command}")).await;
        assert_eq!(recv_text(&mut witness).await, format!("after {command}"));
        assert!(silent(&mut witness).await, "nothing from the failed call leaked out");
        // Other rooms, with and without the plugin, keep working.
        send_text(&mut bystander_a, command).await;
        assert_eq!(recv_text(&mut bystander_b).await, command);
        send_text(&mut other_chaos, "members").await;
        assert!(recv_text(&mut other_chaos).await.starts_with('['));
        assert_eq!(server.metric("roomcast_connections").await, 5.0, "nobody was disconnected");
    }
    server.stop().await;
}

#[tokio::test]
async fn plugin_timers_fire() {
    let dir = PluginDir::new(&[("chaos", None)]);
    let server = server_with(&dir).await;
    let mut a = server.connect("chaos").await;
    send_text(&mut a, "timer:50").await;
    assert_eq!(recv_text(&mut a).await, "timer fired");
    server.stop().await;
}

#[tokio::test]
async fn an_instance_lives_as_long_as_its_room() {
    let dir = PluginDir::new(&[("counter", None)]);
    let server = server_with(&dir).await;
    let mut a = server.connect("counter").await;
    for n in 1..=3 {
        send_text(&mut a, "x").await;
        assert_eq!(recv_json(&mut a).await["count"], n);
    }
    a.close(None).await.unwrap();
    server.wait_metric("roomcast_rooms", 0.0, Duration::from_secs(5)).await;
    // The emptied room dropped its store; a new room starts from nothing.
    let mut b = server.connect("counter").await;
    send_text(&mut b, "x").await;
    assert_eq!(recv_json(&mut b).await["count"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_whose_init_fails_is_not_loaded() {
    let dir = PluginDir::new(&[("chaos", Some("rooms = [\"doomed\"]\n[config]\nfail_init = true\n"))]);
    // A plugin whose init fails is not loaded at all: its rooms keep the default.
    let server = server_with(&dir).await;
    let mut a = server.connect("doomed").await;
    let mut b = server.connect("doomed").await;
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    send_text(&mut a, "spin").await;
    assert_eq!(recv_text(&mut b).await, "spin", "default behaviour, no plugin");
    server.stop().await;
}
