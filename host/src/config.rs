//! Server settings: defaults, the TOML file, and command-line flags, in that order of
//! precedence (flags over file over defaults).
//!
//! Every setting is one top-level TOML key named like its flag (`--max-queue-bytes` is
//! `max_queue_bytes`). A bad key or value is a [`ConfigError`] that names the key and
//! where it came from, and the server does not start.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::units::{parse_duration, parse_size};

/// Where a setting's value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Flag,
}

/// A setting that could not be used. The server refuses to start with one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {}: {reason}", file.display())]
    Unreadable { file: PathBuf, reason: String },
    #[error("config file {} is not valid TOML: {reason}", file.display())]
    Syntax { file: PathBuf, reason: String },
    #[error("unknown key `{key}` in config file {}", file.display())]
    UnknownKey { file: PathBuf, key: String },
    #[error("bad value for `{key}` in config file {}: {reason}", file.display())]
    BadFileValue { file: PathBuf, key: String, reason: String },
    #[error("bad value for --{flag}: {reason}")]
    BadFlag { flag: String, reason: String },
    #[error("cannot read admin token file {}: {reason}", file.display())]
    TokenFile { file: PathBuf, reason: String },
}

/// Which browser origins may open a WebSocket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPolicy {
    /// A request's `Origin` must name the same host and port as its `Host` header.
    SameHost,
    /// Any origin.
    Any,
    /// Exactly these origins (`scheme://host[:port]`) or subdomain wildcards
    /// (`https://*.example.com`).
    List(Vec<String>),
}

impl OriginPolicy {
    pub fn parse(text: &str) -> Result<Self, String> {
        let items: Vec<String> = text
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err("empty origin list; use `*` for any origin".into());
        }
        if items.iter().any(|s| s == "*") {
            return Ok(Self::Any);
        }
        for item in &items {
            let Some((scheme, rest)) = item.split_once("://") else {
                return Err(format!("`{item}` is not an origin like https://app.example.com"));
            };
            if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
                return Err(format!("`{item}` is not an origin like https://app.example.com"));
            }
        }
        Ok(Self::List(items))
    }
}

/// The largest config file read (a config is a few KiB; anything near this is a mistake).
const MAX_CONFIG_FILE: u64 = 1 << 20;
/// The largest admin token file read.
const MAX_TOKEN_FILE: u64 = 64 << 10;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Every setting of `roomcast serve`. See the README's configuration table for the
/// reason behind each default.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub listen_backlog: u32,
    pub plugins: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    pub pong_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message_bytes: u64,
    pub max_queue_bytes: u64,
    pub max_connections: usize,
    /// Connections not (yet) upgraded: HTTP requests and handshakes in progress.
    pub max_http_connections: usize,
    /// Rooms one connection in room-protocol mode may be in at once.
    pub max_rooms_per_connection: usize,
    /// Messages each room without a plugin keeps for recovery (0: none).
    pub history_size: usize,
    /// How long such a room keeps a message.
    pub history_ttl: Duration,
    /// Bytes all rooms' histories may hold together.
    pub history_memory: u64,
    /// Per-message compression (`permessage-deflate`) for clients that offer it.
    pub compression: bool,
    /// Messages smaller than this go uncompressed even to clients that negotiated it.
    pub compression_threshold: usize,
    pub allowed_origins: OriginPolicy,
    pub admin_token: Option<String>,
    pub shutdown_timeout: Duration,
    pub drain_delay: Duration,
    pub log_format: LogFormat,
    pub plugin_max_memory: u64,
    pub plugin_max_deadline: Duration,
    pub plugin_cache: Option<PathBuf>,
    /// PEM certificate chain and private key; with both, the server speaks TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Cluster mode: the Redis URL (`[cluster] redis`); `None` runs one node alone.
    pub redis: Option<String>,
    /// Cluster mode: how long a room's owner holds its lease without renewing it
    /// (`[cluster] lease`), i.e. how soon another node takes over a dead owner's rooms.
    pub cluster_lease: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("listen_backlog", &self.listen_backlog)
            .field("plugins", &self.plugins)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_queue_bytes", &self.max_queue_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_http_connections", &self.max_http_connections)
            .field("max_rooms_per_connection", &self.max_rooms_per_connection)
            .field("history_size", &self.history_size)
            .field("history_ttl", &self.history_ttl)
            .field("history_memory", &self.history_memory)
            .field("compression", &self.compression)
            .field("compression_threshold", &self.compression_threshold)
            .field("allowed_origins", &self.allowed_origins)
            // Tokens never appear in logs.
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("drain_delay", &self.drain_delay)
            .field("log_format", &self.log_format)
            .field("plugin_max_memory", &self.plugin_max_memory)
            .field("plugin_max_deadline", &self.plugin_max_deadline)
            .field("plugin_cache", &self.plugin_cache)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            // A Redis URL may carry a password.
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("cluster_lease", &self.cluster_lease)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_backlog: 4096,
            plugins: None,
            heartbeat_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_message_bytes: 64 << 10,
            max_queue_bytes: 1 << 20,
            max_connections: 19_000,
            max_http_connections: 512,
            max_rooms_per_connection: 100,
            history_size: 0,
            history_ttl: Duration::from_secs(300),
            history_memory: 64 << 20,
            compression: false,
            compression_threshold: 256,
            allowed_origins: OriginPolicy::SameHost,
            admin_token: None,
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            log_format: LogFormat::Human,
            plugin_max_memory: 256 << 20,
            plugin_max_deadline: Duration::from_secs(1),
            plugin_cache: default_cache_dir(),
            tls_cert: None,
            tls_key: None,
            redis: None,
            cluster_lease: crate::cluster::DEFAULT_LEASE,
        }
    }
}

