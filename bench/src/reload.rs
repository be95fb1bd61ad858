//! Reload under load: a paced fan-out through a plugin while its file is replaced
//! every second, the way an operator deploys: write the new file under a temporary
//! name in the plugins folder, then rename it over `NAME.wasm`. Counts lost and
//! duplicated deliveries and, through the admin API when the server has one, how many
//! versions the server actually loaded.
//!
//! Each replacement is the original component with one custom section appended that
//! holds a counter: the code is the same, but the content (and its hash) differs, so a
//! server that skips identical content still has to load a new version each time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::client::{self, Target};
use crate::fanout::{self, FanoutParams, FanoutResult};
use crate::http;

/// One reload-under-load run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadParams {
    pub fanout: FanoutParams,
    /// Replace the plugin this often.
    pub every: Duration,
}

/// What one reload-under-load run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadResult {
    pub replacements: u64,
    /// Versions of the plugin loaded, from `GET /admin/plugins` (None: no admin API).
    pub versions_before: Option<u64>,
    pub versions_after: Option<u64>,
    pub fanout: FanoutResult,
}

/// The admin API: address and bearer token.
#[derive(Clone, Debug)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: String,
}

/// Run the fan-out against `target` (a room served by plugin `name`) while replacing
/// `plugins_dir/NAME.wasm` every `params.every`.
pub async fn run(
    target: &Target,
    params: &ReloadParams,
    plugins_dir: &Path,
    name: &str,
    admin: Option<&Admin>,
    server_pid: u32,
) -> anyhow::Result<ReloadResult> {
    let live = plugins_dir.join(format!("{name}.wasm"));
    let original = std::fs::read(&live).with_context(|| format!("reading {}", live.display()))?;
    let versions_before = match admin {
        Some(admin) => versions(admin, name).await,
        None => None,
    };
    let conns = client::connect_all(target, params.fanout.clients).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let replacements = Arc::new(AtomicU64::new(0));
    let replacer = {
        let (stop, replacements) = (stop.clone(), replacements.clone());
        let temp: PathBuf = plugins_dir.join(format!(".{name}.wasm.tmp"));
        let every = params.every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            while !stop.load(Relaxed) {
                tick.tick().await;
                let n = replacements.load(Relaxed) + 1;
                let bytes = with_custom_section(&original, "roomcast-bench-reload", &n.to_le_bytes());
                tokio::fs::write(&temp, &bytes).await?;
                tokio::fs::rename(&temp, &live).await?;
                replacements.store(n, Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let fanout = fanout::run(conns, &params.fanout, Some(server_pid)).await;
    stop.store(true, Relaxed);
    replacer.abort();
    let fanout = fanout?;
    // Give the last replacement time to load before counting versions.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let versions_after = match admin {
        Some(admin) => versions(admin, name).await,
        None => None,
    };
    Ok(ReloadResult { replacements: replacements.load(Relaxed), versions_before, versions_after, fanout })
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
