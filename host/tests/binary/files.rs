//! Files an operator points the server at that are not files: a FIFO as the config,
//! `/dev/zero` as the admin token, a FIFO as the TLS certificate. Each is refused at
//! once with one line that names the file; none is waited on or read without end.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{TempDir, roomcast};

/// Run `roomcast serve ARGS` and expect it to fail within 20 s with one line naming
/// `needle`.
fn fails_at_once(args: &[&str], needle: &str) {
    let mut child = roomcast()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("roomcast {args:?} still running after 20 s: it waited on something that is not a file");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle) && stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn files_that_are_not_regular_files_are_refused_at_once() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("roomcast.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let fifo = fifo.to_str().unwrap();
    fails_at_once(&["--config", fifo], fifo);
    fails_at_once(&["--admin-token-file", "/dev/zero"], "/dev/zero");
    fails_at_once(&["--tls-cert", fifo, "--tls-key", fifo], fifo);
}
