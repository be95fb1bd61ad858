//! The Markdown reports: a dated results file with every run, and `BENCHMARKS.md` with
//! the latest medians, the machine, and how to reproduce them.

use std::fmt::Write as _;
use std::path::Path;

use crate::fanout::{FanoutParams, FanoutResult, Pace};
use crate::idle::IdleResult;
use crate::reload::{ReloadResult, Spread};
use crate::servers::Kind;
use crate::stats::median;
use crate::suite::{PluginRun, Results, Sizes, window_of};

/// Median of `f` over the runs of `kind`.
fn med<T>(runs: &[(Kind, T)], kind: Kind, f: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().filter(|(k, _)| *k == kind).map(|(_, r)| f(r)))
}

/// The rate a paced run was asked for (runs from before it was recorded ran the first).
fn paced_rate_of(r: &FanoutResult, first: f64) -> f64 {
    r.pace.map_or(first, Pace::rate)
}

/// The paced rates of the run, lowest first.
pub fn paced_rates(results: &Results) -> Vec<f64> {
    results.sizes.as_ref().map(|s| s.paced.iter().map(|p| p.pace.rate()).collect()).unwrap_or_default()
}

/// The paced runs of `kind` at `rate`.
fn paced_runs(results: &Results, kind: Kind, rate: f64) -> impl Iterator<Item = &FanoutResult> {
    let first = paced_rates(results).first().copied().unwrap_or(f64::NAN);
    results.paced.iter().filter(move |(k, r)| *k == kind && paced_rate_of(r, first) == rate).map(|(_, r)| r)
}

/// Median of `f` over the paced runs of `kind` at `rate`.
pub fn paced_med(results: &Results, kind: Kind, rate: f64, f: impl Fn(&FanoutResult) -> f64) -> f64 {
    median(paced_runs(results, kind, rate).map(f))
}

/// `12,345` for 12345.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// The plugin runs through `plugin` in the shape of `params` (runs from before the
/// window was recorded: the large or the small room with its usual window).
fn plugin_runs<'a>(
    results: &'a Results,
    plugin: &'a str,
    params: &FanoutParams,
) -> impl Iterator<Item = &'a PluginRun> {
    let (clients, window) = (params.clients, window_of(params));
    let usual = |clients: usize| {
        results.sizes.as_ref().and_then(|s| {
            [&s.fanout, &s.small_room].into_iter().find(|p| p.clients == clients).map(window_of)
        })
    };
    results.plugins.iter().filter(move |p| {
        p.plugin == plugin
            && p.clients == clients
            && (p.window == window || (p.window == 0 && usual(clients) == Some(window)))
    })
}

/// How often each plugin shape ran through a room per run, when more than once.
fn plugin_rounds_note(results: &Results, sizes: &Sizes) -> String {
    let rounds = plugin_runs(results, "none", &sizes.fanout).count() / sizes.runs.max(1);
    if rounds > 1 {
        format!(
            "Each shape ran {rounds} times through every room in each run (the order rotated); \
             medians over all of them.\n\n"
        )
    } else {
        String::new()
    }
}

/// Median of `f` over the plugin runs through `plugin` in the shape of `params`.
pub fn plugin_med(
    results: &Results,
    plugin: &str,
    params: &FanoutParams,
    f: impl Fn(&FanoutResult) -> f64,
) -> f64 {
    median(plugin_runs(results, plugin, params).map(|p| f(&p.result)))
}

/// Median of `f` over the idle runs of `kind` with `connections` connections.
pub fn idle_med(results: &Results, kind: Kind, connections: usize, f: impl Fn(&IdleResult) -> f64) -> f64 {
    median(results.idle.iter().filter(|(k, r)| *k == kind && r.connections == connections).map(|(_, r)| f(r)))
}

