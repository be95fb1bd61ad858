//! The JSON views the admin API and the dashboard share.

use serde_json::{Value, json};

use super::Shared;
use crate::plugin::reload::rfc3339;

/// The plugins, as `GET /admin/plugins` shows them.
pub(crate) fn plugins_json(shared: &Shared) -> Value {
    let live = shared.rooms.plugins();
    let rooms = shared.rooms.list_with_plugins();
    let list: Vec<Value> = live
        .records()
        .into_iter()
        .map(|(name, record)| {
            let current = record.current.as_ref().map(|(plugin, _)| plugin);
            json!({
                "name": name,
                "file": current.map(|p| p.file().display().to_string()),
                "sha256": current.map(|p| p.sha256()),
                "describe": current.map(|p| format!("{} {}", p.info().name, p.info().version)),
                "loaded_at": current.map(|p| rfc3339(p.loaded_at())),
                "compiler": current.map(|p| p.compiler().label()),
                "compile_ms": current.and_then(|p| p.compiled_in()).map(ms),
                "load_ms": record.loaded_in.map(ms),
                "optimize_ms": current.and_then(|p| p.optimized_in()).map(ms),
                "version": record.current.as_ref().map(|(_, v)| v),
                "versions": record.versions,
                "rooms": rooms
                    .iter()
                    .filter(|r| r.plugin.as_ref().is_some_and(|(p, _)| *p == name))
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>(),
                "last_error": record.last_error.as_ref().map(|(_, e)| e),
                "last_error_at": record.last_error.as_ref().map(|(t, _)| rfc3339(*t)),
            })
        })
        .collect();
    Value::Array(list)
}

/// A duration in milliseconds, to the microsecond.
fn ms(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// This node's rooms, one JSON object each.
fn local_rooms(shared: &Shared) -> Vec<Value> {
    shared
        .rooms
        .list_with_plugins()
        .into_iter()
        .map(|room| {
            json!({
                "name": room.name,
                "members": room.members,
                "plugin": room.plugin.as_ref().map(|(p, _)| p),
                "version": room.plugin.as_ref().map(|(_, v)| v),
            })
        })
        .collect()
}

/// The rooms as `GET /admin/rooms` and the dashboard show them: this node's, or in
/// cluster mode the whole cluster's.
pub(crate) async fn rooms_listing(shared: &Shared) -> Vec<Value> {
    let mut list = local_rooms(shared);
    if let Some(cluster) = shared.rooms.cluster() {
        cluster_rooms(cluster, &mut list).await;
    }
    list
}

/// Cluster mode: every room of the cluster with its cluster-wide members. Each entry
/// gains `owner` (node id), `local_members` (this node's count) and `nodes` (member ids
/// per node); `members` becomes the cluster-wide count. Without Redis the list stays
/// this node's, with `"cluster": "unreachable"` on each entry.
async fn cluster_rooms(cluster: &crate::cluster::Cluster, rooms: &mut Vec<Value>) {
    let Some(overview) = cluster.overview().await else {
        for room in rooms.iter_mut() {
            room["cluster"] = json!("unreachable");
        }
        return;
    };
    let mut index = std::collections::HashMap::with_capacity(rooms.len());
    for (i, room) in rooms.iter_mut().enumerate() {
        room["local_members"] = room["members"].clone();
        index.insert(room["name"].as_str().unwrap_or_default().to_owned(), i);
    }
    for entry in overview {
        let total: usize = entry.members.iter().map(|(_, ids)| ids.len()).sum();
        let nodes: serde_json::Map<String, Value> =
            entry.members.into_iter().map(|(node, ids)| (node, json!(ids))).collect();
        let i = *index.entry(entry.name.clone()).or_insert_with(|| {
            rooms.push(json!({
                "name": entry.name,
                // Its owner elsewhere runs the plugin.
                "plugin": Value::Null,
                "local_members": 0,
            }));
            rooms.len() - 1
        });
        let room = &mut rooms[i];
        room["members"] = json!(total);
        room["owner"] = json!(entry.owner);
        room["nodes"] = Value::Object(nodes);
    }
    rooms.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
}
