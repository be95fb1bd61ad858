//! The whole benchmark: every scenario, for every server, several runs, each run on a
//! freshly started server pinned to its own CPU; then the reports.
//!
//! Runs are interleaved (run 1 of every server, then run 2, ...) so that drift on a
//! noisy machine spreads over all servers instead of favouring one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::chat::ChatParams;
use crate::churn::{self, ChurnParams, ChurnResult};
use crate::client::{self, Target};
use crate::connect_rate::{self, ConnectRateParams, ConnectRateResult};
use crate::fanout::{self, FanoutParams, FanoutResult, Pace};
use crate::idle::{self, IdleParams, IdleResult};
use crate::recovery::{self, RecoveryParams, RecoveryResult};
use crate::reload::{self, Admin, ReloadParams, ReloadResult};
use crate::rooms::{
    self, JoinLeaveParams, JoinLeaveResult, MembershipParams, MembershipResult, RawMembershipResult,
};
use crate::servers::{COMPRESSION_THRESHOLD, Contender, Extras, Kind, Programs, Server};
use crate::{chart, procfs, report};

/// The size of every scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sizes {
    pub runs: usize,
    pub fanout: FanoutParams,
    /// Messages of the saturated fan-out for the Node servers, at least ten times
    /// slower per delivery: the same window and room, fewer messages, so that their
    /// runs do not take minutes.
    pub node_messages: usize,
    /// The paced fan-out, one run per rate, lowest first (the room-protocol scenario runs
    /// the first). A server that could not keep up at one rate is not run at the next.
    #[serde(deserialize_with = "one_or_more")]
    pub paced: Vec<FanoutParams>,
    /// The paced fan-out while a busy loop at the servers' priority shares the server's
    /// core: every server past its knee.
    #[serde(default)]
    pub contended: Option<FanoutParams>,
    /// The idle scenario, one run per size, smallest first (results from before there
    /// were several have one).
    #[serde(deserialize_with = "one_or_more")]
    pub idle: Vec<IdleParams>,
    pub churn: ChurnParams,
    /// New connections per second: connect, upgrade, one message, close.
    #[serde(default)]
    pub connect_rate: Option<ConnectRateParams>,
    /// The plugin scenario runs `fanout` and this: a small room where every member
    /// sends, so the per-message cost (and a plugin call is one) weighs more.
    pub small_room: FanoutParams,
    /// The plugin scenario's third shape: the large room with only a few messages in
    /// flight, so that the per-message costs a wide window hides show.
    #[serde(default)]
    pub narrow_window: Option<FanoutParams>,
    pub reload: ReloadParams,
    /// How long a realistic plugin (`lobby`, about 160 KB, serde_json) takes to go live
    /// when replaced, during a paced fan-out through it.
    #[serde(default)]
    pub reload_latency: Option<ReloadParams>,
    /// Room protocol (Roomcast only): memory per membership. The fan-out and paced
    /// sizes above are also run in room-protocol mode against raw mode.
    #[serde(default)]
    pub memberships: Option<MembershipParams>,
    /// Room protocol (Roomcast only): joins and leaves per second.
    #[serde(default)]
    pub join_leave: Option<JoinLeaveParams>,
    /// Room protocol with history (Roomcast only): a mass reconnect with `since`.
    #[serde(default)]
    pub recovery: Option<RecoveryParams>,
    /// Per-message compression: chat messages to a large room, every server that can
    /// compress with compression on and off.
    #[serde(default)]
    pub compression: Option<CompressionSizes>,
}

/// The paced or idle sizes: a list, or the one size of results from before there were
/// several.
fn one_or_more<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore<T> {
        One(Box<T>),
        More(Vec<T>),
    }
    Ok(match OneOrMore::deserialize(deserializer)? {
        OneOrMore::One(params) => vec![*params],
        OneOrMore::More(list) => list,
    })
}

/// The compression scenario's sizes: the same chat messages, saturated and paced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressionSizes {
    pub saturated: FanoutParams,
    /// Messages of the saturated run for the Node servers (tens of µs per delivery
    /// with compression on).
    pub node_messages: usize,
    pub paced: FanoutParams,
    /// Messages smaller than this go uncompressed (Roomcast and Node `ws`).
    pub threshold: usize,
}

/// The history every room keeps in the recovery scenario (`--history-size`): twice
/// the messages the clients miss, so a client that lagged a little still recovers.
pub const RECOVERY_HISTORY: usize = 200;

