//! Connection rate: new WebSocket connections per second, each one connected,
//! upgraded, used for one message and closed, with a fixed number of attempts in flight.
//!
//! Every server broadcasts a message to the *other* members of its room only, so a new
//! connection's first message is observed by someone else: each of the `in_flight`
//! slots has its own room (`ROOM-0`, `ROOM-1`, ...) with one long-lived listener in it.
//! A slot, over and over: opens a TCP connection (from the next 127.0.0.x source
//! address), upgrades it (checking the `101` and its `Sec-WebSocket-Accept`), sends one
//! small text message and waits until the listener of its room has received it, then
//! closes cleanly: a close frame, and waiting until the server has closed the TCP
//! connection. The server closes first, so the TIME_WAIT sockets are the server's and
//! the client's ports come free at once. Each room holds the listener and at most one
//! new connection, so every server forwards each first message to exactly one member.
//!
//! Reported: completed connections per second (the message arrived), the latency from
//! the start of the TCP connect to the listener's read of the message (and to the
//! validated `101`), the server's CPU per connection (accept, upgrade, one forwarded
//! message, the close handshake: utime + stime over the phase), the errors, and the
//! kernel's listen-queue overflows and drops over the phase.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use crate::client::{self, Target};
use crate::procfs;
use crate::stats::Latency;

/// One connection-rate run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectRateParams {
    /// Attempts in flight at once (connect to close).
    pub in_flight: usize,
    /// How long new attempts start; those under way then finish.
    pub duration: Duration,
    /// Text bytes of the one message (at least [`client::STAMP_LEN`]).
    pub size: usize,
}

/// What one connection-rate run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectRateResult {
    pub in_flight: usize,
    /// From the first attempt to the end of the last one.
    pub elapsed_s: f64,
    /// Attempts whose message reached the listener.
    pub connections: u64,
    pub connections_per_sec: f64,
    /// Start of the TCP connect to the listener's read of the first message.
    pub latency: Latency,
    /// Start of the TCP connect to the validated `101`.
    pub upgrade: Latency,
    /// TCP connect failed or timed out.
    pub connect_errors: u64,
    /// No valid `101` (refused, wrong accept, closed, timed out).
    pub upgrade_errors: u64,
    /// The message could not be sent, or the listener did not get it within 5 s.
    pub message_errors: u64,
    /// The server had not closed 2 s after the close frame (the connection still counts).
    pub close_timeouts: u64,
    /// Listeners the server closed during the run.
    pub listeners_lost: u64,
    /// A few of the error messages, to tell what went wrong.
    pub error_samples: Vec<String>,
    pub server_cpu_s: f64,
    pub cpu_us_per_connection: f64,
    /// The load generator's own CPU over the phase (near `elapsed_s`: it was the limit).
    pub client_cpu_s: f64,
    /// Every other process's CPU over the phase (noise).
    pub other_cpu_s: f64,
    /// `ListenOverflows` and `ListenDrops` (TcpExt, system-wide) over the phase.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    /// The server's open descriptors before the listeners connected and after the run.
    pub fds_before: usize,
    pub fds_after: usize,
}

impl ConnectRateResult {
    /// Failed attempts of every kind (close timeouts are not failures).
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.upgrade_errors + self.message_errors
    }
}

/// How long one step of an attempt may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server has to close after the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Error messages kept per slot.
const SAMPLES: usize = 2;

/// What one slot counted.
#[derive(Default)]
struct SlotStats {
    latency_ns: Vec<u64>,
    upgrade_ns: Vec<u64>,
    connect_errors: u64,
    upgrade_errors: u64,
    message_errors: u64,
    close_timeouts: u64,
    samples: Vec<String>,
}

impl SlotStats {
    fn sample(&mut self, what: &str, error: impl std::fmt::Display) {
        if self.samples.len() < SAMPLES {
            self.samples.push(format!("{what}: {error:#}"));
        }
    }
}

