//! Nothing missed across a reconnect: room history with offsets, and joins with
//! `since` that get exactly what the client missed, then live messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use roomcast_tests::roomcast::config::Config;
use roomcast_tests::*;
use serde_json::{Value, json};

async fn send_json(client: &mut Client, value: Value) {
    send_text(client, &value.to_string()).await;
}

fn history_config(size: usize) -> Config {
    Config { history_size: size, ..test_config() }
}

/// Drop the connection with a TCP reset: no close frame, no FIN.
fn reset(client: Client) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.get_ref() {
        // A zero linger makes the close an RST at once; it never blocks.
        #[allow(deprecated, reason = "SO_LINGER 0 is the point: a reset, not a graceful close")]
        stream.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    }
    drop(client);
}

/// A room-protocol client that joins `room` (with `since`, if given) and returns the
/// `joined` reply.
async fn join(server: &TestServer, room: &str, since: Option<Value>) -> (Client, Value) {
    let mut client = connect_rooms(server.addr, "/ws").await;
    let mut request = json!({"join": room, "ref": 1});
    if let Some(since) = since {
        request["since"] = since;
    }
    send_json(&mut client, request).await;
    let joined = recv_json(&mut client).await;
    (client, joined)
}

/// The next delivery: its text and offset.
async fn delivery(client: &mut Client) -> (String, u64) {
    let message = recv_json(client).await;
    let text = message["text"].as_str().unwrap_or_else(|| panic!("a text delivery: {message}")).to_owned();
    let offset = message["offset"].as_u64().unwrap_or_else(|| panic!("an offset: {message}"));
    (text, offset)
}