impl Sizes {
    /// The full run (about 45 minutes here, 7 of them the room-protocol scenarios and 6
    /// the compression scenario) or a smoke run (about 4 minutes).
    pub fn new(quick: bool, runs: Option<usize>) -> Self {
        let saturated = |clients, senders, messages, window| FanoutParams {
            clients,
            senders,
            messages,
            size: 64,
            pace: Pace::Saturated { window },
            binary: false,
            grace: Duration::from_secs(10),
            max_duration: Duration::from_secs(180),
            room_protocol: None,
            chat: None,
            compress_sends: false,
        };
        let paced = |clients: usize, senders, rate: f64, secs: f64| FanoutParams {
            clients,
            senders,
            messages: (rate / (clients - 1) as f64 * secs) as usize,
            size: 64,
            pace: Pace::Paced { deliveries_per_sec: rate },
            binary: false,
            grace: Duration::from_secs(10),
            max_duration: Duration::from_secs_f64(secs + 60.0),
            room_protocol: None,
            chat: None,
            compress_sends: false,
        };
        let chat = |mut params: FanoutParams| {
            params.chat = Some(ChatParams::default());
            params.size = ChatParams::default().max;
            params
        };
        let reload = |plugin: &str, fanout, baseline| ReloadParams {
            fanout,
            every: Duration::from_secs(1),
            plugin: plugin.into(),
            baseline,
        };
        if quick {
            Sizes {
                runs: runs.unwrap_or(1),
                fanout: saturated(200, 4, 1000, 64),
                node_messages: 500,
                paced: vec![paced(200, 4, 20_000.0, 2.0), paced(200, 4, 40_000.0, 2.0)],
                contended: Some(paced(200, 4, 50_000.0, 2.0)),
                idle: [1000, 2000]
                    .into_iter()
                    .map(|connections| IdleParams {
                        connections,
                        hold: Duration::from_secs(2),
                        concurrency: 128,
                    })
                    .collect(),
                churn: ChurnParams {
                    members: 50,
                    messages_per_sec: 100.0,
                    duration: Duration::from_secs(2),
                    concurrency: 32,
                    settle: Duration::from_secs(2),
                },
                connect_rate: Some(ConnectRateParams {
                    in_flight: 200,
                    duration: Duration::from_secs(2),
                    size: client::STAMP_LEN,
                }),
                small_room: saturated(10, 10, 20_000, 256),
                narrow_window: Some(saturated(200, 4, 400, 10)),
                reload: reload("relay", paced(50, 2, 20_000.0, 3.5), false),
                reload_latency: Some(reload("lobby", paced(50, 2, 20_000.0, 5.5), true)),
                memberships: Some(MembershipParams {
                    connections: 1000,
                    rooms_per_connection: 10,
                    rooms: 20,
                    hold: Duration::from_secs(2),
                    concurrency: 128,
                }),
                join_leave: Some(JoinLeaveParams {
                    connections: 50,
                    rooms: 10,
                    duration: Duration::from_secs(2),
                }),
                recovery: Some(RecoveryParams {
                    clients: 500,
                    watchers: 10,
                    messages_per_sec: 50.0,
                    size: 100,
                    missed: 100,
                    before: Duration::from_secs(2),
                    after: Duration::from_secs(1),
                    concurrency: 1000,
                }),
                compression: Some(CompressionSizes {
                    saturated: chat(saturated(200, 4, 500, 64)),
                    node_messages: 200,
                    paced: chat(paced(200, 4, 5_000.0, 3.0)),
                    threshold: COMPRESSION_THRESHOLD,
                }),
            }
        } else {
            Sizes {
                runs: runs.unwrap_or(3),
                fanout: saturated(1000, 10, 4000, 256),
                node_messages: 1500,
                paced: [50_000.0, 100_000.0, 150_000.0, 200_000.0]
                    .into_iter()
                    .map(|rate| paced(1000, 10, rate, 6.0))
                    .collect(),
                // The load generator spends about 2.9 µs of its own core per delivery and
                // cannot pace above about 300,000 deliveries/s: on 2 cores, only a busy
                // loop beside the server takes it past its knee.
                contended: Some(paced(1000, 10, 250_000.0, 6.0)),
                idle: [10_000, 19_000]
                    .into_iter()
                    .map(|connections| IdleParams {
                        connections,
                        hold: Duration::from_secs(12),
                        concurrency: 128,
                    })
                    .collect(),
                churn: ChurnParams {
                    members: 100,
                    messages_per_sec: 200.0,
                    duration: Duration::from_secs(5),
                    concurrency: 32,
                    settle: Duration::from_secs(2),
                },
                // 200 handshakes in flight, as fastwebsockets' 26,000/s was measured.
                connect_rate: Some(ConnectRateParams {
                    in_flight: 200,
                    duration: Duration::from_secs(5),
                    size: client::STAMP_LEN,
                }),
                small_room: saturated(10, 10, 200_000, 1024),
                // At most 10 messages in flight: latency-bound at about 1.5–2 million
                // deliveries/s here (200 members: 1.5 million), so about 2–3 s.
                narrow_window: Some(saturated(1000, 10, 4000, 10)),
                reload: reload("relay", paced(100, 4, 50_000.0, 10.0), false),
                // 35 reloads a run: over 3 runs, the p99 of 105 is not just the slowest.
                reload_latency: Some(reload("lobby", paced(100, 4, 50_000.0, 35.5), true)),
                memberships: Some(MembershipParams {
                    connections: 10_000,
                    rooms_per_connection: 10,
                    rooms: 100,
                    hold: Duration::from_secs(12),
                    concurrency: 128,
                }),
                join_leave: Some(JoinLeaveParams {
                    connections: 200,
                    rooms: 50,
                    duration: Duration::from_secs(5),
                }),
                // 20 messages/s to 5,050 members is 101,000 deliveries/s: about half of
                // each core here. At 100/s both the server's and the load generator's
                // cores fill before the drop, and clients lag past the history.
                recovery: Some(RecoveryParams {
                    clients: 5000,
                    watchers: 50,
                    messages_per_sec: 20.0,
                    size: 100,
                    missed: 100,
                    before: Duration::from_secs(4),
                    after: Duration::from_secs(2),
                    concurrency: 1000,
                }),
                compression: Some(CompressionSizes {
                    saturated: chat(saturated(1000, 10, 2000, 64)),
                    node_messages: 300,
                    paced: chat(paced(1000, 10, 10_000.0, 10.0)),
                    threshold: COMPRESSION_THRESHOLD,
                }),
            }
        }
    }
}

