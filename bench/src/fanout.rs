//! Fan-out: N clients in one room, K of them sending M messages of S bytes that carry
//! their send time; every other member should receive each message exactly once.
//! Reports deliveries per second, latency percentiles, lost and duplicated deliveries,
//! and the server's CPU over the sending phase only.
//!
//! One pump task sends for all K senders, message `g` from sender `g % K` with sequence
//! number `g / K`. Saturated, it keeps at most `window` messages in flight (sent but not
//! yet delivered to every other member), so server queues stay bounded and what is
//! measured is throughput, not how deep a queue can grow. Paced, message `g` leaves at
//! `g / rate` seconds after the start. Every connection has its own receiver task,
//! which counts each `(sender, seq)` once in a bitset.
//!
//! With chat messages ([`crate::chat`]) and connections that negotiated per-message
//! compression, receivers inflate what arrives compressed before they read the stamp,
//! and count the bytes of every data frame as it came off the socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, Notify, watch};

use crate::chat::{self, ChatParams};
use crate::client::{self, Conn, Inflater, MemoInflater};
use crate::procfs;
use crate::stats::Latency;

/// How the senders send.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum Pace {
    /// As fast as the server takes them, with at most `window` messages in flight.
    Saturated { window: usize },
    /// At a fixed total rate of deliveries per second (messages/s times recipients).
    Paced { deliveries_per_sec: f64 },
}

impl Pace {
    /// The paced rate in deliveries per second; NaN when saturated.
    pub fn rate(self) -> f64 {
        match self {
            Pace::Paced { deliveries_per_sec } => deliveries_per_sec,
            Pace::Saturated { .. } => f64::NAN,
        }
    }
}

/// One fan-out run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FanoutParams {
    pub clients: usize,
    pub senders: usize,
    /// Messages sent in total (rounded down to a multiple of `senders`).
    pub messages: usize,
    /// Payload bytes per message (at least 32, the stamp).
    pub size: usize,
    pub pace: Pace,
    /// Binary frames instead of text.
    pub binary: bool,
    /// Stop waiting for missing deliveries after this long without progress.
    pub grace: Duration,
    /// Bound on the sending phase, whatever happens.
    pub max_duration: Duration,
    /// Speak Roomcast's room protocol in this room (the connections must have offered
    /// it): senders send `{"send": ROOM, "text": STAMP}` (binary: the room prefix, then
    /// the stamp), members receive `{"room": ROOM, "text": STAMP}`. `None`: raw frames.
    #[serde(default)]
    pub room_protocol: Option<String>,
    /// Realistic JSON chat messages instead of `size` bytes of stamp and padding.
    #[serde(default)]
    pub chat: Option<ChatParams>,
    /// Senders whose connection negotiated per-message compression send compressed
    /// frames (otherwise every message goes out uncompressed, as RFC 7692 allows).
    #[serde(default)]
    pub compress_sends: bool,
}

/// How a stamp is wrapped on the way in and found on the way out.
#[derive(Clone, Debug, Default)]
struct Envelope {
    /// Bytes before the stamp in what a sender sends.
    send_prefix: Vec<u8>,
    /// Bytes after it.
    send_suffix: Vec<u8>,
    /// Bytes before the stamp in what a member receives.
    receive_prefix: Vec<u8>,
}

impl Envelope {
    fn new(params: &FanoutParams) -> Self {
        let Some(room) = &params.room_protocol else {
            if params.chat.is_some() {
                return Self { receive_prefix: chat::PREFIX.to_vec(), ..Self::default() };
            }
            return Self::default();
        };
        if params.binary {
            let mut prefix = vec![room.len() as u8];
            prefix.extend_from_slice(room.as_bytes());
            return Self { send_prefix: prefix.clone(), send_suffix: Vec::new(), receive_prefix: prefix };
        }
        // Room names are plain ASCII without quotes, and a stamp needs no escaping.
        Self {
            send_prefix: format!("{{\"send\":\"{room}\",\"text\":\"").into_bytes(),
            send_suffix: b"\"}".to_vec(),
            receive_prefix: format!("{{\"room\":\"{room}\",\"text\":\"").into_bytes(),
        }
    }
}