/// The idle sizes of the run, smallest first.
fn idle_sizes(results: &Results) -> Vec<usize> {
    let mut sizes: Vec<usize> =
        results.sizes.as_ref().map(|s| s.idle.iter().map(|p| p.connections).collect()).unwrap_or_default();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// A number with `d` decimals, or `–` when there is none.
fn num(v: f64, d: usize) -> String {
    if v.is_finite() { format!("{v:.d$}") } else { "–".into() }
}

/// `a / b` as `1.23×`.
fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

/// The medians the chart and the tables share.
#[derive(Clone, Copy, Debug)]
pub struct Medians {
    pub cpu_us_per_delivery: f64,
    pub deliveries_per_sec: f64,
    pub saturated_p99_us: f64,
    pub paced_p50_us: f64,
    pub paced_p99_us: f64,
    pub idle_kib_per_conn: f64,
    pub idle_opened: f64,
    pub churn_per_sec: f64,
    pub rate_per_sec: f64,
    pub rate_p50_us: f64,
    pub rate_p99_us: f64,
    pub rate_cpu_us: f64,
    pub fanout_other_s: f64,
}

pub fn medians(results: &Results, kind: Kind) -> Medians {
    // The chart and the targets show the first paced rate, and the largest idle size.
    let rate = paced_rates(results).first().copied().unwrap_or(f64::NAN);
    let idle = idle_sizes(results).last().copied().unwrap_or(0);
    Medians {
        cpu_us_per_delivery: med(&results.fanout, kind, |r| r.cpu_us_per_delivery),
        deliveries_per_sec: med(&results.fanout, kind, |r| r.deliveries_per_sec),
        saturated_p99_us: med(&results.fanout, kind, |r| r.latency.p99_us),
        paced_p50_us: paced_med(results, kind, rate, |r| r.latency.p50_us),
        paced_p99_us: paced_med(results, kind, rate, |r| r.latency.p99_us),
        idle_kib_per_conn: idle_med(results, kind, idle, |r| r.rss_per_conn_kib),
        idle_opened: idle_med(results, kind, idle, |r| r.opened as f64),
        churn_per_sec: med(&results.churn, kind, |r| r.connects_per_sec),
        rate_per_sec: med(&results.connect_rate, kind, |r| r.connections_per_sec),
        rate_p50_us: med(&results.connect_rate, kind, |r| r.latency.p50_us),
        rate_p99_us: med(&results.connect_rate, kind, |r| r.latency.p99_us),
        rate_cpu_us: med(&results.connect_rate, kind, |r| r.cpu_us_per_connection),
        fanout_other_s: med(&results.fanout, kind, |r| r.other_cpu_s),
    }
}

fn header(out: &mut String, first: &str, servers: &[Kind]) {
    let _ = write!(out, "| {first} |");
    for k in servers {
        let _ = write!(out, " {} |", k.label());
    }
    out.push_str("\n|---|");
    for _ in servers {
        out.push_str("---:|");
    }
    out.push('\n');
}

fn row(out: &mut String, name: &str, cells: impl IntoIterator<Item = String>) {
    let _ = write!(out, "| {name} |");
    for c in cells {
        let _ = write!(out, " {c} |");
    }
    out.push('\n');
}

/// The tables both reports show: summary, ratios, plugins, reload, targets.
pub fn tables(results: &Results) -> String {
    let mut out = String::new();
    let Some(sizes) = &results.sizes else {
        return out;
    };
    let servers = &results.servers;
    let m: Vec<Medians> = servers.iter().map(|&k| medians(results, k)).collect();
    let f = &sizes.fanout;
    let window = match f.pace {
        Pace::Saturated { window } => window,
        Pace::Paced { .. } => 0,
    };
    let _ = writeln!(
        out,
        "Medians of {} runs; each run on a freshly started server pinned to CPU {}, the load \
         generator on CPU {}. The machine is shared: runs wait (a little) for other programs to \
         quiet down, {} of them started anyway on a busy machine, and the rows marked *noise* \
         show what other programs used during the measured phase.\n",
        sizes.runs, results.machine.server_cpu, results.machine.loadgen_cpus, results.busy_starts
    );
    if results.fanout.is_empty()
        && results.paced.is_empty()
        && results.idle.is_empty()
        && results.churn.is_empty()
    {
        // A run of the room-protocol scenarios only, or of the compression scenario.
        out.push_str(&room_protocol(results));
        out.push_str(&compression(results));
        return out;
    }
    let _ = writeln!(out, "### Side by side\n");
    header(&mut out, "", servers);
    let cell = |g: fn(&Medians) -> f64, d: usize| m.iter().map(move |x| num(g(x), d));
    let _ = writeln!(
        out,
        "| **Saturated fan-out**: {} clients, {} senders, {} messages ({} for the Node servers) of {} B, \
         {} in flight | {}",
        f.clients,
        f.senders,
        f.messages,
        sizes.node_messages,
        f.size,
        window,
        "|".repeat(servers.len())
    );
    row(
        &mut out,
        "server CPU µs per delivery (= CPU s per million; lower is better)",
        cell(|x| x.cpu_us_per_delivery, 3),
    );
    row(&mut out, "deliveries/s (the load generator may be the limit)", cell(|x| x.deliveries_per_sec, 0));
    row(&mut out, "latency p99 under saturation, µs", cell(|x| x.saturated_p99_us, 0));
    row(
        &mut out,
        "lost / duplicated deliveries (all runs)",
        servers.iter().map(|&k| {
            let runs: Vec<&FanoutResult> =
                results.fanout.iter().filter(|(s, _)| *s == k).map(|(_, r)| r).collect();
            let (lost, dup) = runs.iter().fold((0, 0), |(l, d), r| (l + r.lost, d + r.duplicates));
            if runs.is_empty() { "–".to_owned() } else { format!("{lost} / {dup}") }
        }),
    );
    row(&mut out, "other programs' CPU during the phase, s (noise)", cell(|x| x.fanout_other_s, 2));
    out.push_str(&paced_rows(results));
    out.push_str(&contended_rows(results));
    let _ = writeln!(
        out,
        "| **Idle**: {} connections held {} s, heartbeat on | {}",
        idle_sizes(results).iter().map(|&n| thousands(n as f64)).collect::<Vec<_>>().join(" or "),
        sizes.idle.first().map_or(0, |p| p.hold.as_secs()),
        "|".repeat(servers.len())
    );
    for n in idle_sizes(results) {
        let cells = |f: fn(&IdleResult) -> f64, d: usize| {
            servers.iter().map(move |&k| num(idle_med(results, k, n, f), d)).collect::<Vec<_>>()
        };
        row(
            &mut out,
            &format!("server RSS per connection at {}, KiB (lower is better)", thousands(n as f64)),
            cells(|r| r.rss_per_conn_kib, 2),
        );
        row(
            &mut out,
            &format!("connections open of {} (median)", thousands(n as f64)),
            cells(|r| r.opened as f64, 0),
        );
    }
    let c = &sizes.churn;
    let _ = writeln!(
        out,
        "| **Churn**: {} at a time join and leave for {} s while {} members get {} msg/s | {}",
        c.concurrency,
        c.duration.as_secs(),
        c.members,
        c.messages_per_sec,
        "|".repeat(servers.len())
    );
    row(&mut out, "connects/s", cell(|x| x.churn_per_sec, 0));
    let churn_cells = |g: fn(&crate::churn::ChurnResult) -> String| {
        servers
            .iter()
            .map(move |&k| {
                results
                    .churn
                    .iter()
                    .filter(|(s, _)| *s == k)
                    .map(|(_, r)| g(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect::<Vec<_>>()
    };
    row(
        &mut out,
        "server fds before → after, each run",
        churn_cells(|r| format!("{}→{}", r.fds_before, r.fds_after)),
    );
    row(
        &mut out,
        "server RSS before → after, MiB, each run",
        churn_cells(|r| {
            format!("{:.1}→{:.1}", r.rss_before_kib as f64 / 1024.0, r.rss_after_kib as f64 / 1024.0)
        }),
    );
    row(&mut out, "broadcast lost during churn, each run", churn_cells(|r| r.broadcast.lost.to_string()));
    if let Some(p) = sizes.connect_rate.as_ref().filter(|_| !results.connect_rate.is_empty()) {
        let _ = writeln!(
            out,
            "| **Connection rate**: connect, upgrade, one {} B text message until a listener in the room \
             has it, clean close; {} in flight for {} s | {}",
            p.size,
            p.in_flight,
            p.duration.as_secs_f64(),
            "|".repeat(servers.len())
        );
        row(&mut out, "connections/s (higher is better)", cell(|x| x.rate_per_sec, 0));
        row(&mut out, "connect → message at the listener, p50, µs", cell(|x| x.rate_p50_us, 0));
        row(&mut out, "connect → message at the listener, p99, µs", cell(|x| x.rate_p99_us, 0));
        row(
            &mut out,
            "server CPU µs per connection (accept, upgrade, message, close)",
            cell(|x| x.rate_cpu_us, 1),
        );
        let rate_cells = |g: fn(&crate::connect_rate::ConnectRateResult) -> f64, d: usize| {
            servers.iter().map(move |&k| num(med(&results.connect_rate, k, g), d)).collect::<Vec<_>>()
        };
        row(
            &mut out,
            "load generator CPU, share of the phase (near 1: it was the limit)",
            rate_cells(|r| r.client_cpu_s / r.elapsed_s, 2),
        );
        let rate_sum = |k: Kind, g: fn(&crate::connect_rate::ConnectRateResult) -> u64| {
            results.connect_rate.iter().filter(|(s, _)| *s == k).map(|(_, r)| g(r)).sum::<u64>()
        };
        row(
            &mut out,
            "failed connects / upgrades / messages (all runs)",
            servers.iter().map(|&k| {
                format!(
                    "{} / {} / {}",
                    rate_sum(k, |r| r.connect_errors),
                    rate_sum(k, |r| r.upgrade_errors),
                    rate_sum(k, |r| r.message_errors)
                )
            }),
        );
        row(
            &mut out,
            "listen-queue overflows / drops (all runs)",
            servers.iter().map(|&k| {
                format!("{} / {}", rate_sum(k, |r| r.listen_overflows), rate_sum(k, |r| r.listen_drops))
            }),
        );
        row(&mut out, "other programs' CPU during the phase, s (noise)", rate_cells(|r| r.other_cpu_s, 2));
    }

    out.push_str(&paced_notes(results));

    if let Some(rc) = servers.iter().position(|&k| k == Kind::Roomcast) {
        let peers: Vec<usize> = (0..servers.len()).filter(|&i| i != rc).collect();
        if !peers.is_empty() {
            let _ = writeln!(out, "\n### Roomcast ÷ peer (medians)\n");
            let peer_kinds: Vec<Kind> = peers.iter().map(|&i| servers[i]).collect();
            header(&mut out, "metric", &peer_kinds);
            let ratios = |g: fn(&Medians) -> f64| {
                peers.iter().map(|&i| ratio(g(&m[rc]), g(&m[i]))).collect::<Vec<_>>()
            };
            row(&mut out, "CPU per delivery, saturated (< 1 is better)", ratios(|x| x.cpu_us_per_delivery));
            row(&mut out, "deliveries/s, saturated (> 1 is better)", ratios(|x| x.deliveries_per_sec));
            let paced_ratios = |rate: f64, f: fn(&FanoutResult) -> f64| {
                peers
                    .iter()
                    .map(|&i| {
                        ratio(
                            paced_med(results, Kind::Roomcast, rate, f),
                            paced_med(results, servers[i], rate, f),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let contended_ratios = |f: fn(&FanoutResult) -> f64| {
                peers
                    .iter()
                    .map(|&i| {
                        ratio(
                            med(&results.contended, Kind::Roomcast, f),
                            med(&results.contended, servers[i], f),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            for rate in paced_rates(results) {
                row(
                    &mut out,
                    &format!("latency p99, paced {} deliveries/s (< 1 is better)", thousands(rate)),
                    paced_ratios(rate, |r| r.latency.p99_us),
                );
            }
            for rate in paced_rates(results) {
                row(
                    &mut out,
                    &format!("CPU per delivery, paced {} deliveries/s (< 1 is better)", thousands(rate)),
                    paced_ratios(rate, |r| r.cpu_us_per_delivery),
                );
            }
            if !results.contended.is_empty() {
                row(
                    &mut out,
                    "latency p99, paced on a contended core (< 1 is better)",
                    contended_ratios(|r| r.latency.p99_us),
                );
                row(
                    &mut out,
                    "CPU per delivery, paced on a contended core (< 1 is better)",
                    contended_ratios(|r| r.cpu_us_per_delivery),
                );
            }
            for n in idle_sizes(results) {
                let f = |r: &IdleResult| r.rss_per_conn_kib;
                row(
                    &mut out,
                    &format!("RSS per idle connection at {} (< 1 is better)", thousands(n as f64)),
                    peers.iter().map(|&i| {
                        ratio(idle_med(results, Kind::Roomcast, n, f), idle_med(results, servers[i], n, f))
                    }),
                );
            }
            row(&mut out, "connects/s under churn (> 1 is better)", ratios(|x| x.churn_per_sec));
            if !results.connect_rate.is_empty() {
                row(&mut out, "connections/s, connection rate (> 1 is better)", ratios(|x| x.rate_per_sec));
                row(&mut out, "CPU per new connection (< 1 is better)", ratios(|x| x.rate_cpu_us));
            }
        }
    }

    if !results.plugins.is_empty() {
        let _ = writeln!(
            out,
            "\n### Plugins (Roomcast, saturated fan-out; relay passes everything on, moderation \
             checks every message)\n\n{}\
             | room | served by | deliveries/s | % of no plugin | CPU µs per delivery | CPU vs no plugin | lost |\n\
             |---|---|---:|---:|---:|---:|---:|",
            plugin_rounds_note(results, sizes)
        );
        for params in sizes.plugin_shapes() {
            if plugin_runs(results, "none", params).next().is_none()
                && plugin_runs(results, "relay", params).next().is_none()
            {
                // A shape the results predate.
                continue;
            }
            let base_tp = plugin_med(results, "none", params, |r| r.deliveries_per_sec);
            let base_cpu = plugin_med(results, "none", params, |r| r.cpu_us_per_delivery);
            for plugin in ["none", "relay", "moderation"] {
                let tp = plugin_med(results, plugin, params, |r| r.deliveries_per_sec);
                let cpu = plugin_med(results, plugin, params, |r| r.cpu_us_per_delivery);
                let lost: u64 = plugin_runs(results, plugin, params).map(|p| p.result.lost).sum();
                let name = if plugin == "none" { "no plugin" } else { plugin };
                let _ = writeln!(
                    out,
                    "| {} | {name} | {} | {}% | {} | {} | {lost} |",
                    plugin_shape(params),
                    num(tp, 0),
                    num(tp / base_tp * 100.0, 1),
                    num(cpu, 3),
                    ratio(cpu, base_cpu)
                );
            }
        }
    }

    if !results.reload.is_empty() {
        let r = &sizes.reload;
        let rate = r.fanout.pace.rate();
        let _ = writeln!(
            out,
            "\n### Reload under load (Roomcast, relay replaced every {} s during a paced fan-out of {} deliveries/s to {} clients)\n\n\
             | run | replacements | versions loaded | deliveries | lost | duplicated | closed by server | p99 µs | max µs |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|",
            r.every.as_secs_f64(),
            num(rate, 0),
            r.fanout.clients
        );
        for (i, run) in results.reload.iter().enumerate() {
            let versions = match (run.versions_before, run.versions_after) {
                (Some(a), Some(b)) => (b - a.min(b)).to_string(),
                _ => "no admin API".into(),
            };
            let f = &run.fanout;
            let _ = writeln!(
                out,
                "| {} | {} | {versions} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                run.replacements,
                f.delivered,
                f.lost,
                f.duplicates,
                f.closed_by_server,
                num(f.latency.p99_us, 0),
                num(f.latency.max_us, 0)
            );
        }
    }

    out.push_str(&reload_latency(results));
    out.push_str(&room_protocol(results));
    out.push_str(&compression(results));
    out.push_str(&targets(results, &m));
    out.push_str(&targets_16(results));
    out
}

/// `1000 members, 10 senders, 256 in flight`.
fn plugin_shape(params: &FanoutParams) -> String {
    format!("{} members, {} senders, {} in flight", params.clients, params.senders, window_of(params))
}

/// The paced fan-out's rows of the side-by-side table: latency and CPU per delivery at
/// every rate.
fn paced_rows(results: &Results) -> String {
    let mut out = String::new();
    let Some(sizes) = &results.sizes else {
        return out;
    };
    let servers = &results.servers;
    let p = sizes.base_paced();
    let gap = "|".repeat(servers.len());
    let rates = paced_rates(results);
    // A cell: the medians over the runs at that rate, "skipped" when the server was not
    // run at it (see the notes), and how many runs when only some were.
    let cell = |kind: Kind, rate: f64, text: String| {
        let ran = paced_runs(results, kind, rate).count();
        let skipped =
            results.paced_skipped.iter().filter(|s| s.kind == kind && s.deliveries_per_sec == rate).count();
        match (ran, skipped) {
            (0, 0) => "–".into(),
            (0, _) => "skipped".into(),
            (_, 0) => text,
            (n, s) => format!("{text} ({n} of {} runs)", n + s),
        }
    };
    let _ = writeln!(
        out,
        "| **Paced fan-out** to {} clients, {} senders, {} B: latency p50 / p99 / max, µs (lower is better) | {gap}",
        p.clients, p.senders, p.size
    );
    for &rate in &rates {
        row(
            &mut out,
            &format!("{} deliveries/s", thousands(rate)),
            servers.iter().map(|&k| {
                let v = |f: fn(&FanoutResult) -> f64| num(paced_med(results, k, rate, f), 0);
                let text = format!(
                    "{} / {} / {}",
                    v(|r| r.latency.p50_us),
                    v(|r| r.latency.p99_us),
                    v(|r| r.latency.max_us)
                );
                cell(k, rate, text)
            }),
        );
    }
    let _ = writeln!(out, "| **Paced fan-out**: server CPU µs per delivery | {gap}");
    for &rate in &rates {
        row(
            &mut out,
            &format!("{} deliveries/s", thousands(rate)),
            servers
                .iter()
                .map(|&k| cell(k, rate, num(paced_med(results, k, rate, |r| r.cpu_us_per_delivery), 3))),
        );
    }
    row(
        &mut out,
        "other programs' CPU during the phase, s, at each rate (noise)",
        servers.iter().map(|&k| {
            rates
                .iter()
                .map(|&rate| num(paced_med(results, k, rate, |r| r.other_cpu_s), 2))
                .collect::<Vec<_>>()
                .join(" / ")
        }),
    );
    out
}

/// The contended-core scenario's rows of the side-by-side table.
fn contended_rows(results: &Results) -> String {
    let mut out = String::new();
    let Some(p) = results.sizes.as_ref().and_then(|s| s.contended.as_ref()) else {
        return out;
    };
    if results.contended.is_empty() {
        return out;
    }
    let servers = &results.servers;
    let runs = &results.contended;
    let cell = |f: fn(&FanoutResult) -> f64, d: usize| servers.iter().map(move |&k| num(med(runs, k, f), d));
    let _ = writeln!(
        out,
        "| **Paced on a contended core**: {} deliveries/s to {} clients while a busy loop at the servers' \
         priority shares the server's CPU | {}",
        thousands(p.pace.rate()),
        p.clients,
        "|".repeat(servers.len())
    );
    row(
        &mut out,
        "latency p50 / p99 / max, µs (lower is better)",
        servers.iter().map(|&k| {
            format!(
                "{} / {} / {}",
                num(med(runs, k, |r| r.latency.p50_us), 0),
                num(med(runs, k, |r| r.latency.p99_us), 0),
                num(med(runs, k, |r| r.latency.max_us), 0)
            )
        }),
    );
    row(&mut out, "server CPU µs per delivery", cell(|r| r.cpu_us_per_delivery, 3));
    row(&mut out, "deliveries/s", cell(|r| r.deliveries_per_sec, 0));
    row(
        &mut out,
        "share of the core: server / busy loop",
        servers.iter().map(|&k| {
            format!(
                "{} / {}",
                num(med(runs, k, |r| r.server_cpu_s / r.elapsed_s), 2),
                num(med(runs, k, |r| r.contender_cpu_s / r.elapsed_s), 2)
            )
        }),
    );
    row(
        &mut out,
        "lost / duplicated deliveries (all runs)",
        servers.iter().map(|&k| {
            let (lost, dup) = runs
                .iter()
                .filter(|(s, _)| *s == k)
                .fold((0, 0), |(l, d), (_, r)| (l + r.lost, d + r.duplicates));
            format!("{lost} / {dup}")
        }),
    );
    row(&mut out, "other programs' CPU during the phase, s (noise)", cell(|r| r.other_cpu_s, 2));
    out
}

/// Below the side-by-side table: which paced rates were skipped and why, and why the
/// contended-core scenario exists.
fn paced_notes(results: &Results) -> String {
    let mut out = String::new();
    let mut skipped: Vec<(Kind, f64)> =
        results.paced_skipped.iter().map(|s| (s.kind, s.deliveries_per_sec)).collect();
    skipped.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    skipped.dedup();
    let mut kinds: Vec<Kind> = skipped.iter().map(|s| s.0).collect();
    kinds.dedup();
    for kind in kinds {
        let rates: Vec<String> = skipped.iter().filter(|s| s.0 == kind).map(|s| thousands(s.1)).collect();
        let reasons: Vec<String> = results
            .paced_skipped
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| format!("run {}: {}", s.run, s.reason))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let _ = writeln!(
            out,
            "\n*Skipped*: {} was not run at {} deliveries/s: it could not keep up with a lower rate \
             (delivered less than 90% of it, or not everything), so a higher one would only measure \
             its backlog ({}).",
            kind.label(),
            rates.join(" and "),
            reasons.join("; ")
        );
    }
    if !results.contended.is_empty() {
        let loadgen = median(
            results
                .paced
                .iter()
                .chain(&results.contended)
                .filter(|(_, r)| r.delivered > 0)
                .map(|(_, r)| r.client_cpu_s * 1e6 / r.delivered as f64),
        );
        let _ = writeln!(
            out,
            "\n*Paced on a contended core* exists because our load generator spends about 2.9 µs of its \
             own core per delivery ({} µs, median of these paced runs) and cannot pace above about \
             300,000 deliveries/s, so without the busy loop the server's core never saturates on this \
             2-core machine. The busy loop (`bash`, pinned to the server's CPU at the same nice value, \
             running only during the measured phase) leaves the server about half a core when it needs \
             more (the *share of the core* row shows what each used), so every server is past its \
             knee: what is measured is how each degrades, by batching or by queueing.",
            num(loadgen, 2)
        );
    }
    out
}

/// The compression scenario's columns: every server that ran it, compression on, then off.
fn compression_variants(results: &Results) -> Vec<(Kind, bool)> {
    let mut kinds: Vec<Kind> = results.compression.iter().map(|r| r.kind).collect();
    kinds.sort();
    kinds.dedup();
    kinds
        .into_iter()
        .flat_map(|k| [(k, true), (k, false)])
        .filter(|&(k, on)| results.compression.iter().any(|r| r.kind == k && r.compression == on))
        .collect()
}

/// Median of `f` over the compression runs of one server, on or off, paced or not.
fn compression_med(
    results: &Results,
    kind: Kind,
    on: bool,
    paced: bool,
    f: impl Fn(&FanoutResult) -> f64,
) -> f64 {
    median(
        results
            .compression
            .iter()
            .filter(|r| r.kind == kind && r.compression == on && r.paced == paced)
            .map(|r| f(&r.result)),
    )
}

/// Per-message compression (issue 15): chat messages to a large room, every server
/// that can compress with compression on and off, medians over the runs.
fn compression(results: &Results) -> String {
    let mut out = String::new();
    let Some(c) = results.sizes.as_ref().and_then(|s| s.compression.as_ref()) else {
        return out;
    };
    if results.compression.is_empty() {
        return out;
    }
    let variants = compression_variants(results);
    let runs =
        results.compression.iter().filter(|r| r.kind == Kind::Roomcast && r.compression && r.paced).count();
    let chat = c.saturated.chat.unwrap_or_default();
    let window = match c.saturated.pace {
        Pace::Saturated { window } => window,
        Pace::Paced { .. } => 0,
    };
    let rate = c.paced.pace.rate();
    let _ = writeln!(
        out,
        "\n### Per-message compression (issue 15)\n\n\
         {} members in one room, {} of them sending realistic JSON chat messages of {} to {} bytes \
         (sizes uniform over that range; ids, times, authors, nested fields and a text of \
         ordinary words; seed {}, so every server gets the same messages). Every client \
         offers `{}` and inflates what arrives compressed before it reads the delivery's \
         stamp. *On*: Roomcast `--compression on` (below {} B a message goes plain), \
         uWebSockets.js `SHARED_COMPRESSOR` (it has no threshold: every message is \
         compressed, for each subscriber), Node ws `perMessageDeflate` with threshold {} B, \
         no context takeover, zlib's default level. *Off*: the same clients, the server \
         declines. tokio-tungstenite and fastwebsockets have no permessage-deflate and are \
         left out. Medians of \
         {runs} runs, each on a fresh server.\n",
        c.saturated.clients,
        c.saturated.senders,
        chat.min,
        chat.max,
        chat.seed,
        crate::client::DEFLATE_OFFER,
        c.threshold,
        c.threshold,
    );
    let label = |&(k, on): &(Kind, bool)| format!("{}, {}", k.label(), if on { "on" } else { "off" });
    let _ = write!(out, "| |");
    for v in &variants {
        let _ = write!(out, " {} |", label(v));
    }
    out.push_str("\n|---|");
    for _ in &variants {
        out.push_str("---:|");
    }
    out.push('\n');
    let gap = "|".repeat(variants.len());
    let cells = |paced: bool, f: fn(&FanoutResult) -> f64, d: usize| {
        variants
            .iter()
            .map(move |&(k, on)| num(compression_med(results, k, on, paced, f), d))
            .collect::<Vec<_>>()
    };
    row(
        &mut out,
        "paced run: message bytes per delivery (inflated)",
        cells(true, |r| r.payload_bytes_per_delivery, 0),
    );
    row(
        &mut out,
        "paced run: **bytes on the wire per delivery** (frames as read from the socket)",
        cells(true, |r| r.wire_bytes_per_delivery, 0),
    );
    row(
        &mut out,
        "wire ÷ message",
        cells(true, |r| r.wire_bytes_per_delivery / r.payload_bytes_per_delivery, 2),
    );
    row(
        &mut out,
        "paced run: deliveries compressed, %",
        cells(true, |r| r.compressed_frames as f64 / r.data_frames.max(1) as f64 * 100.0, 1),
    );
    let _ = writeln!(
        out,
        "| **Saturated**: {} messages ({} for the Node servers), {} in flight | {gap}",
        c.saturated.messages, c.node_messages, window
    );
    row(
        &mut out,
        "**server CPU µs per delivery** (lower is better)",
        cells(false, |r| r.cpu_us_per_delivery, 3),
    );
    row(
        &mut out,
        "deliveries/s (the load generator may be the limit)",
        cells(false, |r| r.deliveries_per_sec, 0),
    );
    row(&mut out, "latency p99, µs", cells(false, |r| r.latency.p99_us, 0));
    row(&mut out, "other programs' CPU during the phase, s (noise)", cells(false, |r| r.other_cpu_s, 2));
    let _ =
        writeln!(out, "| **Paced**: {} deliveries/s ({} messages) | {gap}", num(rate, 0), c.paced.messages);
    row(
        &mut out,
        "**server CPU µs per delivery** (lower is better)",
        cells(true, |r| r.cpu_us_per_delivery, 3),
    );
    row(&mut out, "latency p50, µs", cells(true, |r| r.latency.p50_us, 0));
    row(&mut out, "latency p99, µs", cells(true, |r| r.latency.p99_us, 0));
    row(&mut out, "latency max, µs", cells(true, |r| r.latency.max_us, 0));
    row(&mut out, "other programs' CPU during the phase, s (noise)", cells(true, |r| r.other_cpu_s, 2));
    row(
        &mut out,
        "lost / duplicated / not inflated (all runs)",
        variants.iter().map(|&(k, on)| {
            let runs = results.compression.iter().filter(|r| r.kind == k && r.compression == on);
            let (l, d, e) = runs.fold((0, 0, 0), |(l, d, e), r| {
                (l + r.result.lost, d + r.result.duplicates, e + r.result.inflate_errors)
            });
            format!("{l} / {d} / {e}")
        }),
    );

    let ours = (Kind::Roomcast, true);
    if !variants.contains(&ours) {
        return out;
    }
    let others: Vec<(Kind, bool)> = variants
        .iter()
        .copied()
        .filter(|&(k, on)| (k == Kind::Roomcast && !on) || (k != Kind::Roomcast && on))
        .collect();
    if !others.is_empty() {
        let _ = write!(out, "\n| Roomcast with compression ÷ |");
        for v in &others {
            let _ = write!(out, " {} |", label(v));
        }
        out.push_str("\n|---|");
        for _ in &others {
            out.push_str("---:|");
        }
        out.push('\n');
        let ratios = |paced: bool, f: fn(&FanoutResult) -> f64| {
            others
                .iter()
                .map(|&(k, on)| {
                    ratio(
                        compression_med(results, Kind::Roomcast, true, paced, f),
                        compression_med(results, k, on, paced, f),
                    )
                })
                .collect::<Vec<_>>()
        };
        row(
            &mut out,
            "CPU per delivery, saturated (< 1 is better)",
            ratios(false, |r| r.cpu_us_per_delivery),
        );
        row(&mut out, "CPU per delivery, paced (< 1 is better)", ratios(true, |r| r.cpu_us_per_delivery));
        row(&mut out, "bytes on the wire per delivery", ratios(true, |r| r.wire_bytes_per_delivery));
        row(&mut out, "latency p99, paced", ratios(true, |r| r.latency.p99_us));
    }

    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let _ = writeln!(
        out,
        "\n| target (issue 15) | Roomcast with compression | reference | verdict |\n|---|---:|---:|---|"
    );
    for (paced, name) in [(false, "saturated"), (true, "paced")] {
        let cpu = |k: Kind, on: bool| compression_med(results, k, on, paced, |r| r.cpu_us_per_delivery);
        let ours = cpu(Kind::Roomcast, true);
        let plain = cpu(Kind::Roomcast, false);
        if plain.is_finite() {
            let _ = writeln!(
                out,
                "| CPU per delivery < 1.3 × Roomcast without compression, {name} | {} µs | {} µs | {} ({}) |",
                num(ours, 3),
                num(plain, 3),
                verdict(ours < 1.3 * plain),
                ratio(ours, plain)
            );
        }
        let best = variants
            .iter()
            .filter(|&&(k, on)| k != Kind::Roomcast && on)
            .map(|&(k, _)| (k, cpu(k, true)))
            .filter(|(_, v)| v.is_finite())
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((peer, theirs)) = best {
            let _ = writeln!(
                out,
                "| fewer CPU µs per delivery than every peer with compression on, {name} | {} µs | {} µs ({}) | {} ({}) |",
                num(ours, 3),
                num(theirs, 3),
                peer.label(),
                verdict(ours < theirs),
                ratio(ours, theirs)
            );
        }
    }
    out
}

/// Every reload-latency sample of all runs, ms.
fn pooled(results: &Results, samples: fn(&ReloadResult) -> &Vec<f64>) -> Vec<f64> {
    results.reload_latency.iter().flat_map(|r| samples(r).iter().copied()).collect()
}

/// The realistic plugin replaced during a paced fan-out through it: how long each
/// version took to go live, and what the reloads cost the live traffic.
fn reload_latency(results: &Results) -> String {
    let mut out = String::new();
    let Some(p) = results.sizes.as_ref().and_then(|s| s.reload_latency.as_ref()) else {
        return out;
    };
    if results.reload_latency.is_empty() {
        return out;
    }
    let rate = p.fanout.pace.rate();
    let kb = results.reload_latency[0].plugin_bytes as f64 / 1000.0;
    let _ = writeln!(
        out,
        "\n### Reload latency (Roomcast, `{}.wasm` of {} KB replaced every {} s during a paced fan-out of {} deliveries/s through it to {} clients)\n\n\
         *Live after*: from the rename to `GET /admin/rooms` showing the room on the new version \
         (polled every 2 ms). *Compile* and *load* (compile, link, `init`) as the server reports \
         them in `/admin/plugins`; *optimised after*: from the rename to new instances getting \
         Cranelift's code, for versions that went live on Winch's. The same fan-out runs first \
         without replacements, on the same server.\n\n\
         | run | reloads | seen live | live after p50 / p99 / max, ms | compile p50 / max, ms | load p50 / max, ms | optimised after p50 / max, ms | traffic p99 without → with reloads, µs | lost / duplicated |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|",
        p.plugin,
        num(kb, 0),
        p.every.as_secs_f64(),
        num(rate, 0),
        p.fanout.clients
    );
    let three = |ms: &[f64]| match Spread::of(ms) {
        Some(s) => format!("{} / {} / {}", num(s.p50, 0), num(s.p99, 0), num(s.max, 0)),
        None => "–".into(),
    };
    let two = |ms: &[f64]| match Spread::of(ms) {
        Some(s) => format!("{} / {}", num(s.p50, 0), num(s.max, 0)),
        None => "–".into(),
    };
    for (i, r) in results.reload_latency.iter().enumerate() {
        let without = r.baseline.as_ref().map_or("–".into(), |b| num(b.latency.p99_us, 0));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {without} → {} | {} / {} |",
            i + 1,
            r.replacements,
            r.live_ms.len(),
            three(&r.live_ms),
            two(&r.compile_ms),
            two(&r.load_ms),
            two(&r.optimized_ms),
            num(r.fanout.latency.p99_us, 0),
            r.fanout.lost + r.baseline.as_ref().map_or(0, |b| b.lost),
            r.fanout.duplicates + r.baseline.as_ref().map_or(0, |b| b.duplicates),
        );
    }
    let _ = writeln!(
        out,
        "| all | {} | {} | {} | {} | {} | {} | | |",
        results.reload_latency.iter().map(|r| r.replacements).sum::<u64>(),
        pooled(results, |r| &r.live_ms).len(),
        three(&pooled(results, |r| &r.live_ms)),
        two(&pooled(results, |r| &r.compile_ms)),
        two(&pooled(results, |r| &r.load_ms)),
        two(&pooled(results, |r| &r.optimized_ms)),
    );
    out
}

/// `median (min–max)` of some values, with `d` decimals; just the value for one run.
fn spread(values: &[f64], d: usize) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (Some(min), Some(max)) =
        (finite.iter().copied().reduce(f64::min), finite.iter().copied().reduce(f64::max))
    else {
        return "–".into();
    };
    let mid = num(median(finite.iter().copied()), d);
    if finite.len() == 1 { mid } else { format!("{mid} ({}–{})", num(min, d), num(max, d)) }
}

/// Roomcast's room protocol: memory per membership, a fan-out against raw mode, and
/// the join/leave rate (medians, with the spread over runs).
fn room_protocol(results: &Results) -> String {
    let mut out = String::new();
    let Some(sizes) = &results.sizes else {
        return out;
    };
    if results.memberships.is_empty()
        && results.room_protocol.is_empty()
        && results.join_leave.is_empty()
        && results.recovery.is_empty()
    {
        return out;
    }
    let _ = writeln!(
        out,
        "\n### One connection, many rooms (Roomcast, room protocol `roomcast.v1`)\n\n\
         Median of the runs (lowest–highest in brackets).\n"
    );
    if let Some(p) = sizes.memberships.as_ref().filter(|_| !results.memberships.is_empty()) {
        let runs = &results.memberships;
        let col = |f: fn(&crate::suite::MembershipRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let members = p.connections * p.rooms_per_connection / p.rooms.max(1);
        let _ = writeln!(
            out,
            "| **Memory**: {} connections, heartbeat on, server RSS growth | KiB |\n|---|---:|",
            p.connections
        );
        row(
            &mut out,
            &format!("raw `/ws/{{room}}`, one room each ({} rooms), per connection", p.rooms),
            [spread(&col(|r| r.raw.kib_per_connection), 2)],
        );
        row(
            &mut out,
            "room protocol on `/ws`, in 1 room, per connection",
            [spread(&col(|r| r.protocol.kib_per_connection_one_room), 2)],
        );
        row(
            &mut out,
            &format!(
                "room protocol, in {} rooms ({} rooms of {members} members), per connection",
                p.rooms_per_connection, p.rooms
            ),
            [spread(&col(|r| r.protocol.kib_per_connection_all_rooms), 2)],
        );
        row(
            &mut out,
            "**per membership past the first**",
            [spread(&col(|r| r.protocol.kib_per_extra_membership), 3)],
        );
        let errors: u64 = runs.iter().map(|r| r.protocol.join_errors).sum();
        let dropped: u64 = runs.iter().map(|r| r.protocol.dropped_by_server + r.raw.dropped_by_server).sum();
        row(&mut out, "joins refused / connections dropped (all runs)", [format!("{errors} / {dropped}")]);
        out.push('\n');
    }
    if !results.room_protocol.is_empty() {
        let f = &sizes.fanout;
        let rate = sizes.base_paced().pace.rate();
        let pick = |protocol: bool, paced: bool, clients: usize, g: fn(&FanoutResult) -> f64| -> Vec<f64> {
            results
                .room_protocol
                .iter()
                // Runs from before the member count was recorded were the large room.
                .filter(|r| r.protocol == protocol && r.paced == paced)
                .filter(|r| r.clients == clients || (r.clients == 0 && clients == f.clients))
                .map(|r| g(&r.result))
                .collect()
        };
        let _ = writeln!(
            out,
            "| **Fan-out**, raw against room protocol, one server | raw | room protocol | protocol ÷ raw |\n\
             |---|---:|---:|---:|"
        );
        let mut line = |name: String, paced: bool, clients: usize, g: fn(&FanoutResult) -> f64, d: usize| {
            let (raw, rp) = (pick(false, paced, clients, g), pick(true, paced, clients, g));
            if raw.is_empty() && rp.is_empty() {
                return;
            }
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                spread(&raw, d),
                spread(&rp, d),
                // Noise is not compared.
                if name.ends_with("(noise)") {
                    String::new()
                } else {
                    ratio(median(rp.iter().copied()), median(raw.iter().copied()))
                }
            );
        };
        let saturated = format!("saturated, {} members, {} senders, {} B text", f.clients, f.senders, f.size);
        line(
            format!("{saturated}: server CPU µs per delivery"),
            false,
            f.clients,
            |r| r.cpu_us_per_delivery,
            3,
        );
        line(format!("{saturated}: deliveries/s"), false, f.clients, |r| r.deliveries_per_sec, 0);
        let p = sizes.base_paced();
        let paced = format!("paced, {} deliveries/s to {} members", num(rate, 0), p.clients);
        line(format!("{paced}: server CPU µs per delivery"), true, p.clients, |r| r.cpu_us_per_delivery, 3);
        line(format!("{paced}: latency p99, µs"), true, p.clients, |r| r.latency.p99_us, 0);
        let small = &sizes.small_room;
        let small_room =
            format!("saturated, {} members, {} senders, {} B text", small.clients, small.senders, small.size);
        line(
            format!("{small_room}: server CPU µs per delivery"),
            false,
            small.clients,
            |r| r.cpu_us_per_delivery,
            3,
        );
        line(format!("{small_room}: deliveries/s"), false, small.clients, |r| r.deliveries_per_sec, 0);
        line(
            format!("{saturated}: other programs' CPU during the phase, s (noise)"),
            false,
            f.clients,
            |r| r.other_cpu_s,
            2,
        );
        line(
            format!("{paced}: other programs' CPU during the phase, s (noise)"),
            true,
            p.clients,
            |r| r.other_cpu_s,
            2,
        );
        let lost = |protocol: bool| {
            let runs = results.room_protocol.iter().filter(|r| r.protocol == protocol);
            let (l, d) = runs.fold((0, 0), |(l, d), r| (l + r.result.lost, d + r.result.duplicates));
            format!("{l} / {d}")
        };
        let _ = writeln!(out, "| lost / duplicated (all runs) | {} | {} | |", lost(false), lost(true));
        out.push('\n');
    }
    if let Some(p) = sizes.join_leave.as_ref().filter(|_| !results.join_leave.is_empty()) {
        let runs = &results.join_leave;
        let col = |f: fn(&crate::rooms::JoinLeaveResult) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let _ = writeln!(
            out,
            "| **Join/leave**: {} connections, each in a home room, join and leave the other {} rooms \
             for {} s, one operation in flight each | |\n|---|---:|",
            p.connections,
            p.rooms.saturating_sub(1),
            p.duration.as_secs()
        );
        row(&mut out, "joins + leaves per second", [spread(&col(|r| r.operations_per_sec), 0)]);
        row(&mut out, "server CPU µs per join or leave", [spread(&col(|r| r.cpu_us_per_operation), 2)]);
        row(&mut out, "reply latency p50, µs", [spread(&col(|r| r.latency.p50_us), 0)]);
        row(&mut out, "reply latency p99, µs", [spread(&col(|r| r.latency.p99_us), 0)]);
        row(
            &mut out,
            "load generator CPU, share of the phase (near 1: it was the limit)",
            [spread(&col(|r| r.client_cpu_s / r.elapsed_s), 2)],
        );
        row(&mut out, "refused (all runs)", [runs.iter().map(|r| r.errors).sum::<u64>().to_string()]);
    }
    if let Some(p) = sizes.recovery.as_ref().filter(|_| !results.recovery.is_empty()) {
        let runs = &results.recovery;
        let col = |f: fn(&crate::recovery::RecoveryResult) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let _ = writeln!(
            out,
            "\n| **Mass reconnect**: {} clients in one room drop their connections at once (TCP reset) \
             while {} messages/s of {} B go on; after {} messages they all come back at once and join \
             with `since` (history {}, {} handshakes in flight); {} watchers stay connected | |\n|---|---:|",
            p.clients,
            p.messages_per_sec,
            p.size,
            p.missed,
            crate::suite::RECOVERY_HISTORY,
            p.concurrency,
            p.watchers
        );
        row(&mut out, "until every client recovered, s", [spread(&col(|r| r.all_recovered_s), 2)]);
        row(
            &mut out,
            "per client, from the reconnect: p50, ms",
            [spread(&col(|r| r.recovery.p50_us / 1e3), 0)],
        );
        row(&mut out, "p99, ms", [spread(&col(|r| r.recovery.p99_us / 1e3), 0)]);
        row(
            &mut out,
            "per client, from its join: p99, ms",
            [spread(&col(|r| r.join_to_recovered.p99_us / 1e3), 0)],
        );
        row(
            &mut out,
            "watchers' live latency p99 before, ms",
            [spread(&col(|r| r.live_before.p99_us / 1e3), 1)],
        );
        row(&mut out, "during the storm, ms", [spread(&col(|r| r.live_storm.p99_us / 1e3), 1)]);
        row(&mut out, "server CPU share before", [spread(&col(|r| r.server_cpu_before), 2)]);
        row(&mut out, "during the storm", [spread(&col(|r| r.server_cpu_storm), 2)]);
        let sum = |f: fn(&crate::recovery::RecoveryResult) -> u64| runs.iter().map(f).sum::<u64>();
        row(
            &mut out,
            "not recovered / unfinished / gaps / duplicates (all runs)",
            [format!(
                "{} / {} / {} / {}",
                sum(|r| r.not_recovered),
                sum(|r| r.unfinished),
                sum(|r| r.gaps + r.watcher_gaps),
                sum(|r| r.duplicates + r.watcher_duplicates)
            )],
        );
    }
    out
}

/// fastwebsockets' connection rate as measured on this machine with 200 handshakes in
/// flight: the target's reference until fastwebsockets runs in the suite itself.
const FASTWEBSOCKETS_RATE: f64 = 26_000.0;

/// Issue 5's targets (and later ones), met or not, from the medians.
fn targets(results: &Results, m: &[Medians]) -> String {
    let mut out = String::new();
    let servers = &results.servers;
    let Some(rc) = servers.iter().position(|&k| k == Kind::Roomcast) else {
        return out;
    };
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let _ = writeln!(
        out,
        "\n### Targets (issue 5)\n\n| target | Roomcast | reference | verdict |\n|---|---:|---:|---|"
    );
    let best_peer = (0..servers.len())
        .filter(|&i| i != rc && !servers[i].is_reference() && m[i].cpu_us_per_delivery.is_finite())
        .min_by(|&a, &b| m[a].cpu_us_per_delivery.total_cmp(&m[b].cpu_us_per_delivery));
    if let Some(best) = best_peer {
        let (ours, theirs) = (m[rc].cpu_us_per_delivery, m[best].cpu_us_per_delivery);
        let _ = writeln!(
            out,
            "| CPU per delivery, saturated fan-out ≤ best peer | {} µs | {} µs ({}) | {} ({}) |",
            num(ours, 3),
            num(theirs, 3),
            servers[best].label(),
            verdict(ours <= theirs),
            ratio(ours, theirs)
        );
    }
    if let Some(uws) = servers.iter().position(|&k| k == Kind::Uws) {
        let (ours, theirs) = (m[rc].paced_p99_us, m[uws].paced_p99_us);
        let _ = writeln!(
            out,
            "| broadcast p99, paced, ≤ uWebSockets | {} µs | {} µs | {} ({}) |",
            num(ours, 0),
            num(theirs, 0),
            verdict(ours <= theirs),
            ratio(ours, theirs)
        );
    }
    let _ = writeln!(
        out,
        "| RSS per idle connection ≤ 4 KiB at 19,000 | {} KiB at {} | 4 KiB at 19000 | {} |",
        num(m[rc].idle_kib_per_conn, 2),
        num(m[rc].idle_opened, 0),
        if m[rc].idle_opened < 19_000.0 {
            format!("{} at this size", verdict(m[rc].idle_kib_per_conn <= 4.0))
        } else {
            verdict(m[rc].idle_kib_per_conn <= 4.0).to_owned()
        }
    );
    if !results.connect_rate.is_empty() {
        // fastwebsockets' rate measured here once; its own runs, when it is a server of this
        // run, are the reference instead.
        let fast = servers.iter().position(|&k| k == Kind::Fastwebsockets);
        let (reference, source) = match fast {
            Some(i) if m[i].rate_per_sec.is_finite() => (m[i].rate_per_sec, "fastwebsockets, this run"),
            _ => (FASTWEBSOCKETS_RATE, "fastwebsockets, measured earlier"),
        };
        let overflows: u64 = results
            .connect_rate
            .iter()
            .filter(|(k, _)| *k == Kind::Roomcast)
            .map(|(_, r)| r.listen_overflows + r.listen_drops)
            .sum();
        let ours = m[rc].rate_per_sec;
        let _ = writeln!(
            out,
            "| connection rate (connect, upgrade, first message) ≥ fastwebsockets, no listen-queue \
             overflow | {}/s, {overflows} overflows + drops | {}/s ({source}) | {} ({}) |",
            num(ours, 0),
            num(reference, 0),
            verdict(ours >= reference && overflows == 0),
            ratio(ours, reference)
        );
    }
    if let Some(sizes) = results.sizes.as_ref().filter(|_| !results.plugins.is_empty()) {
        for params in [&sizes.fanout, &sizes.small_room] {
            let n = params.clients;
            let pct = plugin_med(results, "relay", params, |r| r.deliveries_per_sec)
                / plugin_med(results, "none", params, |r| r.deliveries_per_sec)
                * 100.0;
            let cpu = plugin_med(results, "none", params, |r| r.cpu_us_per_delivery)
                / plugin_med(results, "relay", params, |r| r.cpu_us_per_delivery)
                * 100.0;
            let _ = writeln!(
                out,
                "| plugin pass-through ≥ 90% of no-plugin throughput ({n} members) | {}% (by CPU per \
                 delivery: {}%) | 90% | {} |",
                num(pct, 1),
                num(cpu, 1),
                verdict(pct >= 90.0 && cpu >= 90.0)
            );
        }
    }
    out
}

/// The rate issue 16's tail-latency targets are set at.
const TAIL_RATE: f64 = 200_000.0;

/// The sizes of the full run: issue 16's targets are set at its idle sizes and paced
/// rates, and a run without them (a quick one) shows them as not measured.
fn full_sizes() -> Sizes {
    Sizes::new(false, None)
}

/// `targets` and the values of this run not among them, sorted, each with whether it is
/// one of the targets.
fn with_targets(targets: Vec<f64>, this_run: Vec<f64>) -> Vec<(f64, bool)> {
    let mut all: Vec<(f64, bool)> = targets.iter().map(|&v| (v, true)).collect();
    all.extend(this_run.into_iter().filter(|v| !targets.contains(v)).map(|v| (v, false)));
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all
}

/// `12.3 µs`, or "not measured".
fn measured(v: f64, d: usize, unit: &str) -> String {
    if v.is_finite() { format!("{} {unit}", num(v, d)).trim_end().to_owned() } else { "not measured".into() }
}

/// A target's verdict: met, not met, or not measured (no data).
fn verdict_16(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// One row of issue 16's table: Roomcast's value against a named reference, lower (or
/// higher) is better; "not measured" when either is missing.
struct Compare<'a> {
    name: String,
    ours: f64,
    /// The reference's value and who it is.
    reference: (f64, &'a str),
    unit: &'a str,
    decimals: usize,
    /// The verdict when both were measured.
    ok: fn(f64, f64) -> bool,
}

impl Compare<'_> {
    fn write(&self, out: &mut String) {
        let (theirs, who) = self.reference;
        let reference = if theirs.is_finite() {
            format!("{} ({who})", measured(theirs, self.decimals, self.unit))
        } else {
            format!("not measured ({who})")
        };
        let ok = (self.ours.is_finite() && theirs.is_finite()).then(|| (self.ok)(self.ours, theirs));
        let _ = writeln!(
            out,
            "| {} | {} | {reference} | {} | {} |",
            self.name,
            measured(self.ours, self.decimals, self.unit),
            ratio(self.ours, theirs),
            verdict_16(ok)
        );
    }
}

/// Issue 16's targets, met or not, from the medians of this run; each reference is the
/// best peer of the same run unless the target names one. A server or scenario that did
/// not run leaves its rows "not measured".
fn targets_16(results: &Results) -> String {
    let mut out = String::new();
    let servers = &results.servers;
    let Some(sizes) = results.sizes.as_ref().filter(|_| servers.contains(&Kind::Roomcast)) else {
        return out;
    };
    let _ = writeln!(
        out,
        "\n### Targets (issue 16)\n\n\
         | target | Roomcast | reference | ratio | verdict |\n|---|---:|---:|---:|---|"
    );
    let peers: Vec<Kind> =
        servers.iter().copied().filter(|&k| k != Kind::Roomcast && !k.is_reference()).collect();
    // The best peer by `f` (the lowest, or the highest when `higher`), with its name.
    let best = |f: &dyn Fn(Kind) -> f64, higher: bool| -> (f64, &'static str) {
        peers
            .iter()
            .map(|&k| (f(k), k.label()))
            .filter(|(v, _)| v.is_finite())
            .min_by(|a, b| if higher { b.0.total_cmp(&a.0) } else { a.0.total_cmp(&b.0) })
            .unwrap_or((f64::NAN, "best peer"))
    };
    let below = |a: f64, b: f64| a < b;

    // Memory per idle connection, against uWebSockets.js at the same size.
    let full = full_sizes();
    let idle = with_targets(
        full.idle.iter().map(|p| p.connections as f64).collect(),
        idle_sizes(results).into_iter().map(|n| n as f64).collect(),
    );
    for (n, target) in idle {
        let n = n as usize;
        let rss = |k: Kind| idle_med(results, k, n, |r| r.rss_per_conn_kib);
        let uws = if servers.contains(&Kind::Uws) { rss(Kind::Uws) } else { f64::NAN };
        let size = if target { "" } else { " (this run's size)" };
        Compare {
            name: format!(
                "RSS per idle connection below uWebSockets.js', {} connections{size}",
                thousands(n as f64)
            ),
            ours: rss(Kind::Roomcast),
            reference: (uws, Kind::Uws.label()),
            unit: "KiB",
            decimals: 2,
            ok: below,
        }
        .write(&mut out);
    }

    // CPU per delivery, saturated and at every paced rate.
    let saturated = |k: Kind| med(&results.fanout, k, |r| r.cpu_us_per_delivery);
    Compare {
        name: "CPU per delivery below every peer's, saturated fan-out".into(),
        ours: saturated(Kind::Roomcast),
        reference: best(&saturated, false),
        unit: "µs",
        decimals: 3,
        ok: below,
    }
    .write(&mut out);
    // Roomcast not run at a rate because it fell behind at a lower one has not met it.
    let skipped = |rate: f64| {
        paced_runs(results, Kind::Roomcast, rate).next().is_none()
            && results.paced_skipped.iter().any(|s| s.kind == Kind::Roomcast && s.deliveries_per_sec == rate)
    };
    let skipped_row = |out: &mut String, name: String| {
        let _ = writeln!(out, "| {name} | skipped: fell behind at a lower rate | | – | **not met** |");
    };
    let rates = with_targets(full.paced.iter().map(|p| p.pace.rate()).collect(), paced_rates(results));
    for (rate, target) in rates {
        let name = format!(
            "CPU per delivery below every peer's, paced {} deliveries/s{}",
            thousands(rate),
            if target { "" } else { " (this run's rate)" }
        );
        if skipped(rate) {
            skipped_row(&mut out, name);
            continue;
        }
        let cpu = |k: Kind| paced_med(results, k, rate, |r| r.cpu_us_per_delivery);
        Compare {
            name,
            ours: cpu(Kind::Roomcast),
            reference: best(&cpu, false),
            unit: "µs",
            decimals: 3,
            ok: below,
        }
        .write(&mut out);
    }

    // Tail latency at 200,000 deliveries/s.
    for (what, f) in [
        ("p99", (|r: &FanoutResult| r.latency.p99_us) as fn(&FanoutResult) -> f64),
        ("max", |r: &FanoutResult| r.latency.max_us),
    ] {
        let name = format!("latency {what} below every peer's, paced {} deliveries/s", thousands(TAIL_RATE));
        if skipped(TAIL_RATE) {
            skipped_row(&mut out, name);
            continue;
        }
        let tail = |k: Kind| paced_med(results, k, TAIL_RATE, f);
        Compare {
            name,
            ours: tail(Kind::Roomcast),
            reference: best(&tail, false),
            unit: "µs",
            decimals: 0,
            ok: below,
        }
        .write(&mut out);
    }

    // Connection rate, and no listen-queue overflow.
    {
        let rate = |k: Kind| med(&results.connect_rate, k, |r| r.connections_per_sec);
        let fast =
            if servers.contains(&Kind::Fastwebsockets) { rate(Kind::Fastwebsockets) } else { f64::NAN };
        let (theirs, who) = match best(&rate, true) {
            _ if fast.is_finite() => (fast, Kind::Fastwebsockets.label()),
            (v, who) if v.is_finite() => (v, who),
            _ => (f64::NAN, Kind::Fastwebsockets.label()),
        };
        let ours = rate(Kind::Roomcast);
        let overflows: u64 = results
            .connect_rate
            .iter()
            .filter(|(k, _)| *k == Kind::Roomcast)
            .map(|(_, r)| r.listen_overflows)
            .sum();
        let reference = if theirs.is_finite() {
            format!("{}/s ({who}); 0 overflows", thousands(theirs))
        } else {
            format!("not measured ({who})")
        };
        let ok = (ours.is_finite() && theirs.is_finite()).then_some(ours >= theirs && overflows == 0);
        let _ = writeln!(
            out,
            "| connections/s at least fastwebsockets', and 0 listen-queue overflows | {} | {reference} | {} | {} |",
            if ours.is_finite() {
                format!("{}/s, {overflows} overflows", thousands(ours))
            } else {
                "not measured".into()
            },
            ratio(ours, theirs),
            verdict_16(ok)
        );
    }

    // Reload of a realistic plugin.
    let plugin = sizes.reload_latency.as_ref().map_or("lobby", |p| &p.plugin);
    match Spread::of(&pooled(results, |r| &r.live_ms)) {
        Some(live) => {
            let r = &results.reload_latency[0];
            let unseen: u64 = results.reload_latency.iter().map(|r| r.unseen).sum();
            let _ = writeln!(
                out,
                "| reload of a realistic plugin (`{plugin}`, {} KB, serde_json) live in p99 < 200 ms | {} ms \
                 ({} reloads{}) | 200 ms | {} | {} |",
                num(r.plugin_bytes as f64 / 1000.0, 0),
                num(live.p99, 0),
                pooled(results, |r| &r.live_ms).len(),
                if unseen > 0 { format!(", {unseen} not live within 0.9 s") } else { String::new() },
                ratio(live.p99, 200.0),
                verdict_16(Some(live.p99 < 200.0 && unseen == 0))
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| reload of a realistic plugin (`{plugin}`, serde_json) live in p99 < 200 ms | not measured | \
                 200 ms | – | not measured |"
            );
        }
    }

    // Plugins: relay against no plugin, in every shape.
    for params in sizes.plugin_shapes() {
        let tp = |plugin| plugin_med(results, plugin, params, |r| r.deliveries_per_sec);
        let cpu = |plugin| plugin_med(results, plugin, params, |r| r.cpu_us_per_delivery);
        let (tp_ratio, cpu_ratio) = (tp("relay") / tp("none"), cpu("relay") / cpu("none"));
        let ok =
            (tp_ratio.is_finite() && cpu_ratio.is_finite()).then_some(tp_ratio >= 0.97 && cpu_ratio <= 1.03);
        let _ = writeln!(
            out,
            "| relay ≥ 97% of no plugin's throughput and ≤ 1.03× its CPU per delivery, {} | {} | {} | {} | {} |",
            plugin_shape(params),
            if ok.is_some() {
                format!("{}%, {} µs", num(tp_ratio * 100.0, 1), num(cpu("relay"), 3))
            } else {
                "not measured".into()
            },
            if ok.is_some() {
                format!("{} deliveries/s, {} µs (no plugin)", thousands(tp("none")), num(cpu("none"), 3))
            } else {
                "not measured (no plugin)".into()
            },
            if ok.is_some() {
                format!("{} / {}", ratio(tp_ratio, 1.0), ratio(cpu_ratio, 1.0))
            } else {
                "–".into()
            },
            verdict_16(ok)
        );
    }
    out
}

fn machine(results: &Results) -> String {
    let m = &results.machine;
    format!(
        "| | |\n|---|---|\n| date | {} |\n| commit | `{}` (binary sha256 `{}`) |\n| CPUs (nproc) | {} × {} |\n| memory | {:.1} GiB |\n\
         | kernel | {} |\n| pinning | servers on CPU {}, load generator on CPU {} (`taskset`), both at nice {} |\n\
         | Rust | {} |\n| Node | {} |\n| uWebSockets.js | npm `uwebsockets@{}`, integrity `{}` |\n\
         | Node ws | `ws@{}` |\n| tokio-tungstenite | 0.30 (bench/src/bin/tungstenite-peer.rs, 4 KiB read buffer) |\n\
         | fastwebsockets | 0.10 (bench/src/bin/fastwebsockets-peer.rs, upgrade through hyper 1, split halves) |\n\
         {}| load average before → after | {} → {} |\n",
        m.date,
        m.commit,
        m.roomcast_sha256.get(..16).unwrap_or("?"),
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.server_cpu,
        m.loadgen_cpus,
        m.nice,
        m.rustc,
        m.node,
        m.uws_version,
        m.uws_integrity,
        m.ws_version,
        if results.servers.contains(&Kind::Floor) {
            "| floor (reference) | bench/src/bin/floor-peer.rs (one mio epoll loop, one write per member per \
             iteration, no heartbeat) |\n"
        } else {
            ""
        },
        m.load_before,
        m.load_after
    )
}

/// The dated results file: tables, settings, every run.
pub fn results_md(results: &Results, chart: Option<&str>) -> String {
    let mut out = format!(
        "# Roomcast benchmark, {}{}\n\n",
        results.machine.date,
        if results.quick { " (quick smoke run: small sizes, not for comparison)" } else { "" }
    );
    out.push_str(&machine(results));
    out.push('\n');
    if let Some(chart) = chart {
        let _ = writeln!(out, "![CPU per delivery, latency, memory per connection]({chart})\n");
    }
    out.push_str(&tables(results));
    if !results.errors.is_empty() {
        out.push_str("\n### Failed runs\n\n");
        for e in &results.errors {
            let _ = writeln!(out, "- {e}");
        }
    }
    out.push_str("\n### Every run\n\n| server | scenario | deliveries/s | server CPU µs/delivery | load generator CPU s | other CPU s | p50 µs | p99 µs | max µs | lost | dup | closed |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut fan = |kind: &str, scenario: &str, r: &FanoutResult| {
        let _ = writeln!(
            out,
            "| {kind} | {scenario} | {:.0} | {:.3} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            r.deliveries_per_sec,
            r.cpu_us_per_delivery,
            r.client_cpu_s,
            r.other_cpu_s,
            r.latency.p50_us,
            r.latency.p99_us,
            r.latency.max_us,
            if r.timed_out { format!("{} (time limit)", r.lost) } else { r.lost.to_string() },
            r.duplicates,
            r.closed_by_server
        );
    };
    for (k, r) in &results.fanout {
        fan(k.label(), "saturated", r);
    }
    let first = paced_rates(results).first().copied().unwrap_or(f64::NAN);
    for (k, r) in &results.paced {
        fan(k.label(), &format!("paced {}/s", thousands(paced_rate_of(r, first))), r);
    }
    for (k, r) in &results.contended {
        let rate = r.pace.map_or(f64::NAN, Pace::rate);
        fan(k.label(), &format!("contended core, {}/s", thousands(rate)), r);
    }
    for p in &results.plugins {
        let window = if p.window > 0 { format!(", {} in flight", p.window) } else { String::new() };
        fan("Roomcast", &format!("{} members{window}, plugin {}", p.clients, p.plugin), &p.result);
    }
    for r in &results.reload {
        fan("Roomcast", "reload", &r.fanout);
    }
    for r in &results.reload_latency {
        if let Some(b) = &r.baseline {
            fan("Roomcast", "reload latency, no reloads", b);
        }
        fan("Roomcast", "reload latency, reloading", &r.fanout);
    }
    for (k, r) in &results.churn {
        fan(k.label(), "churn broadcast", &r.broadcast);
    }
    for r in &results.room_protocol {
        let mode = if r.protocol { "room protocol" } else { "raw" };
        let pace = if r.paced { "paced" } else { "saturated" };
        fan("Roomcast", &format!("{mode}, {pace}, {} members", r.clients), &r.result);
    }
    out.push_str("\n| server | idle connections | failed | dropped | pings answered | RSS before KiB | RSS after KiB | KiB per connection | connect s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (k, r) in &results.idle {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} |",
            k.label(),
            r.opened,
            r.failed,
            r.dropped_by_server,
            r.pings_answered,
            r.rss_before_kib,
            r.rss_after_kib,
            r.rss_per_conn_kib,
            r.connect_s
        );
    }
    out.push_str("\n| server | churn connects | failed | connects/s | fds before | fds after | RSS before KiB | RSS after KiB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (k, r) in &results.churn {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            k.label(),
            r.connects,
            r.failed,
            r.connects_per_sec,
            r.fds_before,
            r.fds_after,
            r.rss_before_kib,
            r.rss_after_kib
        );
    }
    if !results.connect_rate.is_empty() {
        out.push_str(
            "\n| server | in flight | connections | per second | p50 / p99 / max µs | upgrade p50 / p99 µs | \
             server CPU µs each | failed connect / upgrade / message | close timeouts | listeners lost | \
             listen overflows / drops | load generator CPU s | other CPU s | server fds before → after |\n\
             |---|---:|---:|---:|---|---|---:|---|---:|---:|---|---:|---:|---|\n",
        );
        for (k, r) in &results.connect_rate {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {} / {} / {} | {} | {} | \
                 {} / {} | {:.2} of {:.2} | {:.2} | {} → {} |",
                k.label(),
                r.in_flight,
                r.connections,
                r.connections_per_sec,
                r.latency.p50_us,
                r.latency.p99_us,
                r.latency.max_us,
                r.upgrade.p50_us,
                r.upgrade.p99_us,
                r.cpu_us_per_connection,
                r.connect_errors,
                r.upgrade_errors,
                r.message_errors,
                r.close_timeouts,
                r.listeners_lost,
                r.listen_overflows,
                r.listen_drops,
                r.client_cpu_s,
                r.elapsed_s,
                r.other_cpu_s,
                r.fds_before,
                r.fds_after
            );
        }
        let samples: Vec<String> = results
            .connect_rate
            .iter()
            .flat_map(|(k, r)| r.error_samples.iter().map(move |e| format!("{}: {e}", k.label())))
            .collect();
        if !samples.is_empty() {
            out.push_str("\nConnection-rate errors (samples):\n\n");
            for e in samples.iter().take(20) {
                let _ = writeln!(out, "- {e}");
            }
        }
    }
    if !results.compression.is_empty() {
        out.push_str(
            "\n| server | compression | scenario | deliveries/s | server CPU µs/delivery | wire B/delivery | \
             inflated B/delivery | compressed | load generator CPU s | other CPU s | p50 µs | p99 µs | max µs | \
             lost | dup | not inflated |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &results.compression {
            let f = &r.result;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.3} | {:.1} | {:.1} | {}/{} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                r.kind.label(),
                if r.compression { "on" } else { "off" },
                if r.paced { "paced" } else { "saturated" },
                f.deliveries_per_sec,
                f.cpu_us_per_delivery,
                f.wire_bytes_per_delivery,
                f.payload_bytes_per_delivery,
                f.compressed_frames,
                f.data_frames,
                f.client_cpu_s,
                f.other_cpu_s,
                f.latency.p50_us,
                f.latency.p99_us,
                f.latency.max_us,
                if f.timed_out { format!("{} (time limit)", f.lost) } else { f.lost.to_string() },
                f.duplicates,
                f.inflate_errors
            );
        }
    }
    if !results.memberships.is_empty() {
        out.push_str(
            "\n| run | connections | raw KiB each | protocol RSS start → 1 room → all rooms, KiB | \
             KiB per connection in 1 room | in all rooms | per extra membership | joins | refused | \
             pings answered | later joins s |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (i, r) in results.memberships.iter().enumerate() {
            let p = &r.protocol;
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {} → {} → {} | {:.2} | {:.2} | {:.3} | {} | {} | {} | {:.2} |",
                i + 1,
                p.opened,
                r.raw.kib_per_connection,
                p.rss_start_kib,
                p.rss_one_room_kib,
                p.rss_all_rooms_kib,
                p.kib_per_connection_one_room,
                p.kib_per_connection_all_rooms,
                p.kib_per_extra_membership,
                p.joined,
                p.join_errors,
                p.pings_answered + r.raw.pings_answered,
                p.later_joins_s
            );
        }
    }
    if !results.join_leave.is_empty() {
        out.push_str(
            "\n| run | connections | rooms | joins + leaves | refused | per second | server CPU µs each | \
             p50 µs | p99 µs | load generator CPU s | other CPU s |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (i, r) in results.join_leave.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} |",
                i + 1,
                r.connections,
                r.rooms,
                r.operations,
                r.errors,
                r.operations_per_sec,
                r.cpu_us_per_operation,
                r.latency.p50_us,
                r.latency.p99_us,
                r.client_cpu_s,
                r.other_cpu_s
            );
        }
    }
    if !results.recovery.is_empty() {
        out.push_str(
            "\n| run | clients | behind | recovered | not | unfinished | gaps | duplicates | all recovered s | \
             p50 / p99 / max ms | from join p99 ms | live p99 before / storm ms | server CPU before / storm | \
             load generator CPU storm s | other CPU storm s |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|\n",
        );
        for (i, r) in results.recovery.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {}–{} | {} | {} | {} | {} | {} | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} | \
                 {:.1} / {:.1} | {:.2} / {:.2} | {:.2} | {:.2} |",
                i + 1,
                r.clients,
                r.behind_min,
                r.behind_max,
                r.recovered,
                r.not_recovered,
                r.unfinished,
                r.gaps + r.watcher_gaps,
                r.duplicates + r.watcher_duplicates,
                r.all_recovered_s,
                r.recovery.p50_us / 1e3,
                r.recovery.p99_us / 1e3,
                r.recovery.max_us / 1e3,
                r.join_to_recovered.p99_us / 1e3,
                r.live_before.p99_us / 1e3,
                r.live_storm.p99_us / 1e3,
                r.server_cpu_before,
                r.server_cpu_storm,
                r.client_cpu_storm_s,
                r.other_cpu_storm_s
            );
        }
    }
    let _ = writeln!(
        out,
        "\nWhole run: {:.0} s, of which {:.0} s waiting for other programs to quiet down; {} run(s) \
         started while the machine was still busy. Raw numbers: the `.json` file beside this one.",
        results.duration_s, results.quiet_wait_s, results.busy_starts
    );
    out
}