impl Sizes {
    /// The first (lowest) paced rate: the one the chart, the targets and the
    /// room-protocol scenario use.
    pub fn base_paced(&self) -> &FanoutParams {
        self.paced.first().expect("at least one paced rate")
    }

    /// The largest idle size: the one the chart and issue 5's target use.
    pub fn largest_idle(&self) -> Option<&IdleParams> {
        self.idle.iter().max_by_key(|p| p.connections)
    }

    /// The plugin scenario's shapes: the large room, the large room with a narrow
    /// window, the small room.
    pub fn plugin_shapes(&self) -> Vec<&FanoutParams> {
        std::iter::once(&self.fanout).chain(&self.narrow_window).chain([&self.small_room]).collect()
    }
}

/// The machine and software the numbers come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Machine {
    pub date: String,
    pub commit: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub server_cpu: String,
    pub loadgen_cpus: String,
    pub rustc: String,
    pub node: String,
    pub uws_version: String,
    pub uws_integrity: String,
    pub ws_version: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and ended: other work on
    /// the machine shows here.
    pub load_before: String,
    pub load_after: String,
    /// The nice value servers and load generator ran at (they inherit it).
    pub nice: i64,
    /// `sha256sum` of the Roomcast binary that ran.
    pub roomcast_sha256: String,
}

/// A plugin fan-out run: which room, and which plugin served it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PluginRun {
    pub plugin: String,
    /// Members of the room.
    pub clients: usize,
    /// Messages in flight at most (0: a run from before it was recorded, whose room
    /// size alone tells its shape).
    #[serde(default)]
    pub window: usize,
    pub result: FanoutResult,
}

/// The window of a saturated fan-out (0 for a paced one).
pub fn window_of(params: &FanoutParams) -> usize {
    match params.pace {
        Pace::Saturated { window } => window,
        Pace::Paced { .. } => 0,
    }
}

/// A Roomcast fan-out in raw or room-protocol mode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeRun {
    /// Room protocol (`roomcast.v1`) rather than raw `/ws/{room}`.
    pub protocol: bool,
    /// Members of the room.
    #[serde(default)]
    pub clients: usize,
    /// The paced fan-out rather than the saturated one.
    pub paced: bool,
    pub result: FanoutResult,
}

/// One memberships run: room-protocol connections, and raw ones for reference (each on
/// a fresh server).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipRun {
    pub protocol: MembershipResult,
    pub raw: RawMembershipResult,
}

/// A compression-scenario run: which server, compression on or off, which pace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressionRun {
    pub kind: Kind,
    pub compression: bool,
    pub paced: bool,
    pub result: FanoutResult,
}

/// A paced rate a server was not run at.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PacedSkip {
    pub kind: Kind,
    pub run: usize,
    pub deliveries_per_sec: f64,
    /// How it fell behind at a lower rate.
    pub reason: String,
}

/// How a paced run shows that the server could not keep up with its rate, if it did
/// not: it delivered less than 90% of the rate over the phase, or not everything.
pub fn fell_behind(r: &FanoutResult, rate: f64) -> Option<String> {
    if r.timed_out || r.lost > 0 {
        Some(format!("{} of {} deliveries arrived", r.delivered, r.expected))
    } else if r.deliveries_per_sec < 0.9 * rate {
        Some(format!("it delivered {:.0}/s, p99 {:.0} ms", r.deliveries_per_sec, r.latency.p99_us / 1e3))
    } else {
        None
    }
}

/// Everything measured, run by run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Results {
    pub quick: bool,
    pub machine: Machine,
    pub sizes: Option<Sizes>,
    pub servers: Vec<Kind>,
    pub fanout: Vec<(Kind, FanoutResult)>,
    /// Every paced rate (each result records its pace).
    pub paced: Vec<(Kind, FanoutResult)>,
    /// Paced rates a server was not run at, and why.
    pub paced_skipped: Vec<PacedSkip>,
    /// The paced fan-out on a contended core.
    pub contended: Vec<(Kind, FanoutResult)>,
    pub idle: Vec<(Kind, IdleResult)>,
    pub churn: Vec<(Kind, ChurnResult)>,
    pub connect_rate: Vec<(Kind, ConnectRateResult)>,
    pub plugins: Vec<PluginRun>,
    pub reload: Vec<ReloadResult>,
    pub reload_latency: Vec<ReloadResult>,
    /// Roomcast's fan-outs in raw and in room-protocol mode, on one server per run.
    pub room_protocol: Vec<ModeRun>,
    /// Roomcast's memory per membership, and the raw reference.
    pub memberships: Vec<MembershipRun>,
    pub join_leave: Vec<JoinLeaveResult>,
    /// A mass reconnect with `since`, one node.
    pub recovery: Vec<RecoveryResult>,
    /// Chat messages to a large room, compression on and off.
    pub compression: Vec<CompressionRun>,
    /// Runs that failed, with why.
    pub errors: Vec<String>,
    pub duration_s: f64,
    /// Time spent waiting for other programs to quiet down before runs, and how many
    /// runs started while the machine was still busy.
    pub quiet_wait_s: f64,
    pub busy_starts: usize,
}

/// Where things are and where the reports go.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub quick: bool,
    /// Only the room-protocol scenarios (Roomcast).
    pub rooms_only: bool,
    /// Only the compression scenario.
    pub compression_only: bool,
    /// Only the paced fan-out, for every server given.
    pub paced_only: bool,
    pub runs: Option<usize>,
    pub servers: Vec<Kind>,
    pub programs: Programs,
    /// The folder with the built `relay.wasm`, `moderation.wasm` and `lobby.wasm`.
    pub wasm_dir: PathBuf,
    /// Scratch space (plugin folders); emptied at the start.
    pub work_dir: PathBuf,
    /// Output files: `<out>.md`, `<out>.json`, `<out>.png`.
    pub out: PathBuf,
    /// Also rewrite this BENCHMARKS.md.
    pub benchmarks_md: Option<PathBuf>,
    pub font: PathBuf,
    pub date: String,
    pub commit: String,
}

