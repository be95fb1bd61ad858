//! `roomcast-bench`: the load generator for Roomcast and its peers. It speaks plain
//! WebSocket over loopback only, bounded in connection count and time.
//!
//! Run with: `bench/run` (everything, every server), or one scenario against a server
//! you started, e.g.
//! `roomcast-bench fanout --url ws://127.0.0.1:8080/ws/bench --server-pid PID`.

mod chart;
mod chat;
mod churn;
mod client;
mod connect_rate;
mod fanout;
mod http;
mod idle;
mod procfs;
mod recovery;
mod reload;
mod report;
mod rooms;
mod servers;
mod stats;
mod suite;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::client::Target;
use crate::fanout::{FanoutParams, Pace};
use crate::servers::{Kind, Programs};

#[derive(Parser)]
#[command(about = "Load generator for WebSocket room servers (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N clients in one room, K senders, M stamped messages: throughput, latency, loss,
    /// server CPU per delivery.
    Fanout {
        #[command(flatten)]
        fanout: FanoutArgs,
    },
    /// Hold N idle connections (answering pings) and report the server's RSS per connection.
    Idle {
        /// ws://127.0.0.1:PORT/ws/ROOM (loopback addresses only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// How long to hold them, e.g. 20s
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        hold: Duration,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// The server's process id, to read its RSS from /proc
        #[arg(long)]
        server_pid: u32,
        /// Offer permessage-deflate (what an idle compressed connection costs)
        #[arg(long)]
        deflate: bool,
    },
    /// Holds a share of the idle connections for `idle` (one process per 19,700).
    #[command(hide = true)]
    IdleWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        #[arg(long, default_value_t = 0)]
        source_offset: u32,
        #[arg(long)]
        deflate: bool,
    },
    /// Clients join and leave while the room broadcasts: connects/s, fds and RSS before/after.
    Churn {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Messages per second one member broadcasts
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long)]
        server_pid: u32,
    },
    /// New connections per second: connect, upgrade, one message (which a listener in
    /// the room must receive), clean close, with a fixed number of attempts in flight;
    /// latency, server CPU per connection, errors, listen-queue overflows.
    ConnectRate {
        /// ws://127.0.0.1:PORT/ws/ROOM: each slot uses the room ROOM-SLOT
        #[arg(long)]
        url: String,
        #[arg(long)]
        server_pid: u32,
        /// Attempts in flight at once
        #[arg(long, default_value_t = 200)]
        in_flight: usize,
        /// How long new attempts start
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Text bytes of the one message (at least 32)
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// A paced fan-out through a plugin while its .wasm is replaced every second: lost
    /// and duplicated deliveries, and (with the admin token) how long each new version
    /// took to serve the room.
    Reload {
        #[command(flatten)]
        fanout: FanoutArgs,
        /// The server's plugins folder
        #[arg(long)]
        plugins: PathBuf,
        /// The plugin to replace (its room is the URL's)
        #[arg(long, default_value = "relay")]
        name: String,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        every: Duration,
        /// Admin token, to count the versions the server loaded and time each reload
        #[arg(long, env = "ROOMCAST_ADMIN_TOKEN")]
        admin_token: Option<String>,
        /// First run the same fan-out without replacements, to compare its latency
        #[arg(long)]
        baseline: bool,
    },
    /// Room protocol (Roomcast): N connections on /ws join one room each, then K each;
    /// the server's RSS per connection and per extra membership.
    Memberships {
        /// ws://127.0.0.1:PORT/ws (loopback addresses only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        rooms_per_connection: usize,
        /// Rooms in all (connection i is in rooms i, i+1, ... modulo this)
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// How long to hold after each step before reading RSS
        #[arg(long, default_value = "12s", value_parser = parse_duration)]
        hold: Duration,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// The reference instead: raw connections to /ws/{room}, one room each
        #[arg(long)]
        raw: bool,
        #[arg(long)]
        server_pid: u32,
    },
    /// Room protocol (Roomcast): C connections, each in a home room, join and leave
    /// other rooms as fast as the replies come; operations/s and server CPU per operation.
    JoinLeave {
        /// ws://127.0.0.1:PORT/ws (loopback addresses only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        rooms: usize,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long)]
        server_pid: u32,
    },
    /// Room protocol with history (Roomcast, run with `--history-size` at least
    /// `--missed`): N clients in one room drop at once, miss M messages, come back at
    /// once with `since`; time until all recovered, per-client p50/p99, gaps and
    /// duplicates, watchers' live latency before and during the storm, server CPU.
    Recovery {
        /// ws://127.0.0.1:PORT/ws (loopback addresses only)
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 5000)]
        clients: usize,
        #[arg(long, default_value_t = 50)]
        watchers: usize,
        /// Messages per second the publisher sends throughout
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Text bytes per message (at least 32)
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Messages published while the clients are away
        #[arg(long, default_value_t = 100)]
        missed: usize,
        #[arg(long, default_value = "4s", value_parser = parse_duration)]
        before: Duration,
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        after: Duration,
        /// Handshakes in flight at once during the reconnect
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        #[arg(long)]
        server_pid: u32,
        /// Come back to this URL instead (another node of a cluster)
        #[arg(long)]
        reconnect_url: Option<String>,
        /// That node's process id (its CPU counts as the server's)
        #[arg(long)]
        reconnect_server_pid: Option<u32>,
    },
    /// Every scenario for every server, several runs, reports (what `bench/run` calls).
    Suite(SuiteArgs),
    /// Rewrite the reports from a results .json file.
    Report {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
        font: PathBuf,
        #[arg(long)]
        benchmarks_md: Option<PathBuf>,
    },
}

