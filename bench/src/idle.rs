//! Idle: hold N connections that do nothing but answer the server's pings, then
//! report the server's resident memory per connection.
//!
//! Connections come from source addresses spread over 127.0.0.x. Past this process's
//! open-file limit (20,000 here, and it cannot be raised) the connections are split
//! over worker processes (`roomcast-bench idle-worker`), each holding its share until
//! its stdin closes.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::task::JoinHandle;

use crate::client::{self, Conn, Target};
use crate::procfs;

/// One idle run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleParams {
    pub connections: usize,
    /// How long to hold them once all are open (cover at least one heartbeat).
    pub hold: Duration,
    /// Handshakes in flight at once.
    pub concurrency: usize,
}

/// What one idle run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleResult {
    pub connections: usize,
    pub opened: usize,
    pub failed: usize,
    pub dropped_by_server: u64,
    pub pings_answered: u64,
    pub connect_s: f64,
    pub processes: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_conn_kib: f64,
}

/// Connections one process may hold, keeping some descriptors spare.
fn per_process() -> usize {
    procfs::open_files_limit().saturating_sub(256).max(256)
}

/// Open, hold, measure, close.
pub async fn run(target: &Target, params: &IdleParams, server_pid: u32) -> anyhow::Result<IdleResult> {
    let rss_before_kib = procfs::rss_kib(server_pid)?;
    let started = Instant::now();
    let mut result = IdleResult { connections: params.connections, rss_before_kib, ..IdleResult::default() };
    if params.connections <= per_process() {
        let holding = open_and_hold(target, params.connections, params.concurrency).await;
        result.opened = holding.opened;
        result.failed = holding.failed;
        result.connect_s = started.elapsed().as_secs_f64();
        result.processes = 1;
        tokio::time::sleep(params.hold).await;
        result.rss_after_kib = procfs::rss_kib(server_pid)?;
        result.dropped_by_server = holding.dropped.load(Relaxed);
        result.pings_answered = holding.pings.load(Relaxed);
        holding.release();
    } else {
        let share = per_process();
        let workers = params.connections.div_ceil(share);
        let mut children = Vec::with_capacity(workers);
        for w in 0..workers {
            let n = share.min(params.connections - w * share);
            let child = tokio::process::Command::new(std::env::current_exe()?)
                .args(["idle-worker", "--url"])
                .arg(format!("ws://{}{}", target.addr, target.path))
                .arg("--connections")
                .arg(n.to_string())
                .arg("--concurrency")
                .arg(params.concurrency.to_string())
                .arg("--source-offset")
                .arg((w * 97).to_string())
                .args(target.deflate.then_some("--deflate"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting an idle worker")?;
            children.push(child);
        }
        let mut outputs = Vec::with_capacity(workers);
        for child in &mut children {
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.next_line().await?.context("worker ended early")?;
            let [opened, failed] = numbers(&ready, "opened")?;
            result.opened += opened as usize;
            result.failed += failed as usize;
            outputs.push(lines);
        }
        result.connect_s = started.elapsed().as_secs_f64();
        result.processes = workers;
        tokio::time::sleep(params.hold).await;
        result.rss_after_kib = procfs::rss_kib(server_pid)?;
        for (child, lines) in children.iter_mut().zip(&mut outputs) {
            drop(child.stdin.take());
            let done = lines.next_line().await?.context("worker ended early")?;
            let [dropped, pings] = numbers(&done, "dropped")?;
            result.dropped_by_server += dropped;
            result.pings_answered += pings;
            child.wait().await?;
        }
    }
    if result.opened > 0 {
        result.rss_per_conn_kib =
            result.rss_after_kib.saturating_sub(rss_before_kib) as f64 / result.opened as f64;
    }
    Ok(result)
}

/// Parse a worker line `WORD a b`.
fn numbers(line: &str, word: &str) -> anyhow::Result<[u64; 2]> {
    let mut parts = line.split_whitespace();
    if parts.next() != Some(word) {
        bail!("unexpected worker output: {line}");
    }
    let mut next = || -> anyhow::Result<u64> {
        parts.next().context("short worker line")?.parse().context("worker number")
    };
    Ok([next()?, next()?])
}

/// The body of `roomcast-bench idle-worker`: open, print `opened N FAILED`, hold until
/// stdin closes, print `dropped N PINGS`.
pub async fn worker(target: &Target, connections: usize, concurrency: usize) -> anyhow::Result<()> {
    let holding = open_and_hold(target, connections, concurrency).await;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(format!("opened {} {}\n", holding.opened, holding.failed).as_bytes()).await?;
    stdout.flush().await?;
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    let line = format!("dropped {} {}\n", holding.dropped.load(Relaxed), holding.pings.load(Relaxed));
    holding.release();
    stdout.write_all(line.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// Connections being held, and what happened to them.
struct Holding {
    opened: usize,
    failed: usize,
    dropped: Arc<AtomicU64>,
    pings: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Holding {
    /// Close every connection.
    fn release(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

async fn open_and_hold(target: &Target, n: usize, concurrency: usize) -> Holding {
    let dropped = Arc::new(AtomicU64::new(0));
    let pings = Arc::new(AtomicU64::new(0));
    let mut holding = Holding {
        opened: 0,
        failed: 0,
        dropped: dropped.clone(),
        pings: pings.clone(),
        tasks: Vec::with_capacity(n),
    };
    for conn in client::connect_many(target, n, concurrency, Duration::from_secs(20)).await {
        match conn {
            Ok(conn) => {
                holding.opened += 1;
                let (dropped, pings) = (dropped.clone(), pings.clone());
                holding.tasks.push(tokio::spawn(async move {
                    if answer_pings(conn, &pings).await.is_err() {
                        dropped.fetch_add(1, Relaxed);
                    }
                }));
            }
            Err(_) => holding.failed += 1,
        }
    }
    holding
}

/// Read frames until the server closes, answering each ping with a pong.
pub async fn answer_pings(conn: Conn, pings: &AtomicU64) -> anyhow::Result<()> {
    let Conn { mut stream, pending: mut buf, .. } = conn;
    let mut pong = Vec::new();
    loop {
        let mut at = 0;
        while let Some(frame) = client::parse(&buf[at..]) {
            match frame.opcode {
                client::PING => {
                    pong.clear();
                    client::encode(client::PONG, &buf[at + frame.payload_start..at + frame.end], &mut pong);
                    stream.write_all(&pong).await?;
                    pings.fetch_add(1, Relaxed);
                }
                client::CLOSE => bail!("server closed the connection"),
                _ => {}
            }
            at += frame.end;
        }
        buf.drain(..at);
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(512);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("server closed the connection");
        }
    }
}
