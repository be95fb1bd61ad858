//! The `roomcast` binary as an operator meets it: configuration errors name the key
//! and the file, startup errors (a port in use, a TLS key that does not match its
//! certificate) are one clear line, and SIGTERM drains and exits 0.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roomcast_plugin_build::{build_crate, built_plugins, plugins_workspace};

use crate::support::{RawWs, roomcast};

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
    let unknown = temp_file("unknown.toml", "listen = \"127.0.0.1:0\"\nheartbeat = \"5s\"\n");
    fails_with(&["serve", "--config", unknown.to_str().unwrap()], &["heartbeat", "unknown.toml"]);
    let bad = temp_file("bad.toml", "pong_timeout = \"soon\"\n");
    fails_with(&["serve", "--config", bad.to_str().unwrap()], &["pong_timeout", "bad.toml", "soon"]);
    fails_with(&["serve", "--config", "/nonexistent/roomcast.toml"], &["/nonexistent/roomcast.toml"]);
    fails_with(&["serve", "--max-queue-bytes", "lots"], &["--max-queue-bytes", "lots"]);
}

#[test]
fn a_port_in_use_is_one_clear_line_before_any_plugin_loads() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(
        &["serve", "--listen", &addr],
        &["cannot listen on", &addr, "Address already in use", "--listen"],
    );
    // The cause is said once, and the port is tried before plugins are compiled.
    let plugins = std::env::temp_dir().join(format!("roomcast-cli-port-{}", std::process::id()));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(built_plugins().join("echo.wasm"), plugins.join("echo.wasm")).unwrap();
    let output = roomcast().args(["serve", "--listen", &addr, "--plugins"]).arg(&plugins).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("Address already in use").count(), 1, "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("plugin loaded"), "plugins were loaded before the port was tried:\n{stdout}");
    let _ = std::fs::remove_dir_all(&plugins);
}

/// The first line a person sees says where to connect, which plugins folder serves,
/// and whether the admin API and the dashboard are on; a log that is not a terminal
/// has no colour codes.
#[test]
fn the_start_up_line_says_where_and_what_without_colour_codes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let plugins = std::env::temp_dir().join(format!("roomcast-cli-start-{}", std::process::id()));
    std::fs::create_dir_all(&plugins).unwrap();
    let mut child = roomcast()
        .env_remove("NO_COLOR")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--plugins"])
        .arg(&plugins)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("listening"))).unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&plugins);
    assert!(!line.contains('\u{1b}'), "colour codes in a log that is not a terminal: {line:?}");
    for needle in
        [format!("http://127.0.0.1:{port}"), plugins.display().to_string(), "admin".into(), "off".into()]
    {
        assert!(line.contains(&needle), "`{needle}` missing from the start-up line: {line}");
    }
}

#[test]
fn a_missing_plugins_folder_is_one_clear_line() {
    fails_with(
        &["serve", "--listen", "127.0.0.1:0", "--plugins", "/nonexistent/plugins"],
        &["/nonexistent/plugins", "does not exist"],
    );
}

#[test]
fn a_tls_key_that_does_not_match_its_certificate_is_one_clear_line() {
    let write_pair = |name: &str| {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = temp_file(&format!("{name}.crt"), &pair.cert.pem());
        let key = temp_file(&format!("{name}.key"), &pair.signing_key.serialize_pem());
        (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned())
    };
    let (cert, _) = write_pair("one");
    let (_, other_key) = write_pair("two");
    fails_with(
        &["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &other_key],
        &["does not match", "one.crt", "two.key"],
    );
    fails_with(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert], &["--tls-key"]);
    fails_with(
        &["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", "/nonexistent/key.pem"],
        &["/nonexistent/key.pem"],
    );
    let config = temp_file("tls.toml", "[tls]\ncert = \"one.crt\"\nkye = \"one.key\"\n");
    fails_with(&["serve", "--config", config.to_str().unwrap()], &["tls.kye", "tls.toml"]);
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = roomcast()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with('{') && first.contains("listening"), "json log line: {first}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "roomcast did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:?}");
}

#[test]
fn plugin_check_reports_hooks_or_a_clear_error() {
    let built = built_plugins();
    let output = roomcast().args(["plugin", "check"]).arg(built.join("chat.wasm")).output().unwrap();
    assert!(output.status.success());
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("chat 0.1.0")
            && report.contains("message")
            && report.contains("roomcast:plugin@0.2.0"),
        "{report}"
    );

    let other = built.join("otherworld.wasm");
    fails_with(&["plugin", "check", other.to_str().unwrap()], &["roomcast:plugin/room@0.9.0", "0.2.0"]);
    let core = temp_file("core.wasm", "\0asm\u{1}\0\0\0");
    fails_with(&["plugin", "check", core.to_str().unwrap()], &["core WebAssembly module", "wasm32-wasip2"]);
    let garbage = temp_file("garbage.wasm", "not wasm at all");
    fails_with(&["plugin", "check", garbage.to_str().unwrap()], &["not a WebAssembly file"]);
}