pub async fn run(options: SuiteOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let sizes = Sizes::new(options.quick, options.runs);
    let mut results = Results {
        quick: options.quick,
        machine: machine(&options),
        sizes: Some(sizes.clone()),
        servers: options.servers.clone(),
        ..Results::default()
    };
    if options.work_dir.exists() {
        std::fs::remove_dir_all(&options.work_dir)?;
    }
    std::fs::create_dir_all(&options.work_dir)?;
    eprintln!(
        "bench: {} run(s) of every scenario; load generator on CPU {}, servers on CPU {}",
        sizes.runs, results.machine.loadgen_cpus, options.programs.cpu
    );
    for run in 1..=sizes.runs {
        if options.compression_only {
            compression(&mut results, run, &sizes, &options).await;
            continue;
        }
        // The servers' order rotates between runs, so that no server always meets the
        // machine first, as the suite's start or the previous run left it.
        let mut servers = if options.rooms_only { Vec::new() } else { options.servers.clone() };
        if !servers.is_empty() {
            let first = (run - 1) % servers.len();
            servers.rotate_left(first);
        }
        for kind in servers {
            // A reference (the floor), or a paced-only run: the paced fan-out alone.
            let everything = !options.paced_only && !kind.is_reference();
            let params = FanoutParams {
                messages: match kind {
                    Kind::Roomcast | Kind::Tungstenite | Kind::Fastwebsockets | Kind::Floor => {
                        sizes.fanout.messages
                    }
                    Kind::Uws | Kind::Ws => sizes.node_messages,
                },
                ..sizes.fanout.clone()
            };
            if everything {
                scenario(&mut results, kind, run, "fan-out", &options, async |server| {
                    let target = Target::new(server.addr, "/ws/bench".into())?;
                    let conns = client::connect_all(&target, params.clients).await?;
                    let r = fanout::run(conns, &params, Some(server.pid)).await?;
                    Ok(Outcome::Fanout(r))
                })
                .await;
            }
            // Lowest rate first; once the server fell behind, the higher rates are skipped
            // (and the report says so).
            let mut behind: Option<String> = None;
            for params in &sizes.paced {
                let rate = params.pace.rate();
                let name = format!("paced {}k", rate / 1000.0);
                if let Some(reason) = &behind {
                    eprintln!("  run {run} {:<17} {name:<8} skipped: {reason}", kind.label());
                    let reason = reason.clone();
                    results.paced_skipped.push(PacedSkip { kind, run, deliveries_per_sec: rate, reason });
                    continue;
                }
                let before = results.paced.len();
                scenario(&mut results, kind, run, &name, &options, async |server| {
                    let target = Target::new(server.addr, "/ws/bench".into())?;
                    let conns = client::connect_all(&target, params.clients).await?;
                    let r = fanout::run(conns, params, Some(server.pid)).await?;
                    Ok(Outcome::Paced(r))
                })
                .await;
                if let Some((_, r)) = results.paced.get(before) {
                    behind = fell_behind(r, rate).map(|why| format!("at {rate:.0} deliveries/s {why}"));
                }
            }
            if !everything {
                continue;
            }
            if let Some(params) = &sizes.contended {
                scenario(&mut results, kind, run, "contended", &options, async |server| {
                    let target = Target::new(server.addr, "/ws/bench".into())?;
                    let conns = client::connect_all(&target, params.clients).await?;
                    // Only for the measurement: the busy loop starts once every client
                    // is in, and is killed as soon as the phase ends.
                    let busy = Contender::start(&options.programs.cpu, params.max_duration)?;
                    let r = fanout::run_beside(conns, params, Some(server.pid), Some(busy.pid)).await;
                    busy.stop().await?;
                    Ok(Outcome::Contended(r?))
                })
                .await;
            }
            for params in &sizes.idle {
                let name = format!("idle {}k", params.connections as f64 / 1000.0);
                scenario(&mut results, kind, run, &name, &options, async |server| {
                    let target = Target::new(server.addr, "/ws/idle".into())?;
                    Ok(Outcome::Idle(idle::run(&target, params, server.pid).await?))
                })
                .await;
            }
            scenario(&mut results, kind, run, "churn", &options, async |server| {
                let target = Target::new(server.addr, "/ws/churn".into())?;
                Ok(Outcome::Churn(churn::run(&target, &sizes.churn, server.pid).await?))
            })
            .await;
            if let Some(params) = &sizes.connect_rate {
                scenario(&mut results, kind, run, "rate", &options, async |server| {
                    let target = Target::new(server.addr, "/ws/rate".into())?;
                    Ok(Outcome::ConnectRate(connect_rate::run(&target, params, server.pid).await?))
                })
                .await;
            }
        }
        if options.paced_only {
            continue;
        }
        if options.servers.contains(&Kind::Roomcast) {
            if !options.rooms_only {
                plugins(&mut results, run, &sizes, &options).await;
                reload_run(&mut results, run, &sizes.reload, &options, false).await;
                if let Some(params) = &sizes.reload_latency {
                    reload_run(&mut results, run, params, &options, true).await;
                }
            }
            room_protocol(&mut results, run, &sizes, &options).await;
        }
        if !options.rooms_only {
            compression(&mut results, run, &sizes, &options).await;
        }
    }
    results.duration_s = started.elapsed().as_secs_f64();
    results.machine.load_after = load_average();
    write_reports(&results, &options.out, &options.font, options.benchmarks_md.as_deref())
}

