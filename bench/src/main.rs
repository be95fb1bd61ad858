//! `roomcast-bench`: a load generator that speaks plain WebSocket over loopback only,
//! bounded in connection count and time.
//!
//! Run with: `cargo run --release -p roomcast-bench -- idle --url ws://127.0.0.1:8080/ws/idle --connections 10000 --hold 20s --server-pid PID`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
#[command(about = "Load generator for WebSocket room servers (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle connections (answering pings) and report the server's RSS per connection.
    Idle {
        /// ws://127.0.0.1:PORT/ws/ROOM (loopback addresses only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// How long to hold them, e.g. 20s
        #[arg(long, default_value = "20s", value_parser = parse_secs)]
        hold: Duration,
        /// The server's process id, to read its RSS from /proc
        #[arg(long)]
        server_pid: u32,
    },
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    text.strip_suffix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}`: write seconds like 20s"))
}

/// `(address, path)` of a `ws://` URL, refusing anything but loopback.
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr: SocketAddr = authority.parse().context("the URL needs an IP:port")?;
    if !addr.ip().is_loopback() {
        bail!("refusing to load a non-loopback address: {addr}");
    }
    Ok((addr, path))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Connect from source address 127.0.0.(2 + n / 20000) so tens of thousands of
/// connections do not exhaust one address's ephemeral ports.
async fn connect_from(addr: SocketAddr, n: usize) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let source = Ipv4Addr::new(127, 0, 0, 2 + (n / 20_000) as u8);
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    Ok(socket.connect(addr).await?)
}

async fn handshake(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed during handshake");
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(())
}

/// Read server frames forever, answering pings with masked pongs.
async fn answer_pings(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 2 && buf[1] < 126 && buf.len() >= 2 + buf[1] as usize {
            let (opcode, len) = (buf[0] & 0x0F, buf[1] as usize);
            if opcode == 0x9 {
                let mut pong = vec![0x8A, 0x80 | len as u8, 0, 0, 0, 0];
                pong.extend_from_slice(&buf[2..2 + len]);
                stream.write_all(&pong).await?;
            }
            buf.drain(..2 + len);
        }
    }
}

async fn idle(
    url: &str,
    connections: usize,
    hold: Duration,
    server_pid: u32,
) -> anyhow::Result<()> {
    let (addr, path) = parse_url(url)?;
    let before = rss_kib(server_pid);
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(connections);
    let started = std::time::Instant::now();
    for n in 0..connections {
        let mut stream = connect_from(addr, n).await?;
        handshake(&mut stream, addr, &path).await?;
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            if answer_pings(stream).await.is_err() {
                failed.fetch_add(1, Relaxed);
            }
        }));
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(hold).await;
    let after = rss_kib(server_pid);
    let dropped = failed.load(Relaxed);
    println!(
        "connections: {connections} (opened in {connect_time:.1?}, held {hold:?}, dropped by server: {dropped})"
    );
    println!("server RSS: before {before} KiB, after {after} KiB");
    println!(
        "server RSS per idle connection: {:.2} KiB",
        (after.saturating_sub(before)) as f64 / connections as f64
    );
    for task in tasks {
        task.abort();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Idle {
            url,
            connections,
            hold,
            server_pid,
        } => idle(&url, connections, hold, server_pid).await,
    }
}