#[test]
fn plugin_new_writes_a_crate_that_builds_and_loads() {
    let parent = std::env::temp_dir().join(format!("roomcast-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    let status = roomcast().args(["plugin", "new", "hello_room", "--dir"]).arg(&parent).status().unwrap();
    assert!(status.success());
    let krate = parent.join("hello_room");
    // Build it as a newcomer would, sharing the example plugins' target folder so the
    // SDK's dependencies are compiled once.
    let wasm =
        build_crate(&krate).unwrap_or_else(|output| panic!("the new crate builds as it stands: {output}"));
    let output = roomcast().args(["plugin", "check"]).arg(&wasm).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("hello_room 0.1.0"));
    fails_with(&["plugin", "new", "hello_room", "--dir", parent.to_str().unwrap()], &["already exists"]);
    fails_with(&["plugin", "new", "Bad-Name"], &["not a plugin name"]);
    let _ = std::fs::remove_dir_all(&parent);
}

/// Send `text` on `ws` and return the text that comes back.
fn round_trip(ws: &mut RawWs, text: &str) -> String {
    ws.send(true, 0x1, text.as_bytes()).unwrap();
    let (opcode, payload) = ws.read().unwrap();
    assert_eq!(opcode, 0x1, "a text frame");
    String::from_utf8(payload).unwrap()
}

/// The README's "Write your first plugin", step by step: `plugin new`, build, drop the
/// file into a running server's folder, connect; then the README's upper-casing
/// `message` hook, rebuild, copy over: the same connection gets capitals.
#[test]
fn the_readme_tutorial_works_on_a_running_server() {
    const README: &str = include_str!("../../../README.md");
    let snippet = README
        .split("Change the\nhook to answer in capitals:\n\n```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's tutorial snippet");
    let parent = std::env::temp_dir().join(format!("roomcast-tutorial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    let plugins = parent.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    assert!(roomcast().args(["plugin", "new", "tutorial", "--dir"]).arg(&parent).status().unwrap().success());
    let krate = parent.join("tutorial");
    let build_and_install = || {
        let wasm = build_crate(&krate).unwrap_or_else(|output| panic!("{output}"));
        // Copied under a hidden name, then renamed into place.
        let temp = plugins.join(".tutorial.wasm.part");
        std::fs::copy(wasm, &temp).unwrap();
        std::fs::rename(&temp, plugins.join("tutorial.wasm")).unwrap();
    };
    build_and_install();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = roomcast()
        .args(["serve", "--listen", &addr, "--plugin-cache", "off", "--plugins"])
        .arg(&plugins)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ws = RawWs::connect(addr.parse().unwrap(), "tutorial");
    assert_eq!(round_trip(&mut ws, "hello"), "hello", "the template echoes");

    let lib = krate.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    let start = source.find("    fn message(").expect("the template's message hook");
    let end = start + source[start..].find("\n    }\n").expect("its end") + "\n    }\n".len();
    let indented: String =
        snippet.lines().map(|l| if l.is_empty() { "\n".into() } else { format!("    {l}\n") }).collect();
    std::fs::write(&lib, format!("{}{indented}{}", &source[..start], &source[end..])).unwrap();
    build_and_install();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = round_trip(&mut ws, "hello");
        if reply == "HELLO" {
            break;
        }
        assert_eq!(reply, "hello");
        assert!(Instant::now() < deadline, "the new version never took over the live room");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&parent);
}

/// `plugin new echo` writes the `echo` example's code: the host's template and the
/// example stay alike (their doc comments may differ).
#[test]
fn the_plugin_template_is_the_echo_example() {
    let parent = std::env::temp_dir().join(format!("roomcast-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    assert!(roomcast().args(["plugin", "new", "echo", "--dir"]).arg(&parent).status().unwrap().success());
    let code = |text: &str| -> String {
        text.lines().filter(|l| !l.starts_with("//!")).collect::<Vec<_>>().join("\n").trim().to_owned()
    };
    let written = std::fs::read_to_string(parent.join("echo/src/lib.rs")).unwrap();
    let example = std::fs::read_to_string(plugins_workspace().join("echo/src/lib.rs")).unwrap();
    assert_eq!(code(&written), code(&example), "host/templates/plugin.rs and plugins/echo have drifted");
    assert!(written.contains("ws://127.0.0.1:8080/ws/echo") && !written.contains("{{"), "{written}");
    let _ = std::fs::remove_dir_all(&parent);
}