/// A value before it is interpreted: from TOML (typed) or from a flag (always text).
#[derive(Clone, Debug)]
pub enum RawValue {
    Text(String),
    Integer(i64),
    Bool(bool),
    List(Vec<String>),
    Other(&'static str),
}

impl RawValue {
    fn text(&self) -> Result<String, String> {
        match self {
            Self::Text(s) => Ok(s.clone()),
            Self::Integer(i) => Ok(i.to_string()),
            Self::Bool(b) => Ok(b.to_string()),
            Self::List(items) => Ok(items.join(",")),
            Self::Other(kind) => Err(format!("expected a string, found {kind}")),
        }
    }
}

/// Every setting: its key (the flag is the key with dashes), the value's shape, and
/// what it does. The CLI is generated from this table.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    ("listen", "ADDR", "Address to listen on [default: 127.0.0.1:8080]"),
    ("listen_backlog", "N", "Listen backlog; absorbs reconnect storms [default: 4096]"),
    ("plugins", "DIR", "Folder of plugin .wasm files (and NAME.toml beside them) [default: none]"),
    (
        "heartbeat_interval",
        "DURATION",
        "Ping a session after this long without a frame from it [default: 30s]",
    ),
    ("pong_timeout", "DURATION", "Reap a session silent for heartbeat interval plus this [default: 10s]"),
    (
        "handshake_timeout",
        "DURATION",
        "Close connections without a complete upgrade request in this time [default: 10s]",
    ),
    (
        "max_message_bytes",
        "SIZE",
        "Largest message a client may send; larger closes with 1009 [default: 64KiB]",
    ),
    (
        "max_queue_bytes",
        "SIZE",
        "Outbound bytes queued per member before it is cut as a slow consumer [default: 1MiB]",
    ),
    ("max_connections", "N", "Open WebSocket sessions allowed; more get 503 [default: 19000]"),
    (
        "max_http_connections",
        "N",
        "Connections not yet upgraded (requests, handshakes); more are closed at accept [default: 512]",
    ),
    (
        "max_rooms_per_connection",
        "N",
        "Rooms one connection speaking the room protocol (roomcast.v1) may be in [default: 100]",
    ),
    (
        "history_size",
        "N",
        "Messages each room without a plugin keeps for clients that reconnect (0: none) [default: 0]",
    ),
    ("history_ttl", "DURATION", "How long such a room keeps a message [default: 5m]"),
    ("history_memory", "SIZE", "Bytes all rooms' histories may hold together [default: 64MiB]"),
    (
        "compression",
        "on|off",
        "Per-message compression (permessage-deflate) for clients that offer it [default: off]",
    ),
    ("compression_threshold", "SIZE", "Messages smaller than this are sent uncompressed [default: 256B]"),
    (
        "allowed_origins",
        "LIST",
        "Comma-separated origins (https://*.example.com wildcards, * for any) [default: same host]",
    ),
    ("admin_token", "TOKEN", "Bearer token for the admin API; off without one [env: ROOMCAST_ADMIN_TOKEN]"),
    ("admin_token_file", "FILE", "Read the admin token from this file"),
    ("shutdown_timeout", "DURATION", "How long shutdown waits for sessions to close [default: 10s]"),
    (
        "drain_delay",
        "DURATION",
        "On shutdown, answer /healthz with 503 this long before closing sessions [default: 0s]",
    ),
    ("log_format", "FORMAT", "human or json [default: human]"),
    ("plugin_max_memory", "SIZE", "Host-wide cap on a plugin's per-room memory limit [default: 256MiB]"),
    (
        "plugin_cache",
        "DIR",
        "Compiled-plugin cache, so restarts skip compiling; `off` disables [default: ~/.cache/roomcast/plugins]",
    ),
    ("plugin_max_deadline", "DURATION", "Host-wide cap on a plugin's per-call deadline [default: 1s]"),
    ("tls_cert", "FILE", "PEM certificate chain; with --tls-key, serve https:// and wss:// [default: none]"),
    ("tls_key", "FILE", "PEM private key matching --tls-cert [default: none]"),
    (
        "redis",
        "URL",
        "Cluster mode: share rooms with other nodes through this Redis (redis://host:6379) [default: off]",
    ),
    (
        "cluster_lease",
        "DURATION",
        "Cluster mode: how soon another node takes over the rooms of a node that died [default: 5s]",
    ),
];