#[derive(Args)]
struct FanoutArgs {
    /// ws://127.0.0.1:PORT/ws/ROOM (loopback addresses only)
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages in total
    #[arg(long, default_value_t = 4000)]
    messages: usize,
    /// Payload bytes (at least 32)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Saturated: messages in flight at most
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Paced instead of saturated: deliveries per second
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long)]
    binary: bool,
    /// Speak Roomcast's room protocol (roomcast.v1) in the URL's room
    #[arg(long)]
    room_protocol: bool,
    /// Offer per-message compression (permessage-deflate, no context takeover either
    /// way) and inflate what the server compressed
    #[arg(long)]
    deflate: bool,
    /// Send compressed messages where compression was negotiated
    #[arg(long, requires = "deflate")]
    compress_sends: bool,
    /// Realistic JSON chat messages of --chat-min to --chat-max bytes instead of --size
    #[arg(long, conflicts_with = "room_protocol")]
    chat: bool,
    #[arg(long, default_value_t = 200)]
    chat_min: usize,
    #[arg(long, default_value_t = 2048)]
    chat_max: usize,
    /// The chat messages' seed (the same seed, the same messages)
    #[arg(long, default_value_t = 15)]
    chat_seed: u64,
    /// The server's process id, to read its CPU time from /proc
    #[arg(long)]
    server_pid: Option<u32>,
}

impl FanoutArgs {
    fn params(&self) -> FanoutParams {
        FanoutParams {
            clients: self.clients,
            senders: self.senders,
            messages: self.messages,
            size: self.size,
            pace: match self.rate {
                Some(deliveries_per_sec) => Pace::Paced { deliveries_per_sec },
                None => Pace::Saturated { window: self.window },
            },
            binary: self.binary,
            grace: Duration::from_secs(10),
            max_duration: Duration::from_secs(120),
            room_protocol: self.room_protocol.then(|| self.room()),
            chat: self.chat.then_some(chat::ChatParams {
                seed: self.chat_seed,
                min: self.chat_min,
                max: self.chat_max,
            }),
            compress_sends: self.compress_sends,
        }
    }

    /// The room of the URL (`/ws/ROOM`).
    fn room(&self) -> String {
        self.url.rsplit_once("/ws/").map(|(_, room)| room.to_owned()).unwrap_or_default()
    }