/// What one fan-out run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FanoutResult {
    /// How the senders sent (absent from results written before it was recorded).
    pub pace: Option<Pace>,
    pub messages: u64,
    /// Deliveries owed: each message to every member but its sender.
    pub expected: u64,
    /// Distinct deliveries received.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Frames that carried no stamp of this run (e.g. a plugin's notice).
    pub foreign: u64,
    /// The phase hit `max_duration` before every delivery arrived.
    pub timed_out: bool,
    /// Connections the server closed before the end.
    pub closed_by_server: u64,
    /// From the first send to the last delivery.
    pub elapsed_s: f64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    /// Server CPU (user + system) over the sending phase, when its pid is known.
    pub server_cpu_s: f64,
    pub cpu_us_per_delivery: f64,
    /// The load generator's own CPU over the same phase (it shares no CPU with the
    /// server; near `elapsed_s` means it, not the server, was the limit).
    pub client_cpu_s: f64,
    /// CPU other programs on the machine used over the same phase: a noisy neighbour
    /// shows here (kernel threads are not counted; without a server pid, the server's
    /// own CPU is counted here too).
    pub other_cpu_s: f64,
    /// CPU of the busy process that shared the server's core over the same phase (the
    /// contended-core scenario; not counted in `other_cpu_s`).
    pub contender_cpu_s: f64,
    /// The server's answer to the compression offer (first connection), when it
    /// accepted; `None` when it declined or none was offered.
    pub negotiated: Option<String>,
    /// Connections that negotiated per-message compression.
    pub compressed_conns: u64,
    /// Text and binary frames received (stamped or not), and those of them compressed.
    pub data_frames: u64,
    pub compressed_frames: u64,
    /// Bytes of those frames as read from the socket (headers included), and of their
    /// payloads once inflated.
    pub wire_bytes: u64,
    pub payload_bytes: u64,
    pub wire_bytes_per_delivery: f64,
    pub payload_bytes_per_delivery: f64,
    /// Compressed frames that did not inflate, and fragmented messages (neither is
    /// expected; both count as foreign).
    pub inflate_errors: u64,
    pub fragmented: u64,
    /// Compressed frames the load generator inflated, and those byte-for-byte equal to
    /// one it had inflated for another member (their text reused).
    pub inflated: u64,
    pub inflate_reused: u64,
}

