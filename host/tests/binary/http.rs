//! Hostile HTTP before the upgrade: bodies that never arrive, heads that never end or
//! never stop, duplicate `Host`, HTTP/1.0 upgrades, and a long-lived event stream
//! that must outlive the HTTP deadline.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Server, eventually, metric, request, status_of};

const TOKEN: &str = "hostile-test-token";

/// Open `count` connections that each send `head` and then nothing.
fn stall(server: &Server, head: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect()
}

/// Whether the server closed `stream` (EOF or reset) within `bound`, reading and
/// discarding whatever it sent first.
fn closed_within(stream: &mut TcpStream, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A refusal is answered from the head alone: the body it announces is never awaited.
#[test]
fn a_body_is_refused_unread_when_the_route_is_off_or_the_caller_unauthorised() {
    let off = Server::start(&[]);
    let login = "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n";
    let publish = "POST /admin/rooms/x/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n";
    assert_eq!(request(off.addr, login.as_bytes()).as_deref().and_then(status_of), Some(404));
    assert_eq!(request(off.addr, publish.as_bytes()).as_deref().and_then(status_of), Some(404));

    let on = Server::start(&["--admin-token", TOKEN]);
    assert_eq!(request(on.addr, publish.as_bytes()).as_deref().and_then(status_of), Some(401));
    let cross_site = "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\nContent-Length: 100\r\n\r\n";
    assert_eq!(request(on.addr, cross_site.as_bytes()).as_deref().and_then(status_of), Some(403));
    // Over the limit by its Content-Length: 413 before a byte of it is sent.
    let huge = format!(
        "POST /admin/rooms/x/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2000000\r\n\r\n"
    );
    assert_eq!(request(on.addr, huge.as_bytes()).as_deref().and_then(status_of), Some(413));
    let huge_login = "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n";
    assert_eq!(request(on.addr, huge_login.as_bytes()).as_deref().and_then(status_of), Some(413));
}

/// A body that never arrives is cut off at the request deadline, and while hundreds
/// stall the server still answers and its memory stays put.
#[test]
fn a_stalled_body_is_cut_off_at_the_deadline() {
    let server = Server::start(&["--admin-token", TOKEN, "--handshake-timeout", "2s"]);
    let before = server.rss_kib();
    let head = format!(
        "POST /admin/rooms/x/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 60000\r\n\r\n"
    );
    let mut stalled = stall(&server, &head, 300);
    let login = "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=";
    stalled.extend(stall(&server, login, 100));
    assert_eq!(server.healthz(), Some(200), "answers while 400 bodies stall");
    for stream in &mut stalled {
        assert!(closed_within(stream, Duration::from_secs(8)), "a stalled body outlived the deadline");
    }
    let grown = server.rss_kib().saturating_sub(before);
    assert!(grown < 64 << 10, "400 stalled bodies grew the server by {grown} KiB");
}

/// Heads are capped: a huge header line, a head that never ends, too many bytes in
/// total. Memory stays bounded while 200 clients flood, and a quiet server gives back
/// what the flood took.
#[test]
fn header_floods_get_431_and_memory_comes_back() {
    let server = Server::start(&[]);
    let long_line = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "a".repeat(300 << 10));
    let response = request(server.addr, long_line.as_bytes()).unwrap_or_default();
    assert_eq!(status_of(&response), Some(431), "{}", response.lines().next().unwrap_or(""));
    let many =
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-Many: abcdefghijklmnop\r\n".repeat(2000));
    assert_eq!(request(server.addr, many.as_bytes()).as_deref().and_then(status_of), Some(431));

    let baseline = server.rss_kib();
    let mut peak = baseline;
    let mut flooders: Vec<TcpStream> = Vec::new();
    let chunk = format!("X-Flood-{}: {}\r\n", 0, "b".repeat(4000));
    for _ in 0..200 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.write_all(b"GET /ws/flood HTTP/1.1\r\nHost: x\r\n").unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        // 390 KB of a head that never ends, or as much as the server takes.
        for _ in 0..100 {
            if stream.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        flooders.push(stream);
        peak = peak.max(server.rss_kib());
    }
    assert_eq!(server.healthz(), Some(200));
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 48 << 10, "200 header floods grew the server by {grown} KiB");
    drop(flooders);
    // A quiet server gives back what the burst took.
    let settled = eventually(Duration::from_secs(15), || server.rss_kib() < baseline + (8 << 10));
    assert!(settled, "RSS {} KiB after the flood, {baseline} KiB before", server.rss_kib());
}

