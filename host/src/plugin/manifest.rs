//! `NAME.toml`, the optional file beside `NAME.wasm`: the rooms a plugin serves, the
//! `[config]` handed to its `init`, and its `[limits]`. Every error names the file and
//! the key.

use std::path::Path;

use crate::units::{parse_duration, parse_size};

use super::set::RoomPattern;
use super::{HistorySettings, HostCaps, Limits};
use crate::units::{format_duration, format_size};

/// What a `NAME.toml` says, with the defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Manifest {
    /// `None` when the file does not set `rooms`: the plugin then serves its defaults.
    pub(crate) rooms: Option<Vec<RoomPattern>>,
    /// The `[config]` table as JSON text, `{}` when absent.
    pub(crate) config_json: String,
    pub(crate) limits: Limits,
    /// `[history]`: the plugin's rooms keep history (`None`: they do not).
    pub(crate) history: Option<HistorySettings>,
    /// `compression = false`: its rooms' messages go uncompressed even to clients that
    /// negotiated `permessage-deflate`.
    pub(crate) compression: bool,
}

impl Manifest {
    /// What a plugin without a `NAME.toml` gets.
    pub(crate) fn defaults(caps: &HostCaps) -> Manifest {
        Manifest {
            rooms: None,
            config_json: "{}".to_owned(),
            limits: caps.default_limits(),
            history: None,
            compression: true,
        }
    }
}

/// The most messages a room's history may keep.
pub const MAX_HISTORY_SIZE: u64 = 100_000;

/// Parse `[history]`: `size` (messages, required) and `ttl` (default 5 minutes).
fn parse_history(table: &toml::Table) -> Result<HistorySettings, String> {
    let mut settings = HistorySettings { size: 0, ttl: HistorySettings::DEFAULT_TTL };
    for (key, value) in table {
        match key.as_str() {
            "size" => {
                let size = value
                    .as_integer()
                    .and_then(|size| u64::try_from(size).ok())
                    .filter(|size| (1..=MAX_HISTORY_SIZE).contains(size))
                    .ok_or_else(|| {
                        format!("`history.size` must be a number of messages from 1 to {MAX_HISTORY_SIZE}")
                    })?;
                settings.size = size as usize;
            }
            "ttl" => {
                let text = value.as_str().ok_or("`history.ttl` must be a duration such as \"5m\"")?;
                let ttl = parse_duration(text).map_err(|error| format!("`history.ttl`: {error}"))?;
                if ttl.is_zero() {
                    return Err("`history.ttl` must be more than 0".to_owned());
                }
                settings.ttl = ttl;
            }
            other => {
                return Err(format!("unknown key `history.{other}` (`[history]` may set `size` and `ttl`)"));
            }
        }
    }
    if settings.size == 0 {
        return Err("`[history]` needs `size`, the number of messages each room keeps".to_owned());
    }
    Ok(settings)
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
                    let pattern =
                        RoomPattern::parse(text).map_err(|error| format!("{file}: `rooms`: {error}"))?;
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
                let json = table_to_json(config, "config").map_err(|error| format!("{file}: {error}"))?;
                manifest.config_json = serde_json::Value::Object(json).to_string();
            }
            "limits" => {
                let toml::Value::Table(limits) = value else {
                    return Err(format!("{file}: `limits` must be a table (`[limits]`)"));
                };
                manifest.limits = parse_limits(limits, caps, manifest.limits)
                    .map_err(|error| format!("{file}: {error}"))?;
            }
            "history" => {
                let toml::Value::Table(history) = value else {
                    return Err(format!("{file}: `history` must be a table (`[history]`)"));
                };
                manifest.history = Some(parse_history(history).map_err(|error| format!("{file}: {error}"))?);
            }
            "compression" => {
                let toml::Value::Boolean(on) = value else {
                    return Err(format!("{file}: `compression` must be true or false"));
                };
                manifest.compression = *on;
            }
            other => {
                return Err(format!(
                    "{file}: unknown key `{other}` (a plugin's TOML may set `rooms`, \
                     `compression`, `[config]`, `[limits]` and `[history]`)"
                ));
            }
        }
    }
    Ok(manifest)
}