/// Settings that live in a TOML table rather than at the top level: the dotted TOML
/// name and the setting's key (`[tls] cert` is `--tls-cert`).
pub const NESTED: &[(&str, &str)] = &[
    ("tls.cert", "tls_cert"),
    ("tls.key", "tls_key"),
    ("cluster.redis", "redis"),
    ("cluster.lease", "cluster_lease"),
];

impl Config {
    /// Set one key. `Err` carries the reason; the caller adds the key and its source.
    pub fn set(&mut self, key: &str, value: &RawValue) -> Result<(), SetError> {
        let text = value.text().map_err(SetError::Bad)?;
        let bad = SetError::Bad;
        match key {
            "listen" => {
                self.listen = text
                    .parse()
                    .map_err(|_| bad(format!("`{text}` is not an address like 127.0.0.1:8080")))?
            }
            "listen_backlog" => {
                self.listen_backlog = parse_count(&text, 1, u32::MAX as u64).map_err(bad)? as u32
            }
            "plugins" => self.plugins = Some(PathBuf::from(text)),
            "heartbeat_interval" => self.heartbeat_interval = parse_positive_duration(&text).map_err(bad)?,
            "pong_timeout" => self.pong_timeout = parse_positive_duration(&text).map_err(bad)?,
            "handshake_timeout" => self.handshake_timeout = parse_positive_duration(&text).map_err(bad)?,
            "max_message_bytes" => self.max_message_bytes = parse_positive_size(&text).map_err(bad)?,
            "max_queue_bytes" => self.max_queue_bytes = parse_positive_size(&text).map_err(bad)?,
            "max_connections" => {
                self.max_connections = parse_count(&text, 1, 10_000_000).map_err(bad)? as usize
            }
            "max_http_connections" => {
                self.max_http_connections = parse_count(&text, 1, 10_000_000).map_err(bad)? as usize
            }
            "max_rooms_per_connection" => {
                self.max_rooms_per_connection = parse_count(&text, 1, 100_000).map_err(bad)? as usize
            }
            "history_size" => self.history_size = parse_count(&text, 0, 100_000).map_err(bad)? as usize,
            "history_ttl" => self.history_ttl = parse_positive_duration(&text).map_err(bad)?,
            "history_memory" => self.history_memory = parse_positive_size(&text).map_err(bad)?,
            "compression" => {
                self.compression = match text.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(bad(format!("`{text}` is not on or off"))),
                }
            }
            "compression_threshold" => {
                self.compression_threshold =
                    usize::try_from(crate::units::parse_size(&text).map_err(bad)?).unwrap_or(usize::MAX)
            }
            "allowed_origins" => self.allowed_origins = OriginPolicy::parse(&text).map_err(bad)?,
            "admin_token" => {
                if text.trim().is_empty() {
                    return Err(bad("the admin token is empty".into()));
                }
                self.admin_token = Some(text.trim().to_owned())
            }
            "admin_token_file" => {
                let file = PathBuf::from(&text);
                let token = crate::files::read_regular_text(&file, MAX_TOKEN_FILE)
                    .map_err(|e| SetError::TokenFile(file.clone(), e.to_string()))?;
                if token.trim().is_empty() {
                    return Err(SetError::TokenFile(file, "the file is empty".into()));
                }
                self.admin_token = Some(token.trim().to_owned());
            }
            "shutdown_timeout" => self.shutdown_timeout = parse_duration(&text).map_err(bad)?,
            "drain_delay" => self.drain_delay = parse_duration(&text).map_err(bad)?,
            "log_format" => {
                self.log_format = match text.as_str() {
                    "human" => LogFormat::Human,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(bad(format!("`{other}` is not a log format; use human or json")));
                    }
                }
            }
            "plugin_max_memory" => self.plugin_max_memory = parse_positive_size(&text).map_err(bad)?,
            "plugin_cache" => {
                self.plugin_cache = match text.trim() {
                    "" | "off" => None,
                    path => Some(PathBuf::from(path)),
                }
            }
            "plugin_max_deadline" => {
                self.plugin_max_deadline = parse_positive_duration(&text).map_err(bad)?
            }
            "tls_cert" => self.tls_cert = Some(PathBuf::from(text)),
            "tls_key" => self.tls_key = Some(PathBuf::from(text)),
            "redis" => {
                let url = text.trim();
                redis::Client::open(url)
                    .map_err(|e| bad(format!("`{}` is not a Redis URL: {e}", redact_url(url))))?;
                self.redis = Some(url.to_owned());
            }
            "cluster_lease" => {
                let lease = parse_positive_duration(&text).map_err(bad)?;
                if lease < Duration::from_millis(300) {
                    return Err(bad(format!("`{text}` is too short; the lease must be at least 300ms")));
                }
                self.cluster_lease = lease;
            }
            _ => return Err(SetError::Unknown),
        }
        Ok(())
    }

    /// Read a TOML config file over the current values.
    pub fn apply_file(&mut self, file: &Path) -> Result<(), ConfigError> {
        let text = crate::files::read_regular_text(file, MAX_CONFIG_FILE)
            .map_err(|e| ConfigError::Unreadable { file: file.to_owned(), reason: e.to_string() })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
            file: file.to_owned(),
            reason: e.message().to_owned(),
        })?;
        for (key, value) in flatten(&table) {
            let key = &key;
            let raw = match value {
                toml::Value::String(s) => RawValue::Text(s.clone()),
                toml::Value::Integer(i) => RawValue::Integer(*i),
                toml::Value::Boolean(b) => RawValue::Bool(*b),
                toml::Value::Array(items) => {
                    let mut list = Vec::new();
                    for item in items {
                        match item {
                            toml::Value::String(s) => list.push(s.clone()),
                            _ => {
                                return Err(ConfigError::BadFileValue {
                                    file: file.to_owned(),
                                    key: key.clone(),
                                    reason: "expected a list of strings".into(),
                                });
                            }
                        }
                    }
                    RawValue::List(list)
                }
                toml::Value::Float(_) => RawValue::Other("a float"),
                toml::Value::Datetime(_) => RawValue::Other("a date"),
                toml::Value::Table(_) => RawValue::Other("a table"),
            };
            // A relative path in a file is relative to that file.
            // Settings in a table have a dotted TOML name; the rest are top-level keys.
            let setting = match NESTED.iter().find(|(name, _)| name == key) {
                Some((_, setting)) => *setting,
                None if NESTED.iter().any(|(_, setting)| setting == key) => "",
                None => key.as_str(),
            };
            let raw = match (setting, raw) {
                ("plugins" | "admin_token_file" | "tls_cert" | "tls_key", RawValue::Text(path)) => {
                    let base = file.parent().unwrap_or(Path::new("."));
                    RawValue::Text(base.join(path).to_string_lossy().into_owned())
                }
                (_, raw) => raw,
            };
            self.set(setting, &raw).map_err(|e| match e {
                SetError::Unknown => ConfigError::UnknownKey { file: file.to_owned(), key: key.clone() },
                SetError::Bad(reason) => {
                    ConfigError::BadFileValue { file: file.to_owned(), key: key.clone(), reason }
                }
                SetError::TokenFile(file, reason) => ConfigError::TokenFile { file, reason },
            })?;
        }
        Ok(())
    }

    /// Apply a flag (`flag` is the key's name with dashes, as typed).
    pub fn apply_flag(&mut self, flag: &str, value: &str) -> Result<(), ConfigError> {
        let key = flag.replace('-', "_");
        self.set(&key, &RawValue::Text(value.to_owned())).map_err(|e| match e {
            SetError::Unknown => {
                ConfigError::BadFlag { flag: flag.to_owned(), reason: "unknown setting".into() }
            }
            SetError::Bad(reason) => ConfigError::BadFlag { flag: flag.to_owned(), reason },
            SetError::TokenFile(file, reason) => ConfigError::TokenFile { file, reason },
        })
    }
}

