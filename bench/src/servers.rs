//! The servers under test: how to start each one pinned to its CPU with `taskset`, wait
//! until it accepts connections, and stop it.
//!
//! Every server gets the same room semantics (a message goes to every other member),
//! the same heartbeat interval, and room for bursts in its outbound queues.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// A server implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Roomcast,
    Tungstenite,
    Fastwebsockets,
    Uws,
    Ws,
    /// `floor-peer`: the least a server can do per delivery; a reference that runs the
    /// paced fan-out only and is never a peer in a verdict.
    Floor,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Roomcast, Kind::Tungstenite, Kind::Fastwebsockets, Kind::Uws, Kind::Ws, Kind::Floor];

    /// The short name used on the command line.
    pub fn id(self) -> &'static str {
        match self {
            Kind::Roomcast => "roomcast",
            Kind::Tungstenite => "tungstenite",
            Kind::Fastwebsockets => "fastwebsockets",
            Kind::Uws => "uws",
            Kind::Ws => "ws",
            Kind::Floor => "floor",
        }
    }

    /// The name shown in reports.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Roomcast => "Roomcast",
            Kind::Tungstenite => "tokio-tungstenite",
            Kind::Fastwebsockets => "fastwebsockets",
            Kind::Uws => "uWebSockets.js",
            Kind::Ws => "Node ws",
            Kind::Floor => "floor (reference)",
        }
    }

    /// Whether it is a reference rather than a server people would pick: it runs the
    /// paced fan-out only, and no verdict takes it as the best peer.
    pub fn is_reference(self) -> bool {
        self == Kind::Floor
    }

    pub fn parse(id: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|k| k.id() == id).with_context(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|k| k.id()).collect();
            format!("unknown server `{id}` ({})", known.join(", "))
        })
    }
}

/// Where the server programs are.
#[derive(Clone, Debug)]
pub struct Programs {
    pub roomcast: PathBuf,
    pub tungstenite_peer: PathBuf,
    pub fastwebsockets_peer: PathBuf,
    pub floor_peer: PathBuf,
    /// The folder with `uws.js`, `ws.js` and their `node_modules`.
    pub peers_dir: PathBuf,
    pub node: String,
    /// Where server logs go.
    pub logs: PathBuf,
    /// The CPU every server is pinned to.
    pub cpu: String,
    /// Heartbeat interval for every server.
    pub heartbeat: Duration,
}

/// Extra settings for a Roomcast run.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub plugins: Option<PathBuf>,
    pub admin_token: Option<String>,
    /// `--history-size`: messages each room keeps for clients that come back.
    pub history_size: Option<usize>,
    /// Per-message compression on or off (`--compression` for Roomcast, `COMPRESSION=1`
    /// for the Node peers); `None`: each server's default (off everywhere).
    pub compression: Option<bool>,
}

/// Messages smaller than this go uncompressed (Roomcast's default, and what the Node
/// `ws` peer is given; uWebSockets has no such setting and compresses everything).
pub const COMPRESSION_THRESHOLD: usize = 256;

impl Kind {
    /// Whether the server can compress messages (permessage-deflate).
    pub fn compresses(self) -> bool {
        !matches!(self, Kind::Tungstenite | Kind::Fastwebsockets | Kind::Floor)
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub pid: u32,
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl Server {
    /// Start `kind` on a free loopback port, pinned to `programs.cpu`, and wait until
    /// it accepts connections.
    pub async fn start(kind: Kind, programs: &Programs, extras: &Extras) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let heartbeat = programs.heartbeat.as_secs().max(1).to_string();
        let mut command = tokio::process::Command::new("taskset");
        command.args(["-c", &programs.cpu]);
        match kind {
            Kind::Roomcast => {
                command
                    .arg(&programs.roomcast)
                    .args(["serve", "--listen", &addr.to_string()])
                    .args(["--max-queue-bytes", "64MiB"])
                    .args(["--heartbeat-interval", &format!("{heartbeat}s")])
                    .args(["--max-connections", "19500"]);
                if let Some(dir) = &extras.plugins {
                    command.arg("--plugins").arg(dir);
                }
                if let Some(token) = &extras.admin_token {
                    command.args(["--admin-token", token]);
                }
                if let Some(size) = extras.history_size {
                    command.args(["--history-size", &size.to_string()]);
                }
                if let Some(on) = extras.compression {
                    command.args(["--compression", if on { "on" } else { "off" }]);
                    command.args(["--compression-threshold", &format!("{COMPRESSION_THRESHOLD}B")]);
                }
            }
            Kind::Tungstenite => {
                command.arg(&programs.tungstenite_peer).arg(port.to_string());
            }
            Kind::Fastwebsockets => {
                command.arg(&programs.fastwebsockets_peer).arg(port.to_string());
            }
            Kind::Floor => {
                command.arg(&programs.floor_peer).arg(port.to_string());
            }
            Kind::Uws | Kind::Ws => {
                let script = programs.peers_dir.join(format!("{}.js", kind.id()));
                command.arg(&programs.node).arg(script).arg(port.to_string());
                if extras.compression == Some(true) {
                    command.env("COMPRESSION", "1");
                    command.env("COMPRESSION_THRESHOLD", COMPRESSION_THRESHOLD.to_string());
                }
            }
        }
        std::fs::create_dir_all(&programs.logs)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(programs.logs.join(format!("{}.log", kind.id())))?;
        command
            .env("HEARTBEAT_SECS", &heartbeat)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("starting {}", kind.label()))?;
        let pid = child.id().context("server pid")?;
        let started = Instant::now();
        // taskset execs the server, so the pid is the server's own.
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during start-up ({status}); see {}", kind.label(), programs.logs.display());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{} did not listen on {addr} within 30 s", kind.label());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let start-up work (plugin compilation, JIT warm-up of the module) finish.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Self { pid, addr, child })
    }

    /// Kill it and wait for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        self.child.wait().await?;
        Ok(())
    }
}

/// A busy loop pinned to the servers' CPU at their priority (it inherits the load
/// generator's nice value, as every server does), so that the server gets about half of
/// its core.
#[derive(Debug)]
pub struct Contender {
    pub pid: u32,
    child: tokio::process::Child,
}

impl Contender {
    /// Start it on `cpu`; should nobody stop it, it ends by itself after `limit`.
    pub fn start(cpu: &str, limit: Duration) -> anyhow::Result<Self> {
        let script =
            format!("end=$((SECONDS + {})); while ((SECONDS < end)); do :; done", limit.as_secs() + 1);
        let child = tokio::process::Command::new("taskset")
            .args(["-c", cpu, "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the busy loop")?;
        // taskset execs bash, so the pid is the loop's own.
        let pid = child.id().context("busy loop pid")?;
        Ok(Self { pid, child })
    }

    /// Kill it and wait for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        self.child.wait().await?;
        Ok(())
    }
}

/// A port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Copy the given plugin files (and manifests) into a fresh folder.
pub fn plugins_folder(dir: &Path, files: &[(&Path, &str)]) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    for (from, name) in files {
        std::fs::copy(from, dir.join(name))
            .with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
    }
    Ok(dir.to_owned())
}
