//! The live plugin set: which plugin serves which room right now.
//!
//! The set is replaced whole (copy, change, publish) and every publish bumps a
//! generation number; room actors compare it before each event and switch to the
//! plugin that now matches their room between two events, never during one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::metrics::Metrics;
use crate::plugin::{HostCaps, Plugin, PluginError, PluginRuntime, PluginSet};

/// Why the plugins could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum PluginsError {
    #[error("plugins folder {} does not exist or is not a folder", .0.display())]
    MissingDir(PathBuf),
    #[error(transparent)]
    Runtime(#[from] PluginError),
}

/// The plugin runtime plus the set of plugins currently serving rooms.
#[derive(Debug)]
pub struct LivePlugins {
    runtime: PluginRuntime,
    /// The folder plugins are loaded from (`None`: no plugins, every room has the
    /// default behaviour).
    dir: Option<PathBuf>,
    current: RwLock<Arc<PluginSet>>,
    /// Bumped on every publish; room actors re-resolve their plugin when it changes.
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

impl LivePlugins {
    /// Start the runtime and load every plugin in `dir`. A plugin that fails to load
    /// is logged and skipped; the others serve.
    pub fn load(
        dir: Option<&Path>,
        caps: HostCaps,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PluginsError> {
        if let Some(dir) = dir
            && !dir.is_dir()
        {
            return Err(PluginsError::MissingDir(dir.to_owned()));
        }
        let runtime = PluginRuntime::new(caps)?;
        let set = match dir {
            Some(dir) => {
                let (set, errors) = PluginSet::load_dir(&runtime, dir);
                for error in errors {
                    tracing::error!(%error, "plugin not loaded");
                }
                set
            }
            None => PluginSet::new(),
        };
        for plugin in set.plugins() {
            metrics.plugin_calls(plugin.name());
            tracing::info!(
                plugin = plugin.name(),
                version = %plugin.info().version,
                rooms = ?plugin.patterns().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "plugin loaded"
            );
        }
        Ok(Self {
            runtime,
            dir: dir.map(Path::to_owned),
            current: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
            metrics,
        })
    }

    /// The plugin serving `room`, if any.
    pub fn for_room(&self, room: &str) -> Option<Arc<Plugin>> {
        self.current().for_room(room)
    }

    /// The current set.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The generation of the current set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn runtime(&self) -> &PluginRuntime {
        &self.runtime
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Publish `set` as the current set.
    pub fn publish(&self, set: PluginSet) {
        for plugin in set.plugins() {
            self.metrics.plugin_calls(plugin.name());
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
