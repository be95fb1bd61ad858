//! The plugin contract `roomcast:plugin@0.2.0` end to end: identity attached at the
//! handshake reaches every room, joins carry parameters and may be refused, plugins
//! move members between rooms; and plugins built for `roomcast:plugin@0.1.0` (kept as
//! fixtures in `tests/fixtures/contract-0.1.0/`) run unchanged beside today's.

use std::time::Duration;

use roomcast_tests::roomcast::config::Config;
use roomcast_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "admin-secret";

async fn send_json(client: &mut Client, value: Value) {
    send_text(client, &value.to_string()).await;
}

/// Send `text` to `room` and read the plugin's answer, delivered in that room.
async fn ask(client: &mut Client, room: &str, text: &str) -> Value {
    send_json(client, json!({"send": room, "text": text})).await;
    let reply = recv_json(client).await;
    assert_eq!(reply["room"], room, "{reply}");
    serde_json::from_str(reply["text"].as_str().expect("a text delivery")).expect("JSON text")
}

async fn server_with(plugins: &[(&str, Option<&str>)]) -> (PluginDir, TestServer) {
    let dir = PluginDir::new(plugins);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    (dir, server)
}

#[tokio::test]
async fn identity_from_the_handshake_reaches_every_room() {
    let (_dir, server) = server_with(&[("chaos", None)]).await;
    // Raw mode: the room's plugin sees what its handshake attached.
    let mut raw = connect_to(server.addr, "chaos?identity=ada").await;
    send_text(&mut raw, "whoami").await;
    let me: Value = serde_json::from_str(&recv_text(&mut raw).await).unwrap();
    assert_eq!(me["identity"], json!({"user": "ada"}), "{me}");
    assert_eq!(me["params"], Value::Null, "{me}");

    // Room-protocol mode: the same identity in the first room and in every room joined
    // later, with each join's own parameters.
    let mut client = connect_rooms(server.addr, "/ws/chaos:a?identity=bob").await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "chaos:a", "ref": 0}));
    send_json(&mut client, json!({"join": "chaos:b", "ref": 1, "params": {"seat": 3}})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "chaos:b", "ref": 1}));
    let first = ask(&mut client, "chaos:a", "whoami").await;
    let second = ask(&mut client, "chaos:b", "whoami").await;
    assert_eq!(first["identity"], json!({"user": "bob"}), "{first}");
    assert_eq!(second["identity"], json!({"user": "bob"}), "{second}");
    assert_eq!(first["params"], Value::Null, "{first}");
    assert_eq!(second["params"], json!({"seat": 3}), "{second}");
    assert_eq!(first["id"], second["id"], "one member id for the connection");
    // A fresh instance after a trap is told the same: identity and the join's params.
    send_json(&mut client, json!({"send": "chaos:b", "text": "panic"})).await;
    let again = ask(&mut client, "chaos:b", "whoami").await;
    assert_eq!(
        (&again["identity"], &again["params"]),
        (&json!({"user": "bob"}), &json!({"seat": 3})),
        "{again}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_identity_over_the_limit_fails_the_handshake() {
    let (_dir, server) = server_with(&[("chaos", None)]).await;
    let request = upgrade_request(server.addr, "/ws/chaos?identity=huge", "");
    let response = raw_request(server.addr, request.as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(500), "{response}");
    assert_eq!(server.metric("roomcast_handshakes_rejected_total{reason=\"plugin\"}").await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn a_join_the_plugin_refuses_answers_and_keeps_the_connection() {
    let (_dir, server) = server_with(&[("chaos", None)]).await;
    let mut client = connect_rooms(server.addr, "/ws").await;
    send_json(&mut client, json!({"join": "chaos:x", "ref": 1, "params": {"refuse": true}})).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"error": "refused", "status": 403, "room": "chaos:x", "ref": 1})
    );
    // Refused, it is in no room: the room is gone, and a send to it is refused.
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;
    send_json(&mut client, json!({"send": "chaos:x", "text": "members", "ref": 2})).await;
    assert_eq!(recv_json(&mut client).await, json!({"error": "not in room", "status": 404, "ref": 2}));
    // The same room admits the same connection with other parameters.
    send_json(&mut client, json!({"join": "chaos:x", "ref": 3})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "chaos:x", "ref": 3}));
    let members = ask(&mut client, "chaos:x", "members").await;
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
    server.stop().await;
}

