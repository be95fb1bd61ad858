//! Prometheus metrics: plain atomics, rendered as text by `GET /metrics`.
//!
//! Every labelled series exists from start-up (at 0), so dashboards and alerts never
//! see a series appear out of nowhere.

use crate::types::CloseReason;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Why an upgrade was refused: the `reason` label of
/// `roomcast_handshakes_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    Timeout,
    Method,
    BadRequest,
    Version,
    Origin,
    RoomName,
    Capacity,
    Plugin,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        Self::Timeout,
        Self::Method,
        Self::BadRequest,
        Self::Version,
        Self::Origin,
        Self::RoomName,
        Self::Capacity,
        Self::Plugin,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Method => "method",
            Self::BadRequest => "bad_request",
            Self::Version => "version",
            Self::Origin => "origin",
            Self::RoomName => "room_name",
            Self::Capacity => "capacity",
            Self::Plugin => "plugin",
        }
    }
}

/// Outcomes of a plugin call: the `outcome` label of `roomcast_plugin_calls_total`.
pub const PLUGIN_OUTCOMES: [&str; 5] = ["ok", "trap", "timeout", "memory", "error"];

/// All of the host's counters and gauges. One instance per server, shared by `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub rooms: AtomicI64,
    pub room_members: AtomicI64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Plugin name → its call counters. A plugin's series are created at 0 when it
    /// loads; rooms keep the `Arc` so counting a call is one atomic add.
    plugin_calls: Mutex<BTreeMap<String, Arc<PluginCalls>>>,
}

/// Call counters of one plugin, one per outcome in [`PLUGIN_OUTCOMES`] order.
#[derive(Debug, Default)]
pub struct PluginCalls([AtomicU64; PLUGIN_OUTCOMES.len()]);

impl PluginCalls {
    pub fn count(&self, outcome: &str) {
        if let Some(i) = PLUGIN_OUTCOMES.iter().position(|o| *o == outcome) {
            self.0[i].fetch_add(1, Relaxed);
        }
    }

    pub fn ok(&self) {
        self.0[0].fetch_add(1, Relaxed);
    }

    pub fn get(&self, outcome: &str) -> u64 {
        PLUGIN_OUTCOMES.iter().position(|o| *o == outcome).map_or(0, |i| self.0[i].load(Relaxed))
    }
}

impl Metrics {
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].load(Relaxed)
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Relaxed)
    }

    /// The call counters of `plugin`, created at 0 on first use (when it loads).
    pub fn plugin_calls(&self, plugin: &str) -> Arc<PluginCalls> {
        let mut calls = self.plugin_calls.lock().expect("metrics lock");
        calls.entry(plugin.to_owned()).or_default().clone()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        gauge(&mut out, "roomcast_connections", "Open WebSocket sessions.", self.connections.load(Relaxed));
        gauge(&mut out, "roomcast_rooms", "Rooms with at least one member.", self.rooms.load(Relaxed));
        gauge(
            &mut out,
            "roomcast_room_members",
            "Sum of members over all rooms.",
            self.room_members.load(Relaxed),
        );

        header(
            &mut out,
            "roomcast_connections_closed_total",
            "WebSocket sessions closed, by reason.",
            "counter",
        );
        for reason in CloseReason::ALL {
            let _ = writeln!(
                out,
                "roomcast_connections_closed_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.closed_count(reason)
            );
        }
        header(
            &mut out,
            "roomcast_handshakes_rejected_total",
            "Upgrade requests refused, by reason.",
            "counter",
        );
        for reason in RejectReason::ALL {
            let _ = writeln!(
                out,
                "roomcast_handshakes_rejected_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.rejected_count(reason)
            );
        }
        counter(
            &mut out,
            "roomcast_messages_in_total",
            "Data messages received from clients.",
            self.messages_in.load(Relaxed),
        );
        counter(
            &mut out,
            "roomcast_messages_out_total",
            "Data messages queued to clients, one per recipient.",
            self.messages_out.load(Relaxed),
        );

        header(
            &mut out,
            "roomcast_plugin_calls_total",
            "Plugin hook calls, by plugin and outcome.",
            "counter",
        );
        let calls = self.plugin_calls.lock().expect("metrics lock");
        for (plugin, counters) in calls.iter() {
            let plugin = plugin.replace('\\', "\\\\").replace('"', "\\\"");
            for outcome in PLUGIN_OUTCOMES {
                let count = counters.get(outcome);
                let _ = writeln!(
                    out,
                    "roomcast_plugin_calls_total{{plugin=\"{plugin}\",outcome=\"{outcome}\"}} {count}"
                );
            }
        }
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a series (`kind`: `gauge` or `counter`).
pub(crate) fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A gauge without labels, with its header.
pub(crate) fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// A counter without labels, with its header.
pub(crate) fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}
