//! A mass reconnect (Roomcast's room protocol with history): N clients in one room
//! while a publisher sends at a steady pace; all N drop their TCP connections at once
//! (a reset, no close frame), the publisher goes on for M messages, then all N come
//! back at once and join with `since` = the last offset each one saw.
//!
//! A client has recovered when its join said `recovered: true` and it holds every
//! offset up to the one the join reported as live. Every client checks that offsets
//! arrive exactly once and in order, before the drop, across the seam and after it;
//! a gap or a repeat is counted, never skipped. A few watchers stay connected the whole
//! time and measure publish-to-receive latency (the publisher stamps its send time into
//! the text), before the drop and during the storm, from a thread of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::client::{self, Conn, Target};
use crate::procfs;
use crate::stats::Latency;

/// The room every connection joins.
const ROOM: &str = "recovery";

/// The shape of a recovery run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecoveryParams {
    /// Clients that drop and come back.
    pub clients: usize,
    /// Clients that stay connected and measure live latency.
    pub watchers: usize,
    /// Messages per second the publisher sends, throughout.
    pub messages_per_sec: f64,
    /// Text bytes per message (at least 32, the stamp).
    pub size: usize,
    /// Messages published between the drop and the reconnect.
    pub missed: usize,
    /// How long the room runs before the drop (its latency is the baseline, the first
    /// second left out).
    pub before: Duration,
    /// How long the room runs after every client recovered.
    pub after: Duration,
    /// Handshakes in flight at once during the reconnect.
    pub concurrency: usize,
}

/// What a recovery run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryResult {
    pub clients: usize,
    pub watchers: usize,
    /// Messages published between the drop and the reconnect.
    pub missed_published: u64,
    /// How many messages behind the live offset the clients asked from (lowest, highest).
    pub behind_min: u64,
    pub behind_max: u64,
    /// Joins answered `recovered: true` / `false`.
    pub recovered: u64,
    pub not_recovered: u64,
    /// Clients told `recovered: true` that had not caught up when the wait ended, or
    /// that failed (with the first error).
    pub unfinished: u64,
    pub first_error: Option<String>,
    /// Connection attempts that failed during the reconnect and were retried.
    pub reconnect_retries: u64,
    /// Replayed messages delivered (offsets up to the live one at each rejoin).
    pub replayed: u64,
    /// Offsets skipped / received again or out of order, over all clients and phases.
    pub gaps: u64,
    pub duplicates: u64,
    /// The same for the watchers.
    pub watcher_gaps: u64,
    pub watcher_duplicates: u64,
    /// Clients whose last offset at the end differs from the watchers'.
    pub behind_at_end: u64,
    /// From the reconnect to the last client recovered.
    pub all_recovered_s: f64,
    /// Per client, from the reconnect to recovered (handshake queueing included).
    pub recovery: Latency,
    /// Per client, from sending its join to recovered.
    pub join_to_recovered: Latency,
    /// Watchers' publish-to-receive latency for messages sent before the drop (the
    /// first second left out) and during the storm (reconnect to all recovered).
    pub live_before: Latency,
    pub live_storm: Latency,
    /// Server CPU share (CPU seconds per second) before the drop and during the storm.
    pub server_cpu_before: f64,
    /// The load generator's CPU share before the drop (near 1: it was the limit).
    pub client_cpu_before: f64,
    pub server_cpu_storm: f64,
    pub server_cpu_storm_s: f64,
    /// The load generator's and other programs' CPU over the storm.
    pub client_cpu_storm_s: f64,
    pub other_cpu_storm_s: f64,
}

/// What the driver tells every task; the value only grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Connections join; the publisher waits.
    Setup,
    Steady,
    Drop,
    Reconnect,
    /// The publisher stops.
    Quiet,
    /// Everyone stops and reports.
    End,
}

