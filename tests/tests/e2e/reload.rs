//! Hot reload end to end: plugin files replaced, broken, deleted and re-added under a
//! live server, while clients keep talking; the admin API reports it all.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use roomcast::config::Config;
use roomcast_tests::*;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "test-admin-token";

async fn start(dir: &PluginDir) -> TestServer {
    TestServer::start(Config {
        plugins: Some(dir.path.clone()),
        admin_token: Some(TOKEN.into()),
        plugin_cache: None,
        ..test_config()
    })
    .await
}

/// Install `built` as `name` the safe way: write a temporary file, then rename.
fn install_atomically(dir: &Path, built: &str, name: &str) {
    let temp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(built_plugins().join(format!("{built}.wasm")), &temp).unwrap();
    std::fs::rename(&temp, dir.join(format!("{name}.wasm"))).unwrap();
}

async fn admin(server: &TestServer, path: &str) -> Value {
    admin_json(server.addr, TOKEN, path).await
}

fn plugin<'a>(plugins: &'a Value, name: &str) -> &'a Value {
    plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {plugins}"))
}

/// Send `probe` until the reply carries `prefix`, within 5 s of `landed` (a reload is
/// about 0.3 s on a quiet machine; the bound is for a busy one, not a measure).
async fn wait_for_behaviour(client: &mut Client, prefix: &str, landed: Instant) {
    loop {
        send_text(client, "probe").await;
        let reply = recv_text(client).await;
        if reply.starts_with(prefix) {
            return;
        }
        assert!(
            landed.elapsed() < Duration::from_secs(5),
            "behaviour `{prefix}` not live within 5 s: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_traffic_drop_and_lose_nothing() {
    let dir = PluginDir::new(&[]);
    install_atomically(&dir.path, "taga", "tag");
    let server = start(&dir).await;
    const ROOMS: usize = 10;
    const PER_ROOM: usize = 10;
    let stop = Arc::new(AtomicBool::new(false));
    // Members start sending once everyone has joined, so each sees every message.
    let go = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for room in 0..ROOMS {
        for member in 0..PER_ROOM {
            let (client, _) =
                tokio_tungstenite::connect_async(server.url(&format!("tag:{room}"))).await.unwrap();
            let stop = stop.clone();
            let started = go.clone().notified_owned();
            tasks.push(tokio::spawn(async move {
                // Each member sends numbered messages; every member of the room (the
                // sender included: tag plugins broadcast to all) must see each one
                // exactly once, tagged by exactly one version.
                let (mut write, mut read) = client.split();
                let sender = tokio::spawn(async move {
                    started.await;
                    let mut sent = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        write.send(Message::text(format!("{member}-{sent}"))).await.expect("send");
                        sent += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    // Mark the end so readers know when they have everything.
                    write.send(Message::text(format!("{member}-end"))).await.expect("send end");
                    (sent, write)
                });
                let mut seen: HashMap<String, u32> = HashMap::new();
                let mut ended = 0;
                let mut tags = [0u32; 2];
                while ended < PER_ROOM {
                    let message = tokio::time::timeout(Duration::from_secs(10), read.next())
                        .await
                        .expect("a message within 10 s")
                        .expect("connection open")
                        .expect("no error");
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let (tag, body) = text.split_once(':').unwrap_or_else(|| panic!("untagged: {text}"));
                    match tag {
                        "A" => tags[0] += 1,
                        "B" => tags[1] += 1,
                        other => panic!("handled by no known version: {other}"),
                    }
                    if body.ends_with("-end") {
                        ended += 1;
                        continue;
                    }
                    *seen.entry(body.to_owned()).or_default() += 1;
                }
                let (sent, _write) = sender.await.unwrap();
                (member, sent, seen, tags)
            }));
        }
    }
    server.wait_metric("roomcast_room_members", (ROOMS * PER_ROOM) as f64, Duration::from_secs(10)).await;
    go.notify_waiters();

    let (mut probe, _) = tokio_tungstenite::connect_async(server.url("tag:probe")).await.unwrap();
    for swap in 0..20 {
        let (built, prefix) = if swap % 2 == 0 { ("tagb", "B:") } else { ("taga", "A:") };
        let landed = Instant::now();
        install_atomically(&dir.path, built, "tag");
        wait_for_behaviour(&mut probe, prefix, landed).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not one connection dropped during the swaps.
    assert_eq!(server.metric("roomcast_connections").await, (ROOMS * PER_ROOM + 1) as f64);
    for reason in ["client", "reset", "protocol", "slow_consumer", "plugin", "plugin_failure"] {
        let series = format!("roomcast_connections_closed_total{{reason=\"{reason}\"}}");
        assert_eq!(server.metric(&series).await, 0.0, "{series}");
    }
    stop.store(true, Ordering::Relaxed);

    let calls: Vec<String> = server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("roomcast_plugin_calls_total"))
        .map(String::from)
        .collect();
    println!("{calls:#?}");
    // Tally: within each room, every member saw every message of every member once.
    let mut results = Vec::new();
    for task in tasks {
        results.push(
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("member finished").unwrap(),
        );
    }
    let mut both_versions = 0;
    for room in results.chunks(PER_ROOM) {
        let sent: HashMap<usize, u32> = room.iter().map(|(member, sent, _, _)| (*member, *sent)).collect();
        for (_, _, seen, tags) in room {
            for (member, count) in &sent {
                for n in 0..*count {
                    let key = format!("{member}-{n}");
                    assert_eq!(seen.get(&key).copied(), Some(1), "message {key} lost or duplicated");
                }
            }
            assert_eq!(seen.len(), sent.values().sum::<u32>() as usize, "no unexpected messages");
            if tags[0] > 0 && tags[1] > 0 {
                both_versions += 1;
            }
        }
    }
    assert_eq!(both_versions, ROOMS * PER_ROOM, "every member saw both behaviours");
    let plugins = admin(&server, "/admin/plugins").await;
    assert_eq!(plugin(&plugins, "tag")["versions"], 21);
    server.stop().await;
}

#[tokio::test]
async fn a_stateful_plugin_keeps_its_count_across_reloads() {
    let dir = PluginDir::new(&[("counter", None)]);
    let server = start(&dir).await;
    let mut client = server.connect("counter").await;
    for n in 1..=3 {
        send_text(&mut client, "x").await;
        assert_eq!(serde_json::from_str::<Value>(&recv_text(&mut client).await).unwrap()["count"], n);
    }
    // A new version (a config change is a new version too) takes over the live room.
    std::fs::write(dir.path.join("counter.toml"), "[config]\nnote = \"v2\"\n").unwrap();
    let landed = Instant::now();
    loop {
        if admin(&server, "/admin/rooms").await[0]["version"] == 2 {
            break;
        }
        assert!(landed.elapsed() < Duration::from_secs(2), "counter v2 never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_text(&mut client, "x").await;
    assert_eq!(serde_json::from_str::<Value>(&recv_text(&mut client).await).unwrap()["count"], 4);
    server.stop().await;
}

#[tokio::test]
async fn a_reload_goes_live_on_winch_then_new_instances_get_cranelift() {
    let dir = PluginDir::new(&[("counter", None)]);
    let server = start(&dir).await;
    let mut client = server.connect("counter").await;
    send_text(&mut client, "x").await;
    assert_eq!(serde_json::from_str::<Value>(&recv_text(&mut client).await).unwrap()["count"], 1);
    // The same code with one more custom section: new content, so it is compiled.
    let mut wasm = std::fs::read(built_plugins().join("counter.wasm")).unwrap();
    wasm.extend_from_slice(&[0, 3, 1, b'x', 2]);
    let temp = dir.path.join(".counter.wasm.tmp");
    std::fs::write(&temp, &wasm).unwrap();
    std::fs::rename(&temp, dir.path.join("counter.wasm")).unwrap();
    // Live on Winch's code first; Cranelift's follows, and only a tier-up reports
    // `optimize_ms`.
    let landed = Instant::now();
    let counter = loop {
        let plugins = admin(&server, "/admin/plugins").await;
        let counter = plugin(&plugins, "counter").clone();
        if counter["version"] == 2 && counter["optimize_ms"].is_number() {
            break counter;
        }
        assert!(
            landed.elapsed() < Duration::from_secs(10),
            "counter v2 never got Cranelift's code: {counter}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(counter["compiler"], "cranelift");
    assert!(counter["compile_ms"].is_number(), "{counter}");
    // The live room switched once, to Winch's code, and kept its count; a room made
    // now runs Cranelift's.
    assert_eq!(admin(&server, "/admin/rooms").await[0]["version"], 2);
    send_text(&mut client, "x").await;
    assert_eq!(serde_json::from_str::<Value>(&recv_text(&mut client).await).unwrap()["count"], 2);
    let mut other = server.connect("counter:b").await;
    send_text(&mut other, "x").await;
    assert_eq!(serde_json::from_str::<Value>(&recv_text(&mut other).await).unwrap()["count"], 1);
    server.stop().await;
}

#[tokio::test]
async fn broken_files_leave_the_old_version_serving() {
    let dir = PluginDir::new(&[("taga", None)]);
    let server = start(&dir).await;
    let mut client = server.connect("taga").await;
    send_text(&mut client, "hi").await;
    assert_eq!(recv_text(&mut client).await, "A:hi");
    type Breaker = Box<dyn Fn(&Path)>;
    let broken: [(&str, Breaker); 4] = [
        ("not a WebAssembly file", Box::new(|p: &Path| std::fs::write(p, b"garbage").unwrap())),
        ("core WebAssembly module", Box::new(|p: &Path| std::fs::write(p, b"\0asm\x01\0\0\0").unwrap())),
        (
            "roomcast:plugin/room@0.9.0",
            Box::new(|p: &Path| {
                std::fs::copy(built_plugins().join("otherworld.wasm"), p).unwrap();
            }),
        ),
        (
            "panicked",
            Box::new(|p: &Path| {
                std::fs::write(p.with_extension("toml"), "[config]\npanic_in_init = true\n").unwrap();
                std::fs::copy(built_plugins().join("chaos.wasm"), p).unwrap();
            }),
        ),
    ];
    for (expected, write) in broken {
        let temp = dir.path.join(".taga.wasm.tmp");
        write(&temp);
        if temp.with_extension("toml").exists() {
            std::fs::rename(temp.with_extension("toml"), dir.path.join("taga.toml")).unwrap();
        }
        std::fs::rename(&temp, dir.path.join("taga.wasm")).unwrap();
        let landed = Instant::now();
        loop {
            let plugins = admin(&server, "/admin/plugins").await;
            let error = plugin(&plugins, "taga")["last_error"].as_str().unwrap_or("").to_owned();
            if error.contains(expected) {
                assert!(error.contains("taga"), "the error names the file: {error}");
                break;
            }
            assert!(landed.elapsed() < Duration::from_secs(3), "no `{expected}` error reported: {plugins}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        send_text(&mut client, "still").await;
        assert_eq!(
            recv_text(&mut client).await,
            "A:still",
            "the old version keeps serving after: {expected}"
        );
        let _ = std::fs::remove_file(dir.path.join("taga.toml"));
    }
    // The next good file is picked up.
    install_atomically(&dir.path, "tagb", "taga");
    wait_for_behaviour(&mut client, "B:", Instant::now()).await;
    server.stop().await;
}

#[tokio::test]
async fn delete_returns_rooms_to_default_and_re_adding_restores_the_plugin() {
    let dir = PluginDir::new(&[("echo", None)]);
    let server = start(&dir).await;
    let mut a = server.connect("echo").await;
    let mut b = server.connect("echo").await;
    send_text(&mut a, "1").await;
    assert_eq!(recv_text(&mut a).await, "1", "echo");
    std::fs::remove_file(dir.path.join("echo.wasm")).unwrap();
    let landed = Instant::now();
    loop {
        if admin(&server, "/admin/rooms").await[0]["plugin"].is_null() {
            break;
        }
        assert!(landed.elapsed() < Duration::from_secs(2), "the room never returned to the default");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_text(&mut a, "2").await;
    assert_eq!(recv_text(&mut b).await, "2", "default broadcast");
    // Re-added with a plain copy over (not atomic): picked up once the file is stable.
    std::fs::copy(built_plugins().join("echo.wasm"), dir.path.join("echo.wasm")).unwrap();
    let landed = Instant::now();
    loop {
        send_text(&mut a, "3").await;
        match tokio::time::timeout(Duration::from_millis(100), a.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text == "3" => break,
            _ => {}
        }
        while tokio::time::timeout(Duration::from_millis(1), b.next()).await.is_ok() {}
        assert!(landed.elapsed() < Duration::from_secs(2), "echo never came back");
    }
    server.stop().await;
}

#[tokio::test]
async fn admin_api_needs_the_token_and_publishes() {
    let dir = PluginDir::new(&[("chat", None)]);
    let server = start(&dir).await;
    let mut member = server.connect("news").await;
    server.wait_metric("roomcast_room_members", 1.0, Duration::from_secs(5)).await;
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let response = raw_request(
            server.addr,
            format!("GET /admin/rooms HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status_of(&response), Some(401), "{response}");
        assert!(response.to_ascii_lowercase().contains("www-authenticate: bearer"), "{response}");
    }
    let rooms = admin(&server, "/admin/rooms").await;
    assert_eq!(rooms, serde_json::json!([{"name": "news", "members": 1, "plugin": null, "version": null}]));
    let plugins = admin(&server, "/admin/plugins").await;
    let chat = plugin(&plugins, "chat");
    assert_eq!(chat["versions"], 1);
    assert_eq!(chat["sha256"].as_str().unwrap().len(), 64);
    assert!(chat["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert!(chat["last_error"].is_null());
    // Loaded at start-up: compiled with Cranelift at once, nothing to optimise later.
    assert_eq!(chat["compiler"], "cranelift");
    assert!(chat["load_ms"].as_f64().unwrap() >= chat["compile_ms"].as_f64().unwrap(), "{chat}");
    assert!(chat["optimize_ms"].is_null());

    let publish = |content_type: &'static str, body: &'static [u8]| {
        let addr = server.addr;
        async move {
            let mut request = format!(
                "POST /admin/rooms/news/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(body);
            raw_request(addr, &request).await.unwrap()
        }
    };
    assert_eq!(status_of(&publish("text/plain", b"breaking news").await), Some(202));
    assert_eq!(recv(&mut member).await, Message::text("breaking news"));
    assert_eq!(status_of(&publish("application/octet-stream", b"\x01\x02").await), Some(202));
    assert_eq!(recv(&mut member).await, Message::binary(vec![1u8, 2]));

    // A room's plugin decides what a publish becomes: chat speaks JSON to its members.
    let mut ann = server.connect("chat:lobby?name=ann").await;
    assert_eq!(recv_json(&mut ann).await["type"], "welcome");
    let request = format!(
        "POST /admin/rooms/chat:lobby/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: text/plain\r\nContent-Length: 9\r\nConnection: close\r\n\r\nhello all"
    );
    assert_eq!(status_of(&raw_request(server.addr, request.as_bytes()).await.unwrap()), Some(202));
    assert_eq!(recv_json(&mut ann).await, serde_json::json!({"type": "announcement", "text": "hello all"}));
    server.stop().await;
}

#[tokio::test]
async fn without_a_token_the_admin_api_is_off() {
    let server = TestServer::start(test_config()).await;
    assert_eq!(http_get(server.addr, "/admin/plugins").await.unwrap().0, 404);
    server.stop().await;
}

#[tokio::test]
async fn compiled_plugins_are_cached_for_the_next_start() {
    let dir = PluginDir::new(&[("echo", None)]);
    let cache = dir.path.with_extension("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let config =
        || Config { plugins: Some(dir.path.clone()), plugin_cache: Some(cache.clone()), ..test_config() };
    let first = TestServer::start(config()).await;
    first.stop().await;
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(cached.len(), 1, "one compiled artifact: {cached:?}");
    assert!(cached[0].to_string_lossy().ends_with(".cwasm"));
    // The second start loads the artifact instead of compiling, and serves the same.
    let second = TestServer::start(config()).await;
    let mut client = second.connect("echo").await;
    send_text(&mut client, "from cache").await;
    assert_eq!(recv_text(&mut client).await, "from cache");
    second.stop().await;
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_relative_plugins_folder_is_watched_too() {
    let dir = PluginDir::new(&[]);
    install_atomically(&dir.path, "taga", "tag");
    // The same folder, named relative to the working directory.
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let relative =
        std::path::PathBuf::from(format!("{up}{}", dir.path.display().to_string().trim_start_matches('/')));
    assert!(relative.is_relative() && relative.is_dir(), "{}", relative.display());
    let server =
        TestServer::start(Config { plugins: Some(relative), plugin_cache: None, ..test_config() }).await;
    let mut client = server.connect("tag").await;
    wait_for_behaviour(&mut client, "A:", Instant::now()).await;
    let landed = Instant::now();
    install_atomically(&dir.path, "tagb", "tag");
    // Within a second: the watcher's events, not the two-second rescan.
    wait_for_behaviour(&mut client, "B:", landed).await;
    server.stop().await;
}
