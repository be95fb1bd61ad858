//! The folder watcher: inotify events and a periodic rescan, debounced, acting only
//! once a changed file is stable.

use super::*;

/// One state of a name in the plugins folder, seen without reading the file: the entry
/// itself (`lstat`) and what it names through any symlinks (`stat`). Reading a file
/// never changes its stamp (access times are left out); replacing, writing, renaming,
/// `chmod` or re-pointing a symlink does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stamp {
    entry: Option<FileStamp>,
    target: Option<FileStamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(path: &Path) -> Stamp {
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
pub(super) fn snapshot(dir: &Path) -> std::io::Result<HashMap<PathBuf, Stamp>> {
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

pub(super) enum WatchEvent {
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
pub(super) fn schedules_reload(kind: &notify::EventKind) -> bool {
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
pub(super) fn completes(kind: &notify::EventKind) -> bool {
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

pub(super) fn watch_loop(
    plugins: &LivePlugins,
    dir: &Path,
    rx: &mpsc::Receiver<WatchEvent>,
    stop: &AtomicBool,
) {
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
        // Wait for an event, a pending name to become due, or the rescan; only look for
        // events when a version waits for Cranelift's code and no reload is pending.
        let due = pending.values().map(|(at, _)| *at).min().unwrap_or(next_rescan).min(next_rescan);
        let optimize = pending.is_empty() && plugins.unoptimized();
        let timeout = if optimize { Duration::ZERO } else { due.saturating_duration_since(Instant::now()) };
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
        // One at a time, so that a reload arriving meanwhile waits for one compile at
        // most: it is received at the top of the loop before the next.
        if pending.is_empty() && !stop.load(Ordering::Acquire) {
            plugins.optimize_next();
        }
    }
}

/// Whether a file's stamp (size, modification time, identity) holds still for
/// [`STABLE_FOR`] (a missing file is stable: it was deleted).
pub(super) fn is_stable(path: &Path) -> bool {
    let before = Stamp::of(path);
    std::thread::sleep(STABLE_FOR);
    before == Stamp::of(path)
}