/// How long, in total, the suite may wait for a quiet machine.
const QUIET_BUDGET: Duration = Duration::from_secs(240);
/// How long one run may wait for it.
const QUIET_MAX: Duration = Duration::from_secs(20);

/// Wait until other programs use less than a quarter of a CPU over a second (at most
/// [`QUIET_MAX`], and [`QUIET_BUDGET`] over the whole suite): a compiler that another
/// user starts still shows in the run's other-programs CPU, but runs do not begin in
/// the middle of one.
async fn quiet(results: &mut Results) {
    let me = [std::process::id()];
    let started = Instant::now();
    loop {
        let before = procfs::others_cpu_secs(&me);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = procfs::others_cpu_secs(&me) - before;
        let waited = started.elapsed();
        if busy < 0.25 {
            break;
        }
        if waited >= QUIET_MAX || results.quiet_wait_s + waited.as_secs_f64() >= QUIET_BUDGET.as_secs_f64() {
            results.busy_starts += 1;
            break;
        }
    }
    // The one-second sample itself is not waiting.
    results.quiet_wait_s += (started.elapsed().as_secs_f64() - 1.0).max(0.0);
}

/// What one scenario run produced.
enum Outcome {
    Fanout(FanoutResult),
    Paced(FanoutResult),
    Contended(FanoutResult),
    Idle(IdleResult),
    Churn(ChurnResult),
    ConnectRate(ConnectRateResult),
}

/// Start a fresh server, run one scenario against it, stop it, record the outcome.
async fn scenario(
    results: &mut Results,
    kind: Kind,
    run: usize,
    name: &str,
    options: &SuiteOptions,
    body: impl AsyncFnOnce(&Server) -> anyhow::Result<Outcome>,
) {
    quiet(results).await;
    let started = Instant::now();
    let outcome = async {
        let server = Server::start(kind, &options.programs, &Extras::default()).await?;
        let outcome = body(&server).await;
        server.stop().await?;
        outcome
    }
    .await;
    let took = started.elapsed().as_secs_f64();
    let line = match outcome {
        Ok(Outcome::Fanout(r)) => {
            let line = fanout_line(&r);
            results.fanout.push((kind, r));
            line
        }
        Ok(Outcome::Paced(r)) => {
            let line = fanout_line(&r);
            results.paced.push((kind, r));
            line
        }
        Ok(Outcome::Contended(r)) => {
            let line = format!(
                "{}; the server had {:.2} of its core, the busy loop {:.2}",
                fanout_line(&r),
                r.server_cpu_s / r.elapsed_s,
                r.contender_cpu_s / r.elapsed_s
            );
            results.contended.push((kind, r));
            line
        }
        Ok(Outcome::Idle(r)) => {
            let line = format!(
                "{} open, {:.2} KiB RSS per connection, {} dropped",
                r.opened, r.rss_per_conn_kib, r.dropped_by_server
            );
            results.idle.push((kind, r));
            line
        }
        Ok(Outcome::Churn(r)) => {
            let line = format!(
                "{:.0} connects/s, fds {} -> {}, RSS {} -> {} KiB, broadcast lost {}",
                r.connects_per_sec,
                r.fds_before,
                r.fds_after,
                r.rss_before_kib,
                r.rss_after_kib,
                r.broadcast.lost
            );
            results.churn.push((kind, r));
            line
        }
        Ok(Outcome::ConnectRate(r)) => {
            let line = format!(
                "{:.0} connections/s, p50 {:.0} µs p99 {:.0} µs, {:.1} µs CPU/connection, {} errors, \
                 listen overflows {} drops {}, load generator CPU {:.2} s of {:.2}, other CPU {:.2} s{}",
                r.connections_per_sec,
                r.latency.p50_us,
                r.latency.p99_us,
                r.cpu_us_per_connection,
                r.errors(),
                r.listen_overflows,
                r.listen_drops,
                r.client_cpu_s,
                r.elapsed_s,
                r.other_cpu_s,
                r.error_samples.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
            );
            results.connect_rate.push((kind, r));
            line
        }
        Err(error) => {
            let line = format!("FAILED: {error:#}");
            results.errors.push(format!("{} {name} run {run}: {error:#}", kind.label()));
            line
        }
    };
    eprintln!("  run {run} {:<17} {name:<8} {line} ({took:.1} s)", kind.label());
}

fn fanout_line(r: &FanoutResult) -> String {
    format!(
        "{:.0} deliveries/s, {:.3} µs CPU/delivery, p50 {:.0} µs p99 {:.0} µs, lost {} dup {}, \
         other CPU {:.2} s",
        r.deliveries_per_sec,
        r.cpu_us_per_delivery,
        r.latency.p50_us,
        r.latency.p99_us,
        r.lost,
        r.duplicates,
        r.other_cpu_s
    )
}

