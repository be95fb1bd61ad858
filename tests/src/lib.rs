//! Test support: a real server on port 0, real WebSocket clients, raw TCP for
//! malformed input, and the example plugins built once per test process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, Stream, StreamExt as _};
use roomcast::config::Config;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub use roomcast;

pub type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A server running in this process on an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The server's own counters, readable after it stopped.
    pub metrics: std::sync::Arc<roomcast::metrics::Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Start a server with `config` (its `listen` is ignored: port 0 on loopback).
    pub async fn start(config: Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    /// Start a server with `config` on `addr` (its `listen` is ignored), e.g. on the
    /// port of a server that just stopped.
    pub async fn start_on(addr: SocketAddr, config: Config) -> Self {
        let listener = roomcast::server::bind(addr, config.listen_backlog).expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = roomcast::server::Server::new(config).expect("server config");
        let metrics = server.metrics();
        let task = tokio::spawn(async move {
            server
                .run(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server run");
        });
        Self { addr, metrics, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self, room: &str) -> String {
        format!("ws://{}/ws/{room}", self.addr)
    }

    /// Connect a WebSocket client to `room`.
    pub async fn connect(&self, room: &str) -> Client {
        connect_to(self.addr, room).await
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> String {
        metrics_at(self.addr).await
    }

    /// The value of one series, e.g. `roomcast_connections_closed_total{reason="client"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_at(self.addr, series).await
    }

    /// Wait until `series` reaches `value`, polling, within `bound`.
    pub async fn wait_metric(&self, series: &str, value: f64, bound: Duration) {
        wait_metric_at(self.addr, series, value, bound).await
    }

    /// Start the graceful shutdown and wait for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Connect a WebSocket client to `room` on the server at `addr`.
pub async fn connect_to(addr: SocketAddr, room: &str) -> Client {
    let (client, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{room}")).await.expect("connect");
    client
}

/// The Prometheus text from the `/metrics` of the server at `addr`.
pub async fn metrics_at(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The value of one series of the server at `addr`.
pub async fn metric_at(addr: SocketAddr, series: &str) -> f64 {
    let text = metrics_at(addr).await;
    metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// Wait until `series` of the server at `addr` reaches `value`, polling, within `bound`.
pub async fn wait_metric_at(addr: SocketAddr, series: &str, value: f64, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let now = metric_at(addr, series).await;
        if now == value {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{series} is {now}, expected {value} within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parse one series' value out of Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// A Roomcast node on its own runtime (one worker thread), like a separate process: it
/// can be killed abruptly ([`Node::kill`]: no graceful shutdown, nothing released).
pub struct Node {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub fn start(config: Config) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let guard = runtime.enter();
        let listener = roomcast::server::bind("127.0.0.1:0".parse().unwrap(), 1024).expect("bind");
        let addr = listener.local_addr().unwrap();
        let server = roomcast::server::Server::new(config).expect("server config");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            server
                .run(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server run");
        });
        drop(guard);
        Node { addr, runtime: Some(runtime), stop: Some(stop), task: Some(task) }
    }

    /// Connect a WebSocket client to `room`.
    pub async fn connect(&self, room: &str) -> Client {
        connect_to(self.addr, room).await
    }

    /// The value of one series of the node's `/metrics`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_at(self.addr, series).await
    }

    /// Wait until `series` reaches `value`, polling, within `bound`.
    pub async fn wait_metric(&self, series: &str, value: f64, bound: Duration) {
        wait_metric_at(self.addr, series, value, bound).await
    }

    /// Crash: every task of the node stops where it is.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Graceful shutdown, like SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A fresh `Config` with short timeouts suitable for tests.
pub fn test_config() -> Config {
    Config { shutdown_timeout: Duration::from_secs(5), ..Config::default() }
}

/// Send raw bytes and read the response head and body until the server closes or
/// `Connection: close` semantics end it. Returns the full response text.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the head, then whatever body arrives shortly after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.into()),
        }
        if let Some(head_end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match length {
                Some(len) if out.len() >= head_end + 4 + len => break,
                None if head.starts_with("http/1.1 101") => break,
                _ => {}
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `GET path` over a fresh connection: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let response = raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let status = status_of(&response).context("no status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// `GET path` with `Authorization: Bearer token`: the JSON body of a 200 response.
pub async fn admin_json(addr: SocketAddr, token: &str, path: &str) -> serde_json::Value {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let response = raw_request(addr, request.as_bytes()).await.unwrap();
    assert_eq!(status_of(&response), Some(200), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The next message, which must be a JSON text.
pub async fn recv_json(client: &mut Client) -> serde_json::Value {
    let text = recv_text(client).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The value of header `name` in a response head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Open the dashboard's event stream and read `count` snapshot events (with when each arrived).
pub async fn snapshots(
    addr: SocketAddr,
    extra: &str,
    count: usize,
) -> Vec<(tokio::time::Instant, serde_json::Value)> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /dashboard/events HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    let mut events = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while events.len() < count {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if events.is_empty() {
            let head = text.split("\r\n\r\n").next().unwrap();
            assert_eq!(status_of(head), Some(200), "{text}");
            assert!(
                header(head, "content-type").is_some_and(|v| v.starts_with("text/event-stream")),
                "{head}"
            );
        }
        // Chunked framing aside, each event is one `data:` line.
        while let Some(start) = text.find("data: ") {
            let Some(end) = text[start..].find('\n') else { break };
            let data = text[start + 6..start + end].to_owned();
            text.drain(..start + end);
            events.push((tokio::time::Instant::now(), serde_json::from_str(&data).expect("snapshot JSON")));
        }
    }
    events
}

/// A `redis-server` child process without persistence, on a port of its own.
pub struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { port, child: None };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Start (again) on the same port and wait until it answers.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (scripts/setup installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.command("PING").await.as_deref() != Some("+PONG") {
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kill it without a chance to answer anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `PUBLISH channel data` with binary data; the reply line.
    pub async fn publish(&self, channel: &str, data: &[u8]) -> Option<String> {
        let mut request =
            format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n", channel.len(), data.len())
                .into_bytes();
        request.extend_from_slice(data);
        request.extend_from_slice(b"\r\n");
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        stream.write_all(&request).await.ok()?;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.ok()?.ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).lines().next()?.to_owned())
    }

    /// How many subscribers Redis counts on `channel` (`PUBSUB NUMSUB`).
    pub async fn subscribers(&self, channel: &str) -> Option<u64> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        stream.write_all(format!("PUBSUB NUMSUB {channel}\r\n").as_bytes()).await.ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        // `*2`, the channel as a bulk string, then `:COUNT`.
        while !reply.ends_with(b"\r\n") || !reply.split(|&b| b == b'\n').any(|line| line.starts_with(b":")) {
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.ok()?.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        text.lines().find_map(|line| line.strip_prefix(':')?.parse().ok())
    }

    /// Send one inline command; the first reply line.
    pub async fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.ok()?.ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).lines().next()?.to_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A valid upgrade request for `path` with extra header lines (each ending in `\r\n`).
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Open a raw TCP connection and complete the WebSocket handshake on it; the
/// returned stream is positioned after the 101 response.
pub async fn raw_ws(addr: SocketAddr, room: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(upgrade_request(addr, &format!("/ws/{room}"), "").as_bytes()).await?;
    read_upgrade_response(&mut stream).await?;
    Ok(stream)
}

/// Read an upgrade response head byte by byte (so no frame bytes are consumed) and
/// fail unless it is a 101.
pub async fn read_upgrade_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while find(&head, b"\r\n\r\n").is_none() {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed during handshake: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if status_of(&head) != Some(101) {
        bail!("upgrade refused: {head}");
    }
    Ok(())
}

/// Read one server frame from a raw stream: `(opcode, payload)`.
pub async fn read_frame(stream: &mut TcpStream) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut len = (head[1] & 0x7F) as u64;
    if len == 126 {
        len = stream.read_u16().await? as u64;
    } else if len == 127 {
        len = stream.read_u64().await?;
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await?;
    Ok((head[0] & 0x0F, payload))
}

/// Read frames until a close frame; returns its code (`None` for an empty close, or
/// if the connection ended without one).
pub async fn read_close(stream: &mut TcpStream) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), read_frame(stream)).await {
            Ok(Ok((0x8, payload))) if payload.len() >= 2 => {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            Ok(Ok((0x8, _))) => return None,
            Ok(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// Receive the next data message, skipping pings and pongs, within 10 s (from a
/// [`Client`] or any other WebSocket stream, such as one over TLS).
pub async fn recv<E: std::fmt::Debug>(
    client: &mut (impl Stream<Item = Result<Message, E>> + Unpin),
) -> Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended")
            .expect("websocket error");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Nothing but pings arrives for `wait` (anything else panics, naming it).
pub async fn quiet(client: &mut Client, wait: Duration) -> bool {
    match tokio::time::timeout(wait, recv(client)).await {
        Err(_) => true,
        Ok(message) => panic!("expected nothing, got {message:?}"),
    }
}

/// Receive the next text message as a `String`.
pub async fn recv_text(client: &mut Client) -> String {
    match recv(client).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// A client offering the room protocol (`roomcast.v1`) on `path` (`/ws` or
/// `/ws/{room}`); panics unless the host answers with it.
pub async fn connect_rooms(addr: SocketAddr, path: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "roomcast.v1".parse().unwrap());
    let (client, response) = tokio_tungstenite::connect_async(request).await.expect("connect");
    assert_eq!(response.headers()["sec-websocket-protocol"], "roomcast.v1", "the host speaks the protocol");
    client
}

/// Send a text message.
pub async fn send_text(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.expect("send");
}

/// Whether to run the calling test's body here. For a test that measures the whole
/// process (its resident memory): the tests of a binary share its process and run in
/// parallel, so such a test runs again alone in a child process of the same binary
/// (`--exact` its own name, which libtest gives the test's thread). In that child this
/// returns `true`; in the parent it waits for the child, fails if the child's run of
/// the test failed, passes on what the child printed, and returns `false`.
pub fn alone_in_a_process() -> bool {
    const ALONE: &str = "ROOMCAST_TEST_ALONE";
    let name = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .expect("called on a test's own thread, which libtest names after the test")
        .to_owned();
    if std::env::var(ALONE).is_ok_and(|alone| alone == name) {
        return true;
    }
    let output = Command::new(std::env::current_exe().expect("the test binary"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, &name)
        .stdin(Stdio::null())
        .output()
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, alone in a process: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // Not its summary line, which a script totalling results would count twice.
    for line in stdout.lines().filter(|line| !line.is_empty() && !line.starts_with("test result:")) {
        println!("  {line}");
    }
    false
}

/// Read the process's resident set size in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

pub use roomcast_plugin_build::{built_plugins, plugins_workspace};
pub mod browser;
pub mod tls;

/// The `gate` example plugin in a plugins folder, configured to admit the origin
/// `https://app.example.com` with the token `s3cret`, and a server configuration that
/// loads it and leaves origins to it. Keep the folder alive while the server runs.
pub fn gate_setup() -> (PluginDir, Config) {
    let manifest = "[config]\norigins = [\"https://app.example.com\"]\ntoken = \"s3cret\"\n";
    let dir = PluginDir::new(&[("gate", Some(manifest))]);
    let config = Config {
        plugins: Some(dir.path.clone()),
        allowed_origins: roomcast::config::OriginPolicy::Any,
        ..test_config()
    };
    (dir, config)
}

/// A temporary plugins folder holding copies of the named built plugins
/// (`("chat", None)` copies chat.wasm; a second element writes NAME.toml).
pub struct PluginDir {
    pub path: PathBuf,
}

impl PluginDir {
    pub fn new(plugins: &[(&str, Option<&str>)]) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "roomcast-plugins-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        let dir = Self { path };
        for (name, manifest) in plugins {
            dir.install(name, name);
            if let Some(manifest) = manifest {
                std::fs::write(dir.path.join(format!("{name}.toml")), manifest).unwrap();
            }
        }
        dir
    }

    /// Copy a plugin built for `roomcast:plugin@0.1.0` and kept in the repository
    /// (`tests/fixtures/contract-0.1.0/FIXTURE.wasm`) into the folder as `NAME.wasm`.
    pub fn install_fixture(&self, fixture: &str, name: &str) {
        let source =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/contract-0.1.0/{fixture}.wasm"));
        std::fs::copy(&source, self.path.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    }

    /// Copy built plugin `built` into the folder as `NAME.wasm`.
    pub fn install(&self, built: &str, name: &str) {
        let source = built_plugins().join(format!("{built}.wasm"));
        std::fs::copy(&source, self.path.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A JSON Web Token with header `header` and `claims`, signed with HMAC-SHA256 under
/// `secret` (written out here from RFC 2104, independently of the plugin's crates).
pub fn jwt_signed(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use sha2::{Digest as _, Sha256};
    const BLOCK: usize = 64;
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(&input).finalize();
    let mac = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac))
}