/// The file's keys with tables that hold [`NESTED`] settings opened up: `[tls] cert`
/// becomes `tls.cert`. Other tables stay whole (and are refused as values).
fn flatten(table: &toml::Table) -> Vec<(String, &toml::Value)> {
    let mut entries = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner)
                if NESTED.iter().any(|(name, _)| name.split('.').next() == Some(key)) =>
            {
                entries.extend(inner.iter().map(|(sub, value)| (format!("{key}.{sub}"), value)));
            }
            _ => entries.push((key.clone(), value)),
        }
    }
    entries
}

/// `$XDG_CACHE_HOME/roomcast/plugins`, else `$HOME/.cache/roomcast/plugins`.
fn default_cache_dir() -> Option<PathBuf> {
    let base =
        std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|home| PathBuf::from(home).join(".cache"))
        })?;
    Some(base.join("roomcast").join("plugins"))
}

/// A URL with any password replaced, for logs and error messages.
fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://<redacted>{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// Why [`Config::set`] refused a value.
#[derive(Debug)]
pub enum SetError {
    Unknown,
    Bad(String),
    TokenFile(PathBuf, String),
}

fn parse_count(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = text.trim().parse().map_err(|_| format!("`{text}` is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{n} is out of range ({min} to {max})"));
    }
    Ok(n)
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(d)
}