/// The plugins folder for the plugin scenarios: relay, moderation and its manifest,
/// lobby.
fn plugin_folder(options: &SuiteOptions, name: &str) -> anyhow::Result<PathBuf> {
    let dir = options.work_dir.join(name);
    let wasm = |name: &str| options.wasm_dir.join(format!("{name}.wasm"));
    let (relay, moderation, lobby) = (wasm("relay"), wasm("moderation"), wasm("lobby"));
    crate::servers::plugins_folder(
        &dir,
        &[(&relay, "relay.wasm"), (&moderation, "moderation.wasm"), (&lobby, "lobby.wasm")],
    )?;
    // Checks every message; limits set so that none of the load is dropped.
    std::fs::write(
        dir.join("moderation.toml"),
        "[config]\nbanned_words = [\"spam\", \"scam\", \"phishing\"]\nmax_length = 4096\n\
         rate_limit = { messages = 1000000, per_ms = 1000 }\nclose_after = 0\n",
    )?;
    // An absolute path, so the servers find it whatever their working directory.
    Ok(std::fs::canonicalize(&dir)?)
}

/// How many times each plugin shape runs through every room in one run of the suite.
/// One fan-out of the 10-in-flight shape through the same room on the same server
/// varied from 1.04 to 1.49 µs of CPU per delivery (bench/PROFILE.md, section 12): a
/// median of 3 cannot tell a 3% difference from that, a median of 9 comes closer.
const PLUGIN_ROUNDS: usize = 3;

/// Saturated fan-outs through no plugin, relay and moderation, in every plugin shape, on
/// one Roomcast, [`PLUGIN_ROUNDS`] times, the rooms' order rotated between rounds.
async fn plugins(results: &mut Results, run: usize, sizes: &Sizes, options: &SuiteOptions) {
    quiet(results).await;
    let outcome = async {
        let dir = plugin_folder(options, "plugins")?;
        let extras = Extras { plugins: Some(dir), ..Extras::default() };
        let server = Server::start(Kind::Roomcast, &options.programs, &extras).await?;
        let mut rooms = vec!["none", "relay", "moderation"];
        // Rotate the order between runs so that no room always goes first.
        rooms.rotate_left((run - 1) % 3);
        let mut runs = Vec::new();
        let rounds = if options.quick { 1 } else { PLUGIN_ROUNDS };
        for params in sizes.plugin_shapes() {
            let window = window_of(params);
            let order = (0..rounds).flat_map(|round| {
                let mut rooms = rooms.clone();
                rooms.rotate_left(round % 3);
                rooms
            });
            for plugin in order {
                let room = if plugin == "none" { "bench" } else { plugin };
                let target = Target::new(server.addr, format!("/ws/{room}"))?;
                let conns = client::connect_all(&target, params.clients).await?;
                let result = fanout::run(conns, params, Some(server.pid)).await?;
                eprintln!(
                    "  run {run} Roomcast          plugin {plugin:<10} {:>4} clients, window {window:>4} {}",
                    params.clients,
                    fanout_line(&result)
                );
                runs.push(PluginRun { plugin: plugin.into(), clients: params.clients, window, result });
            }
        }
        server.stop().await?;
        anyhow::Ok(runs)
    }
    .await;
    match outcome {
        Ok(runs) => results.plugins.extend(runs),
        Err(error) => {
            eprintln!("  run {run} Roomcast          plugins  FAILED: {error:#}");
            results.errors.push(format!("plugins run {run}: {error:#}"));
        }
    }
}

/// A paced fan-out through a plugin while its file is replaced every second: relay
/// (`latency` false: the reload-under-load scenario) or the realistic lobby (`latency`
/// true: the reload-latency one).
async fn reload_run(
    results: &mut Results,
    run: usize,
    params: &ReloadParams,
    options: &SuiteOptions,
    latency: bool,
) {
    let label = if latency { "latency" } else { "reload" };
    quiet(results).await;
    let outcome = async {
        let dir = plugin_folder(options, label)?;
        let token = format!("bench-{}", std::process::id());
        let extras =
            Extras { plugins: Some(dir.clone()), admin_token: Some(token.clone()), ..Extras::default() };
        let server = Server::start(Kind::Roomcast, &options.programs, &extras).await?;
        let target = Target::new(server.addr, format!("/ws/{}", params.plugin))?;
        let admin = Admin { addr: server.addr, token };
        let result = reload::run(&target, params, &dir, Some(&admin), server.pid).await;
        server.stop().await?;
        result
    }
    .await;
    match outcome {
        Ok(r) => {
            let live = reload::Spread::of(&r.live_ms).unwrap_or_default();
            eprintln!(
                "  run {run} Roomcast          {label:<8} {} replacements, versions {:?} -> {:?}, live after \
                 p50 {:.0} ms p99 {:.0} ms ({} unseen), {}",
                r.replacements,
                r.versions_before,
                r.versions_after,
                live.p50,
                live.p99,
                r.unseen,
                fanout_line(&r.fanout)
            );
            if latency { results.reload_latency.push(r) } else { results.reload.push(r) }
        }
        Err(error) => {
            eprintln!("  run {run} Roomcast          {label:<8} FAILED: {error:#}");
            results.errors.push(format!("{label} run {run}: {error:#}"));
        }
    }
}

