//! `NAME.toml`, the optional file beside `NAME.wasm`: the rooms a plugin serves, the
//! `[config]` handed to its `init`, and its `[limits]`. Every error names the file and
//! the key.

use std::path::Path;

use crate::units::{parse_duration, parse_size};

use super::instance::{format_duration, format_size};
use super::set::RoomPattern;
use super::{HostCaps, Limits};

/// What a `NAME.toml` says, with the defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Manifest {
    /// `None` when the file does not set `rooms`: the plugin then serves its defaults.
    pub(crate) rooms: Option<Vec<RoomPattern>>,
    /// The `[config]` table as JSON text, `{}` when absent.
    pub(crate) config_json: String,
    pub(crate) limits: Limits,
}

impl Manifest {
    /// What a plugin without a `NAME.toml` gets.
    pub(crate) fn defaults(caps: &HostCaps) -> Manifest {
        Manifest {
            rooms: None,
            config_json: "{}".to_owned(),
            limits: caps.default_limits(),
        }
    }
}

/// Parse the text of the `NAME.toml` at `file`.
pub(crate) fn parse(text: &str, file: &Path, caps: &HostCaps) -> Result<Manifest, String> {
    let file = file.display();
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| format!("{file}: invalid TOML: {}", error.message()))?;
    let mut manifest = Manifest::defaults(caps);
    for (key, value) in &table {
        match key.as_str() {
            "rooms" => {
                let toml::Value::Array(items) = value else {
                    return Err(format!(
                        "{file}: `rooms` must be an array of room patterns, e.g. \
                         rooms = [\"chat\", \"chat:*\"]"
                    ));
                };
                let mut rooms = Vec::with_capacity(items.len());
                for item in items {
                    let toml::Value::String(text) = item else {
                        return Err(format!("{file}: `rooms` must contain only strings"));
                    };
                    let pattern = RoomPattern::parse(text)
                        .map_err(|error| format!("{file}: `rooms`: {error}"))?;
                    if !rooms.contains(&pattern) {
                        rooms.push(pattern);
                    }
                }
                manifest.rooms = Some(rooms);
            }
            "config" => {
                let toml::Value::Table(config) = value else {
                    return Err(format!("{file}: `config` must be a table (`[config]`)"));
                };
                let json =
                    table_to_json(config, "config").map_err(|error| format!("{file}: {error}"))?;
                manifest.config_json = serde_json::Value::Object(json).to_string();
            }
            "limits" => {
                let toml::Value::Table(limits) = value else {
                    return Err(format!("{file}: `limits` must be a table (`[limits]`)"));
                };
                manifest.limits = parse_limits(limits, caps, manifest.limits)
                    .map_err(|error| format!("{file}: {error}"))?;
            }
            other => {
                return Err(format!(
                    "{file}: unknown key `{other}` (a plugin's TOML may set `rooms`, \
                     `[config]` and `[limits]`)"
                ));
            }
        }
    }
    Ok(manifest)
}

fn parse_limits(
    table: &toml::Table,
    caps: &HostCaps,
    mut limits: Limits,
) -> Result<Limits, String> {
    for (key, value) in table {
        match key.as_str() {
            "memory" => {
                let memory = match value {
                    toml::Value::String(text) => {
                        parse_size(text).map_err(|error| format!("`limits.memory`: {error}"))?
                    }
                    toml::Value::Integer(bytes) => u64::try_from(*bytes)
                        .map_err(|_| "`limits.memory` must not be negative".to_owned())?,
                    _ => {
                        return Err(
                            "`limits.memory` must be a size such as \"32MiB\" or a byte count"
                                .to_owned(),
                        );
                    }
                };
                if memory > caps.max_memory {
                    return Err(format!(
                        "`limits.memory` = {} is above the host's maximum of {}",
                        format_size(memory),
                        format_size(caps.max_memory)
                    ));
                }
                if memory == 0 {
                    return Err("`limits.memory` must be more than 0".to_owned());
                }
                limits.memory = memory;
            }
            "deadline" => {
                let toml::Value::String(text) = value else {
                    return Err("`limits.deadline` must be a duration such as \"10ms\"".to_owned());
                };
                let deadline =
                    parse_duration(text).map_err(|error| format!("`limits.deadline`: {error}"))?;
                if deadline > caps.max_deadline {
                    return Err(format!(
                        "`limits.deadline` = {} is above the host's maximum of {}",
                        format_duration(deadline),
                        format_duration(caps.max_deadline)
                    ));
                }
                if deadline.is_zero() {
                    return Err("`limits.deadline` must be at least 1ms".to_owned());
                }
                limits.deadline = deadline;
            }
            other => {
                return Err(format!(
                    "unknown key `limits.{other}` (`[limits]` may set `memory` and `deadline`)"
                ));
            }
        }
    }
    Ok(limits)
}

fn table_to_json(
    table: &toml::Table,
    path: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    table
        .iter()
        .map(|(key, value)| Ok((key.clone(), value_to_json(value, &format!("{path}.{key}"))?)))
        .collect()
}

fn value_to_json(value: &toml::Value, path: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match value {
        toml::Value::String(text) => Json::String(text.clone()),
        toml::Value::Integer(number) => Json::from(*number),
        toml::Value::Float(number) => serde_json::Number::from_f64(*number)
            .map(Json::Number)
            .ok_or_else(|| format!("`{path}` = {number} cannot be written as JSON"))?,
        toml::Value::Boolean(flag) => Json::Bool(*flag),
        toml::Value::Datetime(datetime) => Json::String(datetime.to_string()),
        toml::Value::Array(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| value_to_json(item, &format!("{path}[{index}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Json::Object(table_to_json(table, path)?),
    })
}