pub async fn run(
    target: &Target,
    params: &ConnectRateParams,
    server_pid: u32,
) -> anyhow::Result<ConnectRateResult> {
    anyhow::ensure!(params.in_flight > 0, "at least one attempt in flight");
    let fds_before = procfs::fd_count(server_pid)?;
    let slots = params.in_flight;
    let room = |slot: usize| -> anyhow::Result<Target> {
        let mut t = Target::new(target.addr, format!("{}-{slot}", target.path.trim_end_matches('/')))?;
        t.room_protocol = target.room_protocol;
        Ok(t)
    };
    // One listener per slot's room, connected before the phase.
    let mut listeners = Vec::with_capacity(slots);
    let mut heard = Vec::with_capacity(slots);
    let rooms: Vec<Target> = (0..slots).map(room).collect::<anyhow::Result<_>>()?;
    for (slot, room) in rooms.iter().enumerate() {
        let conn = client::connect(room, Duration::from_secs(10)).await?;
        let (tx, rx) = watch::channel(0u32);
        listeners.push(tokio::spawn(listen(conn, slot as u32, tx)));
        heard.push(rx);
    }
    // Let the server settle after the listeners' handshakes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let me = std::process::id();
    let counters_before = procfs::listen_counters()?;
    let cpu_before = procfs::cpu_secs(server_pid)?;
    let client_before = procfs::cpu_secs(me)?;
    let others_before = procfs::others_cpu_secs(&[me, server_pid]);
    let started = Instant::now();
    let deadline = started + params.duration;
    let workers: Vec<_> = rooms
        .into_iter()
        .zip(heard)
        .enumerate()
        .map(|(slot, (room, heard))| tokio::spawn(slot_loop(room, slot as u32, heard, deadline, params.size)))
        .collect();
    let mut stats = Vec::with_capacity(slots);
    for worker in workers {
        stats.push(worker.await?);
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let server_cpu_s = procfs::cpu_secs(server_pid)? - cpu_before;
    let client_cpu_s = procfs::cpu_secs(me)? - client_before;
    let other_cpu_s = procfs::others_cpu_secs(&[me, server_pid]) - others_before;
    let counters_after = procfs::listen_counters()?;

    let mut listeners_lost = 0;
    for listener in listeners {
        if listener.is_finished() {
            listeners_lost += 1;
        }
        listener.abort();
    }
    // Let the server notice the listeners left before counting its descriptors.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut latency_ns: Vec<u64> = stats.iter().flat_map(|s| s.latency_ns.iter().copied()).collect();
    let mut upgrade_ns: Vec<u64> = stats.iter().flat_map(|s| s.upgrade_ns.iter().copied()).collect();
    let sum = |f: fn(&SlotStats) -> u64| stats.iter().map(f).sum::<u64>();
    let connections = latency_ns.len() as u64;
    let mut error_samples: Vec<String> = stats.iter().flat_map(|s| s.samples.iter().cloned()).collect();
    error_samples.sort();
    error_samples.dedup();
    error_samples.truncate(5);
    Ok(ConnectRateResult {
        in_flight: slots,
        elapsed_s,
        connections,
        connections_per_sec: connections as f64 / elapsed_s,
        latency: Latency::from_ns(&mut latency_ns),
        upgrade: Latency::from_ns(&mut upgrade_ns),
        connect_errors: sum(|s| s.connect_errors),
        upgrade_errors: sum(|s| s.upgrade_errors),
        message_errors: sum(|s| s.message_errors),
        close_timeouts: sum(|s| s.close_timeouts),
        listeners_lost,
        error_samples,
        server_cpu_s,
        cpu_us_per_connection: server_cpu_s * 1e6 / connections.max(1) as f64,
        client_cpu_s,
        other_cpu_s,
        listen_overflows: counters_after.overflows.saturating_sub(counters_before.overflows),
        listen_drops: counters_after.drops.saturating_sub(counters_before.drops),
        fds_before,
        fds_after: procfs::fd_count(server_pid)?,
    })
}

/// The long-lived member of a slot's room: publishes the sequence number of the
/// slot's latest message it read, and answers pings. Ends when the server closes.
async fn listen(conn: client::Conn, slot: u32, heard: watch::Sender<u32>) -> anyhow::Result<()> {
    let mut stream = conn.stream;
    let mut buf = conn.pending;
    buf.reserve(4096);
    let mut pong = Vec::new();
    loop {
        let mut at = 0;
        while let Some(frame) = client::parse(&buf[at..]) {
            let payload = &buf[at + frame.payload_start..at + frame.end];
            match frame.opcode {
                client::TEXT => {
                    if let Some((sender, seq, _)) = client::read_stamp(payload)
                        && sender == slot
                    {
                        heard.send_if_modified(|latest| {
                            let newer = seq > *latest;
                            if newer {
                                *latest = seq;
                            }
                            newer
                        });
                    }
                }
                client::PING => {
                    pong.clear();
                    client::encode(client::PONG, payload, &mut pong);
                    stream.write_all(&pong).await?;
                }
                client::CLOSE => anyhow::bail!("the server closed listener {slot}"),
                _ => {}
            }
            at += frame.end;
        }
        buf.drain(..at);
        if stream.read_buf(&mut buf).await? == 0 {
            anyhow::bail!("the server dropped listener {slot}");
        }
    }
}

/// One slot's attempts, until the deadline.
async fn slot_loop(
    room: Target,
    slot: u32,
    mut heard: watch::Receiver<u32>,
    deadline: Instant,
    size: usize,
) -> SlotStats {
    let mut stats = SlotStats::default();
    let (mut payload, mut frame, mut close) = (Vec::new(), Vec::new(), Vec::new());
    client::encode(client::CLOSE, &1000u16.to_be_bytes(), &mut close);
    let mut sink = vec![0u8; 1024];
    let mut seq = 0u32;
    // After a failure, wait a little so a refusing server is not hammered in a loop.
    let pause = || tokio::time::sleep(Duration::from_millis(10));
    while Instant::now() < deadline {
        let started = Instant::now();
        let stream = match tokio::time::timeout(STEP_TIMEOUT, client::open(&room)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                stats.connect_errors += 1;
                stats.sample("connect", error);
                pause().await;
                continue;
            }
            Err(_) => {
                stats.connect_errors += 1;
                stats.sample("connect", "timed out");
                continue;
            }
        };
        let conn = match tokio::time::timeout(STEP_TIMEOUT, client::upgrade(stream, &room)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                stats.upgrade_errors += 1;
                stats.sample("upgrade", error);
                pause().await;
                continue;
            }
            Err(_) => {
                stats.upgrade_errors += 1;
                stats.sample("upgrade", "timed out");
                continue;
            }
        };
        stats.upgrade_ns.push(started.elapsed().as_nanos() as u64);
        let mut stream = conn.stream;
        seq += 1;
        client::stamp(slot, seq, 0, size, &mut payload);
        frame.clear();
        client::encode(client::TEXT, &payload, &mut frame);
        if let Err(error) = stream.write_all(&frame).await {
            stats.message_errors += 1;
            stats.sample("message", error);
            continue;
        }
        match tokio::time::timeout(STEP_TIMEOUT, heard.wait_for(|&latest| latest >= seq)).await {
            Ok(Ok(_)) => stats.latency_ns.push(started.elapsed().as_nanos() as u64),
            Ok(Err(_)) => {
                // The listener is gone: nothing more can be observed in this room.
                stats.message_errors += 1;
                stats.sample("message", "the room's listener was closed");
                break;
            }
            Err(_) => {
                stats.message_errors += 1;
                stats.sample("message", "the listener did not receive it within 5 s");
                continue;
            }
        }
        // Close: our close frame, then whatever the server sends until it closes the
        // TCP connection (a reset after the close frame counts as closed too).
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if stream.write_all(&close).await.is_err() {
                return;
            }
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        if closed.is_err() {
            stats.close_timeouts += 1;
        }
    }
    stats
}
