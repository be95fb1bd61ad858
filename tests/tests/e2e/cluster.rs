//! Cluster mode end to end: a real `redis-server` on a free port and two or three
//! Roomcast nodes in this process, each on its own runtime so that a node can be
//! killed abruptly (its runtime dropped: no graceful shutdown, no lease released).

use std::time::Duration;

use roomcast::config::Config;
use roomcast_tests::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn config(redis: &Redis, lease: Duration, plugins: Option<&PluginDir>) -> Config {
    Config {
        redis: Some(redis.url()),
        cluster_lease: lease,
        plugins: plugins.map(|p| p.path.clone()),
        plugin_cache: None,
        admin_token: Some("secret".into()),
        ..test_config()
    }
}

/// The next text message within `bound`, if any.
async fn next_text(client: &mut Client, bound: Duration) -> Option<String> {
    use futures_util::StreamExt as _;
    let deadline = Instant::now() + bound;
    loop {
        let message = tokio::time::timeout_at(deadline, client.next()).await.ok()??.ok()?;
        match message {
            Message::Text(text) => return Some(text.to_string()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Send `text` from `from` every 100 ms until every client in `to` received it; then
/// drain the extra copies still on their way (until each client is quiet for 250 ms).
async fn until_heard(from: &mut Client, text: &str, to: &mut [&mut Client], bound: Duration) {
    let deadline = Instant::now() + bound;
    for client in to.iter_mut() {
        loop {
            assert!(Instant::now() < deadline, "`{text}` never arrived");
            send_text(from, text).await;
            if let Some(got) = next_text(client, Duration::from_millis(100)).await {
                assert_eq!(got, text);
                break;
            }
        }
    }
    for client in to.iter_mut() {
        while next_text(client, Duration::from_millis(250)).await.is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_three_nodes_see_one_order() {
    let redis = Redis::start().await;
    let lease = Duration::from_millis(1500);
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(config(&redis, lease, None))).collect();

    // Per node: a sender and a listener.
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for node in &nodes {
        senders.push(node.connect("lobby").await);
        listeners.push(node.connect("lobby").await);
    }
    {
        let (first, _) = senders.split_at_mut(1);
        let mut to: Vec<&mut Client> = listeners.iter_mut().collect();
        until_heard(&mut first[0], "warm-up", &mut to, Duration::from_secs(10)).await;
    }

    // The senders go in rounds: each sends one message, then waits for the others,
    // and every 10 rounds they all pause a moment. Their messages therefore reach
    // the owner interleaved, however the scheduler runs the three tasks.
    const N: usize = 200;
    let rounds = std::sync::Arc::new(tokio::sync::Barrier::new(senders.len()));
    let mut sending = Vec::new();
    for (i, mut sender) in senders.into_iter().enumerate() {
        let rounds = rounds.clone();
        sending.push(tokio::spawn(async move {
            for k in 0..N {
                send_text(&mut sender, &format!("{i}-{k}")).await;
                rounds.wait().await;
                if k % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            sender
        }));
    }
    let mut receiving = Vec::new();
    for mut listener in listeners {
        receiving.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(3 * N);
            while seen.len() < 3 * N {
                match next_text(&mut listener, Duration::from_secs(10)).await {
                    Some(text) if text == "warm-up" => {}
                    Some(text) => seen.push(text),
                    None => panic!("listener stopped after {} messages: {seen:?}", seen.len()),
                }
            }
            seen
        }));
    }
    let mut orders = Vec::new();
    for handle in receiving {
        orders.push(handle.await.unwrap());
    }
    for handle in sending {
        handle.await.unwrap();
    }
    // Every listener got every message once, each sender's in its order...
    for order in &orders {
        for i in 0..3 {
            let mine: Vec<&String> = order.iter().filter(|m| m.starts_with(&format!("{i}-"))).collect();
            let expected: Vec<String> = (0..N).map(|k| format!("{i}-{k}")).collect();
            assert_eq!(mine, expected.iter().collect::<Vec<_>>());
        }
    }
    // ...and all of them in the same interleaving.
    assert_eq!(orders[0], orders[1], "node 0 and node 1 saw different orders");
    assert_eq!(orders[0], orders[2], "node 0 and node 2 saw different orders");
    // The senders were interleaved for real, not one after the other.
    let switches = orders[0].windows(2).filter(|w| w[0].as_bytes()[0] != w[1].as_bytes()[0]).count();
    assert!(switches > 2, "senders never interleaved");
}

/// `{"count":N,...}` → N.
fn count_of(reply: &str) -> u64 {
    let value: serde_json::Value = serde_json::from_str(reply).expect("counter reply is JSON");
    value["count"].as_u64().expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_state_survives_its_owner_being_killed() {
    let redis = Redis::start().await;
    let plugins = PluginDir::new(&[("counter", None)]);
    let lease = Duration::from_millis(1500);
    let owner = Node::start(config(&redis, lease, Some(&plugins)));
    let other = Node::start(config(&redis, lease, Some(&plugins)));

    // The first member makes its node the owner.
    let mut a = owner.connect("counter").await;
    send_text(&mut a, "x").await;
    assert_eq!(count_of(&recv_text(&mut a).await), 1);
    let mut b = other.connect("counter").await;
    for expected in 2..=6 {
        send_text(&mut b, "x").await;
        assert_eq!(count_of(&recv_text(&mut b).await), expected, "the owner counts for the other node");
    }
    assert_eq!(owner.metric("roomcast_cluster_owned_rooms").await, 1.0);
    assert_eq!(other.metric("roomcast_cluster_owned_rooms").await, 0.0);
    // Let the owner store its snapshot, then crash it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    owner.kill();
    drop(a);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Sent while nobody owns the room: kept, and run by the node that takes over.
    send_text(&mut b, "x").await;
    let reply = next_text(&mut b, lease * 4).await.expect("the room continued on the other node");
    assert_eq!(count_of(&reply), 7, "the count continued from the stored snapshot");
    let took = killed.elapsed();
    assert!(took < lease * 3, "takeover took {took:?}");
    send_text(&mut b, "x").await;
    assert_eq!(count_of(&recv_text(&mut b).await), 8);
    assert_eq!(other.metric("roomcast_cluster_owned_rooms").await, 1.0);
    assert_eq!(other.metric("roomcast_cluster_takeovers_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_hands_leases_over_at_once() {
    let redis = Redis::start().await;
    let plugins = PluginDir::new(&[("counter", None)]);
    // A lease far longer than the test may wait: only a handover passes.
    let lease = Duration::from_secs(30);
    let owner = Node::start(config(&redis, lease, Some(&plugins)));
    let other = Node::start(config(&redis, lease, Some(&plugins)));

    let mut a = owner.connect("counter:handover").await;
    send_text(&mut a, "x").await;
    assert_eq!(count_of(&recv_text(&mut a).await), 1);
    let mut b = other.connect("counter:handover").await;
    for expected in 2..=4 {
        send_text(&mut b, "x").await;
        assert_eq!(count_of(&recv_text(&mut b).await), expected);
    }
    let stopping = Instant::now();
    let stop = tokio::spawn(owner.stop());
    // The owner's member is closed with 1001.
    while next_text(&mut a, Duration::from_secs(5)).await.is_some() {}
    // Gone without a close reply, so the node need not wait for one.
    drop(a);
    stop.await.unwrap();
    send_text(&mut b, "x").await;
    let reply = next_text(&mut b, Duration::from_secs(5)).await.expect("the other node took over");
    assert_eq!(count_of(&reply), 5, "the state was handed over");
    assert!(stopping.elapsed() < Duration::from_secs(5), "handover took {:?}", stopping.elapsed());
    assert_eq!(other.metric("roomcast_cluster_owned_rooms").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_no_local_delivery_and_recovers_cross_node() {
    let mut redis = Redis::start().await;
    let lease = Duration::from_millis(1500);
    let owner = Node::start(config(&redis, lease, None));
    let follower = Node::start(config(&redis, lease, None));

    // The owner's node has one member; the follower's node two.
    let mut o = owner.connect("talk").await;
    owner.wait_metric("roomcast_cluster_owned_rooms", 1.0, Duration::from_secs(5)).await;
    let mut f1 = follower.connect("talk").await;
    let mut f2 = follower.connect("talk").await;
    until_heard(&mut o, "warm-up", &mut [&mut f1, &mut f2], Duration::from_secs(10)).await;
    send_text(&mut f1, "before").await;
    assert_eq!(recv_text(&mut o).await, "before");
    assert_eq!(recv_text(&mut f2).await, "before");

    redis.kill();
    // Mid-conversation, Redis gone: every local delivery still happens, in order.
    for k in 0..20 {
        send_text(&mut f1, &format!("local-{k}")).await;
        send_text(&mut o, &format!("owner-{k}")).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for k in 0..20 {
        assert_eq!(recv_text(&mut f2).await, format!("local-{k}"));
    }
    follower.wait_metric("roomcast_cluster_up", 0.0, Duration::from_secs(5)).await;
    owner.wait_metric("roomcast_cluster_up", 0.0, Duration::from_secs(5)).await;

    redis.restart().await;
    // Cross-node delivery comes back both ways.
    until_heard(&mut o, "again", &mut [&mut f1, &mut f2], Duration::from_secs(15)).await;
    until_heard(&mut f1, "back", &mut [&mut o, &mut f2], Duration::from_secs(15)).await;
    assert_eq!(follower.metric("roomcast_cluster_up").await, 1.0);
    assert!(follower.metric("roomcast_cluster_resyncs_total").await >= 1.0);
    // One owner again.
    let owned = owner.metric("roomcast_cluster_owned_rooms").await
        + follower.metric("roomcast_cluster_owned_rooms").await;
    assert_eq!(owned, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscriber_is_detected_and_resynchronised() {
    let redis = Redis::start().await;
    let lease = Duration::from_millis(1500);
    let one = Node::start(config(&redis, lease, None));
    let two = Node::start(config(&redis, lease, None));
    let mut a = one.connect("feed").await;
    one.wait_metric("roomcast_cluster_owned_rooms", 1.0, Duration::from_secs(5)).await;
    let mut b = two.connect("feed").await;
    until_heard(&mut a, "first", &mut [&mut b], Duration::from_secs(10)).await;

    // What Redis does to a subscriber over its output-buffer limit.
    let killed = redis.command("CLIENT KILL TYPE pubsub").await.expect("CLIENT KILL");
    assert!(killed.starts_with(':'), "{killed}");
    until_heard(&mut a, "second", &mut [&mut b], Duration::from_secs(10)).await;
    until_heard(&mut b, "third", &mut [&mut a], Duration::from_secs(10)).await;
    assert!(one.metric("roomcast_cluster_resyncs_total").await >= 1.0);
    assert!(two.metric("roomcast_cluster_resyncs_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_the_cluster() {
    let redis = Redis::start().await;
    let plugins = PluginDir::new(&[("chat", None)]);
    let lease = Duration::from_millis(1500);
    let one = Node::start(config(&redis, lease, Some(&plugins)));
    let two = Node::start(config(&redis, lease, Some(&plugins)));

    let mut ada = one.connect("chat?name=ada").await;
    let welcome = recv_json(&mut ada).await;
    let ada_id = welcome["id"].as_u64().unwrap();
    let mut bob = two.connect("chat?name=bob").await;
    // Bob's welcome, run by the owner on node one, lists both members.
    let welcome = recv_json(&mut bob).await;
    assert_eq!(welcome["type"], "welcome");
    let bob_id = welcome["id"].as_u64().unwrap();
    assert_ne!(ada_id >> 32, bob_id >> 32, "member ids come from distinct per-node ranges");
    let names: Vec<&str> =
        welcome["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ada", "bob"]);
    let joined = recv_json(&mut ada).await;
    assert_eq!((joined["type"].as_str(), joined["name"].as_str()), (Some("join"), Some("bob")));

    // The admin API of either node shows the room's members on both.
    let rooms = admin_json(two.addr, "secret", "/admin/rooms").await;
    let room = rooms.as_array().unwrap().iter().find(|r| r["name"] == "chat").expect("chat listed");
    assert_eq!(room["members"], 2);
    assert_eq!(room["local_members"], 1);
    assert_eq!(room["nodes"].as_object().unwrap().len(), 2);
    assert!(room["owner"].is_string());

    // So does the dashboard: cluster-wide counts, this node's members by name, and a
    // room with no member here listed with its owner.
    let _carol = one.connect("elsewhere").await;
    let node_one = snapshots(one.addr, "Authorization: Bearer secret\r\n", 1).await[0].1["cluster"].clone();
    assert_eq!(node_one["up"], true, "{node_one}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let snapshot = loop {
        let (_, snapshot) = snapshots(two.addr, "Authorization: Bearer secret\r\n", 1).await.remove(0);
        // Listed once its owner holds the lease (presence may be written first).
        if snapshot["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "elsewhere" && r["owner"].is_string())
        {
            break snapshot;
        }
        assert!(Instant::now() < deadline, "the dashboard never listed the remote room: {snapshot}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(snapshot["cluster"]["up"], true);
    assert_ne!(snapshot["cluster"]["node"], node_one["node"]);
    assert_eq!(snapshot["room_count"], 2, "{snapshot}");
    let room = |name: &str| {
        snapshot["rooms"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap()
    };
    let chat = room("chat");
    assert_eq!((chat["member_count"].as_u64(), chat["local_members"].as_u64()), (Some(2), Some(1)), "{chat}");
    let here: Vec<&str> =
        chat["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(here, ["bob"]);
    let elsewhere = room("elsewhere");
    assert_eq!(elsewhere["member_count"], 1, "{elsewhere}");
    assert_eq!(elsewhere["members"], serde_json::json!([]));
    assert_eq!(elsewhere["owner"], node_one["node"]);
    assert_eq!(elsewhere["nodes"], serde_json::json!({ node_one["node"].as_str().unwrap(): 1 }));

    // A leave on one node reaches the plugin on the other.
    drop(bob);
    let left = recv_json(&mut ada).await;
    assert_eq!((left["type"].as_str(), left["id"].as_u64()), (Some("leave"), Some(bob_id)));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rooms = admin_json(one.addr, "secret", "/admin/rooms").await;
        let room = rooms.as_array().unwrap().iter().find(|r| r["name"] == "chat").cloned().unwrap();
        if room["members"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "presence still shows {room}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send `text` to `room` in room-protocol mode and read the next delivery in that room
/// as JSON (skipping other rooms' messages).
async fn ask_in(client: &mut Client, room: &str, text: &str) -> serde_json::Value {
    send_text(client, &serde_json::json!({"send": room, "text": text}).to_string()).await;
    loop {
        let reply = recv_json(client).await;
        if reply["room"] == room {
            return serde_json::from_str(reply["text"].as_str().expect("a text delivery")).expect("JSON");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_in_rooms_owned_by_different_nodes() {
    use serde_json::json;
    let redis = Redis::start().await;
    let plugins = PluginDir::new(&[("chaos", None)]);
    let lease = Duration::from_millis(1500);
    let one = Node::start(config(&redis, lease, Some(&plugins)));
    let two = Node::start(config(&redis, lease, Some(&plugins)));

    // Room `chaos:b` lives on node two (its first member is there); xena, in room-protocol
    // mode on node one, owns `chaos:a` there and joins `chaos:b` across the cluster.
    let mut yan = two.connect("chaos:b?identity=yan").await;
    two.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
    let mut xena = connect_rooms(one.addr, "/ws/chaos:a?identity=xena").await;
    assert_eq!(recv_json(&mut xena).await, json!({"joined": "chaos:a", "ref": 0}));
    send_text(&mut xena, &json!({"join": "chaos:b", "ref": 1, "params": {"seat": 1}}).to_string()).await;
    assert_eq!(recv_json(&mut xena).await, json!({"joined": "chaos:b", "ref": 1}));

    // The owner on node two saw xena's identity and the join's params, and both members.
    let me = ask_in(&mut xena, "chaos:b", "whoami").await;
    assert_eq!(me["identity"], json!({"user": "xena"}), "{me}");
    assert_eq!(me["params"], json!({"seat": 1}), "{me}");
    let members = ask_in(&mut xena, "chaos:b", "members").await;
    assert_eq!(members.as_array().map(Vec::len), Some(2), "{members}");
    let local = ask_in(&mut xena, "chaos:a", "whoami").await;
    assert_eq!(local["identity"], json!({"user": "xena"}), "{local}");

    // Messages cross both ways, tagged for xena, raw for yan.
    send_text(&mut yan, "hello from two").await;
    loop {
        let delivery = recv_json(&mut xena).await;
        if delivery == json!({"room": "chaos:b", "text": "hello from two"}) {
            break;
        }
        assert!(delivery.get("room").is_some(), "unexpected {delivery}");
    }
    send_text(&mut xena, &json!({"send": "chaos:b", "text": "hello from one"}).to_string()).await;
    assert_eq!(recv_text(&mut yan).await, "hello from one");

    // The owner on node two adds xena (on node one) to a third room.
    send_text(&mut xena, &json!({"send": "chaos:b", "text": "add:chaos:c"}).to_string()).await;
    assert_eq!(recv_json(&mut xena).await, json!({"joined": "chaos:c"}));
    let moved = ask_in(&mut xena, "chaos:c", "whoami").await;
    assert_eq!(moved["params"], json!({"by": "chaos:b"}), "{moved}");

    // A join the remote owner refuses: the same `error` as on one node.
    let mut zed = two.connect("chaos:b3").await;
    // Once the room's plugin answers, node two owns the room.
    send_text(&mut zed, "members").await;
    recv_text(&mut zed).await;
    send_text(&mut xena, &json!({"join": "chaos:b3", "ref": 3, "params": {"refuse": true}}).to_string())
        .await;
    assert_eq!(
        recv_json(&mut xena).await,
        json!({"error": "refused", "status": 403, "room": "chaos:b3", "ref": 3})
    );
    send_text(&mut zed, "members").await;
    let members: serde_json::Value = serde_json::from_str(&recv_text(&mut zed).await).unwrap();
    assert_eq!(members.as_array().map(Vec::len), Some(1), "the refused member is not in: {members}");

    // Leaving the remote room: `left` with the ref, and the owner's presence shrinks.
    send_text(&mut xena, &json!({"leave": "chaos:b", "ref": 4}).to_string()).await;
    assert_eq!(recv_json(&mut xena).await, json!({"left": "chaos:b", "ref": 4, "code": 1000, "reason": ""}));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        send_text(&mut yan, "members").await;
        let members: serde_json::Value = serde_json::from_str(&recv_text(&mut yan).await).unwrap();
        if members.as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "xena never left chaos:b: {members}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((xena, yan, zed));
    one.stop().await;
    two.stop().await;
}

/// Wait until node `addr` (the only node yet) has taken the lease of `room`.
async fn wait_owned(addr: std::net::SocketAddr, room: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rooms = admin_json(addr, "secret", "/admin/rooms").await;
        if rooms
            .as_array()
            .is_some_and(|rooms| rooms.iter().any(|r| r["name"] == room && r["owner"].is_string()))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{room} never got an owner: {rooms}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two nodes of a cluster whose rooms keep history: room `news` lives on node one (a
/// raw publisher there), and a room-protocol client on node two has joined it.
struct HistoryCluster {
    redis: Redis,
    one: Node,
    two: Node,
    publisher: Client,
    client: Client,
    /// The history epoch the client's `joined` gave (at offset 0).
    epoch: String,
}

impl HistoryCluster {
    async fn start() -> Self {
        let redis = Redis::start().await;
        let config =
            |redis: &Redis| Config { history_size: 100, ..config(redis, Duration::from_millis(1500), None) };
        let one = Node::start(config(&redis));
        let publisher = one.connect("news").await;
        one.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
        // Node one owns the room before node two exists.
        wait_owned(one.addr, "news").await;
        let two = Node::start(config(&redis));
        let mut client = connect_rooms(two.addr, "/ws").await;
        send_text(&mut client, &serde_json::json!({"join": "news", "ref": 1}).to_string()).await;
        let joined = recv_json(&mut client).await;
        assert_eq!(joined["offset"], 0, "{joined}");
        let epoch =
            joined["epoch"].as_str().unwrap_or_else(|| panic!("the owner's history: {joined}")).to_owned();
        HistoryCluster { redis, one, two, publisher, client, epoch }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_than_the_owner() {
    use serde_json::json;
    let HistoryCluster { redis: _redis, one, two, mut publisher, mut client, epoch } =
        HistoryCluster::start().await;
    let mut last = 0;
    send_text(&mut publisher, "before").await;
    let delivery = recv_json(&mut client).await;
    assert_eq!(delivery["text"], "before", "{delivery}");
    assert_eq!(delivery["offset"], last + 1, "offsets cross nodes: {delivery}");
    last += 1;

    // Gone without a word; 20 messages later it comes back, to node two again.
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while two.metric("roomcast_room_members").await > 0.0 {
        assert!(Instant::now() < deadline, "the member never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..20 {
        send_text(&mut publisher, &format!("missed {n}")).await;
    }
    one.wait_metric("roomcast_history_messages", 21.0, Duration::from_secs(5)).await;
    let mut back = connect_rooms(two.addr, "/ws").await;
    send_text(
        &mut back,
        &json!({"join": "news", "ref": 2, "since": {"epoch": epoch, "offset": last}}).to_string(),
    )
    .await;
    let joined = recv_json(&mut back).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["offset"], last + 20, "{joined}");
    for n in 0..20 {
        let delivery = recv_json(&mut back).await;
        assert_eq!(
            (delivery["text"].as_str(), delivery["offset"].as_u64()),
            (Some(&*format!("missed {n}")), Some(last + 1 + n))
        );
    }
    send_text(&mut publisher, "live").await;
    let delivery = recv_json(&mut back).await;
    assert_eq!((delivery["text"].as_str(), delivery["offset"].as_u64()), (Some("live"), Some(last + 21)));
    drop((back, publisher));
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_after_the_owner_died_and_the_room_was_taken_over() {
    use serde_json::json;
    let HistoryCluster { redis: _redis, one, two, mut publisher, mut client, epoch } =
        HistoryCluster::start().await;
    for n in 1..=5 {
        send_text(&mut publisher, &format!("a{n}")).await;
        let delivery = recv_json(&mut client).await;
        assert_eq!(delivery["offset"], n, "{delivery}");
    }

    // The owner dies; the client drops too. A member of node two keeps talking: node
    // two holds its messages until it has taken the room over.
    one.kill();
    drop(publisher);
    drop(client);
    // Once Redis has seen the dead owner's connections close: what is published to a
    // subscriber that is still counted is lost with it (the owner died mid-message).
    let deadline = Instant::now() + Duration::from_secs(10);
    while _redis.subscribers(&roomcast::cluster::store::in_channel("news")).await != Some(0) {
        assert!(Instant::now() < deadline, "Redis still counts the dead owner's subscription");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut talker = two.connect("news").await;
    for n in 1..=5 {
        send_text(&mut talker, &format!("b{n}")).await;
    }
    // Restored (a1 to a5) plus the five new ones.
    let deadline = Instant::now() + Duration::from_secs(15);
    while two.metric("roomcast_history_messages").await < 10.0 {
        assert!(Instant::now() < deadline, "node two never took the room over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut back = connect_rooms(two.addr, "/ws").await;
    send_text(
        &mut back,
        &json!({"join": "news", "ref": 2, "since": {"epoch": epoch, "offset": 5}}).to_string(),
    )
    .await;
    let joined = recv_json(&mut back).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["offset"], 10, "the offsets carried on: {joined}");
    assert_ne!(joined["epoch"], epoch.as_str(), "a takeover starts a new epoch: {joined}");
    for n in 1..=5u64 {
        let delivery = recv_json(&mut back).await;
        assert_eq!(
            (delivery["text"].as_str(), delivery["offset"].as_u64()),
            (Some(&*format!("b{n}")), Some(5 + n)),
            "{delivery}"
        );
    }
    // A position the old owner may have sent but never stored is not served.
    let mut ahead = connect_rooms(two.addr, "/ws").await;
    send_text(
        &mut ahead,
        &json!({"join": "news", "ref": 3, "since": {"epoch": epoch, "offset": 6}}).to_string(),
    )
    .await;
    assert_eq!(recv_json(&mut ahead).await["recovered"], false);
    drop((back, ahead, talker));
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_turns_recovery_off_and_its_end_turns_it_back_on() {
    use serde_json::json;
    let mut redis = Redis::start().await;
    let lease = Duration::from_millis(1500);
    let node = Node::start(Config { history_size: 100, ..config(&redis, lease, None) });
    let mut publisher = node.connect("news").await;
    wait_owned(node.addr, "news").await;
    let join = |since: serde_json::Value| json!({"join": "news", "ref": 1, "since": since}).to_string();
    let mut client = connect_rooms(node.addr, "/ws").await;
    send_text(&mut client, &json!({"join": "news", "ref": 1}).to_string()).await;
    let epoch = recv_json(&mut client).await["epoch"].as_str().unwrap().to_owned();
    send_text(&mut publisher, "one").await;
    assert_eq!(recv_json(&mut client).await["offset"], 1);

    redis.kill();
    node.wait_metric("roomcast_cluster_up", 0.0, Duration::from_secs(5)).await;
    // Alone, the node still serves its members, but answers no recovery.
    let mut during = connect_rooms(node.addr, "/ws").await;
    send_text(&mut during, &join(json!({"epoch": epoch, "offset": 0}))).await;
    let joined = recv_json(&mut during).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    send_text(&mut publisher, "two").await;
    assert_eq!(recv_json(&mut during).await["text"], "two", "live messages still flow");

    redis.restart().await;
    node.wait_metric("roomcast_cluster_up", 1.0, Duration::from_secs(15)).await;
    wait_owned(node.addr, "news").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Once the node holds the room's lease again, a position it stored is served.
        let mut after = connect_rooms(node.addr, "/ws").await;
        send_text(&mut after, &join(json!({"epoch": epoch, "offset": 0}))).await;
        let joined = recv_json(&mut after).await;
        if joined["recovered"] == true {
            assert_eq!(recv_json(&mut after).await["text"], "one");
            break;
        }
        assert!(Instant::now() < deadline, "recovery never came back: {joined}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((client, during, publisher));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killed_mid_stream_misses_nothing_the_history_holds() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let HistoryCluster { redis, one, two, mut publisher, mut client, .. } = HistoryCluster::start().await;
    // A raw member on node two too: it is filled in with the payloads, not the frames.
    // It hears the room once the owner has admitted it.
    let mut raw = two.connect("news").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send_text(&mut publisher, "warm-up").await;
        if next_text(&mut raw, Duration::from_millis(100)).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the raw member never heard the room");
    }
    while next_text(&mut raw, Duration::from_millis(250)).await.is_some() {}
    let mut base = 0;
    while let Some(text) = next_text(&mut client, Duration::from_millis(250)).await {
        let delivery: serde_json::Value = serde_json::from_str(&text).unwrap();
        base = delivery["offset"].as_u64().unwrap();
    }

    // The publisher streams; meanwhile node two's subscription is killed twice.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let streaming = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                send_text(&mut publisher, &n.to_string()).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (publisher, n)
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed = redis.command("CLIENT KILL TYPE pubsub").await.expect("CLIENT KILL");
        assert!(killed.starts_with(':'), "{killed}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut publisher, sent) = streaming.await.unwrap();
    // One more after the stream, so a gap at its very end shows too.
    send_text(&mut publisher, "end").await;

    // Every message, once and in order, on both members of node two.
    for n in 1..=sent {
        let delivery = recv_json(&mut client).await;
        assert_eq!(
            (delivery["text"].as_str(), delivery["offset"].as_u64()),
            (Some(&*n.to_string()), Some(base + n)),
            "message {n} of {sent}"
        );
        assert_eq!(recv_text(&mut raw).await, n.to_string(), "raw member, message {n} of {sent}");
    }
    assert_eq!(recv_json(&mut client).await["text"], "end");
    assert_eq!(recv_text(&mut raw).await, "end");
    assert!(two.metric("roomcast_cluster_resyncs_total").await >= 1.0, "the subscription was dropped");
    assert_eq!(two.metric("roomcast_cluster_gaps_total").await, 0.0, "every gap was filled");
    drop((client, raw, publisher));
    one.stop().await;
    two.stop().await;
}

/// Deliveries tagged with an earlier lease term than the follower has seen come from
/// an owner that lost the room (it stalled past its lease): they are dropped and
/// counted, and the owner's later ones still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_an_earlier_lease_term_are_dropped() {
    use roomcast::cluster::{store, wire};
    let HistoryCluster { redis, one, two, mut publisher, mut client, .. } = HistoryCluster::start().await;
    send_text(&mut publisher, "first").await;
    assert_eq!(recv_json(&mut client).await["text"], "first");
    let stale = wire::FromOwner {
        node: "a-node-that-lost-the-room".into(),
        event: wire::OutEvent::Deliveries {
            term: 1,
            seq: 1,
            items: vec![wire::Delivery::Broadcast {
                payload: roomcast::plugin::Payload::text("stale"),
                except: vec![],
                offset: None,
            }],
        },
    };
    let reply = redis.publish(&store::out_channel("news"), &stale.encode()).await.expect("PUBLISH");
    assert!(reply.starts_with(':') && reply != ":0", "node two hears the channel: {reply}");
    two.wait_metric("roomcast_cluster_stale_total", 1.0, Duration::from_secs(5)).await;
    send_text(&mut publisher, "second").await;
    assert_eq!(recv_json(&mut client).await["text"], "second", "the stale delivery never arrives");
    drop((client, publisher));
    one.stop().await;
    two.stop().await;
}
