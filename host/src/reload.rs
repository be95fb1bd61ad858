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

use crate::metrics::Metrics;
use crate::plugin::{HostCaps, Plugin, PluginError, PluginRuntime, PluginSet, PluginSource};

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
            let names = plugin_names(dir)
                .map_err(|error| PluginsError::UnreadableDir { dir: dir.to_owned(), error })?;
            for name in names {
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
    /// compiled again, and a failure exactly like the last one is skipped silently.
    pub fn reload(&self, dir: &Path, name: &str) -> bool {
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
        let loaded = source
            .map_err(|error| PluginError::load(name, error.to_string()))
            .and_then(|source| self.runtime.load_source(&source))
            .and_then(|plugin| {
                let mut set = (*self.current()).clone();
                set.insert(plugin.clone()).map(|_| (plugin, set))
            });
        match loaded {
            Ok((plugin, set)) => {
                let content = attempt.read.ok();
                let mut version = 0;
                self.record(name, |r| {
                    r.versions += 1;
                    version = r.versions;
                    r.current = Some((plugin.clone(), r.versions));
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
                    took = ?started.elapsed(),
                    "plugin loaded"
                );
                self.log_event(name, ReloadKind::Loaded, Some(version), None);
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

/// One state of a name in the plugins folder, seen without reading the file: the entry
/// itself (`lstat`) and what it names through any symlinks (`stat`). Reading a file
/// never changes its stamp (access times are left out); replacing, writing, renaming,
/// `chmod` or re-pointing a symlink does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stamp {
    entry: Option<FileStamp>,
    target: Option<FileStamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Stamp {
        Stamp {
            entry: std::fs::symlink_metadata(path).ok().map(|meta| FileStamp::of(&meta)),
            target: std::fs::metadata(path).ok().map(|meta| FileStamp::of(&meta)),
        }
    }
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            // The change time too: a FIFO replaced by another may reuse its inode.
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The stamp of every plugin file in `dir`, for the rescan; an error when the folder
/// cannot be listed (which says nothing about the files in it).
fn snapshot(dir: &Path) -> std::io::Result<HashMap<PathBuf, Stamp>> {
    let mut scan = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if plugin_file_name(&path).is_some() {
            let stamp = Stamp::of(&path);
            scan.insert(path, stamp);
        }
    }
    Ok(scan)
}

/// The watcher: a thread that turns changes in the plugins folder into reloads.
/// Dropping it tells the thread to stop, without waiting for it (see its `Drop`).
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    wake: mpsc::Sender<WatchEvent>,
}

enum WatchEvent {
    /// A file changed; `complete` when the event says it is whole again (renamed into
    /// place, closed after writing, or deleted).
    Changed(PathBuf, bool),
    Rescan,
    Stop,
}

/// Whether a file event may mean a changed plugin: a write, a create, a rename, a
/// delete, a metadata change. Opening, reading and closing a file without writing it
/// (inotify's `IN_OPEN`, `IN_ACCESS`, `IN_CLOSE_NOWRITE`) change nothing, and they are
/// exactly what a reload does to the file: acting on them would read it again, which
/// makes the next such event, forever.
fn schedules_reload(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(access) => *access == AccessKind::Close(AccessMode::Write),
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Other => false,
    }
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
                // The kernel's queue overflowed: events were lost, look at everything.
                Ok(event) if event.need_rescan() => events.send(WatchEvent::Rescan),
                Ok(event) if !schedules_reload(&event.kind) => Ok(()),
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
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("roomcast-reload".into())
            .spawn(move || {
                let _inotify = inotify; // dropped (and unwatched) when the thread ends
                watch_loop(&plugins, &dir, &rx, &stopped);
            })
            .ok()?;
        Some(Watcher { stop, wake: tx })
    }
}

impl Drop for Watcher {
    /// Tell the thread to stop, and return at once. Shutdown never waits for the
    /// thread: it may be in the middle of compiling a large plugin (seconds in a debug
    /// build), and SIGTERM must end the process regardless. The thread looks at the
    /// flag before each reload and after each wake-up, so it publishes at most the one
    /// version it is working on; if the process exits first, that work is simply lost
    /// with it (nothing it does is durable except the compiled-plugin cache, which is
    /// written to a temporary name and renamed).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(WatchEvent::Stop);
    }
}