/// Per-message compression: the chat-message fan-out, saturated and paced, against
/// every server that can compress, with compression on and off; clients offer it
/// every time (as browsers do), and a server with compression off declines. Each
/// run on a fresh server.
async fn compression(results: &mut Results, run: usize, sizes: &Sizes, options: &SuiteOptions) {
    let Some(c) = &sizes.compression else {
        return;
    };
    let variants: Vec<(Kind, bool)> =
        options.servers.iter().filter(|k| k.compresses()).flat_map(|&k| [(k, true), (k, false)]).collect();
    for (kind, on) in variants {
        for paced in [false, true] {
            let mut params = if paced { c.paced.clone() } else { c.saturated.clone() };
            if !paced && matches!(kind, Kind::Uws | Kind::Ws) {
                params.messages = c.node_messages;
            }
            let what = format!(
                "compression {} {}",
                if on { "on " } else { "off" },
                if paced { "paced" } else { "saturated" }
            );
            quiet(results).await;
            let started = Instant::now();
            let outcome = async {
                let extras = Extras { compression: Some(on), ..Extras::default() };
                let server = Server::start(kind, &options.programs, &extras).await?;
                let result = async {
                    let target = Target::new(server.addr, "/ws/chat".into())?.with_deflate();
                    let conns = client::connect_all(&target, params.clients).await?;
                    let negotiated = conns.iter().filter(|c| c.deflate.is_some()).count();
                    anyhow::ensure!(
                        negotiated == if on { conns.len() } else { 0 },
                        "{negotiated} of {} connections negotiated compression",
                        conns.len()
                    );
                    fanout::run(conns, &params, Some(server.pid)).await
                }
                .await;
                server.stop().await?;
                result
            }
            .await;
            let took = started.elapsed().as_secs_f64();
            match outcome {
                Ok(result) => {
                    eprintln!(
                        "  run {run} {:<17} {what} {}, {:.0} B on the wire per delivery ({:.0} B inflated) ({took:.1} s)",
                        kind.label(),
                        fanout_line(&result),
                        result.wire_bytes_per_delivery,
                        result.payload_bytes_per_delivery
                    );
                    results.compression.push(CompressionRun { kind, compression: on, paced, result });
                }
                Err(error) => {
                    eprintln!("  run {run} {:<17} {what} FAILED: {error:#}", kind.label());
                    results.errors.push(format!("{} {what} run {run}: {error:#}", kind.label()));
                }
            }
        }
    }
}

/// The room protocol (Roomcast only): the saturated and paced fan-outs in raw and in
/// room-protocol mode on one server, memory per membership, join/leave rate, and a
/// mass reconnect with `since` (history on).
async fn room_protocol(results: &mut Results, run: usize, sizes: &Sizes, options: &SuiteOptions) {
    let label = |what: &str| format!("  run {run} Roomcast          rooms    {what:<32}");
    quiet(results).await;
    let outcome = async {
        let server = Server::start(Kind::Roomcast, &options.programs, &Extras::default()).await?;
        let mut modes = [false, true];
        // Alternate which mode goes first between runs.
        modes.rotate_left((run - 1) % 2);
        let mut runs = Vec::new();
        for protocol in modes {
            for (paced, params) in
                [(false, &sizes.fanout), (true, sizes.base_paced()), (false, &sizes.small_room)]
            {
                let mut target = Target::new(server.addr, "/ws/bench".into())?;
                let mut params = params.clone();
                if protocol {
                    target = target.with_room_protocol();
                    params.room_protocol = Some("bench".into());
                }
                let conns = client::connect_all(&target, params.clients).await?;
                let result = fanout::run(conns, &params, Some(server.pid)).await?;
                let what = format!(
                    "{} {} {}",
                    if protocol { "room protocol" } else { "raw" },
                    if paced { "paced" } else { "saturated" },
                    params.clients
                );
                eprintln!("{} {}", label(&what), fanout_line(&result));
                runs.push(ModeRun { protocol, clients: params.clients, paced, result });
            }
        }
        server.stop().await?;
        anyhow::Ok(runs)
    }
    .await;
    match outcome {
        Ok(runs) => results.room_protocol.extend(runs),
        Err(error) => {
            eprintln!("{} FAILED: {error:#}", label("fan-out"));
            results.errors.push(format!("room-protocol fan-out run {run}: {error:#}"));
        }
    }

    if let Some(params) = &sizes.memberships {
        let started = Instant::now();
        quiet(results).await;
        let protocol = async {
            let server = Server::start(Kind::Roomcast, &options.programs, &Extras::default()).await?;
            let target = Target::new(server.addr, "/ws".into())?.with_room_protocol();
            let result = rooms::memberships(&target, params, server.pid).await;
            server.stop().await?;
            result
        }
        .await;
        quiet(results).await;
        let raw = async {
            let server = Server::start(Kind::Roomcast, &options.programs, &Extras::default()).await?;
            let result = rooms::raw_memberships(server.addr, params, server.pid).await;
            server.stop().await?;
            result
        }
        .await;
        match (protocol, raw) {
            (Ok(protocol), Ok(raw)) => {
                eprintln!(
                    "{} {} connections: raw {:.2} KiB each; room protocol {:.2} KiB in 1 room, {:.2} in {}, \
                     {:.3} KiB per extra membership; {} join errors, {} dropped ({:.1} s)",
                    label("memberships"),
                    protocol.opened,
                    raw.kib_per_connection,
                    protocol.kib_per_connection_one_room,
                    protocol.kib_per_connection_all_rooms,
                    params.rooms_per_connection,
                    protocol.kib_per_extra_membership,
                    protocol.join_errors,
                    protocol.dropped_by_server + raw.dropped_by_server,
                    started.elapsed().as_secs_f64()
                );
                results.memberships.push(MembershipRun { protocol, raw });
            }
            (protocol, raw) => {
                for error in [protocol.err(), raw.err()].into_iter().flatten() {
                    eprintln!("{} FAILED: {error:#}", label("memberships"));
                    results.errors.push(format!("memberships run {run}: {error:#}"));
                }
            }
        }
    }

    if let Some(params) = &sizes.join_leave {
        quiet(results).await;
        let outcome = async {
            let server = Server::start(Kind::Roomcast, &options.programs, &Extras::default()).await?;
            let target = Target::new(server.addr, "/ws".into())?.with_room_protocol();
            let result = rooms::join_leave(&target, params, server.pid).await;
            server.stop().await?;
            result
        }
        .await;
        match outcome {
            Ok(r) => {
                eprintln!(
                    "{} {:.0} ops/s, {:.2} µs CPU/op, p50 {:.0} µs p99 {:.0} µs, {} refused, \
                     load generator CPU {:.2} s, other CPU {:.2} s",
                    label("join/leave"),
                    r.operations_per_sec,
                    r.cpu_us_per_operation,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.errors,
                    r.client_cpu_s,
                    r.other_cpu_s
                );
                results.join_leave.push(r);
            }
            Err(error) => {
                eprintln!("{} FAILED: {error:#}", label("join/leave"));
                results.errors.push(format!("join/leave run {run}: {error:#}"));
            }
        }
    }

    if let Some(params) = &sizes.recovery {
        quiet(results).await;
        let outcome = async {
            let extras = Extras { history_size: Some(RECOVERY_HISTORY), ..Extras::default() };
            let server = Server::start(Kind::Roomcast, &options.programs, &extras).await?;
            let target = Target::new(server.addr, "/ws".into())?.with_room_protocol();
            let result = recovery::run(&target, params, server.pid).await;
            server.stop().await?;
            result
        }
        .await;
        match outcome {
            Ok(r) => {
                eprintln!(
                    "{} {} back {}–{} behind: all recovered in {:.2} s, p50 {:.0} ms p99 {:.0} ms; \
                     {} not recovered, {} unfinished, {} gaps, {} duplicates; live p99 {:.1} ms before, \
                     {:.1} ms in the storm; server CPU {:.2} before, {:.2} in the storm",
                    label("recovery"),
                    r.clients,
                    r.behind_min,
                    r.behind_max,
                    r.all_recovered_s,
                    r.recovery.p50_us / 1e3,
                    r.recovery.p99_us / 1e3,
                    r.not_recovered,
                    r.unfinished,
                    r.gaps + r.watcher_gaps,
                    r.duplicates + r.watcher_duplicates,
                    r.live_before.p99_us / 1e3,
                    r.live_storm.p99_us / 1e3,
                    r.server_cpu_before,
                    r.server_cpu_storm
                );
                results.recovery.push(r);
            }
            Err(error) => {
                eprintln!("{} FAILED: {error:#}", label("recovery"));
                results.errors.push(format!("recovery run {run}: {error:#}"));
            }
        }
    }
}

