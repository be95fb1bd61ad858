//! One connection, many rooms (Roomcast's room protocol, `roomcast.v1`): what a room
//! membership costs in server memory, and how fast connections join and leave rooms.
//!
//! Memberships: N connections on `GET /ws` each join one room, then the rest of their
//! rooms; the server's RSS is read on a fresh server, after the first joins and after
//! the rest, each time after a hold that covers a heartbeat. Connection `i` is in rooms
//! `(i + j) % R` for `j` in `0..K`, so the first joins already create all R rooms
//! and the later ones only add members (`N × K / R` to a room). The raw reference: N
//! raw connections to `/ws/{room}` spread over the same R rooms.
//!
//! Join/leave: C connections each stay in a home room (so no room empties and the
//! rate is that of joins and leaves, not of rooms starting and stopping) and, as fast
//! as the replies come, join another room and leave it: `{"join": R, "ref": N}`, wait
//! for `joined`, `{"leave": R, "ref": N + 1}`, wait for `left`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::client::{self, Conn, Target};
use crate::idle;
use crate::procfs;
use crate::stats::Latency;

/// The shape of a memberships run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembershipParams {
    pub connections: usize,
    /// Rooms each connection ends up in.
    pub rooms_per_connection: usize,
    /// Rooms in all.
    pub rooms: usize,
    /// How long to hold after each step before reading RSS (cover a heartbeat).
    pub hold: Duration,
    /// Handshakes in flight at once.
    pub concurrency: usize,
}

/// What a room-protocol memberships run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipResult {
    pub opened: usize,
    pub failed: usize,
    /// Joins answered `joined` / with an `error`.
    pub joined: u64,
    pub join_errors: u64,
    pub dropped_by_server: u64,
    pub pings_answered: u64,
    pub rss_start_kib: u64,
    /// After every connection joined its first room.
    pub rss_one_room_kib: u64,
    /// After every connection joined all its rooms.
    pub rss_all_rooms_kib: u64,
    /// Seconds the later joins took, all connections at once.
    pub later_joins_s: f64,
    pub kib_per_connection_one_room: f64,
    pub kib_per_extra_membership: f64,
    pub kib_per_connection_all_rooms: f64,
}

/// What a raw reference run measured: one room per connection, spread over the rooms.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RawMembershipResult {
    pub opened: usize,
    pub failed: usize,
    pub dropped_by_server: u64,
    pub pings_answered: u64,
    pub rss_start_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_connection: f64,
}

/// The name of room `k`.
fn room_name(prefix: &str, k: usize) -> String {
    format!("{prefix}{k}")
}

/// Counters the member tasks share with the driver.
#[derive(Default)]
struct Counters {
    joined: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
}

/// Open N room-protocol connections on `target` (`/ws`), join one room each, then the
/// rest; RSS after each step.
pub async fn memberships(
    target: &Target,
    params: &MembershipParams,
    server_pid: u32,
) -> anyhow::Result<MembershipResult> {
    anyhow::ensure!(target.room_protocol, "memberships need a target that offers the room protocol");
    anyhow::ensure!(
        (1..=params.rooms).contains(&params.rooms_per_connection),
        "rooms per connection must be at least 1 and at most the rooms in all"
    );
    let mut result = MembershipResult { rss_start_kib: procfs::rss_kib(server_pid)?, ..Default::default() };
    let counters = Arc::new(Counters::default());
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(params.connections);
    let conns =
        client::connect_many(target, params.connections, params.concurrency, Duration::from_secs(20)).await;
    for (i, conn) in conns.into_iter().enumerate() {
        match conn {
            Ok(conn) => {
                result.opened += 1;
                let rooms: Vec<String> = (0..params.rooms_per_connection)
                    .map(|j| room_name("m", (i + j) % params.rooms))
                    .collect();
                tasks.push(tokio::spawn(member(conn, rooms, go_rx.clone(), counters.clone())));
            }
            Err(_) => result.failed += 1,
        }
    }
    let answered = |c: &Counters| c.joined.load(Relaxed) + c.errors.load(Relaxed);
    wait_until(Duration::from_secs(60), || answered(&counters) >= result.opened as u64).await;
    tokio::time::sleep(params.hold).await;
    result.rss_one_room_kib = procfs::rss_kib(server_pid)?;

    let started = Instant::now();
    let _ = go_tx.send(true);
    let all = (result.opened * params.rooms_per_connection) as u64;
    wait_until(Duration::from_secs(120), || answered(&counters) >= all).await;
    result.later_joins_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(params.hold).await;
    result.rss_all_rooms_kib = procfs::rss_kib(server_pid)?;

    result.joined = counters.joined.load(Relaxed);
    result.join_errors = counters.errors.load(Relaxed);
    result.dropped_by_server = counters.dropped.load(Relaxed);
    result.pings_answered = counters.pings.load(Relaxed);
    for task in tasks {
        task.abort();
    }
    if result.opened > 0 {
        let n = result.opened as f64;
        let kib = |a: u64, b: u64| b.saturating_sub(a) as f64;
        result.kib_per_connection_one_room = kib(result.rss_start_kib, result.rss_one_room_kib) / n;
        result.kib_per_connection_all_rooms = kib(result.rss_start_kib, result.rss_all_rooms_kib) / n;
        let extra = n * params.rooms_per_connection.saturating_sub(1) as f64;
        if extra > 0.0 {
            result.kib_per_extra_membership = kib(result.rss_one_room_kib, result.rss_all_rooms_kib) / extra;
        }
    }
    Ok(result)
}