fn parse_positive_size(text: &str) -> Result<u64, String> {
    let n = parse_size(text)?;
    if n == 0 {
        return Err(format!("`{text}` must be larger than zero"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let file = dir.path().join("roomcast.toml");
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    /// A minimal temporary directory, removed on drop.
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "roomcast-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn file_then_flags() {
        let (_dir, file) = write(
            "heartbeat_interval = \"5s\"\nmax_queue_bytes = \"64KiB\"\nmax_message_bytes = 1000\nallowed_origins = [\"https://a.example\", \"https://*.b.example\"]\n",
        );
        let mut config = Config::default();
        config.apply_file(&file).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.max_queue_bytes, 65536);
        assert_eq!(config.max_message_bytes, 1000);
        assert_eq!(
            config.allowed_origins,
            OriginPolicy::List(vec!["https://a.example".into(), "https://*.b.example".into()])
        );
        config.apply_flag("heartbeat-interval", "7s").unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_secs(7));
        assert_eq!(config.pong_timeout, Duration::from_secs(10), "defaults stay");
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let (_dir, file) = write("heartbeat_intervl = \"5s\"\n");
        let err = Config::default().apply_file(&file).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("heartbeat_intervl") && text.contains("roomcast.toml"), "{text}");

        let (_dir, file) = write("pong_timeout = \"soon\"\n");
        let text = Config::default().apply_file(&file).unwrap_err().to_string();
        assert!(
            text.contains("pong_timeout") && text.contains("roomcast.toml") && text.contains("soon"),
            "{text}"
        );

        let text =
            Config::default().apply_file(Path::new("/nonexistent/roomcast.toml")).unwrap_err().to_string();
        assert!(text.contains("/nonexistent/roomcast.toml"), "{text}");

        let (_dir, file) = write("listen = [1, 2]\n");
        let text = Config::default().apply_file(&file).unwrap_err().to_string();
        assert!(text.contains("listen") && text.contains("roomcast.toml"), "{text}");

        let text = Config::default().apply_flag("max-queue-bytes", "lots").unwrap_err().to_string();
        assert!(text.contains("--max-queue-bytes") && text.contains("lots"), "{text}");
    }

    #[test]
    fn tls_table() {
        let (dir, file) = write("[tls]\ncert = \"cert.pem\"\nkey = \"/etc/key.pem\"\n");
        let mut config = Config::default();
        config.apply_file(&file).unwrap();
        assert_eq!(config.tls_cert, Some(dir.path().join("cert.pem")), "relative to the file");
        assert_eq!(config.tls_key, Some(PathBuf::from("/etc/key.pem")));
        config.apply_flag("tls-cert", "other.pem").unwrap();
        assert_eq!(config.tls_cert, Some(PathBuf::from("other.pem")));

        for (text, key) in [
            ("[tls]\ncrt = \"c.pem\"\n", "tls.crt"),
            ("tls_cert = \"c.pem\"\n", "tls_cert"),
            ("[tls]\ncert = 5.5\n", "tls.cert"),
        ] {
            let (_dir, file) = write(text);
            let text = Config::default().apply_file(&file).unwrap_err().to_string();
            assert!(text.contains(&format!("`{key}`")) && text.contains("roomcast.toml"), "{text}");
        }
    }

    #[test]
    fn every_key_is_known() {
        let mut config = Config::default();
        for (key, _, _) in SETTINGS {
            let result = config.set(key, &RawValue::Text("x".into()));
            assert!(!matches!(result, Err(SetError::Unknown)), "{key} is listed but unknown");
        }
    }

    #[test]
    fn cluster_settings_live_in_their_table() {
        let (_dir, file) = write("[cluster]\nredis = \"redis://127.0.0.1:6390/\"\nlease = \"2s\"\n");
        let mut config = Config::default();
        config.apply_file(&file).unwrap();
        assert_eq!(config.redis.as_deref(), Some("redis://127.0.0.1:6390/"));
        assert_eq!(config.cluster_lease, Duration::from_secs(2));

        let (_dir, file) = write("redis = \"redis://127.0.0.1/\"\n");
        let text = Config::default().apply_file(&file).unwrap_err().to_string();
        assert!(text.contains("unknown key `redis`"), "{text}");
        let (_dir, file) = write("[cluster]\nredys = \"x\"\n");
        let text = Config::default().apply_file(&file).unwrap_err().to_string();
        assert!(text.contains("cluster.redys"), "{text}");
        let (_dir, file) = write("[cluster]\nredis = \"http://x\"\n");
        let text = Config::default().apply_file(&file).unwrap_err().to_string();
        assert!(text.contains("cluster.redis"), "{text}");

        let mut config = Config::default();
        config.apply_flag("redis", "redis://:pw@127.0.0.1:1/").unwrap();
        assert!(!format!("{config:?}").contains("pw"));
        assert!(config.apply_flag("cluster-lease", "10ms").is_err());
    }

    #[test]
    fn token_is_redacted() {
        let config = Config { admin_token: Some("s3cret".into()), ..Config::default() };
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn origins() {
        assert_eq!(OriginPolicy::parse("*"), Ok(OriginPolicy::Any));
        assert!(OriginPolicy::parse("example.com").is_err());
        assert!(OriginPolicy::parse("").is_err());
    }
}