fn machine(options: &SuiteOptions) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let lock = std::fs::read_to_string(options.programs.peers_dir.join("package-lock.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .unwrap_or_default();
    let package = |name: &str, field: &str| {
        lock["packages"][format!("node_modules/{name}")][field].as_str().unwrap_or("?").to_owned()
    };
    let output = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    Machine {
        date: options.date.clone(),
        commit: options.commit.clone(),
        cpus: cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "?".into()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into()),
        memory_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0 / 1024.0)
            .unwrap_or(0.0),
        server_cpu: options.programs.cpu.clone(),
        loadgen_cpus: procfs::allowed_cpus(),
        rustc: output("rustc", "-V"),
        node: output(&options.programs.node, "--version"),
        uws_version: package("uwebsockets", "version"),
        uws_integrity: package("uwebsockets", "integrity"),
        ws_version: package("ws", "version"),
        load_before: load_average(),
        load_after: String::new(),
        nice: procfs::nice(),
        roomcast_sha256: std::process::Command::new("sha256sum")
            .arg(&options.programs.roomcast)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into()),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Write `OUT.json`, `OUT.md`, `OUT.png` and, when asked, BENCHMARKS.md.
pub fn write_reports(
    results: &Results,
    out: &Path,
    font: &Path,
    benchmarks_md: Option<&Path>,
) -> anyhow::Result<()> {
    let with_ext = |ext: &str| -> PathBuf {
        let mut name = out.to_owned().into_os_string();
        name.push(ext);
        PathBuf::from(name)
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (md, json, png) = (with_ext(".md"), with_ext(".json"), with_ext(".png"));
    std::fs::write(&json, serde_json::to_string_pretty(results)?)?;
    // A run without the saturated fan-out and the idle connections (room protocol,
    // compression, paced only) gets no chart: two of its three panels would be empty.
    let drawable = !(results.fanout.is_empty() && results.idle.is_empty());
    let chart_error = if drawable {
        chart::draw(results, &png, font).err()
    } else {
        Some(anyhow::anyhow!("none of the scenarios it draws ran"))
    };
    if let Some(error) = &chart_error {
        eprintln!("bench: no chart: {error:#}");
    }
    let png_name = chart_error.is_none().then(|| file_name(&png));
    std::fs::write(&md, report::results_md(results, png_name.as_deref()))
        .with_context(|| format!("writing {}", md.display()))?;
    match &png_name {
        Some(_) => eprintln!("bench: wrote {}, {}, {}", md.display(), json.display(), png.display()),
        None => eprintln!("bench: wrote {}, {}", md.display(), json.display()),
    }
    if let Some(path) = benchmarks_md {
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).to_string_lossy().into_owned();
        let chart = chart_error.is_none().then(|| rel(&png));
        std::fs::write(path, report::benchmarks_md(results, &rel(&md), chart.as_deref()))?;
        eprintln!("bench: updated {}", path.display());
    }
    if !results.errors.is_empty() {
        eprintln!("bench: {} run(s) failed:", results.errors.len());
        for error in &results.errors {
            eprintln!("  {error}");
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
