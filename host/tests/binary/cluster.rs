//! Cluster nodes as separate processes, for what only a process can do: be stopped
//! (SIGSTOP) past its lease while its sockets stay open, and resume.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::{RawWs, RedisServer, Server, eventually, metric, signal};

/// Every text message `client` receives until none has come for `quiet`.
fn texts_until_quiet(client: &mut RawWs, quiet: Duration) -> Vec<String> {
    client.stream.set_read_timeout(Some(quiet)).unwrap();
    let mut texts = Vec::new();
    while let Ok((opcode, payload)) = client.read() {
        if opcode == 0x1 {
            texts.push(String::from_utf8(payload).unwrap());
        }
    }
    client.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    texts
}

/// The texts that appear more than once in `texts`, with their counts.
fn repeated(texts: &[String]) -> HashMap<&str, usize> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for text in texts {
        *counts.entry(text).or_default() += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}

/// An owner stopped past its lease finds, when it resumes, that another node runs
/// its room: it must not act on what it heard meanwhile (the successor did), and what
/// it published late must not reach anyone. Every member sees each message at most
/// once, and everything sent after the resume exactly once, in order.
#[test]
fn an_owner_stopped_past_its_lease_and_resumed_delivers_nothing_twice() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis", &url, "--cluster-lease", "1s", "--history-size", "1000"];
    let one = Server::start(&args);
    let mut on_one = RawWs::connect(one.addr, "room");
    assert!(
        eventually(Duration::from_secs(10), || metric(one.addr, "roomcast_cluster_owned_rooms") == Some(1.0)),
        "node one never owned the room"
    );
    let two = Server::start(&args);
    let three = Server::start(&args);
    // A sender on each of the nodes that may take the room over: whichever does not,
    // sends through the room's `in` channel, which the stopped owner hears too.
    let mut senders = [RawWs::connect(two.addr, "room"), RawWs::connect(three.addr, "room")];
    let mut on_two = RawWs::connect(two.addr, "room");
    let mut on_three = RawWs::connect(three.addr, "room");
    // Until the owner has admitted the members of nodes two and three.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for sender in &mut senders {
            sender.send(true, 0x1, b"warm-up").unwrap();
        }
        let heard = |client: &mut RawWs| !texts_until_quiet(client, Duration::from_millis(200)).is_empty();
        if heard(&mut on_three) & heard(&mut on_two) & heard(&mut on_one) {
            break;
        }
        assert!(Instant::now() < deadline, "the members of nodes two and three never heard the room");
    }
    for client in senders.iter_mut().chain([&mut on_one, &mut on_two, &mut on_three]) {
        texts_until_quiet(client, Duration::from_millis(300));
    }

    // Node one stops for 2.5 leases while node two's member keeps sending: another
    // node takes the room over, and node one's subscription piles up what it missed.
    signal(one.child.id(), "STOP");
    let stopped = Instant::now();
    let mut n = 0;
    while stopped.elapsed() < Duration::from_millis(2500) {
        for (s, sender) in senders.iter_mut().enumerate() {
            sender.send(true, 0x1, format!("during {s} {n}").as_bytes()).unwrap();
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(one.child.id(), "CONT");
    let owners = || {
        [&one, &two, &three]
            .iter()
            .map(|node| metric(node.addr, "roomcast_cluster_owned_rooms").unwrap_or(0.0))
            .sum::<f64>()
    };
    assert!(eventually(Duration::from_secs(10), || owners() == 1.0), "one owner after the resume");
    std::thread::sleep(Duration::from_millis(1500));
    for n in 0..20 {
        senders[n % 2].send(true, 0x1, format!("after {n}").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let after: Vec<String> = (0..20).map(|n| format!("after {n}")).collect();
    for (name, client) in [("one", &mut on_one), ("two", &mut on_two), ("three", &mut on_three)] {
        let texts = texts_until_quiet(client, Duration::from_secs(2));
        assert!(repeated(&texts).is_empty(), "node {name}'s member heard twice: {:?}", repeated(&texts));
        // Each sender's messages in the order it sent them.
        for s in 0..2 {
            let prefix = format!("during {s} ");
            let order: Vec<u32> =
                texts.iter().filter_map(|t| t.strip_prefix(&prefix)?.parse().ok()).collect();
            assert!(order.is_sorted(), "node {name}'s member, sender {s}: {order:?}");
        }
        let late: Vec<&String> = texts.iter().filter(|t| t.starts_with("after")).collect();
        assert_eq!(late, after.iter().collect::<Vec<_>>(), "node {name}'s member, after the resume");
    }
    let stale: f64 = [&one, &two, &three]
        .iter()
        .map(|node| metric(node.addr, "roomcast_cluster_stale_total").unwrap_or(0.0))
        .sum();
    eprintln!("stale records dropped: {stale}");
}
