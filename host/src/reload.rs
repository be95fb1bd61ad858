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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::plugin::{HostCaps, Plugin, PluginError, PluginRuntime, PluginSet};

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
    /// The latest failure to load it, with when it happened.
    pub last_error: Option<(SystemTime, String)>,
    /// Hash of the `.wasm` and `.toml` contents of the version serving, so identical
    /// content is not compiled again.
    content: Option<[u8; 32]>,
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
    metrics: Arc<Metrics>,
}

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
            metrics,
        };
        if let Some(dir) = dir {
            let started = Instant::now();
            for name in plugin_names(dir) {
                live.reload(dir, &name);
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

    /// Every plugin name seen since start-up, with its versions and last error.
    pub fn records(&self) -> BTreeMap<String, PluginRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The latest reload outcomes, oldest first (at most [`RELOAD_LOG`]).
    pub fn reload_events(&self) -> Vec<ReloadEvent> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    fn log_event(&self, plugin: &str, kind: ReloadKind, version: Option<u64>, error: Option<String>) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // The same failure again (the watcher retries a broken file on each event) is
        // not news; `last_error_at` in the plugin's record says when it last happened.
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
    pub fn reload(&self, dir: &Path, name: &str) -> bool {
        let wasm = dir.join(format!("{name}.wasm"));
        let manifest = dir.join(format!("{name}.toml"));
        let Ok(bytes) = std::fs::read(&wasm) else {
            // Deleted (or unreadable): its rooms return to the default behaviour.
            let mut set = (*self.current()).clone();
            if set.remove(name).is_none() {
                return false;
            }
            self.record(name, |r| {
                r.current = None;
                r.content = None;
            });
            tracing::info!(plugin = name, file = %wasm.display(), "plugin removed; its rooms return to the default behaviour");
            self.log_event(name, ReloadKind::Removed, None, None);
            self.publish(set);
            return true;
        };
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        hasher.update(std::fs::read(&manifest).unwrap_or_default());
        let content: [u8; 32] = hasher.finalize().into();
        let unchanged = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.get(name).and_then(|r| r.content) == Some(content)
        };
        if unchanged {
            return false;
        }
        let started = Instant::now();
        let loaded = self.runtime.load(&wasm).and_then(|plugin| {
            let mut set = (*self.current()).clone();
            set.insert(plugin.clone()).map(|_| (plugin, set))
        });
        match loaded {
            Ok((plugin, set)) => {
                let mut version = 0;
                self.record(name, |r| {
                    r.versions += 1;
                    version = r.versions;
                    r.current = Some((plugin.clone(), r.versions));
                    r.content = Some(content);
                });
                tracing::info!(
                    plugin = name,
                    version,
                    describe = %format!("{} {}", plugin.info().name, plugin.info().version),
                    sha256 = plugin.sha256(),
                    rooms = ?plugin.patterns().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    took = ?started.elapsed(),
                    "plugin loaded"
                );
                self.log_event(name, ReloadKind::Loaded, Some(version), None);
                self.publish(set);
                true
            }
            Err(error) => {
                tracing::error!(plugin = name, file = %wasm.display(), %error, "plugin not loaded; the previous version keeps serving");
                self.log_event(name, ReloadKind::Failed, None, Some(error.to_string()));
                self.record(name, |r| {
                    r.last_error = Some((SystemTime::now(), error.to_string()));
                    // Try again when the file changes, even back to this content.
                    r.content = None;
                });
                false
            }
        }
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

/// The plugin names in `dir` (those with a `.wasm` file), sorted.
fn plugin_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "wasm"))
        .filter_map(|path| plugin_file_name(&path))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Size and modification time of every plugin file in `dir`, for the rescan.
fn snapshot(dir: &Path) -> HashMap<PathBuf, (u64, Option<SystemTime>)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| plugin_file_name(&entry.path()).is_some())
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            Some((entry.path(), (meta.len(), meta.modified().ok())))
        })
        .collect()
}

/// The watcher: a thread that turns changes in the plugins folder into reloads.
/// Dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    stop: Option<mpsc::Sender<WatchEvent>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum WatchEvent {
    /// A file changed; `complete` when the event says it is whole again (renamed into
    /// place, closed after writing, or deleted).
    Changed(PathBuf, bool),
    Rescan,
    Stop,
}

/// Whether a file event means the file is complete: it was renamed into place, closed
/// after writing, or removed. Other events (data written, created) may be mid-write.
fn completes(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    matches!(
        kind,
        notify::EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            | notify::EventKind::Access(AccessKind::Close(AccessMode::Write))
            | notify::EventKind::Remove(_)
    )
}

