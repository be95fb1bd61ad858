//! What the tests of the real `roomcast` binary share: run it, serve on a free port,
//! read its resident memory, ask `/healthz`, stop it with SIGTERM; raw clients.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `roomcast` executable this package built, without an admin token from the
/// environment and without colour codes.
pub fn roomcast() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    command.env_remove("ROOMCAST_ADMIN_TOKEN").env("NO_COLOR", "1");
    command
}

/// A `roomcast serve` process on a free loopback port, killed when dropped.
pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    /// What the process writes on stdout and stderr (its log), collected by a thread.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Start `roomcast serve` with `args` (plus `--listen`) and wait until it answers
    /// `/healthz` (within 60 s: a debug build loads plugins slowly).
    pub fn start(args: &[&str]) -> Self {
        Self::try_start(args).unwrap_or_else(|(log, why)| panic!("{why}; log:\n{log}"))
    }

    /// Like [`Server::start`], but an `Err` (the log and why) when it does not come up
    /// within `60 s`.
    pub fn try_start(args: &[&str]) -> Result<Self, (String, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = roomcast()
            .arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn roomcast");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut server = Server { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if server.healthz() == Some(200) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err((server.log(), format!("roomcast exited with {status} before serving")));
            }
            if Instant::now() > deadline {
                return Err((server.log(), "roomcast did not answer /healthz within 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The status of `GET /healthz` on a fresh connection, or `None` if there was no
    /// answer within 5 s.
    pub fn healthz(&self) -> Option<u16> {
        let response = request(self.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        status_of(&response)
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.child.id())
    }

    /// SIGTERM, then wait up to `bound` for the process to exit; its exit status.
    pub fn terminate(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib_of(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// One `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:` for the peak), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Send `bytes` on a fresh connection and read the response until the server closes,
/// or 5 s pass; `None` if nothing came back.
pub fn request(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(bytes).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if complete_response(&out) {
            break;
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Whether `out` holds a whole response (head and a `Content-Length` body).
fn complete_response(out: &[u8]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    match head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        Some(len) => len.trim().parse::<usize>().is_ok_and(|len| out.len() >= end + 4 + len),
        None => head.starts_with("http/1.1 101"),
    }
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Wait up to `bound` for `check` to hold, polling every 50 ms.
pub fn eventually(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scratch folder removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("roomcast-hostile-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw WebSocket client over a blocking socket: frames exactly as written.
pub struct RawWs {
    pub stream: TcpStream,
}

impl RawWs {
    /// Connect and upgrade to `/ws/{room}`; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, room: &str) -> Self {
        Self::upgrade(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap(), addr, room)
    }

    /// Like [`RawWs::connect`], with a receive buffer as small as the kernel allows,
    /// so that what this client does not read backs up on the server quickly.
    pub fn connect_with_small_window(addr: SocketAddr, room: &str) -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
        Self::upgrade(socket.into(), addr, room)
    }

    fn upgrade(mut stream: TcpStream, addr: SocketAddr, room: &str) -> Self {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "GET /ws/{room} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed during the handshake");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert_eq!(status_of(&head), Some(101), "{head}");
        Self { stream }
    }

    /// Send one masked client frame.
    pub fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(&roomcast::ws::frame::encode_client(fin, opcode, payload, [1, 2, 3, 4]))
    }

    /// Read one server frame: `(opcode, payload)`.
    pub fn read(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head)?;
        let mut len = u64::from(head[1] & 0x7F);
        if len == 126 {
            let mut ext = [0u8; 2];
            self.stream.read_exact(&mut ext)?;
            len = u64::from(u16::from_be_bytes(ext));
        } else if len == 127 {
            let mut ext = [0u8; 8];
            self.stream.read_exact(&mut ext)?;
            len = u64::from_be_bytes(ext);
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok((head[0] & 0x0F, payload))
    }

    /// Read frames until a close frame: its code, or `None` if the connection ended
    /// without one.
    pub fn read_close(&mut self) -> Option<u16> {
        loop {
            match self.read() {
                Ok((0x8, payload)) if payload.len() >= 2 => {
                    return Some(u16::from_be_bytes([payload[0], payload[1]]));
                }
                Ok((0x8, _)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// The value of one series in the server's `/metrics`.
pub fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// A `redis-server` child process without persistence on a free port, killed when
/// dropped.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    /// Start it and wait (up to 10 s) until it answers `PING`.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (scripts/setup installs it)");
        let redis = Self { port, child };
        assert!(
            eventually(Duration::from_secs(10), || redis.ping()),
            "redis-server did not answer PING within 10 s"
        );
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 16];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `signal` (`STOP`, `CONT`, ...) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}
