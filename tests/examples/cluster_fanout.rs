//! Cross-node fan-out against one node: the same load through one Roomcast node, and
//! through two nodes sharing the room through Redis.
//!
//! Run with: `cargo run --release -p roomcast-tests --example cluster_fanout [-- RECEIVERS MESSAGES]`
//! (needs `redis-server`, which `scripts/setup` installs).
//!
//! One sender and RECEIVERS receivers in one room with the default behaviour (every
//! message to every other member), 64-byte messages stamped with their send time.
//! Three layouts: one node; two nodes with the sender on the room's owner (receivers
//! split evenly); two nodes with the sender on the follower (each message goes to the
//! owner and back). Each is run saturated (throughput: deliveries per second) and
//! paced at 200 messages per second (latency percentiles). Servers, Redis and clients
//! share this machine's cores, so compare the layouts, not the absolute numbers.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use roomcast::config::Config;
use roomcast_tests::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

struct Outcome {
    deliveries_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// `sender` sends `messages` stamped messages (every `pace`, or as fast as it can);
/// every receiver counts them and records their latency.
async fn run(mut sender: Client, receivers: Vec<Client>, messages: usize, pace: Option<Duration>) -> Outcome {
    let epoch = Instant::now();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(messages * receivers.len())));
    let mut tasks = Vec::new();
    for mut receiver in receivers {
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            let mut mine = Vec::with_capacity(messages);
            while got < messages {
                let message = match tokio::time::timeout(Duration::from_secs(20), receiver.next()).await {
                    Ok(Some(Ok(message))) => message,
                    other => {
                        eprintln!("a receiver ended after {got} messages: {other:?}");
                        break;
                    }
                };
                if let Message::Text(text) = message
                    && let Some(stamp) = text.strip_prefix("t:").and_then(|t| t.split(' ').next())
                {
                    let sent = Duration::from_nanos(stamp.parse().unwrap());
                    mine.push(epoch.elapsed().saturating_sub(sent));
                    got += 1;
                }
            }
            latencies.lock().unwrap().extend(mine);
            got
        }));
    }
    let started = Instant::now();
    for _ in 0..messages {
        let stamp = epoch.elapsed().as_nanos();
        let text = format!("t:{stamp} {}", "x".repeat(40));
        sender.send(Message::text(text)).await.unwrap();
        if let Some(pace) = pace {
            tokio::time::sleep(pace).await;
        }
    }
    let receivers = tasks.len();
    let mut delivered = 0;
    for task in tasks {
        delivered += task.await.unwrap();
    }
    if delivered < messages * receivers {
        eprintln!("only {delivered} of {} deliveries arrived", messages * receivers);
    }
    let elapsed = started.elapsed();
    let mut all = std::mem::take(&mut *latencies.lock().unwrap());
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Outcome { deliveries_per_s: delivered as f64 / elapsed.as_secs_f64(), p50: at(0.5), p99: at(0.99) }
}

/// Connect the sender and receivers as the layout says and warm the room up.
async fn layout(nodes: &[&Node], sender_on: usize, receivers: usize, room: &str) -> (Client, Vec<Client>) {
    // The first member's node owns the room.
    let mut sender = nodes[sender_on].connect(room).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut clients = Vec::with_capacity(receivers);
    for i in 0..receivers {
        clients.push(nodes[i % nodes.len()].connect(room).await);
    }
    // Until everyone hears the sender.
    for client in clients.iter_mut() {
        loop {
            sender.send(Message::text("warm")).await.unwrap();
            match tokio::time::timeout(Duration::from_millis(200), client.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => break,
                _ => continue,
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in clients.iter_mut() {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), client.next()).await {}
    }
    (sender, clients)
}

/// Open `room` with a first member on `node`, and give the node time to take the
/// room's lease: the owner is the node of the room's first member.
async fn open_room(node: &Node, room: &str) -> Client {
    let first = node.connect(room).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let receivers = args.first().copied().unwrap_or(200);
    let messages = args.get(1).copied().unwrap_or(2000);
    let redis = Redis::start().await;
    println!("{receivers} receivers, {messages} messages of 64 bytes; paced runs: 200 messages/s");
    println!("| layout | deliveries/s (saturated) | p50 latency (paced) | p99 latency (paced) |");
    println!("|---|---|---|---|");
    let config = |redis: Option<&Redis>| Config {
        redis: redis.map(Redis::url),
        max_queue_bytes: 64 << 20,
        ..test_config()
    };
    let single = Node::start(config(None));
    let owner = Node::start(config(Some(&redis)));
    let follower = Node::start(config(Some(&redis)));
    let cases: [(&str, Vec<&Node>, usize); 3] = [
        ("one node", vec![&single], 0),
        ("two nodes, sender on the owner", vec![&owner, &follower], 0),
        ("two nodes, sender on the follower", vec![&owner, &follower], 1),
    ];
    for (n, (name, nodes, sender_on)) in cases.into_iter().enumerate() {
        let room = format!("bench{n}");
        let first = open_room(nodes[0], &room).await;
        let (sender, clients) = layout(&nodes, sender_on, receivers, &room).await;
        let saturated = run(sender, clients, messages, None).await;
        let room = format!("paced{n}");
        let first_paced = open_room(nodes[0], &room).await;
        let (sender, clients) = layout(&nodes, sender_on, receivers, &room).await;
        let paced = run(sender, clients, messages.min(1000), Some(Duration::from_millis(5))).await;
        drop((first, first_paced));
        for node in &nodes {
            let (_, text) = http_get(node.addr, "/metrics").await.unwrap();
            for line in text.lines().filter(|l| !l.starts_with('#') && !l.ends_with(" 0")) {
                if line.contains("closed") || line.contains("cluster") {
                    eprintln!("  {} {line}", node.addr);
                }
            }
        }
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms |",
            saturated.deliveries_per_s,
            paced.p50.as_secs_f64() * 1e3,
            paced.p99.as_secs_f64() * 1e3
        );
    }
}
