//! Hot reload: the live plugin set, the folder watcher, and the swap.
//!
//! A reload is compile, validate, swap. The watcher thread notices a change in the
//! plugins folder (inotify through `notify`, plus a periodic rescan that also covers
//! missed events), waits until the burst is over and the file is stable, compiles and
//! links the new version on its own thread (never on the async workers), calls its
//! `init`, and only then publishes a new plugin set. Every publish bumps a generation
//! number; each room actor compares it before each event and switches to the plugin
//! that now matches its room between two events, never during one. A file that fails
//! at any step is logged with its reason and recorded for the admin API, and the
//! previous version keeps serving.
//!
//! A reload goes live on Winch's code (unless the compiled-plugin cache has
//! Cranelift's); once no other reload waits, the same thread compiles it with Cranelift
//! and new instances of that version are made from Cranelift's code from then on
//! ([`LivePlugins::optimize_next`]). That publishes nothing: no room switches, and the
//! rooms that switched to the new version keep the instance they have (a live instance
//! cannot change compilers: its store belongs to one engine) until their next one,
//! when the room is created again or recovers from a failed call. A room would
//! otherwise switch twice per reload, and a plugin without `snapshot` would lose its
//! state twice.
//!
//! Gone and broken are different things. Only a `NAME.wasm` that is gone (no entry of
//! that name at all) takes its rooms back to the default broadcast. A file that exists
//! but cannot be read (a symlink loop, a dangling symlink, a folder, a FIFO, a device,
//! a file over [`MAX_PLUGIN_BYTES`](crate::plugin::MAX_PLUGIN_BYTES)) or loaded is an
//! error: a token-gating plugin made unreadable keeps gating. One that has no version
//! serving at all (broken since start-up) still guards the rooms it would serve by
//! default (`NAME`, `NAME:*`): their upgrades are refused with 503 until it loads or
//! is gone ([`LivePlugins::failed_for`]). Likewise a plugins folder
//! that cannot be read is an error at start-up, and skipped by the rescan, never taken
//! for an empty folder.
//!
//! The watcher acts on writes, creates, renames, deletes and metadata changes only:
//! the reload's own reads (inotify's open, access and close-without-write events)
//! would otherwise schedule another reload, forever. A file is loaded once per change,
//! and a broken one is reported (logged and recorded) once until it changes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

#[cfg(test)]
mod tests;
mod watch;

use crate::metrics::Metrics;
use crate::plugin::{Compiler, HostCaps, Plugin, PluginError, PluginRuntime, PluginSet, PluginSource};

use watch::Stamp;
pub use watch::Watcher;

/// How long the folder must be quiet before a burst of events is acted on.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// After an event that says a file is complete, how long to gather related events.
const SETTLE: Duration = Duration::from_millis(5);
/// A file whose size or modification time changes within this window is still being
/// written (a plain `cp` over the old file); it is looked at again later.
const STABLE_FOR: Duration = Duration::from_millis(25);
/// The rescan that catches events the watcher missed (or a folder it cannot watch).
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// How many reload events [`LivePlugins::reload_events`] keeps (the dashboard's log).
pub const RELOAD_LOG: usize = 64;

/// One outcome of a reload, for the dashboard's log.
#[derive(Clone, Debug)]
pub struct ReloadEvent {
    pub at: SystemTime,
    pub plugin: String,
    pub kind: ReloadKind,
    /// The version now serving, for `Loaded`.
    pub version: Option<u64>,
    /// The error, for `Failed`.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadKind {
    Loaded,
    Failed,
    Removed,
}

impl ReloadKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Failed => "failed",
            Self::Removed => "removed",
        }
    }
}

