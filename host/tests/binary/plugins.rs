//! Plugin folders holding what no plugin folder should: a FIFO named `x.wasm`, a
//! `.wasm` symlinked to `/dev/zero` or larger than the limit, a gate plugin replaced by
//! a symlink loop or a FIFO. The server keeps serving, keeps its rooms gated, reports
//! each broken file once, and still ends on SIGTERM; an idle watcher reads nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Server, TempDir, eventually, request, status_of};
use roomcast_plugin_build::built_plugins;

const TOKEN: &str = "hostile-plugins-token";
/// How long a plugin may take to load: a debug build compiles it slowly.
const LOAD: Duration = Duration::from_secs(60);

/// A compiled-plugin cache for these tests' servers (each test's plugins folder is its
/// own), so a plugin is compiled once, not once per test.
fn cache() -> String {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-plugin-cache").display().to_string()
}

/// `roomcast serve` on `dir`, with the admin API and JSON log lines.
fn serve(dir: &Path) -> Server {
    Server::start(&[
        "--plugins",
        dir.to_str().unwrap(),
        "--plugin-cache",
        &cache(),
        "--admin-token",
        TOKEN,
        "--log-format",
        "json",
    ])
}

/// Install the built plugin `built` as `name.wasm`, the safe way (copy, then rename).
fn install(dir: &Path, built: &str, name: &str) {
    let temp = dir.join(format!(".{name}.wasm.tmp"));
    std::fs::copy(built_plugins().join(format!("{built}.wasm")), &temp).unwrap();
    std::fs::rename(&temp, dir.join(format!("{name}.wasm"))).unwrap();
}