/// Poll `done` every 10 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One room-protocol member: join `rooms[0]`, the rest when `go` turns true; count the
/// replies, answer pings, until the server closes or the task is aborted.
async fn member(conn: Conn, rooms: Vec<String>, mut go: watch::Receiver<bool>, counters: Arc<Counters>) {
    let Conn { mut stream, pending: mut buf, .. } = conn;
    let joins = |rooms: &[String], first_ref: usize| {
        let mut out = Vec::new();
        for (n, room) in rooms.iter().enumerate() {
            let op = format!("{{\"join\":\"{room}\",\"ref\":{}}}", first_ref + n);
            client::encode(client::TEXT, op.as_bytes(), &mut out);
        }
        out
    };
    if stream.write_all(&joins(&rooms[..1], 0)).await.is_err() {
        counters.dropped.fetch_add(1, Relaxed);
        return;
    }
    let mut rest_sent = false;
    let mut pong = Vec::new();
    loop {
        let mut at = 0;
        while let Some(frame) = client::parse(&buf[at..]) {
            let payload = &buf[at + frame.payload_start..at + frame.end];
            match frame.opcode {
                client::TEXT if payload.starts_with(b"{\"joined\"") => {
                    counters.joined.fetch_add(1, Relaxed);
                }
                client::TEXT if payload.starts_with(b"{\"error\"") => {
                    counters.errors.fetch_add(1, Relaxed);
                }
                client::PING => {
                    pong.clear();
                    client::encode(client::PONG, payload, &mut pong);
                    if stream.write_all(&pong).await.is_err() {
                        counters.dropped.fetch_add(1, Relaxed);
                        return;
                    }
                    counters.pings.fetch_add(1, Relaxed);
                }
                client::CLOSE => {
                    counters.dropped.fetch_add(1, Relaxed);
                    return;
                }
                _ => {}
            }
            at += frame.end;
        }
        buf.drain(..at);
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(512);
        }
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    counters.dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
            changed = go.changed(), if !rest_sent => {
                if changed.is_err() {
                    // The driver is gone; keep answering until aborted.
                    rest_sent = true;
                    continue;
                }
                if *go.borrow_and_update() {
                    rest_sent = true;
                    if stream.write_all(&joins(&rooms[1..], 1)).await.is_err() {
                        counters.dropped.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
        }
    }
}

/// The raw reference: N raw connections to `/ws/{room}` (no subprotocol), spread over
/// `params.rooms` rooms, held answering pings; RSS per connection.
pub async fn raw_memberships(
    addr: std::net::SocketAddr,
    params: &MembershipParams,
    server_pid: u32,
) -> anyhow::Result<RawMembershipResult> {
    let mut result =
        RawMembershipResult { rss_start_kib: procfs::rss_kib(server_pid)?, ..Default::default() };
    let targets = (0..params.rooms)
        .map(|k| Target::new(addr, format!("/ws/{}", room_name("m", k))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let conns: Vec<_> = futures_util::stream::iter(0..params.connections)
        .map(|i| client::connect(&targets[i % targets.len()], Duration::from_secs(20)))
        .buffered(params.concurrency.max(1))
        .collect()
        .await;
    let dropped = Arc::new(AtomicU64::new(0));
    let pings = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns.len());
    for conn in conns {
        match conn {
            Ok(conn) => {
                result.opened += 1;
                let (dropped, pings) = (dropped.clone(), pings.clone());
                tasks.push(tokio::spawn(async move {
                    if idle::answer_pings(conn, &pings).await.is_err() {
                        dropped.fetch_add(1, Relaxed);
                    }
                }));
            }
            Err(_) => result.failed += 1,
        }
    }
    tokio::time::sleep(params.hold).await;
    result.rss_after_kib = procfs::rss_kib(server_pid)?;
    result.dropped_by_server = dropped.load(Relaxed);
    result.pings_answered = pings.load(Relaxed);
    for task in tasks {
        task.abort();
    }
    if result.opened > 0 {
        result.kib_per_connection =
            result.rss_after_kib.saturating_sub(result.rss_start_kib) as f64 / result.opened as f64;
    }
    Ok(result)
}

/// The shape of a join/leave run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinLeaveParams {
    pub connections: usize,
    /// Rooms in all (at most `connections`: every room has a member that stays).
    pub rooms: usize,
    pub duration: Duration,
}

/// What a join/leave run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JoinLeaveResult {
    pub connections: usize,
    pub rooms: usize,
    /// Joins and leaves answered (`joined`, `left`) during the measured phase.
    pub operations: u64,
    /// Operations answered with an `error`.
    pub errors: u64,
    pub elapsed_s: f64,
    pub operations_per_sec: f64,
    /// From sending an operation to its reply.
    pub latency: Latency,
    pub server_cpu_s: f64,
    pub cpu_us_per_operation: f64,
    pub client_cpu_s: f64,
    pub other_cpu_s: f64,
}