/// Why the plugins could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum PluginsError {
    #[error("plugins folder {} does not exist or is not a folder", .0.display())]
    MissingDir(PathBuf),
    /// The folder exists but cannot be listed: not the same as an empty folder.
    #[error("cannot read the plugins folder {}: {error}", dir.display())]
    UnreadableDir { dir: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Runtime(#[from] PluginError),
}

/// What the admin API shows about one plugin name.
#[derive(Clone, Debug, Default)]
pub struct PluginRecord {
    /// How many versions of it have been loaded since start-up.
    pub versions: u64,
    /// The version now serving, if any.
    pub current: Option<(Arc<Plugin>, u64)>,
    /// How long loading the version serving took: compiling (see
    /// [`Plugin::compiled_in`]), linking, its `init` and `describe`.
    pub loaded_in: Option<Duration>,
    /// The latest failure to load it, with when it happened (cleared when its
    /// `NAME.wasm` is gone).
    pub last_error: Option<(SystemTime, String)>,
    /// Hash of the `.wasm` and `.toml` contents of the version serving, so identical
    /// content is not compiled again.
    content: Option<[u8; 32]>,
    /// What failed last time, if the latest attempt failed: the same failure again is
    /// not reported again.
    failed: Option<Attempt>,
}

/// What one attempt to load a plugin saw, to tell a change from the same thing again:
/// the stamps of `NAME.wasm` and `NAME.toml`, and the hash of their contents (or, when
/// they could not be read, the error). A FIFO replaced by another reads the same error
/// but has another stamp; `touch` on a file that failed retries it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attempt {
    stamps: [Stamp; 2],
    read: Result<[u8; 32], String>,
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
    records: Mutex<BTreeMap<String, PluginRecord>>,
    /// The latest [`RELOAD_LOG`] reload outcomes, oldest first.
    events: Mutex<VecDeque<ReloadEvent>>,
    /// Called after each publish (the server tells every live room).
    on_publish: Mutex<Option<Callback>>,
    /// Versions that went live on Winch's code, to compile with Cranelift when no
    /// reload waits; oldest first, at most one per plugin.
    unoptimized: Mutex<VecDeque<Unoptimized>>,
    metrics: Arc<Metrics>,
}

/// A version serving on Winch's code, and the bytes it was loaded from.
type Unoptimized = (Arc<Plugin>, Arc<[u8]>);

/// A callback run after each publish.
struct Callback(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Callback")
    }
}

impl LivePlugins {
    /// Start the runtime and load every plugin in `dir`. A plugin that fails to load
    /// is logged, recorded and skipped; the others serve.
    pub fn load(
        dir: Option<&Path>,
        caps: HostCaps,
        cache: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PluginsError> {
        if let Some(dir) = dir
            && !dir.is_dir()
        {
            return Err(PluginsError::MissingDir(dir.to_owned()));
        }
        // The watcher reports absolute paths: compare them with an absolute folder.
        let dir = dir.map(|dir| dir.canonicalize().unwrap_or_else(|_| dir.to_owned()));
        let dir = dir.as_deref();
        let mut runtime = PluginRuntime::new(caps)?;
        if let Some(cache) = cache {
            runtime.set_cache_dir(cache);
        }
        let live = Self {
            runtime,
            dir: dir.map(Path::to_owned),
            current: RwLock::new(Arc::new(PluginSet::new())),
            generation: AtomicU64::new(0),
            records: Mutex::new(BTreeMap::new()),
            events: Mutex::new(VecDeque::with_capacity(RELOAD_LOG)),
            on_publish: Mutex::new(None),
            unoptimized: Mutex::new(VecDeque::new()),
            metrics,
        };
        if let Some(dir) = dir {
            let started = Instant::now();
            let names = plugin_names(dir)
                .map_err(|error| PluginsError::UnreadableDir { dir: dir.to_owned(), error })?;
            // Nothing serves yet: compile with Cranelift (or load from the cache) at once.
            for name in names {
                live.load_one(dir, &name, false);
            }
            tracing::info!(plugins = live.current().len(), took = ?started.elapsed(), "plugins loaded");
        }
        Ok(live)
    }

    /// Run `callback` after every publish.
    pub fn on_publish(&self, callback: impl Fn() + Send + Sync + 'static) {
        *self.on_publish.lock().unwrap_or_else(|e| e.into_inner()) = Some(Callback(Box::new(callback)));
    }

    /// The plugin serving `room`, if any.
    pub fn for_room(&self, room: &str) -> Option<Arc<Plugin>> {
        self.current().for_room(room)
    }

    /// The current set.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// Every plugin serving now, or whose files are there but failed to load, with its
    /// versions and last error. A plugin whose `NAME.wasm` is gone is not listed (its
    /// record stays, hidden, so a re-added plugin continues its version count).
    pub fn records(&self) -> BTreeMap<String, PluginRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .filter(|(_, record)| record.current.is_some() || record.last_error.is_some())
            .map(|(name, record)| (name.clone(), record.clone()))
            .collect()
    }