fn watch_loop(plugins: &LivePlugins, dir: &Path, rx: &mpsc::Receiver<WatchEvent>, stop: &AtomicBool) {
    // Name → (when to act, whether the file is known complete).
    let mut pending: BTreeMap<String, (Instant, bool)> = BTreeMap::new();
    let mut last_scan = snapshot(dir).unwrap_or_default();
    // The latest error listing the folder, so it is logged once, not every rescan.
    let mut scan_error: Option<String> = None;
    let mut next_rescan = Instant::now() + RESCAN_EVERY;
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
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
            match snapshot(dir) {
                Ok(scan) => {
                    if scan_error.take().is_some() {
                        tracing::info!(dir = %dir.display(), "the plugins folder can be read again");
                    }
                    let mut changed: Vec<&PathBuf> =
                        scan.iter().filter(|(p, m)| last_scan.get(*p) != Some(m)).map(|(p, _)| p).collect();
                    changed.extend(last_scan.keys().filter(|p| !scan.contains_key(*p)));
                    for path in changed {
                        if let Some(name) = plugin_file_name(path) {
                            pending.entry(name).or_insert((now, false));
                        }
                    }
                    last_scan = scan;
                }
                Err(error) => {
                    // Not "every file was deleted": what serves keeps serving, and the
                    // next scan that can read the folder compares with the last one that
                    // could. Events for single files are still acted on.
                    let error = error.to_string();
                    if scan_error.as_ref() != Some(&error) {
                        tracing::warn!(dir = %dir.display(), %error, "cannot read the plugins folder; its plugins stay as they are");
                        scan_error = Some(error);
                    }
                }
            }
            next_rescan = now + RESCAN_EVERY;
        }
        let ready: Vec<(String, bool)> =
            pending.iter().filter(|(_, (at, _))| *at <= now).map(|(n, (_, c))| (n.clone(), *c)).collect();
        for (name, complete) in ready {
            if stop.load(Ordering::Acquire) {
                return;
            }
            pending.remove(&name);
            if !complete && !is_stable(&dir.join(format!("{name}.wasm"))) {
                // Still being written: look again shortly.
                pending.insert(name, (Instant::now() + DEBOUNCE, false));
                continue;
            }
            // Stamped before the read: the rescan then has nothing to look at again,
            // and a change made during the reload still differs from this stamp.
            let files = [dir.join(format!("{name}.wasm")), dir.join(format!("{name}.toml"))];
            let stamps = files.clone().map(|file| Stamp::of(&file));
            plugins.reload(dir, &name);
            for (file, stamp) in files.into_iter().zip(stamps) {
                if stamp.entry.is_some() {
                    last_scan.insert(file, stamp);
                } else {
                    last_scan.remove(&file);
                }
            }
        }
    }
}