/// Put `make`'s entry (made under a temporary name) in place of `dir/name`, in one
/// rename: the name never goes missing, so it is never taken for a deleted plugin.
fn replace(dir: &Path, name: &str, make: impl FnOnce(&Path)) {
    let temp = dir.join(format!(".{name}.tmp"));
    make(&temp);
    std::fs::rename(&temp, dir.join(name)).unwrap();
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// `GET /admin/plugins`, parsed.
fn admin_plugins(addr: SocketAddr) -> Value {
    let head = format!(
        "GET /admin/plugins HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let response = request(addr, head.as_bytes()).expect("an answer from /admin/plugins");
    assert_eq!(status_of(&response), Some(200), "{response}");
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Plugin `name`'s entry in `/admin/plugins`, if listed.
fn listed(addr: SocketAddr, name: &str) -> Option<Value> {
    admin_plugins(addr).as_array().unwrap().iter().find(|p| p["name"] == name).cloned()
}

/// Its `last_error`, or "" when there is none (or it is not listed).
fn last_error(addr: SocketAddr, name: &str) -> String {
    listed(addr, name).and_then(|p| p["last_error"].as_str().map(str::to_owned)).unwrap_or_default()
}

/// The status of an upgrade to `/ws/{room}{query}`.
fn upgrade_status(addr: SocketAddr, room: &str, query: &str) -> Option<u16> {
    let head = format!(
        "GET /ws/{room}{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    request(addr, head.as_bytes()).as_deref().and_then(status_of)
}

/// The server's JSON log lines at `level` about plugin `plugin`.
fn log_lines(server: &Server, level: &str, plugin: &str) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|line| {
            serde_json::from_str::<Value>(line)
                .is_ok_and(|v| v["level"] == level && v["fields"]["plugin"] == plugin)
        })
        .map(str::to_owned)
        .collect()
}

/// Bytes the process has read with `read(2)` and friends so far (`rchar`).
fn bytes_read(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_fifo_named_wasm_blocks_neither_start_nor_reloads_nor_shutdown() {
    let dir = TempDir::new("plugins-fifo");
    mkfifo(&dir.path().join("x.wasm"));
    let mut server = serve(dir.path());
    assert_eq!(server.healthz(), Some(200));
    assert!(last_error(server.addr, "x").contains("not a regular file"), "{}", server.log());

    // One more while serving, then a real plugin: the reload thread is not stuck.
    mkfifo(&dir.path().join("y.wasm"));
    assert!(
        eventually(LOAD, || last_error(server.addr, "y").contains("not a regular file")),
        "no error recorded for y.wasm; log:\n{}",
        server.log()
    );
    install(dir.path(), "echo", "echo");
    assert!(
        eventually(LOAD, || listed(server.addr, "echo").is_some_and(|p| p["version"] == 1)),
        "echo installed after the FIFOs never loaded; log:\n{}",
        server.log()
    );

    let status = server.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM did not end it cleanly: {status:?}\n{}",
        server.log()
    );
}

#[test]
fn a_wasm_that_is_a_device_or_too_large_is_refused_with_bounded_memory() {
    let dir = TempDir::new("plugins-zero");
    let server = serve(dir.path());
    let baseline = server.rss_kib();
    let bounded = |server: &Server| {
        let rss = server.rss_kib();
        assert!(rss < baseline + 256 * 1024, "RSS grew from {baseline} KiB to {rss} KiB");
    };
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.wasm")).unwrap();
    // A sparse file one byte over the 64 MiB limit (it takes no disk).
    let big = dir.path().join(".big.wasm.tmp");
    std::fs::File::create(&big).unwrap().set_len((64 << 20) + 1).unwrap();
    std::fs::rename(&big, dir.path().join("big.wasm")).unwrap();
    let refused = eventually(LOAD, || {
        bounded(&server);
        let zero = last_error(server.addr, "zero");
        let big = last_error(server.addr, "big");
        zero.contains("zero.wasm")
            && zero.contains("not a regular file")
            && big.contains("big.wasm")
            && big.contains("larger than 64MiB")
    });
    assert!(refused, "{}\nlog:\n{}", admin_plugins(server.addr), server.log());
    // A rescan later (every 2 s), still bounded, still serving.
    std::thread::sleep(Duration::from_secs(3));
    bounded(&server);
    assert_eq!(server.healthz(), Some(200));
}

#[test]
fn a_gate_made_unreadable_keeps_its_room_gated() {
    let dir = TempDir::new("plugins-gate");
    install(dir.path(), "gate", "gate");
    std::fs::write(dir.path().join("gate.toml"), "[config]\ntoken = \"secret\"\n").unwrap();
    let server = serve(dir.path());
    assert_eq!(upgrade_status(server.addr, "gate", ""), Some(403), "gated without a token");
    assert_eq!(upgrade_status(server.addr, "gate", "?token=secret"), Some(101));

    type Breaker = fn(&Path);
    let breakers: [(&str, &str, Breaker); 3] = [
        ("a symlink loop", "symbolic links", |temp| std::os::unix::fs::symlink("gate.wasm", temp).unwrap()),
        ("a FIFO", "not a regular file", |temp| mkfifo(temp)),
        ("a dangling symlink", "does not exist", |temp| {
            std::os::unix::fs::symlink("no-such-gate.wasm", temp).unwrap()
        }),
    ];
    for (what, expected, make) in breakers {
        replace(dir.path(), "gate.wasm", make);
        assert!(
            eventually(LOAD, || last_error(server.addr, "gate").contains(expected)),
            "gate.wasm as {what}: no `{expected}` error in /admin/plugins: {}\nlog:\n{}",
            admin_plugins(server.addr),
            server.log()
        );
        let gate = listed(server.addr, "gate").unwrap();
        assert_eq!(gate["version"], 1, "gate.wasm as {what}: the loaded version keeps serving: {gate}");
        assert_eq!(
            upgrade_status(server.addr, "gate", ""),
            Some(403),
            "gate.wasm as {what}: the room must stay gated"
        );
        assert_eq!(upgrade_status(server.addr, "gate", "?token=secret"), Some(101));
    }
    let errors = log_lines(&server, "ERROR", "gate");
    assert_eq!(errors.len(), 3, "one ERROR line per broken state: {errors:#?}");
    assert!(errors.iter().all(|line| line.contains("the previous version keeps serving")), "{errors:#?}");

    // Gone is different: the room returns to the default, and the plugin is unlisted.
    std::fs::remove_file(dir.path().join("gate.wasm")).unwrap();
    assert!(
        eventually(LOAD, || upgrade_status(server.addr, "gate", "") == Some(101)),
        "a deleted gate returns its room to the default"
    );
    assert!(
        eventually(LOAD, || listed(server.addr, "gate").is_none()),
        "a deleted plugin is no longer listed: {}",
        admin_plugins(server.addr)
    );
}

#[test]
fn an_idle_watcher_reads_nothing_and_reports_a_broken_file_once() {
    let dir = TempDir::new("plugins-idle");
    let server = serve(dir.path());
    install(dir.path(), "echo", "echo");
    assert!(
        eventually(LOAD, || listed(server.addr, "echo").is_some_and(|p| p["version"] == 1)),
        "echo never loaded; log:\n{}",
        server.log()
    );
    replace(dir.path(), "junk.wasm", |temp| std::fs::write(temp, b"not a plugin").unwrap());
    assert!(
        eventually(LOAD, || !log_lines(&server, "ERROR", "junk").is_empty()),
        "no ERROR line for junk.wasm; log:\n{}",
        server.log()
    );

    // At rest, over more than one rescan (every 2 s): no reads of the plugin files
    // (echo.wasm is ~50 KiB), no more log lines about them.
    let pid = server.child.id();
    let before = bytes_read(pid);
    std::thread::sleep(Duration::from_secs(3));
    let read = bytes_read(pid) - before;
    assert!(read < 16 * 1024, "an idle server read {read} bytes in 3 s; log:\n{}", server.log());
    let loaded: Vec<String> = log_lines(&server, "INFO", "echo")
        .into_iter()
        .filter(|line| line.contains("plugin loaded"))
        .collect();
    assert_eq!(loaded.len(), 1, "echo loaded once: {loaded:#?}");
    let errors = log_lines(&server, "ERROR", "junk");
    assert_eq!(errors.len(), 1, "junk.wasm reported once: {errors:#?}");

    // A file that cannot even be read is reported once too.
    replace(dir.path(), "stuck.wasm", mkfifo);
    assert!(
        eventually(LOAD, || !log_lines(&server, "ERROR", "stuck").is_empty()),
        "no ERROR line for stuck.wasm; log:\n{}",
        server.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    for broken in ["junk", "stuck"] {
        let errors = log_lines(&server, "ERROR", broken);
        assert_eq!(errors.len(), 1, "{broken}.wasm reported once: {errors:#?}");
        assert!(
            errors[0].contains("no version of it is serving") && !errors[0].contains("previous version"),
            "{}",
            errors[0]
        );
    }
}

/// A plugin that exists but has never loaded still guards its rooms: a gate broken at
/// start-up refuses its rooms (503) rather than serving them open, until it loads.
#[test]
fn a_gate_broken_from_the_start_fails_closed() {
    let dir = TempDir::new("plugins-broken-gate");
    replace(dir.path(), "gate.wasm", |temp| std::fs::write(temp, b"not a plugin").unwrap());
    std::fs::write(dir.path().join("gate.toml"), "[config]\ntoken = \"secret\"\n").unwrap();
    let server = serve(dir.path());
    assert!(
        last_error(server.addr, "gate").contains("not a WebAssembly file"),
        "{}",
        admin_plugins(server.addr)
    );
    for room in ["gate", "gate:vip"] {
        assert_eq!(
            upgrade_status(server.addr, room, ""),
            Some(503),
            "{room} must not open without its plugin"
        );
        assert_eq!(upgrade_status(server.addr, room, "?token=secret"), Some(503));
    }
    assert_eq!(upgrade_status(server.addr, "gateway", ""), Some(101), "another room is not affected");
    install(dir.path(), "gate", "gate");
    assert!(
        eventually(LOAD, || upgrade_status(server.addr, "gate", "?token=secret") == Some(101)),
        "the gate serves once it loads"
    );
    assert_eq!(upgrade_status(server.addr, "gate", ""), Some(403));
}