/// The replies a join/leave client waits for.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    joined: Option<String>,
    #[serde(default)]
    left: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(rename = "ref", default)]
    reference: Option<u64>,
}

/// What one join/leave client counted.
#[derive(Default)]
struct ClientOut {
    latencies_ns: Vec<u64>,
}

/// Connect C room-protocol clients, put each in its home room, then let them join and
/// leave other rooms for `duration`.
pub async fn join_leave(
    target: &Target,
    params: &JoinLeaveParams,
    server_pid: u32,
) -> anyhow::Result<JoinLeaveResult> {
    anyhow::ensure!(target.room_protocol, "join/leave needs a target that offers the room protocol");
    let rooms = params.rooms.clamp(2, params.connections.max(2));
    let conns = client::connect_all(target, params.connections).await?;
    let ready = Arc::new(AtomicU64::new(0));
    let operations = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        let counters = JoinLeaveCounters {
            ready: ready.clone(),
            operations: operations.clone(),
            errors: errors.clone(),
            measuring: measuring.clone(),
            stop: stop.clone(),
        };
        tasks.push(tokio::spawn(join_leave_client(conn, i, rooms, go_rx.clone(), counters)));
    }
    let n = tasks.len() as u64;
    wait_until(Duration::from_secs(30), || ready.load(Relaxed) >= n).await;
    if ready.load(Relaxed) < n {
        bail!("only {} of {n} clients joined their home room", ready.load(Relaxed));
    }
    let me = std::process::id();
    let exclude = [me, server_pid];
    let (cpu_before, own_before, others_before) =
        (procfs::cpu_secs(server_pid)?, procfs::cpu_secs(me)?, procfs::others_cpu_secs(&exclude));
    measuring.store(true, Relaxed);
    let _ = go_tx.send(true);
    let started = Instant::now();
    tokio::time::sleep(params.duration).await;
    measuring.store(false, Relaxed);
    let elapsed_s = started.elapsed().as_secs_f64();
    let ops = operations.load(Relaxed);
    let errs = errors.load(Relaxed);
    let (cpu_after, own_after, others_after) =
        (procfs::cpu_secs(server_pid)?, procfs::cpu_secs(me)?, procfs::others_cpu_secs(&exclude));
    stop.store(true, Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(out))) => latencies.extend_from_slice(&out.latencies_ns),
            Ok(Ok(Err(error))) => bail!("a join/leave client failed: {error:#}"),
            Ok(Err(error)) => bail!("a join/leave client panicked: {error}"),
            Err(_) => bail!("a join/leave client did not stop"),
        }
    }
    let server_cpu_s = cpu_after - cpu_before;
    Ok(JoinLeaveResult {
        connections: params.connections,
        rooms,
        operations: ops,
        errors: errs,
        elapsed_s,
        operations_per_sec: ops as f64 / elapsed_s,
        latency: Latency::from_ns(&mut latencies),
        server_cpu_s,
        cpu_us_per_operation: if ops > 0 { server_cpu_s * 1e6 / ops as f64 } else { 0.0 },
        client_cpu_s: own_after - own_before,
        other_cpu_s: (others_after - others_before).max(0.0),
    })
}

