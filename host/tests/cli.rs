//! The `roomcast` binary as an operator meets it: configuration errors name the key
//! and the file, startup errors are one clear line, and SIGTERM drains and exits 0.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn roomcast() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    command
        .env_remove("ROOMCAST_ADMIN_TOKEN")
        .env("NO_COLOR", "1");
    command
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Run and expect a failure whose stderr is one line containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let output = roomcast().args(args).output().unwrap();
    assert!(!output.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let unknown = temp_file(
        "unknown.toml",
        "listen = \"127.0.0.1:0\"\nheartbeat = \"5s\"\n",
    );
    fails_with(
        &["serve", "--config", unknown.to_str().unwrap()],
        &["heartbeat", "unknown.toml"],
    );
    let bad = temp_file("bad.toml", "pong_timeout = \"soon\"\n");
    fails_with(
        &["serve", "--config", bad.to_str().unwrap()],
        &["pong_timeout", "bad.toml", "soon"],
    );
    fails_with(
        &["serve", "--config", "/nonexistent/roomcast.toml"],
        &["/nonexistent/roomcast.toml"],
    );
    fails_with(
        &["serve", "--max-queue-bytes", "lots"],
        &["--max-queue-bytes", "lots"],
    );
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(&["serve", "--listen", &addr], &["cannot listen on", &addr]);
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = roomcast()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.starts_with('{') && first.contains("listening"),
        "json log line: {first}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "roomcast did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:?}");
}