/// `BENCHMARKS.md`: the latest tables, the machine, how to reproduce.
pub fn benchmarks_md(results: &Results, results_file: &str, chart: Option<&str>) -> String {
    let mut out = String::from(
        "# Benchmarks\n\n\
         Roomcast against the servers people would pick instead, on one machine, with one load\n\
         generator, in one script run. This file is rewritten by `bench/run`; every run also\n\
         leaves a dated report with every individual run under `bench/results/`.\n\n",
    );
    let _ = writeln!(out, "Latest: [{results_file}]({results_file}), {}.\n", results.machine.date);
    if let Some(chart) = chart {
        let _ = writeln!(out, "![CPU per delivery, latency, memory per connection]({chart})\n");
    }
    out.push_str("## Latest results\n\n");
    out.push_str(&tables(results));
    out.push_str("\n## Machine\n\n");
    out.push_str(&machine(results));
    // Kept beside the suite: the scenarios run on their own (`--rooms-only`,
    // `--compression-only`, by hand), whose reports a full run does not rewrite, and
    // what the suite cannot measure itself (several nodes).
    for kept in ["separate-runs.md", "cluster.md"] {
        if let Ok(text) = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(kept)) {
            out.push('\n');
            out.push_str(&text);
        }
    }
    out.push_str(
        "\n## How to reproduce\n\n\
         ```sh\n\
         bench/run              # everything, about 45 minutes on 2 cores (plus the build)\n\
         bench/run --quick      # a 4-minute smoke run with small sizes\n\
         bench/run --rooms-only # the room-protocol scenarios alone, about 7 minutes\n\
         bench/run --compression-only # the compression scenario alone, about 6 minutes\n\
         bench/run --paced-only # the paced fan-out beside the floor, about 12 minutes\n\
         ```\n\n\
         `bench/run` installs what it needs (the Debian font for the chart, the Node peers with\n\
         `npm ci` from `bench/peers/package-lock.json`), builds Roomcast, the plugins and the\n\
         peers in release mode, copies the binaries aside (others may rebuild `target/` during\n\
         the run), and runs `roomcast-bench suite` pinned to CPU 1 while every server is pinned\n\
         to CPU 0, both at nice -20 when run as root so that other work on the machine does not\n\
         preempt them. Each scenario can also be run by hand against a server you started:\n\
         `target/release/roomcast-bench --help`. Profiles of Roomcast's hot path and how they\n\
         were taken: [bench/PROFILE.md](bench/PROFILE.md).\n\n\
         ## What is measured\n\n\
         - **Saturated fan-out**: N clients in one room; K of them send M text messages of S bytes,\n\
           each stamped with its sender, sequence number and send time; every other member must\n\
           get each message once. At most a window of messages is in flight (sent but not yet\n\
           delivered to everyone), so queues stay bounded; the window decides how much a\n\
           server can batch, and is the same for every server. *Server CPU per delivery* is utime + stime from `/proc/PID/stat` over the\n\
           sending phase only, divided by deliveries: it is the fair number, because on 2 cores\n\
           the load generator, not the server, saturates first for the fastest servers.\n\
           *Other programs' CPU* (every other process, from `/proc`) shows how noisy the\n\
           machine was during the phase.\n\
         - **Paced fan-out**: the same at fixed rates of deliveries per second (50,000, 100,000,\n\
           150,000 and 200,000; each server runs them lowest first, on a fresh server each);\n\
           latency is from the send stamp to the read that returned the delivery. A server that\n\
           could not keep up with a rate (delivered less than 90% of it, or not everything) is\n\
           not run at the higher ones, and the report says so.\n\
         - **Paced on a contended core**: the same fan-out at 250,000 deliveries/s while a busy\n\
           loop (`bash`, pinned to the server's CPU at the same nice value, for the measured\n\
           phase only) takes about half of the server's core. It exists because the load\n\
           generator spends about 2.9 µs of its own core per delivery and cannot pace above\n\
           about 300,000 deliveries/s, so on 2 cores the server's core never saturates\n\
           otherwise; here every server is past its knee, and what is measured is how each\n\
           degrades, by batching or by queueing. The busy loop's CPU is shown apart, not as\n\
           noise.\n\
         - **Idle**: 10,000 and 19,000 connections (a fresh server for each) from source\n\
           addresses spread over 127.0.0.x that only answer pings (every server pings after the\n\
           same interval); RSS growth over the fresh server divided by connections.\n\
         - **Churn**: clients join and leave the room (half with a close frame, half by dropping\n\
           the TCP connection) while it broadcasts; the server's open descriptors and RSS before\n\
           the run and after everyone left show leaks.\n\
         - **Connection rate**: new connections per second with a fixed number of attempts in\n\
           flight (200, as fastwebsockets' 26,000/s here was measured). Every server sends a\n\
           message to the *other* members of its room, so each in-flight slot has its own room\n\
           with one long-lived listener in it; a slot, over and over, opens a TCP connection\n\
           (source addresses spread over 127.0.0.x), upgrades it (a fresh `Sec-WebSocket-Key`;\n\
           the `101` and its `Sec-WebSocket-Accept` are checked), sends one 32-byte text message,\n\
           waits until the room's listener has read it, then closes cleanly: a close frame, and\n\
           reading until the server closes the TCP connection (the server closes first, so the\n\
           TIME_WAIT sockets are its own). A connection counts when its message reached the\n\
           listener; its latency runs from the start of the connect to that read. *Server CPU\n\
           per connection* covers accept, upgrade, forwarding the message to one member and the\n\
           close handshake; on loopback part of the kernel's TCP work (the SYN and its answer)\n\
           runs on the load generator's CPU and is not in it, for every server alike.\n\
           *Listen-queue overflows / drops* are `ListenOverflows` and `ListenDrops` from\n\
           `/proc/net/netstat` (system-wide) over the phase.\n\
         - **Plugins**: the saturated fan-out through `relay` (passes everything on, the same\n\
           semantics as no plugin) and `moderation` (checks every message; limits set so none is\n\
           dropped) against no plugin, on one Roomcast, in three shapes: 1000 members with 256\n\
           messages in flight, 1000 members with 10 in flight (per-message costs that a wide\n\
           window hides show), and 10 members who all send.\n\
         - **Reload under load**: a paced fan-out through `relay` while `relay.wasm` is replaced\n\
           every second (written under a temporary name, renamed over the old one; each copy\n\
           carries a different custom section so its content hash changes); lost and duplicated\n\
           deliveries are counted per member and per message.\n\
         - **Reload latency**: the same with the `lobby` plugin (about 160 KB, serde_json: it\n\
           parses every message), replaced 35 times while a paced fan-out runs through it; each\n\
           replacement is timed from the rename to `GET /admin/rooms` showing the room on the new\n\
           version, and the fan-out's latency is compared with the same fan-out without\n\
           replacements just before, on the same server.\n\
         - **One connection, many rooms** (Roomcast only: the peers have no room protocol).\n\
           *Memory*: N connections offer `roomcast.v1` on `GET /ws` and join one room each,\n\
           then nine more (connection i is in rooms i to i + 9 of R, so the first joins\n\
           create every room and the later ones only add members); the server's RSS growth\n\
           over the fresh server after each step, held past a heartbeat, gives the cost of\n\
           a connection in one room and of each membership after it. The reference is N\n\
           raw connections spread over the same rooms, on another fresh server. *Fan-out*:\n\
           the saturated and paced fan-outs and the plugins' small room, on one server, with\n\
           raw clients and with room-protocol clients (senders send `{\"send\": ROOM, \"text\": ...}`, members get\n\
           `{\"room\": ROOM, \"text\": ...}`: the same text, 26 bytes more on the wire each\n\
           way for the room `bench`); which mode goes first alternates between runs.\n\
           *Join/leave*: C connections, each in a home room so that no room empties, join\n\
           and leave the other rooms with one operation in flight each, waiting for every\n\
           `joined` and `left`; server CPU over the phase divided by the operations.\n\
           *Mass reconnect*: a room with history (`--history-size 200`); N clients and a few\n\
           watchers in it while a publisher sends stamped text at a steady rate; the N drop\n\
           their connections at once (TCP reset), the room goes on for 100 messages, then\n\
           they all connect again and join with `since` = the last offset each one saw. A\n\
           client has recovered when its join said `recovered: true` and it holds every\n\
           offset up to the live one its join reported; every client checks that offsets\n\
           arrive once and in order across the seam. The watchers never leave and time\n\
           the live messages before the drop and during the storm.\n\
         - **Per-message compression** (RFC 7692): the saturated and paced fan-outs with\n\
           realistic JSON chat messages of 200 B to 2 KB instead of 64-byte stamps, every\n\
           server that can compress with compression on and off; the clients always offer\n\
           `permessage-deflate` with no context takeover either way (the shape that lets a\n\
           server compress a broadcast once), inflate every compressed delivery, and read its\n\
           stamp from the text. *Bytes on the wire* are the data frames as read from the\n\
           socket, headers included. A compressed frame byte-for-byte equal to one the load\n\
           generator already inflated for another member reuses that text (inflating it again\n\
           gives the same bytes), so the load generator costs about the same per delivery\n\
           with compression as without.\n\n\
         The peers: uWebSockets.js from npm `uwebsockets@3.0.6` (`bench/peers/uws.js`, rooms as\n\
         topics, `maxBackpressure` raised to 64 MiB), Node `ws` 8 (`bench/peers/ws.js`, the usual\n\
         ping/terminate heartbeat), a minimal tokio-tungstenite server\n\
         (`bench/src/bin/tungstenite-peer.rs`) and a minimal fastwebsockets server\n\
         (`bench/src/bin/fastwebsockets-peer.rs`: the handshake through hyper 1, then the\n\
         socket split so that one task reads while it writes; fastwebsockets' reads are not\n\
         cancel-safe). Both Rust peers keep one queue per member, drained by the member's task\n\
         and flushed once per batch. Roomcast runs with `--max-queue-bytes 64MiB`. The floor\n\
         (`bench/src/bin/floor-peer.rs`; in the full run and in `bench/run --paced-only`) is a\n\
         reference, not a peer: one epoll loop that gives every member each loop iteration's\n\
         messages in one write, with no heartbeat and no runtime; it runs the paced fan-out\n\
         only, and no verdict takes it as the best peer.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_show_the_median_and_the_range() {
        assert_eq!(spread(&[], 2), "–");
        assert_eq!(spread(&[1.5], 2), "1.50");
        assert_eq!(spread(&[3.0, 1.0, 2.0, f64::NAN], 1), "2.0 (1.0–3.0)");
    }

    fn fanout(deliveries_per_sec: f64, cpu_us_per_delivery: f64) -> FanoutResult {
        FanoutResult { deliveries_per_sec, cpu_us_per_delivery, ..FanoutResult::default() }
    }

    fn idle(connections: usize, rss_per_conn_kib: f64) -> IdleResult {
        IdleResult { connections, opened: connections, rss_per_conn_kib, ..IdleResult::default() }
    }

    fn issue_16(md: &str) -> &str {
        let start = md.find("### Targets (issue 16)").expect("the issue-16 table");
        &md[start..]
    }

    #[test]
    fn missing_servers_and_scenarios_are_not_measured() {
        for quick in [true, false] {
            let results = Results {
                quick,
                sizes: Some(Sizes::new(quick, None)),
                servers: vec![Kind::Roomcast, Kind::Tungstenite],
                fanout: vec![(Kind::Roomcast, fanout(1e6, 0.2))],
                idle: vec![(Kind::Roomcast, idle(Sizes::new(quick, None).idle[0].connections, 3.0))],
                ..Results::default()
            };
            let md = tables(&results);
            assert!(!md.contains("NaN"), "{md}");
            let targets = issue_16(&md);
            // 2 idle sizes, saturated, 4 paced rates, p99 and max, connection rate, reload,
            // 3 plugin shapes; a quick run adds its own idle sizes and rates.
            let rows = targets.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| target")).count();
            assert_eq!(rows, if quick { 18 } else { 14 }, "{targets}");
            assert!(targets.lines().skip(4).all(|l| l.is_empty() || l.contains("not measured")), "{targets}");
        }
    }

    #[test]
    fn targets_compare_with_the_best_peer_and_uws() {
        let sizes = Sizes::new(false, None);
        let mut results = Results {
            sizes: Some(sizes.clone()),
            servers: vec![Kind::Roomcast, Kind::Tungstenite, Kind::Fastwebsockets, Kind::Uws],
            fanout: vec![
                (Kind::Roomcast, fanout(1e6, 0.2)),
                (Kind::Tungstenite, fanout(1e6, 0.3)),
                (Kind::Fastwebsockets, fanout(1e6, 0.25)),
                (Kind::Uws, fanout(1e6, 0.15)),
            ],
            idle: vec![
                (Kind::Roomcast, idle(10_000, 1.5)),
                (Kind::Uws, idle(10_000, 2.0)),
                (Kind::Roomcast, idle(19_000, 1.5)),
                (Kind::Uws, idle(19_000, 1.0)),
            ],
            ..Results::default()
        };
        for (window, none, relay) in [(256, 0.2, 0.2), (10, 0.2, 0.25), (1024, 0.5, 0.5)] {
            let params = sizes.plugin_shapes().into_iter().find(|p| window_of(p) == window).unwrap().clone();
            for (plugin, cpu) in [("none", none), ("relay", relay)] {
                results.plugins.push(PluginRun {
                    plugin: plugin.into(),
                    clients: params.clients,
                    window,
                    result: fanout(1e6, cpu),
                });
            }
        }
        let md = tables(&results);
        let targets = issue_16(&md);
        let line = |start: &str| targets.lines().find(|l| l.starts_with(start)).unwrap().to_owned();
        assert!(line("| RSS per idle connection below uWebSockets.js', 10,000").ends_with("| met |"));
        assert!(line("| RSS per idle connection below uWebSockets.js', 19,000").ends_with("**not met** |"));
        let saturated = line("| CPU per delivery below every peer's, saturated");
        assert!(
            saturated.contains("(uWebSockets.js)") && saturated.ends_with("**not met** |"),
            "{saturated}"
        );
        assert!(line("| relay ≥ 97% of no plugin's throughput and ≤ 1.03× its CPU per delivery, 1000 members, 10 senders, 256").ends_with("| met |"));
        assert!(line("| relay ≥ 97% of no plugin's throughput and ≤ 1.03× its CPU per delivery, 1000 members, 10 senders, 10 ").ends_with("**not met** |"));
        // The plugins table tells the two 1000-member shapes apart.
        assert!(md.contains("| 1000 members, 10 senders, 10 in flight | relay |"));
        assert!(md.contains("| 1000 members, 10 senders, 256 in flight | relay |"));
    }

    #[test]
    fn the_floor_is_never_the_best_peer() {
        let sizes = Sizes::new(false, None);
        let rate = sizes.paced[0].pace.rate();
        let results = Results {
            sizes: Some(sizes.clone()),
            servers: vec![Kind::Roomcast, Kind::Uws, Kind::Floor],
            fanout: vec![(Kind::Roomcast, fanout(1e6, 0.2)), (Kind::Uws, fanout(1e6, 0.3))],
            paced: vec![
                (Kind::Roomcast, fanout(rate, 5.0)),
                (Kind::Uws, fanout(rate, 5.5)),
                (Kind::Floor, fanout(rate, 4.0)),
            ],
            ..Results::default()
        };
        let md = tables(&results);
        let targets = issue_16(&md);
        let name = format!("| CPU per delivery below every peer's, paced {} deliveries/s", thousands(rate));
        let paced = targets.lines().find(|l| l.starts_with(&name)).unwrap();
        assert!(paced.contains("(uWebSockets.js)") && paced.ends_with("| met |"), "{paced}");
        let saturated = targets
            .lines()
            .find(|l| l.starts_with("| CPU per delivery below every peer's, saturated"))
            .unwrap();
        assert!(saturated.contains("(uWebSockets.js)") && saturated.ends_with("| met |"), "{saturated}");
        // Its column shows what it ran: the paced fan-out, against Roomcast's 1.25×; no
        // saturated run, so no count of losses there either.
        assert!(md.contains("floor (reference)"), "{md}");
        assert!(md.contains("| lost / duplicated deliveries (all runs) | 0 / 0 | 0 / 0 | – |"), "{md}");
        assert!(md.contains("1.25×"), "{md}");
    }

    #[test]
    fn plugin_runs_from_before_the_window_take_their_room_size() {
        let sizes = Sizes::new(false, None);
        let results = Results {
            sizes: Some(sizes.clone()),
            plugins: vec![PluginRun {
                plugin: "relay".into(),
                clients: 1000,
                window: 0,
                result: fanout(1e6, 0.2),
            }],
            ..Results::default()
        };
        assert_eq!(plugin_med(&results, "relay", &sizes.fanout, |r| r.cpu_us_per_delivery), 0.2);
        let narrow = sizes.narrow_window.as_ref().unwrap();
        assert!(plugin_med(&results, "relay", narrow, |r| r.cpu_us_per_delivery).is_nan());
    }

    #[test]
    fn sizes_from_before_several_idle_sizes_read() {
        let mut json = serde_json::to_value(Sizes::new(false, None)).unwrap();
        json["idle"] = json["idle"][1].clone();
        json.as_object_mut().unwrap().remove("narrow_window");
        let sizes: Sizes = serde_json::from_value(json).unwrap();
        assert_eq!(sizes.idle.len(), 1);
        assert_eq!(sizes.idle[0].connections, 19_000);
        assert_eq!(sizes.plugin_shapes().len(), 2);
    }
}