/// What the join/leave clients share with the driver.
struct JoinLeaveCounters {
    /// Clients in their home room.
    ready: Arc<AtomicU64>,
    /// Joins and leaves answered while `measuring`.
    operations: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// Client `i`: home room `i % rooms`, then join and leave the other rooms in turn.
async fn join_leave_client(
    conn: Conn,
    i: usize,
    rooms: usize,
    mut go: watch::Receiver<bool>,
    counters: JoinLeaveCounters,
) -> anyhow::Result<ClientOut> {
    let Conn { mut stream, pending: mut buf, .. } = conn;
    let mut out = ClientOut::default();
    let home = i % rooms;
    let mut reference = 0u64;
    let reply = operation(&mut stream, &mut buf, "join", &room_name("jl", home), reference).await?;
    anyhow::ensure!(reply.joined.is_some(), "home room refused: {:?}", reply.error);
    counters.ready.fetch_add(1, Relaxed);
    while !*go.borrow_and_update() {
        go.changed().await?;
    }
    let mut n = i;
    while !counters.stop.load(Relaxed) {
        // Every room but the home one, starting from a different one for each client.
        let room = room_name("jl", (home + 1 + n % (rooms - 1)) % rooms);
        n += 1;
        for op in ["join", "leave"] {
            reference += 1;
            let sent = Instant::now();
            let reply = operation(&mut stream, &mut buf, op, &room, reference).await?;
            let ok = match op {
                "join" => reply.joined.is_some(),
                _ => reply.left.is_some(),
            };
            if counters.measuring.load(Relaxed) {
                if ok {
                    counters.operations.fetch_add(1, Relaxed);
                    out.latencies_ns.push(sent.elapsed().as_nanos() as u64);
                } else {
                    counters.errors.fetch_add(1, Relaxed);
                }
            }
        }
    }
    Ok(out)
}

/// Send `{"OP": ROOM, "ref": N}` and read until the reply with that `ref`, answering
/// pings on the way.
async fn operation(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    op: &str,
    room: &str,
    reference: u64,
) -> anyhow::Result<Reply> {
    let mut frame = Vec::new();
    let text = format!("{{\"{op}\":\"{room}\",\"ref\":{reference}}}");
    client::encode(client::TEXT, text.as_bytes(), &mut frame);
    stream.write_all(&frame).await?;
    loop {
        let mut at = 0;
        let mut found = None;
        while let Some(f) = client::parse(&buf[at..]) {
            let payload = &buf[at + f.payload_start..at + f.end];
            match f.opcode {
                client::TEXT => {
                    let reply: Reply = serde_json::from_slice(payload)
                        .with_context(|| format!("reply {}", String::from_utf8_lossy(payload)))?;
                    if reply.reference == Some(reference) && found.is_none() {
                        found = Some(reply);
                    }
                }
                client::PING => {
                    frame.clear();
                    client::encode(client::PONG, payload, &mut frame);
                    stream.write_all(&frame).await?;
                }
                client::CLOSE => bail!("the server closed the connection"),
                _ => {}
            }
            at += f.end;
        }
        buf.drain(..at);
        if let Some(reply) = found {
            return Ok(reply);
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("the server closed the connection");
        }
    }
}
