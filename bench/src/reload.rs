//! Reload under load: a paced fan-out through a plugin while its file is replaced
//! every second, the way an operator deploys: write the new file under a temporary
//! name in the plugins folder, then rename it over `NAME.wasm`. Counts lost and
//! duplicated deliveries and, through the admin API when the server has one, how many
//! versions the server actually loaded and how long each took to go live: from the
//! rename to `GET /admin/rooms` showing the fan-out's room on the new version (polled
//! every [`POLL`]), with the compile and load times `GET /admin/plugins` reports for
//! it. With `baseline`, the same fan-out first runs without replacements on the same
//! server, for the live traffic's latency to compare.
//!
//! Each replacement is the original component with one custom section appended that
//! holds this run's start time and a counter: the code is the same, but the content
//! (and its hash) differs from every earlier replacement of this run and of any run
//! before, so neither a server that skips identical content nor its compiled-plugin
//! cache (kept across runs) can skip loading a new version.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::client::{self, Target};
use crate::fanout::{self, FanoutParams, FanoutResult};
use crate::http;
use crate::stats::percentile;

/// How often the admin API is asked whether the new version serves.
const POLL: Duration = Duration::from_millis(2);

/// One reload-under-load run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadParams {
    pub fanout: FanoutParams,
    /// Replace the plugin this often.
    pub every: Duration,
    /// The plugin replaced; the fan-out runs in its room.
    #[serde(default = "relay")]
    pub plugin: String,
    /// First run the same fan-out without replacements.
    #[serde(default)]
    pub baseline: bool,
}

fn relay() -> String {
    "relay".into()
}

/// What one reload-under-load run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadResult {
    pub replacements: u64,
    /// Versions of the plugin loaded, from `GET /admin/plugins` (None: no admin API).
    pub versions_before: Option<u64>,
    pub versions_after: Option<u64>,
    pub fanout: FanoutResult,
    /// The same fan-out without replacements, before (with `baseline`).
    #[serde(default)]
    pub baseline: Option<FanoutResult>,
    /// Per replacement seen live (admin API only): from the rename to the room serving
    /// the new version, and the compile and load times the server reports for it, ms.
    #[serde(default)]
    pub live_ms: Vec<f64>,
    #[serde(default)]
    pub compile_ms: Vec<f64>,
    #[serde(default)]
    pub load_ms: Vec<f64>,
    /// Per replacement that went live on Winch's code: from the rename to the server
    /// reporting Cranelift's code for new instances (`compiler` in `/admin/plugins`), ms.
    #[serde(default)]
    pub optimized_ms: Vec<f64>,
    /// Replacements not seen live before the next one (admin API only).
    #[serde(default)]
    pub unseen: u64,
    /// The size of the plugin's file.
    #[serde(default)]
    pub plugin_bytes: u64,
}

/// p50, p99 and max of some milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(ms: &[f64]) -> Option<Spread> {
        let mut us: Vec<u64> = ms.iter().map(|m| (m * 1e3).round() as u64).collect();
        us.sort_unstable();
        let at = |p| percentile(&us, p) as f64 / 1e3;
        (!us.is_empty()).then(|| Spread { p50: at(50.0), p99: at(99.0), max: at(100.0) })
    }
}

/// What one replacement measured.
#[derive(Debug, Default)]
struct Sample {
    live_ms: Option<f64>,
    compile_ms: Option<f64>,
    load_ms: Option<f64>,
    optimized_ms: Option<f64>,
}

/// The admin API: address and bearer token.
#[derive(Clone, Debug)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: String,
}