    /// The target, offering the room protocol when asked to.
    fn target(&self) -> anyhow::Result<Target> {
        let target = Target::parse(&self.url)?;
        let target = if self.room_protocol { target.with_room_protocol() } else { target };
        Ok(if self.deflate { target.with_deflate() } else { target })
    }
}

#[derive(Args)]
struct SuiteArgs {
    /// Small sizes, one run: a smoke test of the whole pipeline
    #[arg(long)]
    quick: bool,
    /// Only the room-protocol scenarios (Roomcast): memory per membership, fan-out in
    /// raw against room-protocol mode, join/leave rate, a mass reconnect with recovery
    #[arg(long)]
    rooms_only: bool,
    /// Only the compression scenario: chat messages to a 1000-member room, every
    /// server that can compress, compression on and off
    #[arg(long, conflicts_with = "rooms_only")]
    compression_only: bool,
    /// Only the paced fan-out, at every rate, for every server given (with `floor` among
    /// them: how far each is from the least a server can do per delivery)
    #[arg(long, conflicts_with_all = ["rooms_only", "compression_only"])]
    paced_only: bool,
    /// Runs of every scenario [default: 3, quick: 1]
    #[arg(long)]
    runs: Option<usize>,
    /// Servers to run, comma-separated
    #[arg(long, default_value = "roomcast,tungstenite,fastwebsockets,uws,ws,floor", value_delimiter = ',')]
    servers: Vec<String>,
    #[arg(long, default_value = "target/release/roomcast")]
    roomcast: PathBuf,
    #[arg(long, default_value = "target/release/tungstenite-peer")]
    tungstenite_peer: PathBuf,
    #[arg(long, default_value = "target/release/fastwebsockets-peer")]
    fastwebsockets_peer: PathBuf,
    #[arg(long, default_value = "target/release/floor-peer")]
    floor_peer: PathBuf,
    #[arg(long, default_value = "bench/peers")]
    peers_dir: PathBuf,
    #[arg(long, default_value = "node")]
    node: String,
    /// Where relay.wasm, moderation.wasm and lobby.wasm are
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release")]
    wasm_dir: PathBuf,
    #[arg(long, default_value = "target/bench-work")]
    work_dir: PathBuf,
    /// Reports go to OUT.md, OUT.json, OUT.png
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    benchmarks_md: Option<PathBuf>,
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
    #[arg(long, default_value = "")]
    date: String,
    #[arg(long, default_value = "")]
    commit: String,
    /// The CPU servers are pinned to
    #[arg(long, default_value = "0")]
    server_cpu: String,
    /// Heartbeat (ping) interval of every server
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat: Duration,
}