impl Watcher {
    /// Watch `plugins.dir()` (if any) and reload on changes.
    pub fn start(plugins: Arc<LivePlugins>) -> Option<Watcher> {
        let dir = plugins.dir()?.to_owned();
        let (tx, rx) = mpsc::channel::<WatchEvent>();
        let events = tx.clone();
        let inotify = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let _ = match event {
                Ok(event) => {
                    let complete = completes(&event.kind);
                    event.paths.into_iter().try_for_each(|p| events.send(WatchEvent::Changed(p, complete)))
                }
                Err(_) => events.send(WatchEvent::Rescan),
            };
        });
        let inotify = match inotify {
            Ok(mut watcher) => {
                use notify::Watcher as _;
                match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                    Ok(()) => Some(watcher),
                    Err(error) => {
                        tracing::warn!(%error, dir = %dir.display(), "cannot watch the plugins folder; rescanning it every {RESCAN_EVERY:?}");
                        None
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "no file watcher; rescanning the plugins folder every {RESCAN_EVERY:?}");
                None
            }
        };
        let thread = std::thread::Builder::new()
            .name("roomcast-reload".into())
            .spawn(move || {
                let _inotify = inotify; // dropped (and unwatched) when the thread ends
                watch_loop(&plugins, &dir, &rx);
            })
            .ok()?;
        Some(Watcher { stop: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The loop ends when every sender is gone: ours, and the inotify callback's,
        // which `_inotify` drops as the loop returns... so signal it explicitly.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(WatchEvent::Stop);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(plugins: &LivePlugins, dir: &Path, rx: &mpsc::Receiver<WatchEvent>) {
    // Name → (when to act, whether the file is known complete).
    let mut pending: BTreeMap<String, (Instant, bool)> = BTreeMap::new();
    let mut last_scan = snapshot(dir);
    let mut next_rescan = Instant::now() + RESCAN_EVERY;
    loop {
        // Wait for an event, a pending name to become due, or the rescan.
        let due = pending.values().map(|(at, _)| *at).min().unwrap_or(next_rescan).min(next_rescan);
        let timeout = due.saturating_duration_since(Instant::now());
        match rx.recv_timeout(timeout) {
            Ok(WatchEvent::Stop) => return,
            Ok(WatchEvent::Changed(path, complete)) => {
                if path.parent() == Some(dir)
                    && let Some(name) = plugin_file_name(&path)
                {
                    // A complete file is acted on almost at once (a few milliseconds
                    // gather the `.wasm` and `.toml` of one install); any other event
                    // pushes the name's deadline back: debounce.
                    let wait = if complete { SETTLE } else { DEBOUNCE };
                    pending.insert(name, (Instant::now() + wait, complete));
                }
            }
            Ok(WatchEvent::Rescan) => next_rescan = Instant::now(),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if now >= next_rescan {
            let scan = snapshot(dir);
            let mut changed: Vec<&PathBuf> =
                scan.iter().filter(|(p, m)| last_scan.get(*p) != Some(m)).map(|(p, _)| p).collect();
            changed.extend(last_scan.keys().filter(|p| !scan.contains_key(*p)));
            for path in changed {
                if let Some(name) = plugin_file_name(path) {
                    pending.entry(name).or_insert((now, false));
                }
            }
            last_scan = scan;
            next_rescan = now + RESCAN_EVERY;
        }
        let ready: Vec<(String, bool)> =
            pending.iter().filter(|(_, (at, _))| *at <= now).map(|(n, (_, c))| (n.clone(), *c)).collect();
        for (name, complete) in ready {
            pending.remove(&name);
            if !complete && !is_stable(&dir.join(format!("{name}.wasm"))) {
                // Still being written: look again shortly.
                pending.insert(name, (Instant::now() + DEBOUNCE, false));
                continue;
            }
            plugins.reload(dir, &name);
        }
    }
}

/// Whether a file's size and modification time hold still for [`STABLE_FOR`] (a
/// missing file is stable: it was deleted).
fn is_stable(path: &Path) -> bool {
    let look = || std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()));
    let before = look();
    std::thread::sleep(STABLE_FOR);
    before == look()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(plugin_file_name(Path::new("/p/chat.wasm")).as_deref(), Some("chat"));
        assert_eq!(plugin_file_name(Path::new("/p/chat.toml")).as_deref(), Some("chat"));
        for ignored in
            [".chat.wasm", ".chat.wasm.tmp", "chat.wasm~", "chat.wasm.part", "chat.txt", "#chat.wasm#"]
        {
            assert_eq!(plugin_file_name(Path::new(ignored)), None, "{ignored}");
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_657_522);
        assert_eq!(rfc3339(t), "2026-11-26T01:45:22Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