fn parse_limits(table: &toml::Table, caps: &HostCaps, mut limits: Limits) -> Result<Limits, String> {
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
                            "`limits.memory` must be a size such as \"32MiB\" or a byte count".to_owned()
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
                let deadline = parse_duration(text).map_err(|error| format!("`limits.deadline`: {error}"))?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse_ok(text: &str) -> Manifest {
        parse(text, Path::new("/p/chat.toml"), &HostCaps::default()).expect("valid manifest")
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/p/chat.toml"), &HostCaps::default()).expect_err("invalid manifest")
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(parse_ok(""), Manifest::defaults(&HostCaps::default()));
        let defaults = Manifest::defaults(&HostCaps::default());
        assert_eq!(defaults.config_json, "{}");
        assert_eq!(defaults.limits.deadline, Duration::from_millis(10));
        assert_eq!(defaults.limits.memory, 32 << 20);
        assert_eq!(defaults.rooms, None);
    }

    #[test]
    fn rooms_config_and_limits() {
        let manifest = parse_ok(
            r#"
            rooms = ["lobby", "game:*", "game:*"]

            [config]
            greeting = "hi"
            max = 3
            ratio = 0.5
            tags = ["a", "b"]
            nested = { deep = true }
            when = 1979-05-27T07:32:00Z

            [limits]
            memory = "64MiB"
            deadline = "50ms"
            "#,
        );
        let rooms: Vec<&str> =
            manifest.rooms.as_ref().expect("rooms").iter().map(RoomPattern::as_str).collect();
        assert_eq!(rooms, vec!["lobby", "game:*"]);
        let config: serde_json::Value = serde_json::from_str(&manifest.config_json).expect("config is JSON");
        assert_eq!(
            config,
            serde_json::json!({
                "greeting": "hi", "max": 3, "ratio": 0.5, "tags": ["a", "b"],
                "nested": {"deep": true}, "when": "1979-05-27T07:32:00Z"
            })
        );
        assert_eq!(manifest.limits.memory, 64 << 20);
        assert_eq!(manifest.limits.deadline, Duration::from_millis(50));

        let manifest = parse_ok("[limits]\nmemory = 1048576\n");
        assert_eq!(manifest.limits.memory, 1 << 20);
        assert_eq!(manifest.limits.deadline, Duration::from_millis(10));
        assert_eq!(parse_ok("rooms = []").rooms, Some(vec![]));
    }

    #[test]
    fn compression_may_be_turned_off() {
        assert!(parse_ok("").compression);
        assert!(!parse_ok("compression = false").compression);
        assert!(parse_err("compression = \"no\"").contains("`compression` must be true or false"));
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let error = parse_err("room = [\"x\"]");
        assert!(error.contains("/p/chat.toml"), "{error}");
        assert!(error.contains("unknown key `room`"), "{error}");
        let error = parse_err("[limits]\ncpu = \"1s\"");
        assert!(error.contains("/p/chat.toml"), "{error}");
        assert!(error.contains("unknown key `limits.cpu`"), "{error}");
    }

    #[test]
    fn limits_above_the_caps_are_refused() {
        let error = parse_err("[limits]\nmemory = \"512MiB\"");
        assert!(error.contains("/p/chat.toml"), "{error}");
        assert!(error.contains("`limits.memory` = 512MiB is above the host's maximum of 256MiB"), "{error}");
        let error = parse_err("[limits]\ndeadline = \"2s\"");
        assert!(error.contains("`limits.deadline` = 2s is above the host's maximum of 1s"), "{error}");
        // Caps lower than the defaults lower the defaults.
        let caps = HostCaps { max_deadline: Duration::from_millis(5), max_memory: 16 << 20 };
        let manifest = parse("", Path::new("x.toml"), &caps).expect("valid");
        assert_eq!(manifest.limits.deadline, Duration::from_millis(5));
        assert_eq!(manifest.limits.memory, 16 << 20);
    }

    #[test]
    fn bad_values_name_the_key_and_the_file() {
        for (text, key) in [
            ("rooms = \"chat\"", "`rooms`"),
            ("rooms = [1]", "`rooms`"),
            ("rooms = [\"bad room\"]", "`rooms`"),
            ("rooms = [\"\"]", "`rooms`"),
            ("config = 3", "`config`"),
            ("limits = 3", "`limits`"),
            ("[limits]\nmemory = \"lots\"", "`limits.memory`"),
            ("[limits]\nmemory = -1", "`limits.memory`"),
            ("[limits]\nmemory = 0", "`limits.memory`"),
            ("[limits]\ndeadline = 10", "`limits.deadline`"),
            ("[limits]\ndeadline = \"10\"", "`limits.deadline`"),
            ("[limits]\ndeadline = \"0ms\"", "`limits.deadline`"),
            ("[config]\nx = nan", "`config.x`"),
        ] {
            let error = parse_err(text);
            assert!(error.contains("/p/chat.toml"), "{text}: {error}");
            assert!(error.contains(key), "{text}: {error}");
        }
        let error = parse_err("rooms = [");
        assert!(error.contains("/p/chat.toml: invalid TOML"), "{error}");
    }
}