    /// The plugin that would serve `room` by its default patterns (`NAME`, `NAME:*`)
    /// but failed to load and has no version serving, if any. Failing to load a
    /// plugin never opens a room it would guard: the server refuses such a room's
    /// upgrades until the plugin loads or its file is gone.
    pub fn failed_for(&self, room: &str) -> Option<String> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .filter(|(_, record)| record.current.is_none() && record.last_error.is_some())
            .find(|(name, _)| crate::plugin::RoomPattern::defaults_for(name).iter().any(|p| p.matches(room)))
            .map(|(name, _)| name.clone())
    }

    /// The latest reload outcomes, oldest first (at most [`RELOAD_LOG`]).
    pub fn reload_events(&self) -> Vec<ReloadEvent> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    fn log_event(&self, plugin: &str, kind: ReloadKind, version: Option<u64>, error: Option<String>) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // A rewritten file that fails the same way is not news for the dashboard's log;
        // `last_error_at` in the plugin's record says when it last happened.
        let previous = events.iter().rev().find(|e| e.plugin == plugin);
        if kind == ReloadKind::Failed && previous.is_some_and(|e| e.kind == kind && e.error == error) {
            return;
        }
        if events.len() == RELOAD_LOG {
            events.pop_front();
        }
        events.push_back(ReloadEvent {
            at: SystemTime::now(),
            plugin: plugin.to_owned(),
            kind,
            version,
            error,
        });
    }

    /// The version number of `plugin` (1 for the first version loaded under its name),
    /// or 0 if it is no longer the current version.
    pub fn version_of(&self, plugin: &Arc<Plugin>) -> u64 {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .get(plugin.name())
            .and_then(|r| r.current.as_ref())
            .filter(|(current, _)| Arc::ptr_eq(current, plugin))
            .map_or(0, |(_, version)| *version)
    }

    fn publish(&self, set: PluginSet) {
        for plugin in set.plugins() {
            self.metrics.plugin_calls(plugin.name());
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(callback) = self.on_publish.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            (callback.0)();
        }
    }

    fn record(&self, name: &str, change: impl FnOnce(&mut PluginRecord)) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        change(records.entry(name.to_owned()).or_default());
    }

    /// Bring plugin `name` in line with the folder: load a new or changed version,
    /// remove a deleted one. Returns whether the live set changed.
    ///
    /// The files are read once (regular files only, bounded); unchanged content is not
    /// compiled again, and a failure exactly like the last one is skipped silently. A
    /// new version goes live on Winch's code (see [`LivePlugins::optimize_next`]).
    pub fn reload(&self, dir: &Path, name: &str) -> bool {
        self.load_one(dir, name, true)
    }

    /// Compile, with Cranelift, the oldest version still serving on Winch's code, and
    /// make its new instances from that code. Returns whether there was one. The
    /// watcher calls it when no reload waits: a reload never waits for more than the
    /// one that runs.
    pub fn optimize_next(&self) -> bool {
        let next = loop {
            let Some((plugin, wasm)) = self.unoptimized.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
            else {
                return false;
            };
            // A version replaced (or removed) meanwhile is not worth compiling.
            if self.version_of(&plugin) != 0 {
                break (plugin, wasm);
            }
        };
        let (plugin, wasm) = next;
        let started = Instant::now();
        match self.runtime.optimize(&plugin, &wasm) {
            Ok(took) => tracing::info!(
                plugin = plugin.name(),
                load = self.version_of(&plugin),
                compile = ?took,
                took = ?started.elapsed(),
                "plugin optimised: new instances run Cranelift's code"
            ),
            // Not expected (Winch compiled the same bytes); the version keeps serving on
            // Winch's code.
            Err(error) => {
                tracing::warn!(plugin = plugin.name(), %error, "cannot optimise the plugin; it keeps Winch's code")
            }
        }
        true
    }

    /// Whether a version serves on Winch's code and waits for Cranelift's.
    pub fn unoptimized(&self) -> bool {
        !self.unoptimized.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// [`reload`](LivePlugins::reload), going live on Winch's code when `fast`.
    fn load_one(&self, dir: &Path, name: &str, fast: bool) -> bool {
        let wasm = dir.join(format!("{name}.wasm"));
        // Stamped before the read, so a change during it is a change next time too.
        let stamps = [Stamp::of(&wasm), Stamp::of(&wasm.with_extension("toml"))];
        let Some(source) = PluginSource::read(&wasm).transpose() else {
            return self.remove(name, &wasm);
        };
        let attempt = Attempt {
            stamps,
            read: source.as_ref().map(PluginSource::content_hash).map_err(ToString::to_string),
        };
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(record) = records.get_mut(name) {
                if let Ok(content) = attempt.read
                    && record.content == Some(content)
                {
                    // The version serving (a broken file was put back): nothing to load,
                    // and the next failure is news again.
                    record.failed = None;
                    return false;
                }
                if record.failed.as_ref() == Some(&attempt) {
                    // Reported when it first failed; not again until a file changes.
                    return false;
                }
            }
        }
        let started = Instant::now();
        let mut bytes = None;
        let loaded = source
            .map_err(|error| PluginError::load(name, error.to_string()))
            .and_then(|source| {
                if fast {
                    let plugin = self.runtime.load_source_fast(&source)?;
                    bytes = (plugin.compiler() == Compiler::Winch).then(|| Arc::from(source.wasm()));
                    Ok(plugin)
                } else {
                    self.runtime.load_source(&source)
                }
            })
            .and_then(|plugin| {
                let mut set = (*self.current()).clone();
                set.insert(plugin.clone()).map(|_| (plugin, set))
            });
        match loaded {
            Ok((plugin, set)) => {
                let content = attempt.read.ok();
                let mut version = 0;
                let took = started.elapsed();
                self.record(name, |r| {
                    r.versions += 1;
                    version = r.versions;
                    r.current = Some((plugin.clone(), r.versions));
                    r.loaded_in = Some(took);
                    r.content = content;
                    r.failed = None;
                });
                // `version` is what the plugin says it is (its crate's version); `load`
                // counts the versions of this name loaded since start-up (the admin
                // API's `version` field).
                tracing::info!(
                    plugin = name,
                    version = %plugin.info().version,
                    load = version,
                    sha256 = plugin.sha256(),
                    rooms = ?plugin.patterns().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    compiler = plugin.compiler().label(),
                    compile = ?plugin.compiled_in(),
                    took = ?took,
                    "plugin loaded"
                );
                self.log_event(name, ReloadKind::Loaded, Some(version), None);
                if let Some(bytes) = bytes {
                    let mut queue = self.unoptimized.lock().unwrap_or_else(|e| e.into_inner());
                    queue.retain(|(queued, _)| queued.name() != name);
                    queue.push_back((plugin.clone(), bytes));
                }
                self.publish(set);
                true
            }
            Err(error) => {
                if self.current().get(name).is_some() {
                    tracing::error!(plugin = name, file = %wasm.display(), %error, "plugin not loaded; the previous version keeps serving");
                } else {
                    tracing::error!(plugin = name, file = %wasm.display(), %error, "plugin not loaded; no version of it is serving, so its rooms refuse new members until it loads");
                }
                self.log_event(name, ReloadKind::Failed, None, Some(error.to_string()));
                self.record(name, |r| {
                    r.last_error = Some((SystemTime::now(), error.to_string()));
                    r.failed = Some(attempt);
                });
                false
            }
        }
    }

    /// `name`'s `.wasm` is gone: its rooms return to the default behaviour, and it
    /// leaves the admin listing. Returns whether the live set changed.
    fn remove(&self, name: &str, wasm: &Path) -> bool {
        if let Some(record) = self.records.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
            record.current = None;
            record.loaded_in = None;
            record.content = None;
            record.failed = None;
            record.last_error = None;
        }
        let mut set = (*self.current()).clone();
        if set.remove(name).is_none() {
            return false;
        }
        tracing::info!(plugin = name, file = %wasm.display(), "plugin removed; its rooms return to the default behaviour");
        self.log_event(name, ReloadKind::Removed, None, None);
        self.publish(set);
        true
    }
}

/// Whether a file name is one the watcher acts on: `NAME.wasm` or `NAME.toml`, not
/// hidden, not an editor's or downloader's temporary file. Returns `NAME`.
pub fn plugin_file_name(file: &Path) -> Option<String> {
    let name = file.file_name()?.to_str()?;
    if name.starts_with('.') || name.ends_with('~') || name.starts_with('#') {
        return None;
    }
    let stem = name.strip_suffix(".wasm").or_else(|| name.strip_suffix(".toml"))?;
    (!stem.is_empty()).then(|| stem.to_owned())
}

/// The plugin names in `dir` (those with a `.wasm` file), sorted; an error if the
/// folder cannot be listed.
fn plugin_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm")
            && let Some(name) = plugin_file_name(&path)
        {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Format a time as RFC 3339 in UTC, e.g. `2026-11-26T01:45:22Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