/// Whether a file's stamp (size, modification time, identity) holds still for
/// [`STABLE_FOR`] (a missing file is stable: it was deleted).
fn is_stable(path: &Path) -> bool {
    let before = Stamp::of(path);
    std::thread::sleep(STABLE_FOR);
    before == Stamp::of(path)
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

    /// A scratch plugins folder, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("roomcast-reload-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir.canonicalize().unwrap())
        }

        /// Make `name` nothing at all: remove whatever entry has that name.
        fn clear(&self, name: &str) {
            let path = self.0.join(name);
            if path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir(&path).unwrap();
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }

        fn mkfifo(&self, name: &str) {
            let path = self.0.join(name);
            assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn live(dir: &Path) -> LivePlugins {
        LivePlugins::load(Some(dir), HostCaps::default(), None, Arc::new(Metrics::default())).unwrap()
    }

    fn last_error(live: &LivePlugins, name: &str) -> Option<(SystemTime, String)> {
        live.records().get(name).and_then(|r| r.last_error.clone())
    }

    #[test]
    fn an_unreadable_file_is_an_error_reported_once_and_the_previous_version_serves() {
        let scratch = Scratch::new("unreadable");
        let dir = &scratch.0;
        let echo = crate::plugin::tests::plugin_file("echo");
        std::fs::copy(&echo, dir.join("echo.wasm")).unwrap();
        let live = live(dir);
        let serving = live.for_room("echo").expect("echo serves");
        assert_eq!(live.version_of(&serving), 1);

        type Breaker = Box<dyn Fn(&Scratch)>;
        let breakers: Vec<(&str, Breaker)> = vec![
            (
                "symbolic links",
                Box::new(|s| std::os::unix::fs::symlink("echo.wasm", s.0.join("echo.wasm")).unwrap()),
            ),
            (
                "does not exist",
                Box::new(|s| std::os::unix::fs::symlink("nowhere", s.0.join("echo.wasm")).unwrap()),
            ),
            ("not a regular file", Box::new(|s| s.mkfifo("echo.wasm"))),
            ("not a regular file", Box::new(|s| std::fs::create_dir(s.0.join("echo.wasm")).unwrap())),
            (
                "not a regular file",
                Box::new(|s| std::os::unix::fs::symlink("/dev/zero", s.0.join("echo.wasm")).unwrap()),
            ),
            (
                "larger than 64MiB",
                Box::new(|s| {
                    let file = std::fs::File::create(s.0.join("echo.wasm")).unwrap();
                    file.set_len(crate::plugin::MAX_PLUGIN_BYTES + 1).unwrap();
                }),
            ),
            (
                "not a regular file",
                Box::new(|s| {
                    std::fs::copy(crate::plugin::tests::plugin_file("echo"), s.0.join("echo.wasm")).unwrap();
                    s.mkfifo("echo.toml");
                }),
            ),
        ];
        for (expected, break_it) in breakers {
            scratch.clear("echo.wasm");
            scratch.clear("echo.toml");
            break_it(&scratch);
            assert!(!live.reload(dir, "echo"), "{expected}: nothing published");
            let current = live.for_room("echo").expect("the previous version keeps serving");
            assert!(Arc::ptr_eq(&current, &serving), "{expected}");
            assert_eq!(live.version_of(&current), 1);
            let (at, error) = last_error(&live, "echo").expect("recorded");
            assert!(error.contains(expected) && error.contains("echo."), "{expected}: {error}");
            // The same failure again (another event, the rescan) is not news.
            assert!(!live.reload(dir, "echo"));
            assert_eq!(last_error(&live, "echo").map(|(at, _)| at), Some(at), "{expected}: reported once");
        }

        // The serving file put back: nothing to load; breaking it again is news again.
        scratch.clear("echo.wasm");
        scratch.clear("echo.toml");
        std::fs::copy(&echo, dir.join("echo.wasm")).unwrap();
        assert!(!live.reload(dir, "echo"));
        assert_eq!(live.records()["echo"].versions, 1, "not compiled again");
        let (before, _) = last_error(&live, "echo").unwrap();
        std::fs::write(dir.join("echo.toml"), "rooms = 3\n").unwrap();
        assert!(!live.reload(dir, "echo"));
        let (after, error) = last_error(&live, "echo").unwrap();
        assert!(after > before && error.contains("echo.toml"), "{error}");

        // Gone: its rooms return to the default, and it leaves the listing.
        scratch.clear("echo.wasm");
        assert!(live.reload(dir, "echo"));
        assert!(live.for_room("echo").is_none());
        assert!(!live.records().contains_key("echo"), "a removed plugin is not listed");
        // Back again: the version count continues.
        scratch.clear("echo.toml");
        std::fs::copy(&echo, dir.join("echo.wasm")).unwrap();
        assert!(live.reload(dir, "echo"));
        let back = live.for_room("echo").unwrap();
        assert_eq!(live.version_of(&back), 2);
        assert!(live.records()["echo"].last_error.is_none());
    }

    #[test]
    fn a_broken_file_without_a_version_is_listed_until_it_is_gone() {
        let scratch = Scratch::new("broken");
        let dir = &scratch.0;
        scratch.mkfifo("stuck.wasm");
        std::fs::write(dir.join("junk.wasm"), b"not wasm").unwrap();
        let live = live(dir);
        assert!(live.current().is_empty());
        let records = live.records();
        assert!(records["stuck"].last_error.as_ref().unwrap().1.contains("not a regular file"));
        assert!(records["junk"].last_error.as_ref().unwrap().1.contains("not a WebAssembly file"));
        let at = records["junk"].last_error.as_ref().unwrap().0;
        assert!(!live.reload(dir, "junk"));
        assert_eq!(live.records()["junk"].last_error.as_ref().unwrap().0, at, "reported once");
        // Other bytes are a change, reported again.
        std::fs::write(dir.join("junk.wasm"), b"still not wasm").unwrap();
        assert!(!live.reload(dir, "junk"));
        let at = live.records()["junk"].last_error.as_ref().unwrap().0;
        assert!(!live.reload(dir, "junk"));
        assert_eq!(live.records()["junk"].last_error.as_ref().unwrap().0, at);
        // The same bytes touched: a retry (after fixing what it conflicted with, say).
        let file = std::fs::File::options().write(true).open(dir.join("junk.wasm")).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(60)).unwrap();
        assert!(!live.reload(dir, "junk"));
        assert!(live.records()["junk"].last_error.as_ref().unwrap().0 > at);
        for name in ["stuck", "junk"] {
            scratch.clear(&format!("{name}.wasm"));
            assert!(!live.reload(dir, name), "nothing was serving");
            assert!(!live.records().contains_key(name), "{name} is gone");
        }
    }

    #[test]
    fn a_folder_that_cannot_be_listed_is_an_error_not_an_empty_folder() {
        let scratch = Scratch::new("folder");
        let file = scratch.0.join("not-a-folder");
        std::fs::write(&file, b"").unwrap();
        assert!(plugin_names(&file).is_err());
        assert!(snapshot(&file).is_err(), "the rescan sees an error, not zero files");
        assert!(snapshot(&scratch.0).unwrap().is_empty());

        // Without read permission (root reads it anyway: then there is nothing to see).
        use std::os::unix::fs::PermissionsExt as _;
        let locked = scratch.0.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read_dir(&locked).is_err() {
            let loaded =
                LivePlugins::load(Some(&locked), HostCaps::default(), None, Arc::new(Metrics::default()));
            assert!(matches!(loaded, Err(PluginsError::UnreadableDir { .. })), "{loaded:?}");
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn only_changes_schedule_a_reload() {
        use notify::EventKind;
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode,
        };
        // What reading a file produces (inotify's IN_OPEN, IN_ACCESS, IN_CLOSE_NOWRITE).
        for read in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!schedules_reload(&read), "{read:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(schedules_reload(&change), "{change:?}");
        }
    }

    #[test]
    fn stamps_change_with_the_file_not_with_reads() {
        let scratch = Scratch::new("stamps");
        let path = scratch.0.join("p.wasm");
        std::fs::write(&path, b"one").unwrap();
        let stamp = Stamp::of(&path);
        let _ = std::fs::read(&path).unwrap();
        assert_eq!(Stamp::of(&path), stamp, "a read is no change");
        std::fs::write(&path, b"two!").unwrap();
        assert_ne!(Stamp::of(&path), stamp);

        scratch.clear("p.wasm");
        scratch.mkfifo("p.wasm");
        let fifo = Stamp::of(&path);
        let _ = crate::files::read_regular(&path, 10);
        assert_eq!(Stamp::of(&path), fifo, "opening a FIFO is no change");
        scratch.clear("p.wasm");
        scratch.mkfifo("p.wasm");
        assert_ne!(Stamp::of(&path), fifo, "another FIFO is");

        scratch.clear("p.wasm");
        std::fs::write(scratch.0.join("a"), b"a").unwrap();
        std::fs::write(scratch.0.join("b"), b"bb").unwrap();
        std::os::unix::fs::symlink("a", &path).unwrap();
        let link = Stamp::of(&path);
        std::fs::write(scratch.0.join("a"), b"aaa").unwrap();
        assert_ne!(Stamp::of(&path), link, "the target changed");
        assert_eq!(Stamp::of(&scratch.0.join("missing")), Stamp::default());
    }

    #[test]
    fn dropping_the_watcher_does_not_wait_for_its_thread() {
        let scratch = Scratch::new("watcher");
        let live = Arc::new(live(&scratch.0));
        let watcher = Watcher::start(live.clone()).expect("a watcher");
        let started = Instant::now();
        drop(watcher);
        assert!(started.elapsed() < Duration::from_secs(5));
        // The thread ends by itself (it holds the last other reference).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&live) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(Arc::strong_count(&live), 1, "the reload thread stopped");
    }

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
