//! Prometheus metrics: the registry of `prometheus-client`, rendered in the Prometheus
//! text format (0.0.4) by `GET /metrics`.
//!
//! Every labelled series exists from start-up (at 0), so dashboards and alerts never
//! see a series appear out of nowhere. Updates are on hot paths (per message, per
//! delivery), so each series is resolved once into a plain handle (an `Arc` of one
//! atomic): the fixed label sets at start-up, a plugin's when it loads. Counting is one
//! relaxed atomic add, never a family lookup. Counters are registered without `_total`,
//! which the encoder appends.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::types::CloseReason;

/// The `Content-Type` of `GET /metrics`: Prometheus text, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

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

/// A registered gauge, used as the atomic the registry reads (`fetch_add`, `load`).
#[derive(Clone, Debug, Default)]
pub struct GaugeCell(Gauge);

impl Deref for GaugeCell {
    type Target = AtomicI64;

    fn deref(&self) -> &AtomicI64 {
        self.0.inner()
    }
}

/// A registered counter, used as the atomic the registry reads. Only ever added to.
#[derive(Clone, Debug, Default)]
pub struct CounterCell(Counter);

impl Deref for CounterCell {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        self.0.inner()
    }
}

/// `{reason="…"}`.
type ReasonLabel = [(&'static str, &'static str); 1];
/// `{plugin="…",outcome="…"}`, in that order.
type PluginCallLabels = [(&'static str, String); 2];

/// All of the host's counters and gauges. One instance per server, shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    pub connections: GaugeCell,
    /// Open sessions parked: idle, without a task.
    pub connections_parked: GaugeCell,
    pub rooms: GaugeCell,
    pub room_members: GaugeCell,
    pub messages_in: CounterCell,
    pub messages_out: CounterCell,
    /// Data messages a room handled together with others that waited in its inbox.
    pub messages_batched: CounterCell,
    /// Messages and bytes held by rooms' histories (recovery).
    pub history_messages: GaugeCell,
    pub history_bytes: GaugeCell,
    /// Joins with `since`: `[recovered, not recovered]`.
    recoveries: [Counter; 2],
    closed: [Counter; CloseReason::ALL.len()],
    rejected: [Counter; RejectReason::ALL.len()],
    plugin_call_family: Family<PluginCallLabels, Counter>,
    /// Plugin name → its call counters, resolved from the family once, when it loads;
    /// rooms keep the `Arc` so counting a call is one atomic add.
    plugin_calls: Mutex<BTreeMap<String, Arc<PluginCalls>>>,
    /// Locked to render and to register a collector, never to count.
    registry: Mutex<Registry>,
}

/// Call counters of one plugin, one per outcome in [`PLUGIN_OUTCOMES`] order (from
/// [`Metrics::plugin_calls`]; a `default()` one is in no registry).
#[derive(Debug, Default)]
pub struct PluginCalls([Counter; PLUGIN_OUTCOMES.len()]);

impl PluginCalls {
    pub fn count(&self, outcome: &str) {
        if let Some(i) = PLUGIN_OUTCOMES.iter().position(|o| *o == outcome) {
            self.0[i].inc();
        }
    }

    pub fn ok(&self) {
        self.0[0].inc();
    }

    pub fn get(&self, outcome: &str) -> u64 {
        PLUGIN_OUTCOMES.iter().position(|o| *o == outcome).map_or(0, |i| self.0[i].get())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        // Help texts without a final period: the registry adds one.
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = GaugeCell::default();
            registry.register(name, help, gauge.0.clone());
            gauge
        };
        let connections = gauge(&mut registry, "roomcast_connections", "Open WebSocket sessions");
        let connections_parked = gauge(
            &mut registry,
            "roomcast_connections_parked",
            "Open WebSocket sessions parked: idle, waiting without a task",
        );
        let rooms = gauge(&mut registry, "roomcast_rooms", "Rooms with at least one member");
        let room_members = gauge(&mut registry, "roomcast_room_members", "Sum of members over all rooms");

        let closed_family = Family::<ReasonLabel, Counter>::default();
        let closed = CloseReason::ALL.map(|r| closed_family.get_or_create_owned(&[("reason", r.label())]));
        registry.register(
            "roomcast_connections_closed",
            "WebSocket sessions closed, by reason",
            closed_family,
        );
        let rejected_family = Family::<ReasonLabel, Counter>::default();
        let rejected =
            RejectReason::ALL.map(|r| rejected_family.get_or_create_owned(&[("reason", r.label())]));
        registry.register(
            "roomcast_handshakes_rejected",
            "Upgrade requests refused, by reason",
            rejected_family,
        );

        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = CounterCell::default();
            registry.register(name, help, counter.0.clone());
            counter
        };
        let messages_in =
            counter(&mut registry, "roomcast_messages_in", "Data messages received from clients");
        let messages_out = counter(
            &mut registry,
            "roomcast_messages_out",
            "Data messages queued to clients, one per recipient",
        );
        let messages_batched = counter(
            &mut registry,
            "roomcast_messages_batched",
            "Data messages a room handled in a batch with others that waited (each member got them in one write)",
        );

        let history_messages =
            gauge(&mut registry, "roomcast_history_messages", "Messages held by rooms' histories");
        let history_bytes = gauge(&mut registry, "roomcast_history_bytes", "Bytes held by rooms' histories");
        let recoveries_family = Family::<ReasonLabel, Counter>::default();
        let recoveries = ["recovered", "not_recovered"]
            .map(|outcome| recoveries_family.get_or_create_owned(&[("outcome", outcome)]));
        registry.register(
            "roomcast_recoveries",
            "Joins that asked to recover missed messages, by outcome",
            recoveries_family,
        );

        let plugin_call_family = Family::<PluginCallLabels, Counter>::default();
        registry.register(
            "roomcast_plugin_calls",
            "Plugin hook calls, by plugin and outcome",
            plugin_call_family.clone(),
        );

        Self {
            connections,
            connections_parked,
            rooms,
            room_members,
            messages_in,
            messages_out,
            messages_batched,
            history_messages,
            history_bytes,
            recoveries,
            closed,
            rejected,
            plugin_call_family,
            plugin_calls: Mutex::new(BTreeMap::new()),
            registry: Mutex::new(registry),
        }
    }
}