/// State the pump and the receivers share.
struct Shared {
    epoch: Instant,
    /// Messages handed to the kernel so far.
    sent: AtomicU64,
    /// Distinct deliveries so far, over all receivers.
    delivered: AtomicU64,
    /// Set while the pump waits for the window to open; receivers then wake it.
    pump_waiting: AtomicBool,
    progress: Notify,
    /// What comes before the stamp in a delivery (the room protocol's envelope).
    receive_prefix: Vec<u8>,
    /// One inflater for every connection whose server keeps no compression context
    /// between messages (the runtime has one thread: never contended).
    inflater: std::sync::Mutex<MemoInflater>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Where `(sender, seq)` sits in a receiver's bitset.
#[derive(Clone, Copy)]
struct Layout {
    senders: usize,
    per_sender: usize,
}

#[derive(Default)]
struct ReceiverOut {
    latencies_ns: Vec<u64>,
    duplicates: u64,
    foreign: u64,
    last_ns: u64,
    closed_by_server: bool,
    data_frames: u64,
    compressed_frames: u64,
    wire_bytes: u64,
    payload_bytes: u64,
    inflate_errors: u64,
    fragmented: u64,
    inflated: u64,
}

/// Run one fan-out over connections already open in the room. The connections are
/// closed when it returns.
pub async fn run(
    conns: Vec<Conn>,
    params: &FanoutParams,
    server_pid: Option<u32>,
) -> anyhow::Result<FanoutResult> {
    run_beside(conns, params, server_pid, None).await
}

/// [`run`] while the process `contender` (a busy loop) shares the server's core: its
/// CPU over the phase is measured apart from other programs'.
pub async fn run_beside(
    conns: Vec<Conn>,
    params: &FanoutParams,
    server_pid: Option<u32>,
    contender: Option<u32>,
) -> anyhow::Result<FanoutResult> {
    let clients = conns.len();
    anyhow::ensure!(clients >= 2, "fan-out needs at least two clients");
    anyhow::ensure!(
        params.chat.is_none() || params.room_protocol.is_none(),
        "chat messages are sent raw, not in the room protocol"
    );
    let negotiated = conns.iter().find_map(|c| c.deflate.as_ref()).map(|d| d.response.clone());
    let compressed_conns = conns.iter().filter(|c| c.deflate.is_some()).count() as u64;
    let senders = params.senders.clamp(1, clients);
    let per_sender = params.messages / senders;
    let total = per_sender * senders;
    let layout = Layout { senders, per_sender };
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        pump_waiting: AtomicBool::new(false),
        progress: Notify::new(),
        receive_prefix: Envelope::new(params).receive_prefix,
        inflater: std::sync::Mutex::new(MemoInflater::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writers = Vec::with_capacity(senders);
    let mut receivers = Vec::with_capacity(clients);
    for (i, conn) in conns.into_iter().enumerate() {
        let (read, write) = conn.stream.into_split();
        let write = Arc::new(Mutex::new(write));
        if i < senders {
            writers.push((write.clone(), conn.deflate.is_some()));
        }
        // Its own inflater only if the server carries context from message to message.
        let inflate = match &conn.deflate {
            None => Inflate::Never,
            Some(d) if d.server_no_context_takeover => Inflate::Shared,
            Some(_) => Inflate::Own(Box::new(Inflater::new(false))),
        };
        let own = if i < senders { per_sender } else { 0 };
        let expected = total - own;
        receivers.push(tokio::spawn(receive(
            read,
            write,
            conn.pending,
            inflate,
            shared.clone(),
            stop_rx.clone(),
            layout,
            expected,
        )));
    }
    // Let every member's join reach its room before anything is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let recipients = (clients - 1) as u64;
    let expected = total as u64 * recipients;
    let cpu_before = server_pid.map(procfs::cpu_secs).transpose()?;
    let me = std::process::id();
    let own_before = procfs::cpu_secs(me)?;
    let exclude = [me, server_pid.unwrap_or(me), contender.unwrap_or(me)];
    let others_before = procfs::others_cpu_secs(&exclude);
    let contender_before = contender.map(procfs::cpu_secs).transpose()?;
    let start = Instant::now();
    let start_ns = shared.now_ns();
    let pump = tokio::spawn(pump(writers, shared.clone(), params.clone(), layout, start));

    let deadline = start + params.max_duration;
    let mut last_seen = 0;
    let mut last_change = Instant::now();
    let mut timed_out = false;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let delivered = shared.delivered.load(Relaxed);
        let now = Instant::now();
        if delivered >= expected {
            break;
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        if delivered != last_seen {
            last_seen = delivered;
            last_change = now;
        } else if pump.is_finished() && now - last_change >= params.grace {
            break;
        }
    }
    let cpu_after = server_pid.map(procfs::cpu_secs).transpose()?;
    let own_after = procfs::cpu_secs(me)?;
    let others_after = procfs::others_cpu_secs(&exclude);
    let contender_after = contender.map(procfs::cpu_secs).transpose()?;
    let _ = stop_tx.send(true);
    pump.abort();

    let mut result = FanoutResult {
        pace: Some(params.pace),
        messages: shared.sent.load(Relaxed),
        expected,
        timed_out,
        client_cpu_s: own_after - own_before,
        other_cpu_s: (others_after - others_before).max(0.0),
        contender_cpu_s: contender_after.zip(contender_before).map_or(0.0, |(a, b)| a - b),
        negotiated,
        compressed_conns,
        ..FanoutResult::default()
    };
    let mut latencies: Vec<u64> = Vec::with_capacity(expected as usize);
    let mut last_ns = start_ns;
    for receiver in receivers {
        let out = receiver.await.context("receiver task")?;
        result.delivered += out.latencies_ns.len() as u64;
        result.duplicates += out.duplicates;
        result.foreign += out.foreign;
        result.closed_by_server += out.closed_by_server as u64;
        result.data_frames += out.data_frames;
        result.compressed_frames += out.compressed_frames;
        result.wire_bytes += out.wire_bytes;
        result.payload_bytes += out.payload_bytes;
        result.inflate_errors += out.inflate_errors;
        result.fragmented += out.fragmented;
        result.inflated += out.inflated;
        last_ns = last_ns.max(out.last_ns);
        latencies.extend_from_slice(&out.latencies_ns);
    }
    result.lost = expected.saturating_sub(result.delivered);
    if let Ok(memo) = shared.inflater.lock() {
        result.inflated += memo.inflated;
        result.inflate_reused = memo.reused;
    }
    if result.data_frames > 0 {
        result.wire_bytes_per_delivery = result.wire_bytes as f64 / result.data_frames as f64;
        result.payload_bytes_per_delivery = result.payload_bytes as f64 / result.data_frames as f64;
    }
    result.elapsed_s = (last_ns - start_ns) as f64 / 1e9;
    if result.elapsed_s > 0.0 {
        result.deliveries_per_sec = result.delivered as f64 / result.elapsed_s;
    }
    result.latency = Latency::from_ns(&mut latencies);
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        result.server_cpu_s = after - before;
        if result.delivered > 0 {
            result.cpu_us_per_delivery = result.server_cpu_s * 1e6 / result.delivered as f64;
        }
    }
    Ok(result)
}

/// Send every message, for all senders, in the order `g = seq * senders + sender`.
async fn pump(
    writers: Vec<(Arc<Mutex<OwnedWriteHalf>>, bool)>,
    shared: Arc<Shared>,
    params: FanoutParams,
    layout: Layout,
    start: Instant,
) -> anyhow::Result<()> {
    let opcode = if params.binary { client::BINARY } else { client::TEXT };
    let recipients = (params.clients.max(2) - 1) as u64;
    let total = layout.per_sender * layout.senders;
    let envelope = Envelope::new(&params);
    let mut stamp = Vec::with_capacity(params.size);
    let mut payload = Vec::with_capacity(params.size + 64);
    let mut frame = Vec::with_capacity(params.size + 64 + 14);
    let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
    let mut deflated = Vec::new();
    for g in 0..total {
        match params.pace {
            Pace::Saturated { window } => {
                wait_for_window(&shared, window as u64 * recipients, recipients, params.grace).await
            }
            Pace::Paced { deliveries_per_sec } => {
                let at = g as f64 * recipients as f64 / deliveries_per_sec;
                tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            }
        }
        let (sender, seq) = (g % layout.senders, g / layout.senders);
        if let Some(chat) = &params.chat {
            chat::message(chat, g as u64, &mut payload);
            chat::stamp(&mut payload, sender as u32, seq as u32, shared.now_ns());
        } else {
            client::stamp(sender as u32, seq as u32, shared.now_ns(), params.size, &mut stamp);
            payload.clear();
            payload.extend_from_slice(&envelope.send_prefix);
            payload.extend_from_slice(&stamp);
            payload.extend_from_slice(&envelope.send_suffix);
        }
        let (writer, deflate) = &writers[sender];
        frame.clear();
        if params.compress_sends && *deflate {
            client::deflate_message(&mut compress, &payload, &mut deflated)?;
            client::encode_compressed(opcode, &deflated, &mut frame);
        } else {
            client::encode(opcode, &payload, &mut frame);
        }
        shared.sent.fetch_add(1, Relaxed);
        writer.lock().await.write_all(&frame).await?;
    }
    Ok(())
}

/// Wait until fewer than `window` deliveries are outstanding, or until `grace` passes
/// without progress (some deliveries were lost: carry on rather than stall).
async fn wait_for_window(shared: &Shared, window: u64, recipients: u64, grace: Duration) {
    loop {
        let notified = shared.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        shared.pump_waiting.store(true, Relaxed);
        let owed = shared.sent.load(Relaxed) * recipients;
        if owed.saturating_sub(shared.delivered.load(Relaxed)) < window {
            shared.pump_waiting.store(false, Relaxed);
            return;
        }
        if tokio::time::timeout(grace, notified).await.is_err() {
            shared.pump_waiting.store(false, Relaxed);
            return;
        }
    }
}

/// How a connection inflates compressed messages.
enum Inflate {
    /// It negotiated no compression: a compressed frame is an error.
    Never,
    /// With [`Shared::inflater`]: the server keeps no context between messages.
    Shared,
    /// With its own: the server keeps its context.
    Own(Box<Inflater>),
}

/// Read one member's frames until told to stop: count each stamped message once,
/// record its latency, answer pings.
#[allow(clippy::too_many_arguments)]
async fn receive(
    mut read: OwnedReadHalf,
    write: Arc<Mutex<OwnedWriteHalf>>,
    mut buf: Vec<u8>,
    mut inflate: Inflate,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    layout: Layout,
    expected: usize,
) -> ReceiverOut {
    let prefix = &shared.receive_prefix[..];
    let mut out = ReceiverOut { latencies_ns: Vec::with_capacity(expected), ..ReceiverOut::default() };
    let mut seen = vec![0u64; (layout.senders * layout.per_sender).div_ceil(64)];
    let mut pong = Vec::new();
    buf.reserve(64 * 1024);
    loop {
        let now = shared.now_ns();
        let mut at = 0;
        let mut fresh = 0u64;
        let mut closed = false;
        while let Some(frame) = client::parse(&buf[at..]) {
            let mut payload = &buf[at + frame.payload_start..at + frame.end];
            let mut shared_inflater = None;
            match frame.opcode {
                client::TEXT | client::BINARY | client::CONTINUATION => {
                    out.data_frames += 1;
                    out.wire_bytes += frame.end as u64;
                    if !frame.fin || frame.opcode == client::CONTINUATION {
                        out.fragmented += 1;
                        payload = &[];
                    } else if frame.compressed {
                        out.compressed_frames += 1;
                        let inflated = match &mut inflate {
                            Inflate::Never => Err(anyhow::anyhow!("compressed, never negotiated")),
                            Inflate::Own(inflater) => {
                                out.inflated += 1;
                                inflater.inflate(payload)
                            }
                            Inflate::Shared => {
                                let guard = shared_inflater.insert(shared.inflater.lock().expect("inflater"));
                                guard.inflate(payload)
                            }
                        };
                        match inflated {
                            Ok(inflated) => payload = inflated,
                            Err(_) => {
                                out.inflate_errors += 1;
                                payload = &[];
                            }
                        }
                    }
                    out.payload_bytes += payload.len() as u64;
                    match payload.strip_prefix(prefix).and_then(client::read_stamp) {
                        Some((sender, seq, sent_ns))
                            if (sender as usize) < layout.senders && (seq as usize) < layout.per_sender =>
                        {
                            let bit = sender as usize * layout.per_sender + seq as usize;
                            let (word, mask) = (bit / 64, 1u64 << (bit % 64));
                            if seen[word] & mask != 0 {
                                out.duplicates += 1;
                            } else {
                                seen[word] |= mask;
                                fresh += 1;
                                let latency = now.saturating_sub(sent_ns);
                                out.latencies_ns.push(latency);
                            }
                        }
                        _ => out.foreign += 1,
                    }
                }
                // Answered once this batch of frames is read (no await in here).
                client::PING => client::encode(client::PONG, payload, &mut pong),
                client::CLOSE => closed = true,
                _ => {}
            }
            at += frame.end;
        }
        buf.drain(..at);
        if !pong.is_empty() {
            let _ = write.lock().await.write_all(&pong).await;
            pong.clear();
        }
        if fresh > 0 {
            out.last_ns = now;
            shared.delivered.fetch_add(fresh, Relaxed);
            if shared.pump_waiting.load(Relaxed) {
                shared.progress.notify_one();
            }
        }
        if closed {
            out.closed_by_server = !*stop.borrow();
            break;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            biased;
            read = read.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    out.closed_by_server = !*stop.borrow();
                    break;
                }
                Ok(_) => {}
            },
            _ = stop.changed() => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(room_protocol: Option<&str>, binary: bool) -> FanoutParams {
        FanoutParams {
            clients: 2,
            senders: 1,
            messages: 1,
            size: 64,
            pace: Pace::Saturated { window: 1 },
            binary,
            grace: Duration::from_secs(1),
            max_duration: Duration::from_secs(1),
            room_protocol: room_protocol.map(str::to_owned),
            chat: None,
            compress_sends: false,
        }
    }

    #[test]
    fn envelopes_wrap_the_stamp_as_the_room_protocol_does() {
        let raw = Envelope::new(&params(None, false));
        assert!(raw.send_prefix.is_empty() && raw.send_suffix.is_empty() && raw.receive_prefix.is_empty());

        let text = Envelope::new(&params(Some("bench"), false));
        let mut stamp = Vec::new();
        client::stamp(3, 4, 5, 64, &mut stamp);
        let sent = [&text.send_prefix[..], &stamp, &text.send_suffix].concat();
        let op: serde_json::Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(op["send"], "bench");
        assert_eq!(op["text"].as_str().unwrap().as_bytes(), &stamp[..]);
        // What the server delivers to room-protocol members: {"room": ROOM, "text": T}.
        let delivered =
            format!("{{\"room\":\"bench\",\"text\":\"{}\"}}", std::str::from_utf8(&stamp).unwrap());
        let inner = delivered.as_bytes().strip_prefix(&text.receive_prefix[..]).unwrap();
        assert_eq!(client::read_stamp(inner), Some((3, 4, 5)));

        let binary = Envelope::new(&params(Some("bench"), true));
        assert_eq!(binary.send_prefix, b"\x05bench");
        assert_eq!(binary.receive_prefix, b"\x05bench");
    }
}