/// State the tasks share with the driver.
struct Shared {
    epoch: Instant,
    /// Connections in the room (publisher, watchers, clients).
    ready: AtomicU64,
    /// Messages published.
    sent: AtomicU64,
    /// Clients that dropped their connection.
    dropped: AtomicU64,
    /// Clients recovered, or finished without recovering.
    settled: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientOut {
    behind: u64,
    recovered: Option<bool>,
    reconnect_ns: u64,
    join_sent_ns: u64,
    recovered_ns: Option<u64>,
    retries: u64,
    replayed: u64,
    last: u64,
    order: Order,
    error: Option<String>,
}

/// Exactly-once, in-order bookkeeping of one connection's offsets.
#[derive(Default, Clone, Copy)]
struct Order {
    last: u64,
    gaps: u64,
    duplicates: u64,
}

impl Order {
    fn see(&mut self, offset: u64) {
        if offset == self.last + 1 {
            self.last = offset;
        } else if offset > self.last {
            self.gaps += 1;
            self.last = offset;
        } else {
            self.duplicates += 1;
        }
    }
}

/// Run the scenario against a server whose rooms keep at least `missed` messages of history.
pub async fn run(
    target: &Target,
    params: &RecoveryParams,
    server_pid: u32,
) -> anyhow::Result<RecoveryResult> {
    run_across(target, target, params, &[server_pid]).await
}

/// The same, with the clients coming back to `reconnect` (another node of a cluster);
/// the server CPU is that of every process in `server_pids`.
pub async fn run_across(
    target: &Target,
    reconnect: &Target,
    params: &RecoveryParams,
    server_pids: &[u32],
) -> anyhow::Result<RecoveryResult> {
    anyhow::ensure!(
        target.room_protocol && reconnect.room_protocol,
        "recovery needs targets that offer the room protocol"
    );
    let server_cpu = || -> anyhow::Result<f64> { server_pids.iter().map(|&pid| procfs::cpu_secs(pid)).sum() };
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        ready: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        settled: AtomicU64::new(0),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let publisher_conn = client::connect(target, Duration::from_secs(10)).await?;
    let watchers = spawn_watchers(target, params.watchers, &shared, &phase_rx);
    let client_conns = client::connect_all(target, params.clients).await?;
    let publisher = tokio::spawn(publish(publisher_conn, params.clone(), shared.clone(), phase_rx.clone()));
    let handshakes = Arc::new(Semaphore::new(params.concurrency.max(1)));
    let clients: Vec<_> = client_conns
        .into_iter()
        .map(|conn| {
            let args = (reconnect.clone(), shared.clone(), phase_rx.clone(), handshakes.clone());
            tokio::spawn(async move {
                let mut out = ClientOut::default();
                if let Err(error) = client(conn, &mut out, args.0, &args.1, args.2, &args.3).await {
                    out.error = Some(format!("{error:#}"));
                    // Not yet counted: neither caught up nor told `recovered: false`.
                    if out.recovered_ns.is_none() && out.recovered != Some(false) {
                        args.1.settled.fetch_add(1, Relaxed);
                    }
                }
                out
            })
        })
        .collect();
    let everyone = 1 + params.watchers as u64 + params.clients as u64;
    wait_until(Duration::from_secs(60), || shared.ready.load(Relaxed) >= everyone).await;
    if shared.ready.load(Relaxed) < everyone {
        bail!("only {} of {everyone} connections joined the room", shared.ready.load(Relaxed));
    }

    // Steady: the publisher runs; the baseline is its last part.
    let _ = phase_tx.send(Phase::Steady);
    tokio::time::sleep(Duration::from_secs(1).min(params.before)).await;
    let me = std::process::id();
    let (cpu_0, own_0, baseline_from_ns) = (server_cpu()?, procfs::cpu_secs(me)?, shared.now_ns());
    tokio::time::sleep(params.before.saturating_sub(Duration::from_secs(1))).await;
    let (cpu_1, own_1, drop_ns) = (server_cpu()?, procfs::cpu_secs(me)?, shared.now_ns());
    let baseline_s = ((drop_ns - baseline_from_ns) as f64 / 1e9).max(1e-9);
    let server_cpu_before = (cpu_1 - cpu_0) / baseline_s;
    let client_cpu_before = (own_1 - own_0) / baseline_s;

    // Drop every client at once, let the room go on for `missed` messages.
    let _ = phase_tx.send(Phase::Drop);
    let n = params.clients as u64;
    wait_until(Duration::from_secs(30), || shared.dropped.load(Relaxed) >= n).await;
    let sent_at_drop = shared.sent.load(Relaxed);
    let missed_target = sent_at_drop + params.missed as u64;
    wait_until(Duration::from_secs(60), || shared.sent.load(Relaxed) >= missed_target).await;
    let missed_published = shared.sent.load(Relaxed) - sent_at_drop;

    // Everyone back at once.
    let exclude: Vec<u32> = [me].into_iter().chain(server_pids.iter().copied()).collect();
    let (cpu_2, own_2, others_2) = (server_cpu()?, procfs::cpu_secs(me)?, procfs::others_cpu_secs(&exclude));
    let reconnect_ns = shared.now_ns();
    let _ = phase_tx.send(Phase::Reconnect);
    wait_until(Duration::from_secs(120), || shared.settled.load(Relaxed) >= n).await;
    let all_ns = shared.now_ns();
    let (cpu_3, own_3, others_3) = (server_cpu()?, procfs::cpu_secs(me)?, procfs::others_cpu_secs(&exclude));
    let storm_s = ((all_ns - reconnect_ns) as f64 / 1e9).max(1e-9);

    tokio::time::sleep(params.after).await;
    let _ = phase_tx.send(Phase::Quiet);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = phase_tx.send(Phase::End);

    publisher.await.context("publisher task")?.context("publisher")?;
    let mut result = RecoveryResult {
        clients: params.clients,
        watchers: params.watchers,
        missed_published,
        behind_min: u64::MAX,
        all_recovered_s: storm_s,
        server_cpu_before,
        client_cpu_before,
        server_cpu_storm_s: cpu_3 - cpu_2,
        server_cpu_storm: (cpu_3 - cpu_2) / storm_s,
        client_cpu_storm_s: own_3 - own_2,
        other_cpu_storm_s: (others_3 - others_2).max(0.0),
        ..RecoveryResult::default()
    };
    let (mut before, mut storm) = (Vec::new(), Vec::new());
    let mut live_last = 0;
    let watchers = watchers.join().map_err(|_| anyhow::anyhow!("the watchers' thread panicked"))??;
    for out in watchers {
        result.watcher_gaps += out.order.gaps;
        result.watcher_duplicates += out.order.duplicates;
        live_last = live_last.max(out.order.last);
        for (sent_ns, latency_ns) in out.samples {
            if (baseline_from_ns..drop_ns).contains(&sent_ns) {
                before.push(latency_ns);
            } else if (reconnect_ns..=all_ns).contains(&sent_ns) {
                storm.push(latency_ns);
            }
        }
    }
    result.live_before = Latency::from_ns(&mut before);
    result.live_storm = Latency::from_ns(&mut storm);
    let (mut recovery, mut join_to_recovered) = (Vec::new(), Vec::new());
    for task in clients {
        let out = task.await.context("client task")?;
        result.behind_min = result.behind_min.min(out.behind);
        result.behind_max = result.behind_max.max(out.behind);
        match out.recovered {
            Some(true) => result.recovered += 1,
            Some(false) => result.not_recovered += 1,
            None => {}
        }
        result.reconnect_retries += out.retries;
        result.replayed += out.replayed;
        result.gaps += out.order.gaps;
        result.duplicates += out.order.duplicates;
        if out.last != live_last {
            result.behind_at_end += 1;
        }
        match out.recovered_ns {
            Some(at) if out.error.is_none() => {
                recovery.push(at - out.reconnect_ns);
                join_to_recovered.push(at - out.join_sent_ns);
            }
            None if out.error.is_none() && out.recovered == Some(false) => {}
            _ => {
                result.unfinished += 1;
                if result.first_error.is_none() {
                    result.first_error = out.error.or(Some("did not catch up".into()));
                }
            }
        }
    }
    if result.behind_min == u64::MAX {
        result.behind_min = 0;
    }
    result.recovery = Latency::from_ns(&mut recovery);
    result.join_to_recovered = Latency::from_ns(&mut join_to_recovered);
    Ok(result)
}

/// Poll `done` every 5 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What arrived on a room-protocol connection.
enum Frame {
    /// `{"room": .., "text": .., "offset": K}`: the offset and where the text starts.
    Delivery {
        offset: u64,
        text_at: usize,
    },
    Joined(JoinedReply),
    Other,
}

#[derive(Deserialize)]
struct JoinedReply {
    epoch: Option<String>,
    offset: Option<u64>,
    recovered: Option<bool>,
}

/// `{"room":"recovery","text":"` (what comes before a delivery's text).
fn delivery_prefix() -> String {
    format!("{{\"room\":\"{ROOM}\",\"text\":\"")
}

/// Read the frames in `buf`, answering pings, handing each text frame to `on`;
/// returns what was consumed. A close or an `error` reply is an error.
async fn frames(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    prefix: &[u8],
    mut on: impl FnMut(Frame, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut at = 0;
    let mut pong = Vec::new();
    while let Some(f) = client::parse(&buf[at..]) {
        let payload = &buf[at + f.payload_start..at + f.end];
        match f.opcode {
            client::TEXT if payload.starts_with(prefix) => {
                let offset = offset_at_end(payload)
                    .with_context(|| format!("no offset in {}", String::from_utf8_lossy(payload)))?;
                on(Frame::Delivery { offset, text_at: prefix.len() }, payload)?;
            }
            client::TEXT if payload.starts_with(b"{\"joined\"") => {
                on(Frame::Joined(serde_json::from_slice(payload)?), payload)?;
            }
            client::TEXT => {
                bail!("unexpected reply {}", String::from_utf8_lossy(payload));
            }
            client::PING => {
                pong.clear();
                client::encode(client::PONG, payload, &mut pong);
                stream.write_all(&pong).await?;
            }
            client::CLOSE => bail!("the server closed the connection"),
            _ => on(Frame::Other, payload)?,
        }
        at += f.end;
    }
    buf.drain(..at);
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    Ok(())
}

/// The `K` of a delivery that ends `,"offset":K}`.
fn offset_at_end(payload: &[u8]) -> Option<u64> {
    let body = payload.strip_suffix(b"}")?;
    let colon = body.iter().rposition(|&b| b == b':')?;
    body[..colon].ends_with(b"\"offset\"").then_some(())?;
    std::str::from_utf8(&body[colon + 1..]).ok()?.parse().ok()
}

/// Send `{"join": ROOM, "ref": N}`, with `since` when given.
async fn join(stream: &mut TcpStream, reference: u64, since: Option<(&str, u64)>) -> anyhow::Result<()> {
    let text = match since {
        Some((epoch, offset)) => format!(
            "{{\"join\":\"{ROOM}\",\"ref\":{reference},\"since\":{{\"epoch\":\"{epoch}\",\"offset\":{offset}}}}}"
        ),
        None => format!("{{\"join\":\"{ROOM}\",\"ref\":{reference}}}"),
    };
    let mut frame = Vec::new();
    client::encode(client::TEXT, text.as_bytes(), &mut frame);
    stream.write_all(&frame).await?;
    Ok(())
}

/// Read until the phase reaches `until`, handing frames to `on`.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    phase: &mut watch::Receiver<Phase>,
    until: Phase,
    prefix: &[u8],
    mut on: impl FnMut(Frame, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    loop {
        frames(stream, buf, prefix, &mut on).await?;
        if *phase.borrow_and_update() >= until {
            return Ok(());
        }
        tokio::select! {
            read = stream.read_buf(buf) => {
                if read? == 0 {
                    bail!("the server closed the connection");
                }
            }
            changed = phase.changed() => changed?,
        }
    }
}

/// One client: join, follow the room, drop on `Drop`, come back on `Reconnect` with
/// `since`, follow the room until `End`.
async fn client(
    conn: Conn,
    out: &mut ClientOut,
    target: Target,
    shared: &Shared,
    mut phase: watch::Receiver<Phase>,
    handshakes: &Semaphore,
) -> anyhow::Result<()> {
    let prefix = delivery_prefix();
    let prefix = prefix.as_bytes();
    let Conn { mut stream, pending: mut buf, .. } = conn;
    join(&mut stream, 1, None).await?;
    let mut epoch = None;
    let mut order = Order::default();
    read_until(&mut stream, &mut buf, &mut phase, Phase::Drop, prefix, |frame, _| {
        match frame {
            Frame::Joined(reply) => {
                order.last = reply.offset.context("joined without an offset: is history on?")?;
                epoch = Some(reply.epoch.context("joined without an epoch")?);
                shared.ready.fetch_add(1, Relaxed);
            }
            Frame::Delivery { offset, .. } => order.see(offset),
            Frame::Other => {}
        }
        Ok(())
    })
    .await?;
    let epoch = epoch.context("the drop came before the join's reply")?;
    // A reset, not a close: the server learns of it as a dead connection. (Deprecated
    // because a lingering close blocks the thread; a zero linger never waits.)
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))?;
    drop(stream);
    shared.dropped.fetch_add(1, Relaxed);

