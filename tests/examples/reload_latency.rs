//! Time from a plugin file landing in the plugins folder to its behaviour being live.
//!
//! Run with: `cargo run --release -p roomcast-tests --example reload_latency [-- RELOADS]`
//!
//! A server runs in this process with a plugins folder holding `tag.wasm`; the file is
//! replaced, alternately with the `taga` and `tagb` builds (the safe way: a temporary
//! name, then a rename), and a client probes the room until the reply carries the new
//! tag. Reported twice: with the compiled-plugin cache off (every reload compiles) and
//! on (after the first two reloads, each version is loaded from the cache).

use std::time::Duration;

use roomcast::config::Config;
use roomcast_tests::*;
use tokio::time::Instant;

async fn measure(reloads: usize, cache: Option<std::path::PathBuf>) -> Vec<Duration> {
    let dir = PluginDir::new(&[]);
    dir.install("taga", "tag");
    let server =
        TestServer::start(Config { plugins: Some(dir.path.clone()), plugin_cache: cache, ..test_config() })
            .await;
    let mut client = server.connect("tag").await;
    let mut samples = Vec::with_capacity(reloads);
    for n in 0..reloads {
        let (built, prefix) = if n % 2 == 0 { ("tagb", "B:") } else { ("taga", "A:") };
        let temp = dir.path.join(".tag.wasm.tmp");
        std::fs::copy(built_plugins().join(format!("{built}.wasm")), &temp).unwrap();
        let landed = Instant::now();
        std::fs::rename(&temp, dir.path.join("tag.wasm")).unwrap();
        loop {
            send_text(&mut client, "probe").await;
            if recv_text(&mut client).await.starts_with(prefix) {
                samples.push(landed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Let the folder settle so each sample is one reload.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    server.stop().await;
    samples
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "{label}: {} reloads, p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        samples.len(),
        at(0.50),
        at(0.99),
        samples[samples.len() - 1]
    );
}

#[tokio::main]
async fn main() {
    let reloads = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(60);
    built_plugins();
    report("cache off", measure(reloads, None).await);
    let cache = std::env::temp_dir().join(format!("roomcast-reload-cache-{}", std::process::id()));
    report("cache on ", measure(reloads, Some(cache.clone())).await);
    let _ = std::fs::remove_dir_all(cache);
}
