//! Identity from the handshake and rooms that move members, through the example
//! plugins: `jwt` verifies a signed token and attaches its claims, which every room's
//! plugin then sees; `lobby` seats matched players in a match room only they may enter.

use std::collections::BTreeSet;

use roomcast_tests::roomcast::config::Config;
use roomcast_tests::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const SECRET: &str = "e2e secret";

fn jwt_toml(secret: &str) -> String {
    format!("[config]\nsecret = \"{secret}\"\n")
}

/// A HS256 token for `claims` under [`SECRET`].
fn token(claims: &Value) -> String {
    jwt_signed(&json!({"alg": "HS256", "typ": "JWT"}), claims, SECRET.as_bytes())
}

async fn server_with(plugins: &PluginDir) -> TestServer {
    TestServer::start(Config { plugins: Some(plugins.path.clone()), ..test_config() }).await
}

async fn send_json(client: &mut Client, value: Value) {
    send_text(client, &value.to_string()).await;
}

/// The next message, which must be a text delivery from `room` holding JSON: that JSON.
async fn recv_in(client: &mut Client, room: &str) -> Value {
    let delivery = recv_json(client).await;
    assert_eq!(delivery["room"], room, "{delivery}");
    let text = delivery["text"].as_str().unwrap_or_else(|| panic!("a text delivery: {delivery}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn jwt_admits_a_signed_token_and_refuses_others_with_401() {
    let dir = PluginDir::new(&[("jwt", Some(&jwt_toml(SECRET)))]);
    let server = server_with(&dir).await;
    let ada = json!({"sub": "42", "name": "Ada", "roles": ["player"]});
    let url = format!("{}?token={}", server.url("jwt"), token(&ada));
    let (mut raw, _) = tokio_tungstenite::connect_async(url).await.expect("a valid token upgrades");
    let welcome = recv_json(&mut raw).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], ada, "the welcome shows the token's claims");
    let id = welcome["id"].as_u64().expect("the member's id");
    send_text(&mut raw, r#"{"say":"hi"}"#).await;
    assert_eq!(
        recv_json(&mut raw).await,
        json!({"type": "say", "from": id, "sub": "42", "name": "Ada", "text": "hi"})
    );

    // A client that can set headers sends the token as a bearer token.
    let bob = json!({"sub": "7", "name": "Bob"});
    let mut request = server.url("jwt").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", token(&bob)).parse().unwrap());
    let (mut bearer, _) = tokio_tungstenite::connect_async(request).await.expect("a bearer token upgrades");
    assert_eq!(recv_json(&mut bearer).await["user"], bob);
    let joined = recv_json(&mut raw).await;
    assert_eq!((joined["type"].as_str(), joined["sub"].as_str()), (Some("join"), Some("7")), "{joined}");

    // Anything else is refused before the upgrade, with 401 and the reason.
    let forged = jwt_signed(&json!({"alg": "HS256"}), &ada, b"not the secret");
    let unsigned = jwt_signed(&json!({"alg": "none"}), &ada, SECRET.as_bytes());
    let unsigned = format!("{}.", unsigned.rsplit_once('.').unwrap().0);
    let cases = [
        ("/ws/jwt".to_owned(), String::new(), "missing token"),
        (format!("/ws/jwt?token={forged}"), String::new(), "bad signature"),
        (format!("/ws/jwt:x?token={unsigned}"), String::new(), "unsupported alg"),
        ("/ws/jwt".to_owned(), "Authorization: Bearer not-a-jwt\r\n".to_owned(), "malformed token"),
    ];
    for (path, extra, reason) in cases {
        let response =
            raw_request(server.addr, upgrade_request(server.addr, &path, &extra).as_bytes()).await.unwrap();
        assert_eq!(status_of(&response), Some(401), "{path}: {response}");
        assert!(response.contains(reason), "{path}: expected {reason:?} in {response}");
    }
    server.stop().await;
}

#[tokio::test]
async fn identity_from_the_handshake_reaches_every_room_of_the_connection() {
    let dir = PluginDir::new(&[("jwt", Some(&jwt_toml(SECRET)))]);
    // A second plugin (the same code under another name, with another secret) serves
    // `other` and `other:*`: it never saw the token, only the identity.
    dir.install("jwt", "other");
    std::fs::write(dir.path.join("other.toml"), jwt_toml("another secret")).unwrap();
    let server = server_with(&dir).await;
    let ada = json!({"sub": "42", "name": "Ada", "team": {"id": 3}});
    let mut client = connect_rooms(server.addr, &format!("/ws/jwt:a?token={}", token(&ada))).await;
    assert_eq!(recv_json(&mut client).await, json!({"joined": "jwt:a", "ref": 0}));
    let welcome = recv_in(&mut client, "jwt:a").await;
    assert_eq!(welcome["user"], ada, "{welcome}");
    let id = welcome["id"].clone();

    for (reference, room) in [(1, "jwt:b"), (2, "other:x")] {
        send_json(&mut client, json!({"join": room, "ref": reference})).await;
        assert_eq!(recv_json(&mut client).await, json!({"joined": room, "ref": reference}));
        let welcome = recv_in(&mut client, room).await;
        assert_eq!(welcome, json!({"type": "welcome", "id": id, "user": ada}), "in {room}");
    }
    send_json(&mut client, json!({"send": "other:x", "text": r#"{"say":"hello"}"#})).await;
    assert_eq!(
        recv_in(&mut client, "other:x").await,
        json!({"type": "say", "from": id, "sub": "42", "name": "Ada", "text": "hello"})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_connection_without_identity_is_refused_by_jwt_rooms_and_stays_up() {
    let dir = PluginDir::new(&[("jwt", Some(&jwt_toml(SECRET)))]);
    let server = server_with(&dir).await;
    // `GET /ws` joins no room, so no plugin's handshake runs and nothing attaches an
    // identity: not even a valid token in its query string counts.
    let valid = token(&json!({"sub": "42"}));
    for path in ["/ws".to_owned(), format!("/ws?token={valid}")] {
        let mut client = connect_rooms(server.addr, &path).await;
        send_json(&mut client, json!({"join": "jwt:b", "ref": 1})).await;
        let refused = recv_json(&mut client).await;
        assert_eq!(refused["status"], 401, "{path}: {refused}");
        assert_eq!(refused["room"], "jwt:b", "{refused}");
        assert_eq!(refused["ref"], 1, "{refused}");
        assert!(refused["error"].as_str().is_some_and(|reason| !reason.is_empty()), "{refused}");
        // The connection is still up, and a room without a plugin takes it.
        send_json(&mut client, json!({"join": "open", "ref": 2})).await;
        assert_eq!(recv_json(&mut client).await, json!({"joined": "open", "ref": 2}));
    }
    server.stop().await;
}

/// What one player saw of being matched, in whatever order the lobby's removal and
/// the match room's join reached it.
#[derive(Debug, Default)]
struct Matched {
    /// From the lobby's `matched` message, and from the host's `joined` (no `ref`).
    announced: Option<String>,
    joined: Option<String>,
    seat: Option<u64>,
    left_lobby: bool,
    welcomed: bool,
    started: bool,
}

async fn matched(client: &mut Client) -> Matched {
    let mut seen = Matched::default();
    for _ in 0..10 {
        if seen.joined.is_some() && seen.left_lobby && seen.welcomed && seen.started {
            return seen;
        }
        let event = recv_json(client).await;
        if let Some(room) = event["joined"].as_str() {
            assert!(event.get("ref").is_none(), "a join the lobby made has no ref: {event}");
            seen.joined = Some(room.to_owned());
        } else if event["left"] == "lobby" {
            assert_eq!(event, json!({"left": "lobby", "code": 1000, "reason": "matched"}));
            seen.left_lobby = true;
        } else if event["room"] == "lobby" {
            let text: Value = serde_json::from_str(event["text"].as_str().unwrap()).unwrap();
            assert_eq!(text["type"], "matched", "{text}");
            seen.announced = text["room"].as_str().map(str::to_owned);
            seen.seat = text["seat"].as_u64();
        } else if let Some(room) = event["room"].as_str().filter(|room| Some(*room) == seen.joined.as_deref())
        {
            let text: Value = serde_json::from_str(event["text"].as_str().unwrap()).unwrap();
            match text["type"].as_str() {
                Some("match") => {
                    assert_eq!(text["room"], room);
                    assert_eq!(text["seat"].as_u64(), seen.seat, "{text}");
                    seen.welcomed = true;
                }
                Some("start") => seen.started = true,
                _ => panic!("unexpected in the match room: {text}"),
            }
        } else {
            panic!("unexpected while being matched: {event}");
        }
    }
    panic!("not matched within 10 messages: {seen:?}");
}

#[tokio::test]
async fn the_lobby_seats_two_players_in_a_match_only_they_may_enter() {
    let dir = PluginDir::new(&[("lobby", None)]);
    let server = server_with(&dir).await;
    let mut ann = connect_rooms(server.addr, "/ws/lobby").await;
    let mut bob = connect_rooms(server.addr, "/ws/lobby").await;
    for player in [&mut ann, &mut bob] {
        assert_eq!(recv_json(player).await, json!({"joined": "lobby", "ref": 0}));
    }
    let play = json!({"send": "lobby", "text": r#"{"play":true}"#});
    send_json(&mut ann, play.clone()).await;
    assert_eq!(recv_in(&mut ann, "lobby").await, json!({"type": "queued", "waiting": 1, "players": 2}));
    send_json(&mut bob, play).await;

    let (ann_seat, bob_seat) = (matched(&mut ann).await, matched(&mut bob).await);
    let room = ann_seat.joined.clone().expect("ann joined the match");
    assert!(room.starts_with("lobby:match:"), "{room}");
    assert_eq!(ann_seat.announced.as_deref(), Some(room.as_str()));
    assert_eq!(bob_seat.joined.as_deref(), Some(room.as_str()), "both in one match");
    let seats: BTreeSet<_> = [ann_seat.seat, bob_seat.seat].into_iter().collect();
    assert_eq!(seats, BTreeSet::from([Some(1), Some(2)]));

    // The players talk in the match room; they are no longer in the lobby.
    send_json(&mut ann, json!({"send": room, "text": "gg"})).await;
    assert_eq!(recv_json(&mut bob).await, json!({"room": room, "text": "gg"}));
    send_json(&mut bob, json!({"send": "lobby", "text": "hi", "ref": 5})).await;
    assert_eq!(recv_json(&mut bob).await, json!({"error": "not in room", "status": 404, "ref": 5}));

    // Nobody else gets in: not by joining, not with a ticket of its own making, not raw.
    let mut third = connect_rooms(server.addr, "/ws").await;
    let forged = json!({"match": room, "seat": 1, "players": [1, 2, 3, 4, 5, 6, 7, 8]});
    for (reference, params) in [(1, None), (2, Some(forged))] {
        let mut join = json!({"join": room, "ref": reference});
        if let Some(params) = params {
            join["params"] = params;
        }
        send_json(&mut third, join).await;
        assert_eq!(
            recv_json(&mut third).await,
            json!({"error": "no seat in this match", "status": 403, "room": room, "ref": reference})
        );
    }
    let mut raw_into_match = raw_ws(server.addr, &room).await.unwrap();
    assert_eq!(read_close(&mut raw_into_match).await, Some(1008));

    // A raw connection to the lobby is told it cannot be matched.
    let mut raw = server.connect("lobby").await;
    send_text(&mut raw, r#"{"play":true}"#).await;
    assert_eq!(
        recv_json(&mut raw).await,
        json!({"type": "error", "error": "matchmaking needs the room protocol: connect with the subprotocol roomcast.v1"})
    );
    server.stop().await;
}