    while *phase.borrow_and_update() < Phase::Reconnect {
        phase.changed().await?;
    }
    out.reconnect_ns = shared.now_ns();
    let conn = {
        let _permit = handshakes.acquire().await?;
        let mut attempt = 0;
        loop {
            match client::connect(&target, Duration::from_secs(10)).await {
                Ok(conn) => break conn,
                Err(error) if attempt >= 20 => return Err(error.context("reconnecting")),
                Err(_) => {
                    attempt += 1;
                    out.retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let Conn { mut stream, pending: mut buf, .. } = conn;
    let since = order.last;
    out.join_sent_ns = shared.now_ns();
    join(&mut stream, 2, Some((&epoch, since))).await?;
    let mut live = None;
    read_until(&mut stream, &mut buf, &mut phase, Phase::End, prefix, |frame, _| {
        match frame {
            Frame::Joined(reply) => {
                let at = reply.offset.context("joined without an offset")?;
                out.recovered = reply.recovered;
                out.behind = at.saturating_sub(since);
                live = Some(at);
                if reply.recovered != Some(true) {
                    // Only live messages follow: no offset order to keep across the seam.
                    order.last = at;
                    out.recovered_ns = None;
                    shared.settled.fetch_add(1, Relaxed);
                }
            }
            Frame::Delivery { offset, .. } => {
                order.see(offset);
                if live.is_some_and(|at| offset <= at) {
                    out.replayed += 1;
                }
            }
            Frame::Other => {}
        }
        if out.recovered == Some(true)
            && out.recovered_ns.is_none()
            && live.is_some_and(|at| order.last >= at)
        {
            out.recovered_ns = Some(shared.now_ns());
            shared.settled.fetch_add(1, Relaxed);
        }
        Ok(())
    })
    .await?;
    out.last = order.last;
    out.order = order;
    Ok(())
}

/// Connect the watchers and run them on a thread of their own (on the same CPU): in
/// the driver's runtime a message's deliveries to every client would be read before
/// some of theirs, and their latency would be the load generator's.
fn spawn_watchers(
    target: &Target,
    watchers: usize,
    shared: &Arc<Shared>,
    phase: &watch::Receiver<Phase>,
) -> std::thread::JoinHandle<anyhow::Result<Vec<WatcherOut>>> {
    let (target, shared, phase) = (target.clone(), shared.clone(), phase.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let conns = client::connect_all(&target, watchers).await?;
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|conn| tokio::spawn(watch_room(conn, shared.clone(), phase.clone())))
                .collect();
            let mut outs = Vec::with_capacity(tasks.len());
            for task in tasks {
                outs.push(task.await.context("watcher task")?.context("watcher")?);
            }
            Ok(outs)
        })
    })
}