#[test]
fn two_hosts_and_http_1_0_upgrades_are_refused() {
    let server = Server::start(&[]);
    let upgrade = |version: &str, hosts: &str| {
        format!(
            "GET /ws/room {version}\r\n{hosts}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let two_hosts = upgrade("HTTP/1.1", "Host: good.example\r\nHost: evil.example\r\n");
    assert_eq!(request(server.addr, two_hosts.as_bytes()).as_deref().and_then(status_of), Some(400));
    let old = upgrade("HTTP/1.0", "Host: x\r\n");
    assert_eq!(request(server.addr, old.as_bytes()).as_deref().and_then(status_of), Some(400));
    let ok = upgrade("HTTP/1.1", &format!("Host: {}\r\n", server.addr));
    assert_eq!(request(server.addr, ok.as_bytes()).as_deref().and_then(status_of), Some(101));
}

/// Connections that have not upgraded are capped: at the cap new ones wait in the
/// listen backlog, and one that has stalled for a while is closed to make room, so
/// stalled connections can neither hold more descriptors than the cap nor keep a new
/// client out.
#[test]
fn connections_that_have_not_upgraded_are_capped_and_stalled_ones_make_room() {
    let server = Server::start(&["--max-http-connections", "50"]);
    let mut held = stall(&server, "GET /healthz HTTP/1.1\r\n", 50);
    assert_eq!(server.healthz(), Some(200), "a new client gets in");
    assert!(closed_within(&mut held[0], Duration::from_secs(5)), "the oldest stalled one made room");
    let open_files = || std::fs::read_dir(format!("/proc/{}/fd", server.child.id())).unwrap().count();
    let before = open_files();
    let more = stall(&server, "GET /healthz HTTP/1.1\r\n", 200);
    for _ in 0..10 {
        assert!(open_files() <= before + 2, "{} descriptors open, {before} before", open_files());
        std::thread::sleep(Duration::from_millis(300));
    }
    let timeouts =
        || metric(server.addr, "roomcast_handshakes_rejected_total{reason=\"timeout\"}").unwrap_or(0.0);
    assert!(
        eventually(Duration::from_secs(15), || timeouts() >= 200.0),
        "each one closed counted: {}",
        timeouts()
    );
    assert_eq!(server.healthz(), Some(200));
    drop(more);
}

/// The dashboard's event stream lives past the HTTP deadline, and ends at shutdown.
#[test]
fn the_event_stream_outlives_the_http_deadline_and_ends_at_shutdown() {
    let mut server = Server::start(&["--admin-token", TOKEN, "--handshake-timeout", "1s"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let request =
        format!("GET /dashboard/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 16 << 10];
    while started.elapsed() < Duration::from_secs(4) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let snapshots = seen.matches("event: snapshot").count();
    assert!(started.elapsed() >= Duration::from_secs(4), "the stream ended after {:?}", started.elapsed());
    assert!(snapshots >= 3, "{snapshots} snapshots in 4 s with a 1 s HTTP deadline");
    let status = server.terminate(Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}

/// Peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    crate::support::status_kib(pid, "VmHWM:")
}

/// Upgrade requests to a plugin's room each cost a handshake call on an instance of up
/// to the plugin's memory cap: clients without a token asking for 64 at once get a few
/// running at a time, so the server's peak memory is a few caps, not 64.
#[test]
fn plugin_handshakes_run_a_few_at_a_time() {
    let plugins = crate::support::TempDir::new("chaos");
    std::fs::copy(
        roomcast_plugin_build::built_plugins().join("chaos.wasm"),
        plugins.path().join("chaos.wasm"),
    )
    .unwrap();
    std::fs::write(plugins.path().join("chaos.toml"), "[limits]\nmemory = \"32MiB\"\n").unwrap();
    let server = Server::start(&["--plugins", plugins.path().to_str().unwrap()]);
    let before = peak_rss_kib(server.child.id());
    let addr = server.addr;
    let clients: Vec<_> = (0..64)
        .map(|_| {
            std::thread::spawn(move || {
                let upgrade = format!(
                    "GET /ws/chaos?hog HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                );
                request(addr, upgrade.as_bytes()).as_deref().and_then(status_of)
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), Some(500), "the plugin failed its handshake");
    }
    let grown = peak_rss_kib(server.child.id()).saturating_sub(before);
    // Four calls at once on this machine's two cores, 32 MiB each, plus slack.
    eprintln!("peak grew {grown} KiB");
    assert!(grown < 320 << 10, "64 handshakes that each fill 32 MiB raised the peak by {grown} KiB");
    assert_eq!(server.healthz(), Some(200));
}