#[tokio::test]
async fn a_raw_connection_the_plugin_refuses_is_closed_with_1008() {
    let (_dir, server) = server_with(&[("chaos", None)]).await;
    let mut client = connect_to(server.addr, "chaos?refuse=1").await;
    match recv(&mut client).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert_eq!(frame.reason.as_str(), "refused");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;
    assert_eq!(server.metric("roomcast_connections_closed_total{reason=\"plugin\"}").await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_adds_a_member_to_another_room_and_removes_it() {
    let manifest = "[config]\ntoken = \"s3cret\"\n";
    let (_dir, server) = server_with(&[("chaos", None), ("gate", Some(manifest))]).await;
    let mut client = connect_rooms(server.addr, "/ws/chaos?identity=cy").await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "chaos", "ref": 0}));
    let mut other = connect_to(server.addr, "chaos:match").await;

    // Added by the plugin: `joined` without a ref, then the room's messages.
    send_json(&mut client, json!({"send": "chaos", "text": "add:chaos:match"})).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "chaos:match"}));
    server.wait_metric("roomcast_room_members", 3.0, Duration::from_secs(5)).await;
    send_text(&mut other, "hello").await;
    assert_eq!(recv_json(&mut client).await, json!({"room": "chaos:match", "text": "hello"}));
    // The target room's plugin saw the identity and the parameters the plugin passed.
    let me = ask(&mut client, "chaos:match", "whoami").await;
    assert_eq!(me["identity"], json!({"user": "cy"}), "{me}");
    assert_eq!(me["params"], json!({"by": "chaos"}), "{me}");

    // A second add of a room it is in changes nothing.
    send_json(&mut client, json!({"send": "chaos", "text": "add:chaos:match"})).await;
    // An add the target room's plugin refuses: an error naming the room, no ref.
    send_json(&mut client, json!({"send": "chaos", "text": "add:gate"})).await;
    assert_eq!(recv_json(&mut client).await, json!({"error": "bad token", "status": 403, "room": "gate"}));
    // An invalid room name is refused to the plugin itself.
    send_json(&mut client, json!({"send": "chaos", "text": "add:no spaces"})).await;
    assert_eq!(recv_json(&mut client).await, json!({"room": "chaos", "text": "add error: unknown room"}));

    // Removed from one room: `left` 1000 with the reason; the connection and its other
    // room stay.
    send_json(&mut client, json!({"send": "chaos:match", "text": "remove"})).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"left": "chaos:match", "code": 1000, "reason": "removed"})
    );
    server.wait_metric("roomcast_room_members", 2.0, Duration::from_secs(5)).await;
    let members = ask(&mut client, "chaos", "members").await;
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
    server.stop().await;
}

#[tokio::test]
async fn a_raw_member_is_not_moved_and_its_removal_closes_it() {
    let (_dir, server) = server_with(&[("chaos", None)]).await;
    let mut raw = connect_to(server.addr, "chaos").await;
    send_text(&mut raw, "add:chaos:elsewhere").await;
    send_text(&mut raw, "members").await;
    // Nothing came before the answer to `members`, and no room was created.
    let members: Value = serde_json::from_str(&recv_text(&mut raw).await).unwrap();
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
    assert_eq!(server.metric("roomcast_rooms").await, 1.0);
    send_text(&mut raw, "remove").await;
    match recv(&mut raw).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1000);
            assert_eq!(frame.reason.as_str(), "removed");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn plugins_built_for_0_1_0_run_beside_plugins_built_for_0_2_0() {
    let dir = PluginDir::new(&[("chat", None)]);
    dir.install_fixture("chat", "oldchat");
    dir.install_fixture("gate", "oldgate");
    std::fs::write(dir.path.join("oldgate.toml"), "[config]\ntoken = \"s3cret\"\n").unwrap();
    let config = Config { plugins: Some(dir.path.clone()), admin_token: Some(TOKEN.into()), ..test_config() };
    let server = TestServer::start(config).await;

    let admin = admin_json(server.addr, TOKEN, "/admin/plugins").await;
    let admin = admin.as_array().cloned().unwrap_or_default();
    for name in ["chat", "oldchat", "oldgate"] {
        let plugin = admin.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{name}: {admin:?}"));
        assert_eq!(plugin["last_error"], Value::Null, "{plugin}");
    }

    // The old chat serves its rooms as it did: welcome, join notice, say.
    for room in ["oldchat", "chat"] {
        let mut ada = connect_to(server.addr, &format!("{room}?name=ada")).await;
        let welcome: Value = serde_json::from_str(&recv_text(&mut ada).await).unwrap();
        assert_eq!(welcome["type"], "welcome", "{room}: {welcome}");
        let mut bob = connect_to(server.addr, &format!("{room}?name=bob")).await;
        recv_text(&mut bob).await; // bob's welcome
        let joined: Value = serde_json::from_str(&recv_text(&mut ada).await).unwrap();
        assert_eq!(joined, json!({"type": "join", "id": joined["id"], "name": "bob"}), "{room}");
        send_text(&mut bob, r#"{"say":"hi"}"#).await;
        let said: Value = serde_json::from_str(&recv_text(&mut ada).await).unwrap();
        assert_eq!(said["text"], "hi", "{room}: {said}");
        assert_eq!(said["name"], "bob", "{room}: {said}");
    }

    // An old plugin cannot refuse in `join`: its handshake decides room-protocol joins.
    let mut without = connect_rooms(server.addr, "/ws").await;
    send_json(&mut without, json!({"join": "oldgate", "ref": 1})).await;
    assert_eq!(
        recv_json(&mut without).await,
        json!({"error": "bad token", "status": 403, "room": "oldgate", "ref": 1})
    );
    let mut with = connect_rooms(server.addr, "/ws?token=s3cret").await;
    send_json(&mut with, json!({"join": "oldgate", "ref": 1})).await;
    assert_eq!(recv_json(&mut with).await, json!({"joined": "oldgate", "ref": 1}));
    // A raw upgrade is decided by its handshake as before.
    let request = upgrade_request(server.addr, "/ws/oldgate", "");
    let response = raw_request(server.addr, request.as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(403), "{response}");
    server.stop().await;
}