/// What a watcher saw.
struct WatcherOut {
    order: Order,
    /// `(sent_ns, latency_ns)` of every delivery.
    samples: Vec<(u64, u64)>,
}

/// A watcher: join, then time every delivery until `End`.
async fn watch_room(
    conn: Conn,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<WatcherOut> {
    let prefix = delivery_prefix();
    let Conn { mut stream, pending: mut buf, .. } = conn;
    join(&mut stream, 1, None).await?;
    let mut out = WatcherOut { order: Order::default(), samples: Vec::with_capacity(8192) };
    read_until(&mut stream, &mut buf, &mut phase, Phase::End, prefix.as_bytes(), |frame, payload| {
        match frame {
            Frame::Joined(reply) => {
                out.order.last = reply.offset.context("joined without an offset: is history on?")?;
                shared.ready.fetch_add(1, Relaxed);
            }
            Frame::Delivery { offset, text_at } => {
                out.order.see(offset);
                let (_, _, sent_ns) = client::read_stamp(&payload[text_at..]).context("no stamp")?;
                out.samples.push((sent_ns, shared.now_ns().saturating_sub(sent_ns)));
            }
            Frame::Other => {}
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// The publisher: join, then from `Steady` to `Quiet` send stamped text at a steady pace.
async fn publish(
    conn: Conn,
    params: RecoveryParams,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let Conn { mut stream, pending: mut buf, .. } = conn;
    join(&mut stream, 1, None).await?;
    let mut joined = false;
    while !joined {
        let n = stream.read_buf(&mut buf).await?;
        anyhow::ensure!(n > 0, "the server closed the publisher's connection");
        frames(&mut stream, &mut buf, b"{\"room\"", |frame, _| {
            joined |= matches!(frame, Frame::Joined(_));
            Ok(())
        })
        .await?;
    }
    shared.ready.fetch_add(1, Relaxed);
    while *phase.borrow_and_update() < Phase::Steady {
        phase.changed().await?;
    }
    let (mut stamp, mut text, mut frame) = (Vec::new(), Vec::new(), Vec::new());
    let start = tokio::time::Instant::now();
    let mut g = 0u64;
    loop {
        let at = start + Duration::from_secs_f64(g as f64 / params.messages_per_sec);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            read = stream.read_buf(&mut buf) => {
                anyhow::ensure!(read? > 0, "the server closed the publisher's connection");
                frames(&mut stream, &mut buf, b"{\"room\"", |_, _| Ok(())).await?;
                continue;
            }
            changed = phase.changed() => {
                changed?;
                continue;
            }
        }
        if *phase.borrow() >= Phase::Quiet {
            return Ok(());
        }
        client::stamp(0, g as u32, shared.now_ns(), params.size, &mut stamp);
        text.clear();
        text.extend_from_slice(format!("{{\"send\":\"{ROOM}\",\"text\":\"").as_bytes());
        text.extend_from_slice(&stamp);
        text.extend_from_slice(b"\"}");
        frame.clear();
        client::encode(client::TEXT, &text, &mut frame);
        stream.write_all(&frame).await?;
        shared.sent.fetch_add(1, Relaxed);
        g += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_offset_at_the_end_of_a_delivery() {
        assert_eq!(offset_at_end(br#"{"room":"r","text":"a:b","offset":42}"#), Some(42));
        assert_eq!(offset_at_end(br#"{"room":"r","text":"a"}"#), None);
        assert_eq!(offset_at_end(br#"{"room":"r","text":"x","other":3}"#), None);
    }

    #[test]
    fn counts_gaps_and_duplicates() {
        let mut order = Order { last: 10, ..Order::default() };
        for offset in [11, 12, 14, 14, 13, 15] {
            order.see(offset);
        }
        assert_eq!((order.last, order.gaps, order.duplicates), (15, 1, 2));
    }
}