/// Run the fan-out against `target` (a room served by plugin `params.plugin`) while
/// replacing `plugins_dir/NAME.wasm` every `params.every`.
pub async fn run(
    target: &Target,
    params: &ReloadParams,
    plugins_dir: &Path,
    admin: Option<&Admin>,
    server_pid: u32,
) -> anyhow::Result<ReloadResult> {
    let name = params.plugin.as_str();
    let room = target.path.strip_prefix("/ws/").context("the target is not a /ws/ROOM URL")?.to_owned();
    let live = plugins_dir.join(format!("{name}.wasm"));
    let original = std::fs::read(&live).with_context(|| format!("reading {}", live.display()))?;
    let plugin_bytes = original.len() as u64;
    let versions_before = match admin {
        Some(admin) => versions(admin, name).await,
        None => None,
    };
    let baseline = if params.baseline {
        let conns = client::connect_all(target, params.fanout.clients).await?;
        Some(fanout::run(conns, &params.fanout, Some(server_pid)).await?)
    } else {
        None
    };
    let conns = client::connect_all(target, params.fanout.clients).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let replacements = Arc::new(AtomicU64::new(0));
    let replacer = {
        let (stop, replacements) = (stop.clone(), replacements.clone());
        let temp: PathBuf = plugins_dir.join(format!(".{name}.wasm.tmp"));
        let every = params.every;
        let (admin, name) = (admin.cloned(), name.to_owned());
        let run =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Relaxed) {
                tick.tick().await;
                if stop.load(Relaxed) {
                    break;
                }
                let n = replacements.load(Relaxed) + 1;
                let mut tag = run.to_le_bytes().to_vec();
                tag.extend_from_slice(&n.to_le_bytes());
                let bytes = with_custom_section(&original, "roomcast-bench-reload", &tag);
                tokio::fs::write(&temp, &bytes).await?;
                let serving = match &admin {
                    Some(admin) => room_version(admin, &room).await,
                    None => None,
                };
                let landed = Instant::now();
                tokio::fs::rename(&temp, &live).await?;
                replacements.store(n, Relaxed);
                if let (Some(admin), Some(serving)) = (&admin, serving) {
                    // Wait for the room to serve a newer version, until the next replacement is due.
                    let deadline = landed + every.mul_f64(0.9);
                    let mut sample = Sample::default();
                    while Instant::now() < deadline && !stop.load(Relaxed) {
                        if room_version(admin, &room).await.is_some_and(|v| v > serving) {
                            sample.live_ms = Some(landed.elapsed().as_secs_f64() * 1e3);
                            break;
                        }
                        tokio::time::sleep(POLL).await;
                    }
                    // Then, if it went live on Winch's code, until new instances get
                    // Cranelift's.
                    let mut on_winch = false;
                    while sample.live_ms.is_some() && Instant::now() < deadline && !stop.load(Relaxed) {
                        let Some(loaded) = load_times(admin, &name).await else { break };
                        (sample.compile_ms, sample.load_ms) = (loaded.compile_ms, loaded.load_ms);
                        if loaded.compiler.as_deref() != Some("winch") {
                            if on_winch {
                                sample.optimized_ms = Some(landed.elapsed().as_secs_f64() * 1e3);
                            }
                            break;
                        }
                        on_winch = true;
                        tokio::time::sleep(POLL).await;
                    }
                    samples.push(sample);
                }
            }
            anyhow::Ok(samples)
        })
    };
    let fanout = fanout::run(conns, &params.fanout, Some(server_pid)).await;
    stop.store(true, Relaxed);
    // A replacement in progress finishes (within `every`), so its sample counts.
    let samples = tokio::time::timeout(params.every * 2, replacer).await.ok().and_then(|r| r.ok());
    let fanout = fanout?;
    let samples = samples.transpose()?.unwrap_or_default();
    // Give the last replacement time to load before counting versions.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let versions_after = match admin {
        Some(admin) => versions(admin, name).await,
        None => None,
    };
    Ok(ReloadResult {
        replacements: replacements.load(Relaxed),
        versions_before,
        versions_after,
        fanout,
        baseline,
        live_ms: samples.iter().filter_map(|s| s.live_ms).collect(),
        compile_ms: samples.iter().filter_map(|s| s.compile_ms).collect(),
        load_ms: samples.iter().filter_map(|s| s.load_ms).collect(),
        optimized_ms: samples.iter().filter_map(|s| s.optimized_ms).collect(),
        unseen: samples.iter().filter(|s| s.live_ms.is_none()).count() as u64,
        plugin_bytes,
    })
}

/// The version (load number) of the plugin serving `room`, from `GET /admin/rooms`.
async fn room_version(admin: &Admin, room: &str) -> Option<u64> {
    let (status, body) = http::get(admin.addr, "/admin/rooms", Some(&admin.token)).await.ok()?;
    if status != 200 {
        return None;
    }
    let rooms: serde_json::Value = serde_json::from_str(&body).ok()?;
    rooms.as_array()?.iter().find(|r| r["name"] == room)?.get("version")?.as_u64()
}

/// What `GET /admin/plugins` says about loading the version serving.
struct Loaded {
    compiler: Option<String>,
    compile_ms: Option<f64>,
    load_ms: Option<f64>,
}

/// `compiler`, `compile_ms` and `load_ms` of plugin `name` in `GET /admin/plugins`.
async fn load_times(admin: &Admin, name: &str) -> Option<Loaded> {
    let (status, body) = http::get(admin.addr, "/admin/plugins", Some(&admin.token)).await.ok()?;
    if status != 200 {
        return None;
    }
    let plugins: serde_json::Value = serde_json::from_str(&body).ok()?;
    let plugin = plugins.as_array()?.iter().find(|p| p["name"] == name)?;
    Some(Loaded {
        compiler: plugin["compiler"].as_str().map(str::to_owned),
        compile_ms: plugin["compile_ms"].as_f64(),
        load_ms: plugin["load_ms"].as_f64(),
    })
}

/// `versions` of plugin `name` in `GET /admin/plugins`, if the server answers it.
async fn versions(admin: &Admin, name: &str) -> Option<u64> {
    let (status, body) = http::get(admin.addr, "/admin/plugins", Some(&admin.token)).await.ok()?;
    if status != 200 {
        return None;
    }
    let plugins: serde_json::Value = serde_json::from_str(&body).ok()?;
    plugins.as_array()?.iter().find(|p| p["name"] == name)?.get("versions")?.as_u64()
}

/// A WebAssembly module or component with one custom section appended (valid at the
/// end of either).
pub fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    leb128(name.len() as u64, &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    leb128(body.len() as u64, &mut out);
    out.extend_from_slice(&body);
    out
}

fn leb128(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_a_custom_section() {
        let out = with_custom_section(b"\0asm\x01\0\0\0", "x", &[1, 2]);
        assert_eq!(&out[8..], &[0, 4, 1, b'x', 1, 2]);
        let mut v = Vec::new();
        leb128(300, &mut v);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
