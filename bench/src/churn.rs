//! Churn: clients join and leave a room as fast as they can while the room broadcasts
//! to its steady members. Reports connects per second, whether the steady members
//! still got every message, and the server's open file descriptors and RSS before the
//! run and after everything has left (a leak shows as a difference).
//!
//! Churners alternate between a clean leave (close frame, then wait for the server's
//! close) and an abrupt one (the TCP connection just goes away).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::client::{self, Target};
use crate::fanout::{self, FanoutParams, FanoutResult, Pace};
use crate::procfs;

/// One churn run's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChurnParams {
    /// Steady members of the broadcasting room.
    pub members: usize,
    /// Messages per second one steady member broadcasts.
    pub messages_per_sec: f64,
    pub duration: Duration,
    /// Churning clients at once.
    pub concurrency: usize,
    /// How long to wait after the run before counting what the server still holds.
    pub settle: Duration,
}

/// What one churn run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChurnResult {
    pub connects: u64,
    pub failed: u64,
    pub connects_per_sec: f64,
    pub fds_before: usize,
    pub fds_after: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// The steady members' broadcast while the churn ran.
    pub broadcast: FanoutResult,
}

pub async fn run(target: &Target, params: &ChurnParams, server_pid: u32) -> anyhow::Result<ChurnResult> {
    let fds_before = procfs::fd_count(server_pid)?;
    let rss_before_kib = procfs::rss_kib(server_pid)?;
    let members = client::connect_all(target, params.members).await?;
    let recipients = (params.members.max(2) - 1) as f64;
    let broadcast = FanoutParams {
        clients: params.members,
        senders: 1,
        messages: (params.messages_per_sec * params.duration.as_secs_f64()) as usize,
        size: 64,
        pace: Pace::Paced { deliveries_per_sec: params.messages_per_sec * recipients },
        binary: false,
        grace: Duration::from_secs(10),
        max_duration: params.duration + Duration::from_secs(30),
        room_protocol: None,
        chat: None,
        compress_sends: false,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let churners: Vec<_> = (0..params.concurrency)
        .map(|i| {
            let (target, stop) = (target.clone(), stop.clone());
            let (connects, failed) = (connects.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Relaxed) {
                    match churn_once(&target, n % 2 == 0).await {
                        Ok(()) => connects.fetch_add(1, Relaxed),
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                    n += 1;
                }
            })
        })
        .collect();
    let broadcast = fanout::run(members, &broadcast, None).await?;
    stop.store(true, Relaxed);
    let churn_secs = started.elapsed().as_secs_f64();
    for churner in churners {
        let _ = churner.await;
    }
    tokio::time::sleep(params.settle).await;
    let connects = connects.load(Relaxed);
    Ok(ChurnResult {
        connects,
        failed: failed.load(Relaxed),
        connects_per_sec: connects as f64 / churn_secs,
        fds_before,
        fds_after: procfs::fd_count(server_pid)?,
        rss_before_kib,
        rss_after_kib: procfs::rss_kib(server_pid)?,
        broadcast,
    })
}

/// Join, then leave cleanly or abruptly.
async fn churn_once(target: &Target, clean: bool) -> anyhow::Result<()> {
    let conn = client::connect(target, Duration::from_secs(5)).await?;
    if !clean {
        return Ok(());
    }
    let mut stream = conn.stream;
    let mut close = Vec::new();
    client::encode(client::CLOSE, &1000u16.to_be_bytes(), &mut close);
    stream.write_all(&close).await?;
    // Wait for the server's close and end of stream (discarding any broadcasts).
    let mut sink = [0u8; 4096];
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        while stream.read(&mut sink).await? > 0 {}
        anyhow::Ok(())
    })
    .await;
    drained.map_err(|_| anyhow::anyhow!("no close from the server"))?
}
