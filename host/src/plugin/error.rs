//! The one error type of the plugin runtime: which plugin, which room, what kind of failure.

use std::fmt;

/// How a plugin failed. [`FailureKind::outcome`] is the `outcome` label of
/// `roomcast_plugin_calls_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access, a call to an
    /// import plugins are not given).
    Trap,
    /// The call ran past its deadline and was interrupted.
    Timeout,
    /// The guest asked for more memory than its limit (and then trapped).
    Memory,
    /// The guest returned an error (`init`, `restore`) or an answer the host refuses,
    /// or the instance is unusable after an earlier failure.
    Error,
    /// The plugin could not be loaded: unreadable file, not a component, the wrong
    /// world or WIT version, a bad `NAME.toml`, a pattern conflict.
    Load,
}

impl FailureKind {
    /// The metrics label for a call that failed this way.
    pub fn outcome(&self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Error | FailureKind::Load => "error",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Error => "error",
            FailureKind::Load => "load error",
        })
    }
}

/// A plugin failure: `plugin `chat` in room `chat:x`: ran past its 10ms deadline`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{plugin}`{}: {detail}", .room.as_ref().map(|room| format!(" in room `{room}`")).unwrap_or_default())]
pub struct PluginError {
    /// The plugin's name (its file stem).
    pub plugin: String,
    /// The room whose instance failed; `None` for loading and handshakes.
    pub room: Option<String>,
    pub kind: FailureKind,
    /// What happened, for people: `ran past its 10ms deadline`, `trapped: ...`.
    pub detail: String,
}

impl PluginError {
    pub(crate) fn new(
        plugin: impl Into<String>,
        room: Option<&str>,
        kind: FailureKind,
        detail: impl Into<String>,
    ) -> Self {
        PluginError { plugin: plugin.into(), room: room.map(str::to_owned), kind, detail: detail.into() }
    }

    pub(crate) fn load(plugin: impl Into<String>, detail: impl Into<String>) -> Self {
        PluginError::new(plugin, None, FailureKind::Load, detail)
    }
}
