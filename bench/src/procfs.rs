//! What the load generator reads from `/proc`: a process's CPU time (utime + stime of
//! all its threads), resident memory and open file descriptors, the CPU every other
//! process used, the kernel's listen-queue counters, and its own nice value and
//! open-file limit.

use std::sync::OnceLock;

use anyhow::Context as _;

/// CPU seconds (user + system, all threads) the process has used so far.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let after = stat_after_name(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields.get(i).context("short stat")?.parse().context("stat field")
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks() as f64)
}

/// `sysconf(_SC_CLK_TCK)`, read once through `getconf` (100 on every Linux we know).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// CPU seconds used so far by every user-space process but `exclude` (kernel threads
/// are skipped), each with the time of the children it has reaped: over an interval,
/// the difference is what other programs on the machine used, including short-lived
/// ones (a compiler run shows in its parent's children time once it exits).
pub fn others_cpu_secs(exclude: &[u32]) -> f64 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Some(after) = stat_after_name(pid) else {
            continue;
        };
        let fields: Vec<u64> = after.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        // After the state: ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime.
        if fields.len() < 14 || fields[5] & PF_KTHREAD != 0 {
            continue;
        }
        ticks += fields[10..14].iter().sum::<u64>();
    }
    ticks as f64 / clock_ticks() as f64
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in status")
}

/// Open file descriptors.
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// The kernel's listen-queue counters (`TcpExt` in `/proc/net/netstat`, for the whole
/// network namespace): connections dropped because an accept queue was full, and every
/// connection a listening socket dropped (overflows included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenCounters {
    pub overflows: u64,
    pub drops: u64,
}

pub fn listen_counters() -> anyhow::Result<ListenCounters> {
    let text = std::fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
    parse_listen_counters(&text).context("no TcpExt ListenOverflows / ListenDrops in /proc/net/netstat")
}

fn parse_listen_counters(text: &str) -> Option<ListenCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let pairs: Vec<(&str, &str)> = names.split_whitespace().zip(values.split_whitespace()).skip(1).collect();
    let get = |name: &str| pairs.iter().find(|(n, _)| *n == name)?.1.parse().ok();
    Some(ListenCounters { overflows: get("ListenOverflows")?, drops: get("ListenDrops")? })
}

/// This process's nice value (field 19 of `/proc/self/stat`).
pub fn nice() -> i64 {
    stat_after_name("self").and_then(|after| after.split_whitespace().nth(16)?.parse().ok()).unwrap_or(0)
}

/// The fields of `/proc/PID/stat` after the command name, the state first: the name
/// may contain spaces, so they are counted after its `)`.
fn stat_after_name(pid: impl std::fmt::Display) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.to_owned())
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

/// The CPUs this process may run on (`Cpus_allowed_list`), e.g. `1`.
pub fn allowed_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).unwrap() >= 0.0);
        assert!(others_cpu_secs(&[me]) > 0.0);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(fd_count(me).unwrap() >= 3);
        assert!(open_files_limit() > 0);
        assert!(listen_counters().is_ok());
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 3 5\n\
                       IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_listen_counters(netstat), Some(ListenCounters { overflows: 3, drops: 5 }));
    }
}