impl Metrics {
    /// A join with `since` was answered `recovered: true` or `false`.
    pub fn recovery(&self, recovered: bool) {
        self.recoveries[usize::from(!recovered)].inc();
    }

    pub fn recoveries(&self, recovered: bool) -> u64 {
        self.recoveries[usize::from(!recovered)].get()
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].get()
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].inc();
    }

    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].get()
    }

    /// The call counters of `plugin`, created at 0 on first use (when it loads).
    pub fn plugin_calls(&self, plugin: &str) -> Arc<PluginCalls> {
        let mut calls = self.plugin_calls.lock().expect("metrics lock");
        if let Some(calls) = calls.get(plugin) {
            return calls.clone();
        }
        let counters = PLUGIN_OUTCOMES.map(|outcome| {
            self.plugin_call_family
                .get_or_create_owned(&[("plugin", plugin.to_owned()), ("outcome", outcome.to_owned())])
        });
        let counters = Arc::new(PluginCalls(counters));
        calls.insert(plugin.to_owned(), counters.clone());
        counters
    }

    /// Add series computed when scraped (the cluster's).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry.lock().expect("metrics lock").register_collector(collector);
    }

    /// The Prometheus text exposition ([`CONTENT_TYPE`]) of every series.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let registry = self.registry.lock().expect("metrics lock");
        prometheus_text::encode(&mut out, &registry).expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    /// The `# TYPE` lines of `text`: (family, type).
    fn types(text: &str) -> Vec<(&str, &str)> {
        text.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.split_once(' ')).collect()
    }

    /// The sample lines of `text`: (series, value).
    fn samples(text: &str) -> Vec<(&str, f64)> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample");
                (series, value.parse().expect("a number"))
            })
            .collect()
    }

    /// Every series of DESIGN.md, with its name, labels and type, at 0 from start-up.
    #[test]
    fn design_series_from_start_up() {
        let metrics = Metrics::default();
        metrics.plugin_calls("chat");
        let text = metrics.render();
        let (types, samples) = (types(&text), samples(&text));
        let type_of = |name: &str| types.iter().find(|(n, _)| *n == name).map(|(_, kind)| *kind);
        for (name, kind) in [
            ("roomcast_connections", "gauge"),
            ("roomcast_connections_parked", "gauge"),
            ("roomcast_rooms", "gauge"),
            ("roomcast_room_members", "gauge"),
            ("roomcast_connections_closed_total", "counter"),
            ("roomcast_handshakes_rejected_total", "counter"),
            ("roomcast_messages_in_total", "counter"),
            ("roomcast_messages_out_total", "counter"),
            ("roomcast_messages_batched_total", "counter"),
            ("roomcast_plugin_calls_total", "counter"),
            ("roomcast_history_messages", "gauge"),
            ("roomcast_history_bytes", "gauge"),
            ("roomcast_recoveries_total", "counter"),
        ] {
            assert_eq!(type_of(name), Some(kind), "{name}");
        }
        assert_eq!(types.len(), 13, "one TYPE line per family: {types:?}");

        let mut expected: Vec<String> = [
            "connections",
            "connections_parked",
            "rooms",
            "room_members",
            "messages_in_total",
            "messages_out_total",
            "messages_batched_total",
            "history_messages",
            "history_bytes",
            "recoveries_total{outcome=\"recovered\"}",
            "recoveries_total{outcome=\"not_recovered\"}",
        ]
        .iter()
        .map(|name| format!("roomcast_{name}"))
        .collect();
        expected.extend(
            CloseReason::ALL
                .iter()
                .map(|r| format!("roomcast_connections_closed_total{{reason=\"{}\"}}", r.label())),
        );
        expected.extend(
            RejectReason::ALL
                .iter()
                .map(|r| format!("roomcast_handshakes_rejected_total{{reason=\"{}\"}}", r.label())),
        );
        expected.extend(
            PLUGIN_OUTCOMES
                .iter()
                .map(|o| format!("roomcast_plugin_calls_total{{plugin=\"chat\",outcome=\"{o}\"}}")),
        );
        let mut got: Vec<String> = samples.iter().map(|(series, _)| series.to_string()).collect();
        assert!(samples.iter().all(|(_, value)| *value == 0.0), "{samples:?}");
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
    }

    #[test]
    fn updates_reach_the_text() {
        let metrics = Metrics::default();
        metrics.connections.fetch_add(3, Relaxed);
        metrics.connections.fetch_sub(1, Relaxed);
        metrics.messages_out.fetch_add(7, Relaxed);
        metrics.closed(CloseReason::SlowConsumer);
        metrics.rejected(RejectReason::Origin);
        metrics.rejected(RejectReason::Origin);
        let calls = metrics.plugin_calls("a\"b");
        calls.ok();
        calls.count("trap");
        assert!(Arc::ptr_eq(&calls, &metrics.plugin_calls("a\"b")), "resolved once");
        assert_eq!((calls.get("ok"), calls.get("trap"), calls.get("error")), (1, 1, 0));
        assert_eq!(metrics.closed_count(CloseReason::SlowConsumer), 1);
        assert_eq!(metrics.rejected_count(RejectReason::Origin), 2);

        let text = metrics.render();
        for line in [
            "roomcast_connections 2",
            "roomcast_messages_out_total 7",
            "roomcast_connections_closed_total{reason=\"slow_consumer\"} 1",
            "roomcast_handshakes_rejected_total{reason=\"origin\"} 2",
            "roomcast_plugin_calls_total{plugin=\"a\\\"b\",outcome=\"ok\"} 1",
            "roomcast_plugin_calls_total{plugin=\"a\\\"b\",outcome=\"trap\"} 1",
            "# HELP roomcast_messages_in_total Data messages received from clients.",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text 0.0.4, not OpenMetrics");
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }
}
