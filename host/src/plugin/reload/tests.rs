//! Tests of hot reload against real plugin files: the live set, the watcher, the swap.

use super::watch::{schedules_reload, snapshot};
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

/// `wasm` with one more custom section: the same code, other content.
fn with_custom_section(wasm: &[u8], payload: u8) -> Vec<u8> {
    let mut out = wasm.to_vec();
    // Section id 0, 3 bytes: a name of 1 byte (`x`), then the payload.
    out.extend_from_slice(&[0, 3, 1, b'x', payload]);
    out
}

/// What a fresh instance of counter restored from `count` snapshots: the guest's code
/// runs.
fn round_trip(plugin: &Arc<Plugin>, count: u64) -> Vec<u8> {
    let mut instance = plugin.instantiate("counter").unwrap();
    instance.restore(&count.to_le_bytes()).unwrap();
    instance.snapshot().unwrap().unwrap()
}

#[test]
fn a_reload_goes_live_on_winch_and_new_instances_then_get_cranelift() {
    let scratch = Scratch::new("tiers");
    let dir = &scratch.0;
    let counter = std::fs::read(crate::plugin::tests::plugin_file("counter")).unwrap();
    std::fs::write(dir.join("counter.wasm"), &counter).unwrap();
    let live = live(dir);
    // Start-up compiles with Cranelift: nothing is left to optimise.
    assert_eq!(live.for_room("counter").unwrap().compiler(), Compiler::Cranelift);
    assert!(!live.unoptimized() && !live.optimize_next());

    // Two reloads before the reload thread is free: only the version serving is
    // compiled again.
    for n in 1..=2 {
        std::fs::write(dir.join("counter.wasm"), with_custom_section(&counter, n)).unwrap();
        assert!(live.reload(dir, "counter"));
    }
    let serving = live.for_room("counter").unwrap();
    assert_eq!((live.version_of(&serving), serving.compiler()), (3, Compiler::Winch));
    assert!(serving.compiled_in().is_some() && serving.optimized_in().is_none());
    let mut before = serving.instantiate("counter").unwrap();
    before.restore(&5u64.to_le_bytes()).unwrap();

    assert!(live.unoptimized());
    let generation = live.generation();
    assert!(live.optimize_next());
    assert!(!live.unoptimized() && !live.optimize_next());
    // Nothing was published: the same version serves, and rooms do not switch.
    assert_eq!(live.generation(), generation);
    assert!(Arc::ptr_eq(&live.for_room("counter").unwrap(), &serving));
    assert_eq!(serving.compiler(), Compiler::Cranelift);
    assert!(serving.optimized_in().is_some());
    // The instance made before keeps its code and state; new ones run Cranelift's.
    assert_eq!(before.snapshot().unwrap().unwrap(), 5u64.to_le_bytes());
    assert_eq!(round_trip(&serving, 7), 7u64.to_le_bytes());
    let decision = serving.handshake(&crate::plugin::HandshakeRequest::default()).unwrap();
    assert!(matches!(decision, crate::plugin::HandshakeDecision::Accept { .. }));
}

#[test]
fn a_reload_the_cache_knows_goes_live_on_cranelift() {
    let scratch = Scratch::new("tiers-cache");
    let dir = &scratch.0;
    let cache = Scratch::new("tiers-cache-dir");
    let counter = std::fs::read(crate::plugin::tests::plugin_file("counter")).unwrap();
    std::fs::write(dir.join("counter.wasm"), &counter).unwrap();
    let live = LivePlugins::load(
        Some(dir),
        HostCaps::default(),
        Some(cache.0.clone()),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    std::fs::write(dir.join("counter.wasm"), with_custom_section(&counter, 1)).unwrap();
    assert!(live.reload(dir, "counter"));
    assert_eq!(live.for_room("counter").unwrap().compiler(), Compiler::Winch);
    assert!(live.optimize_next());
    // Back to the first version: Cranelift compiled it at start-up and cached it.
    std::fs::write(dir.join("counter.wasm"), &counter).unwrap();
    assert!(live.reload(dir, "counter"));
    let serving = live.for_room("counter").unwrap();
    assert_eq!((serving.compiler(), serving.compiled_in()), (Compiler::Cranelift, None));
    assert!(!live.unoptimized());
    assert_eq!(round_trip(&serving, 3), 3u64.to_le_bytes());
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
    for ignored in [".chat.wasm", ".chat.wasm.tmp", "chat.wasm~", "chat.wasm.part", "chat.txt", "#chat.wasm#"]
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