/// `20s`, `500ms`, `1.5s`, `2m` (humantime's grammar).
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("`{text}`: {error}; write e.g. 20s or 500ms"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the load generator is pinned to one CPU, and a single-threaded
    // runtime spends it on sockets rather than on moving tasks between threads.
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Fanout { fanout } => {
            let target = fanout.target()?;
            let params = fanout.params();
            let conns = client::connect_all(&target, params.clients).await?;
            let result = fanout::run(conns, &params, fanout.server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Idle { url, connections, hold, concurrency, server_pid, deflate } => {
            let params = idle::IdleParams { connections, hold, concurrency };
            let mut target = Target::parse(&url)?;
            if deflate {
                target = target.with_deflate();
            }
            let result = idle::run(&target, &params, server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::IdleWorker { url, connections, concurrency, source_offset, deflate } => {
            client::offset_sources(source_offset);
            let mut target = Target::parse(&url)?;
            if deflate {
                target = target.with_deflate();
            }
            idle::worker(&target, connections, concurrency).await?;
        }
        Command::Churn { url, members, rate, duration, concurrency, server_pid } => {
            let params = churn::ChurnParams {
                members,
                messages_per_sec: rate,
                duration,
                concurrency,
                settle: Duration::from_secs(2),
            };
            let result = churn::run(&Target::parse(&url)?, &params, server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::ConnectRate { url, server_pid, in_flight, duration, size } => {
            let params = connect_rate::ConnectRateParams { in_flight, duration, size };
            let result = connect_rate::run(&Target::parse(&url)?, &params, server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Reload { fanout, plugins, name, every, admin_token, baseline } => {
            let target = fanout.target()?;
            let server_pid = fanout.server_pid.context("--server-pid is needed")?;
            let mut params = fanout.params();
            if let Pace::Saturated { .. } = params.pace {
                params.pace = Pace::Paced { deliveries_per_sec: 50_000.0 };
            }
            let admin = admin_token.map(|token| reload::Admin { addr: target.addr, token });
            let params = reload::ReloadParams { fanout: params, every, plugin: name, baseline };
            let result = reload::run(&target, &params, &plugins, admin.as_ref(), server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            for (what, ms) in [
                ("live after", &result.live_ms),
                ("compile", &result.compile_ms),
                ("load", &result.load_ms),
                ("optimized after", &result.optimized_ms),
            ] {
                if let Some(s) = reload::Spread::of(ms) {
                    eprintln!(
                        "{what:<15} {} reloads: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                        ms.len(),
                        s.p50,
                        s.p99,
                        s.max
                    );
                }
            }
        }
        Command::Memberships {
            url,
            connections,
            rooms_per_connection,
            rooms,
            hold,
            concurrency,
            raw,
            server_pid,
        } => {
            let params =
                rooms::MembershipParams { connections, rooms_per_connection, rooms, hold, concurrency };
            let target = Target::parse(&url)?;
            if raw {
                let result = rooms::raw_memberships(target.addr, &params, server_pid).await?;
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let result = rooms::memberships(&target.with_room_protocol(), &params, server_pid).await?;
                println!("{}", serde_json::to_string_pretty(&result)?);
            }
        }
        Command::JoinLeave { url, connections, rooms, duration, server_pid } => {
            let params = rooms::JoinLeaveParams { connections, rooms, duration };
            let target = Target::parse(&url)?.with_room_protocol();
            let result = rooms::join_leave(&target, &params, server_pid).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Recovery {
            url,
            clients,
            watchers,
            rate,
            size,
            missed,
            before,
            after,
            concurrency,
            server_pid,
            reconnect_url,
            reconnect_server_pid,
        } => {
            let params = recovery::RecoveryParams {
                clients,
                watchers,
                messages_per_sec: rate,
                size,
                missed,
                before,
                after,
                concurrency,
            };
            let target = Target::parse(&url)?.with_room_protocol();
            let reconnect = match &reconnect_url {
                Some(url) => Target::parse(url)?.with_room_protocol(),
                None => target.clone(),
            };
            let pids: Vec<u32> = [server_pid].into_iter().chain(reconnect_server_pid).collect();
            let result = recovery::run_across(&target, &reconnect, &params, &pids).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Command::Suite(args) => suite::run(suite_options(args)?).await?,
        Command::Report { json, font, benchmarks_md } => {
            let text =
                std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
            let results: suite::Results = serde_json::from_str(&text)?;
            let out = json.with_extension("");
            suite::write_reports(&results, &out, &font, benchmarks_md.as_deref())?;
        }
    }
    Ok(())
}

fn suite_options(args: SuiteArgs) -> anyhow::Result<suite::SuiteOptions> {
    let servers = args.servers.iter().map(|s| Kind::parse(s)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(suite::SuiteOptions {
        quick: args.quick,
        rooms_only: args.rooms_only,
        compression_only: args.compression_only,
        paced_only: args.paced_only,
        runs: args.runs,
        servers,
        programs: Programs {
            roomcast: args.roomcast,
            tungstenite_peer: args.tungstenite_peer,
            fastwebsockets_peer: args.fastwebsockets_peer,
            floor_peer: args.floor_peer,
            peers_dir: args.peers_dir,
            node: args.node,
            logs: args.work_dir.join("logs"),
            cpu: args.server_cpu,
            heartbeat: args.heartbeat,
        },
        wasm_dir: args.wasm_dir,
        work_dir: args.work_dir,
        out: args.out,
        benchmarks_md: args.benchmarks_md,
        font: args.font,
        date: args.date,
        commit: args.commit,
    })
}
