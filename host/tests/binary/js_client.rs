//! The browser client's own tests (`clients/js/test`, Node's test runner) against this
//! `roomcast` executable and the built example plugins: each of them starts, kills and
//! restarts real server processes.

use std::path::Path;
use std::process::{Command, Stdio};

use roomcast_plugin_build::built_plugins;

/// `node`, with the flag that gives it its own `WebSocket` where that helps (Node
/// 20.10+; Node 22 has it by default). Older versions (Debian 12's Node 18) run the
/// tests with the tests' own WebSocket (`clients/js/test/websocket.js`).
fn node() -> Command {
    let has = |args: &[&str]| {
        Command::new("node")
            .args(args)
            .args(["-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let mut command = Command::new("node");
    if !has(&[]) && has(&["--experimental-websocket"]) {
        command.arg("--experimental-websocket");
    }
    command
}

#[test]
fn the_javascript_client_passes_its_own_tests_against_this_binary() {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    let mut tests: Vec<_> = std::fs::read_dir(package.join("test"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(".test.js"))
        .collect();
    tests.sort();
    assert!(tests.len() >= 2, "the client's test files: {tests:?}");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("js-client-plugin-cache");
    let output = node()
        .arg("--test")
        .args(&tests)
        .current_dir(&package)
        .env("ROOMCAST_BIN", env!("CARGO_BIN_EXE_roomcast"))
        .env("ROOMCAST_PLUGINS", built_plugins())
        .env("ROOMCAST_PLUGIN_CACHE", &cache)
        .stdin(Stdio::null())
        .output()
        .expect("run node (scripts/setup --tests installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines().filter(|line| line.starts_with("ok ") || line.starts_with("not ok ")) {
        println!("  node: {line}");
    }
    let count = |key: &str| {
        stdout.lines().find_map(|line| line.strip_prefix(key)?.trim().parse::<u32>().ok()).unwrap_or(0)
    };
    assert!(
        output.status.success() && count("# fail ") == 0 && count("# pass ") >= 10,
        "node --test: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