#[tokio::test]
async fn a_reset_connection_recovers_exactly_what_it_missed() {
    let server = TestServer::start(history_config(100)).await;
    let (mut client, joined) = join(&server, "news", None).await;
    let epoch = joined["epoch"].as_str().expect("a room with history gives its epoch").to_owned();
    assert_eq!(joined["offset"], 0, "{joined}");
    assert!(joined.get("recovered").is_none(), "{joined}");
    let mut publisher = server.connect("news").await;
    send_text(&mut publisher, "first").await;
    assert_eq!(delivery(&mut client).await, ("first".to_owned(), 1));

    reset(client);
    server.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
    for n in 0..50 {
        send_text(&mut publisher, &format!("missed {n}")).await;
    }
    // Once the room has handled them all.
    server.wait_metric("roomcast_history_messages", 51.0, Duration::from_secs(5)).await;

    let (mut back, joined) = join(&server, "news", Some(json!({"epoch": epoch, "offset": 1}))).await;
    assert_eq!(joined, json!({"joined": "news", "ref": 1, "epoch": epoch, "offset": 51, "recovered": true}));
    for n in 0..50 {
        assert_eq!(delivery(&mut back).await, (format!("missed {n}"), n + 2));
    }
    send_text(&mut publisher, "live").await;
    assert_eq!(delivery(&mut back).await, ("live".to_owned(), 52));
    assert_eq!(server.metric("roomcast_recoveries_total{outcome=\"recovered\"}").await, 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_and_no_duplicate_at_the_seam_under_a_steady_stream() {
    let server = TestServer::start(history_config(10_000)).await;
    let (mut client, joined) = join(&server, "ticker", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut publisher = server.connect("ticker").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                send_text(&mut publisher, &n.to_string()).await;
                sent.store(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            publisher
        })
    };
    // Read a while, then vanish mid-stream and come straight back from the last offset.
    let mut last = 0;
    for _ in 0..100 {
        let (text, offset) = delivery(&mut client).await;
        assert_eq!(offset, last + 1);
        assert_eq!(text, offset.to_string(), "the room's one order is the publisher's");
        last = offset;
    }
    reset(client);
    let (mut back, joined) = join(&server, "ticker", Some(json!({"epoch": epoch, "offset": last}))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    // Replayed, then live, with no gap and no duplicate, until the publisher stops.
    while last < 600 {
        let (text, offset) = delivery(&mut back).await;
        assert_eq!(offset, last + 1, "offsets are consecutive across the seam");
        assert_eq!(text, offset.to_string());
        last = offset;
    }
    stop.store(true, Ordering::Relaxed);
    let _publisher = publishing.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    while last < total {
        let (text, offset) = delivery(&mut back).await;
        assert_eq!((offset, text), (last + 1, (last + 1).to_string()));
        last = offset;
    }
    server.stop().await;
}

#[tokio::test]
async fn positions_that_cannot_be_served_answer_recovered_false() {
    let server = TestServer::start(history_config(5)).await;
    let (mut client, joined) = join(&server, "small", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut publisher = server.connect("small").await;
    for n in 1..=20 {
        send_text(&mut publisher, &format!("m{n}")).await;
        assert_eq!(delivery(&mut client).await.1, n);
    }
    let cases = [
        (json!({"epoch": "not-the-epoch", "offset": 19}), "another epoch"),
        (json!({"epoch": epoch, "offset": 1}), "trimmed: only the last 5 are kept"),
        (json!({"epoch": epoch, "offset": 99}), "ahead of the room"),
    ];
    let mut last = 20;
    for (since, why) in cases {
        let (mut other, joined) = join(&server, "small", Some(since)).await;
        assert_eq!(joined["recovered"], false, "{why}: {joined}");
        assert_eq!(joined["offset"], last, "{why}: {joined}");
        // Only live messages follow.
        send_text(&mut publisher, "live").await;
        last += 1;
        assert_eq!(delivery(&mut other).await, ("live".to_owned(), last));
        assert_eq!(delivery(&mut client).await.1, last);
    }
    // The oldest position still held is served: the last 5 are 19 to 23.
    let (mut edge, joined) = join(&server, "small", Some(json!({"epoch": epoch, "offset": 18}))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    for offset in 19..=23 {
        assert_eq!(delivery(&mut edge).await.1, offset);
    }
    assert_eq!(server.metric("roomcast_recoveries_total{outcome=\"not_recovered\"}").await, 3.0);
    server.stop().await;
}

#[tokio::test]
async fn history_expires_by_age_and_outlives_an_empty_room() {
    let config = Config { history_ttl: Duration::from_secs(1), ..history_config(100) };
    let server = TestServer::start(config).await;
    let (mut client, joined) = join(&server, "brief", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut publisher = server.connect("brief").await;
    send_text(&mut publisher, "one").await;
    assert_eq!(delivery(&mut client).await.1, 1);
    // Everyone leaves: the room closes, its history stays for its messages' lifetime.
    reset(client);
    drop(publisher);
    server.wait_metric("roomcast_rooms", 0.0, Duration::from_secs(5)).await;
    let (mut back, joined) = join(&server, "brief", Some(json!({"epoch": epoch, "offset": 0}))).await;
    assert_eq!(joined["epoch"], epoch.as_str(), "the same history continues: {joined}");
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(delivery(&mut back).await, ("one".to_owned(), 1));
    drop(back);
    server.wait_metric("roomcast_rooms", 0.0, Duration::from_secs(5)).await;
    // A message older than the time to live is gone: asking from before it fails.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_late, joined) = join(&server, "brief", Some(json!({"epoch": epoch, "offset": 0}))).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    server.wait_metric("roomcast_history_messages", 0.0, Duration::from_secs(5)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_plugin_room_keeps_history_and_replays_without_calling_the_plugin() {
    let dir = PluginDir::new(&[("relay", Some("[history]\nsize = 10\nttl = \"1m\"\n"))]);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    let (client, joined) = join(&server, "relay", None).await;
    let epoch = joined["epoch"].as_str().expect("the plugin's room keeps history").to_owned();
    reset(client);
    server.wait_metric("roomcast_room_members", 0.0, Duration::from_secs(5)).await;
    let mut publisher = server.connect("relay").await;
    for n in 1..=5 {
        send_text(&mut publisher, &format!("p{n}")).await;
    }
    server.wait_metric("roomcast_history_messages", 5.0, Duration::from_secs(5)).await;
    let calls = "roomcast_plugin_calls_total{plugin=\"relay\",outcome=\"ok\"}";
    let before = server.metric(calls).await;
    let (mut back, joined) = join(&server, "relay", Some(json!({"epoch": epoch, "offset": 0}))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    for n in 1..=5 {
        assert_eq!(delivery(&mut back).await, (format!("p{n}"), n));
    }
    // One call for the join itself; none per replayed message.
    assert_eq!(server.metric(calls).await, before + 1.0);
    // Rooms without a plugin keep none unless the server says so.
    let (_plain, joined) = join(&server, "plain", None).await;
    assert!(joined.get("epoch").is_none(), "{joined}");
    server.stop().await;

    // Recovery goes through the room's plugin like any join: a refused join replays
    // nothing.
    let manifest = "[config]\ntoken = \"s3cret\"\n[history]\nsize = 10\n";
    let dir = PluginDir::new(&[("gate", Some(manifest))]);
    let server = TestServer::start(Config { plugins: Some(dir.path.clone()), ..test_config() }).await;
    let mut member = connect_rooms(server.addr, "/ws?token=s3cret").await;
    send_json(&mut member, json!({"join": "gate", "ref": 1})).await;
    let joined = recv_json(&mut member).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    send_json(&mut member, json!({"send": "gate", "text": "secret"})).await;
    let (mut outsider, refused) = join(&server, "gate", Some(json!({"epoch": epoch, "offset": 0}))).await;
    assert_eq!(refused["status"], 403, "{refused}");
    assert!(quiet(&mut outsider, Duration::from_millis(300)).await, "nothing replayed");
    server.stop().await;
}
