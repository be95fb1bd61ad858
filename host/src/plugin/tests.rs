//! Tests of the plugin runtime against real wasmtime and the real plugin components of
//! `plugins/` (built once per test run, see [`plugin_file`]).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// The built `NAME.wasm` (also used by the reload's tests), from the one helper that
/// builds plugins for tests.
pub(crate) fn plugin_file(name: &str) -> PathBuf {
    roomcast_plugin_build::plugin_file(name)
}

#[test]
fn the_seam_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<PluginRuntime>();
    send_sync::<Plugin>();
    send_sync::<PluginSet>();
    send_sync::<PluginError>();
    send::<RoomInstance>();
}

fn runtime() -> PluginRuntime {
    PluginRuntime::new(HostCaps::default()).expect("runtime")
}

/// A scratch folder for plugin files and their TOML.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("roomcast-plugin-test-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// Copy plugin `source` in as `name.wasm`, with `toml` beside it if given.
    fn plugin(&self, source: &str, name: &str, toml: Option<&str>) -> PathBuf {
        let wasm = self.0.join(format!("{name}.wasm"));
        std::fs::copy(plugin_file(source), &wasm).expect("copy plugin");
        if let Some(toml) = toml {
            std::fs::write(self.0.join(format!("{name}.toml")), toml).expect("write toml");
        }
        wasm
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A room's members and the live rooms, as the room actor would hand them over.
struct Room {
    name: String,
    members: Vec<MemberId>,
    exists: RoomExists,
}

impl Room {
    fn new(name: &str, members: &[MemberId]) -> Room {
        Room {
            name: name.to_owned(),
            members: members.to_vec(),
            exists: Arc::new(|room: &str| room == "elsewhere"),
        }
    }

    fn view(&self) -> RoomView<'_> {
        RoomView { room: &self.name, members: &self.members, room_exists: &self.exists }
    }
}

fn member(id: MemberId) -> MemberInfo {
    MemberInfo { id, remote_addr: "127.0.0.1:1".to_owned(), ..MemberInfo::default() }
}

/// Load a plugin with the host's largest deadline rather than the default 10ms:
/// deadlines count wall-clock time, and a test thread on a busy two-core machine can
/// be preempted that long. Tests of the deadline itself load with the default.
fn load(runtime: &PluginRuntime, name: &str) -> Arc<Plugin> {
    let scratch = Scratch::new(name);
    let file = scratch.plugin(name, name, Some("[limits]\ndeadline = \"1s\"\n"));
    runtime.load(&file).unwrap_or_else(|error| panic!("load {name}: {error}"))
}

/// Load a plugin as it is, with the default limits.
fn load_default(runtime: &PluginRuntime, name: &str) -> Arc<Plugin> {
    runtime.load(&plugin_file(name)).unwrap_or_else(|error| panic!("load {name}: {error}"))
}

#[test]
fn echo_sends_each_message_back_to_its_sender() {
    let runtime = runtime();
    let plugin = load(&runtime, "echo");
    assert_eq!(plugin.name(), "echo");
    assert_eq!(plugin.info().name, "echo");
    assert_eq!(plugin.sha256().len(), 64);
    let mut room = Room::new("echo:a", &[7]);
    let mut instance = plugin.instantiate("echo:a").expect("instantiate");
    assert_eq!(instance.join(&room.view(), &member(7)).expect("join"), (Ok(()), vec![]));
    room.members.push(8);
    instance.join(&room.view(), &member(8)).expect("join").0.expect("admitted");

    let text = Payload::text("héllo");
    let (verdict, actions) = instance.message(&room.view(), Origin::Member(8), &text).expect("message");
    assert_eq!(verdict, Verdict::Drop);
    assert_eq!(actions, vec![Action::Send { to: 8, payload: text }]);

    let binary = Payload::binary(vec![0u8, 159, 146, 150]);
    let (_, actions) = instance.message(&room.view(), Origin::Member(7), &binary).expect("message");
    assert_eq!(actions, vec![Action::Send { to: 7, payload: binary }]);
}

#[test]
fn relay_passes_without_actions_and_accepts_handshakes() {
    let runtime = runtime();
    let plugin = load(&runtime, "relay");
    let room = Room::new("relay", &[1, 2]);
    let mut instance = plugin.instantiate("relay").expect("instantiate");
    let (verdict, actions) =
        instance.message(&room.view(), Origin::Member(1), &Payload::text("hi")).expect("message");
    assert_eq!(verdict, Verdict::Pass);
    assert!(actions.is_empty());
    let (verdict, _) = instance
        .message(&room.view(), Origin::Room("elsewhere".into()), &Payload::text("x"))
        .expect("forwarded message");
    assert_eq!(verdict, Verdict::Pass);

    let request = HandshakeRequest {
        room: "relay".into(),
        path: "/ws/relay".into(),
        protocols: vec!["v1".into()],
        ..HandshakeRequest::default()
    };
    for _ in 0..3 {
        assert_eq!(
            plugin.handshake(&request).expect("handshake"),
            HandshakeDecision::Accept { protocol: None, identity: None }
        );
    }
}

#[test]
fn check_reports_a_good_plugin() {
    let runtime = runtime();
    let report = runtime.check(&plugin_file("relay")).expect("check");
    assert_eq!(report.name, "relay");
    assert_eq!(report.info.name, "relay");
    assert!(!report.info.version.is_empty());
    assert_eq!(report.hooks.len(), 9);
    assert_eq!(report.wit_package, WIT_PACKAGE);
    assert_eq!(report.rooms, vec!["relay", "relay:*"]);
    assert!(report.imports.contains(&"roomcast:plugin/room@0.2.0".to_owned()));
    assert!(report.imports.iter().any(|import| import.starts_with("wasi:cli/")));
    let text = report.to_string();
    assert!(text.contains("world:   roomcast:plugin@0.2.0 room-plugin"), "{text}");
    assert!(text.contains("trapping: wasi:") && text.contains("a call traps"), "{text}");
    eprintln!("{text}");
}

#[test]
fn a_core_module_is_refused_clearly() {
    let runtime = runtime();
    let scratch = Scratch::new("core");
    let file = scratch.file("core.wasm", b"\0asm\x01\0\0\0");
    let error = runtime.check(&file).expect_err("core module");
    assert_eq!(error.kind, FailureKind::Load);
    assert_eq!(error.plugin, "core");
    let text = error.to_string();
    assert!(
        text.contains("is a core WebAssembly module, not a component; build with --target wasm32-wasip2"),
        "{text}"
    );
}

#[test]
fn garbage_and_missing_files_are_refused_clearly() {
    let runtime = runtime();
    let scratch = Scratch::new("garbage");
    let file = scratch.file("junk.wasm", b"this is not wasm at all");
    let error = runtime.load(&file).expect_err("garbage");
    assert_eq!(error.kind, FailureKind::Load);
    assert!(error.to_string().contains("is not a WebAssembly file"), "{error}");

    // A component header with nothing valid after it.
    let file = scratch.file("broken.wasm", b"\0asm\x0d\0\x01\0\xff\xff\xff");
    let error = runtime.load(&file).expect_err("broken component");
    assert!(error.to_string().contains("is not a valid WebAssembly component"), "{error}");

    let error = runtime.load(&scratch.0.join("absent.wasm")).expect_err("missing file");
    assert!(error.to_string().contains("cannot read"), "{error}");

    // `roomcast plugin check` on a FIFO: refused at once, never waited on.
    let fifo = scratch.0.join("fifo.wasm");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let error = runtime.check(&fifo).expect_err("a FIFO");
    assert!(error.to_string().contains("fifo.wasm: not a regular file"), "{error}");

    let file = scratch.file("bad name.wasm", b"");
    let error = runtime.load(&file).expect_err("bad name");
    assert!(error.to_string().contains("not a valid plugin name"), "{error}");
}

#[test]
fn fresh_instances_are_isolated_and_cheap() {
    // Each `instantiate` makes a new store: a failure in one room's instance does not
    // touch another's.
    let runtime = runtime();
    let plugin = load(&runtime, "relay");
    let room = Room::new("relay", &[1]);
    let mut a = plugin.instantiate("relay").expect("a");
    let mut b = plugin.instantiate("relay").expect("b");
    a.message(&room.view(), Origin::Member(1), &Payload::text("1")).expect("a works");
    b.message(&room.view(), Origin::Member(1), &Payload::text("2")).expect("b works");
}

/// Not an assertion on time: prints the host CPU per `message` call through relay
/// and per instantiation, for the report (run with `--nocapture`).
#[test]
fn bench_relay_message_and_instantiation() {
    let runtime = runtime();
    let plugin = load(&runtime, "relay");
    let room = Room::new("relay:bench", &[1, 2]);
    let mut instance = plugin.instantiate("relay:bench").expect("instantiate");
    let payload = Payload::text("x".repeat(100));
    let calls = 20_000;
    for _ in 0..1000 {
        instance.message(&room.view(), Origin::Member(1), &payload).expect("warm up");
    }
    let started = Instant::now();
    for _ in 0..calls {
        let (verdict, actions) =
            instance.message(&room.view(), Origin::Member(1), &payload).expect("message");
        assert_eq!(verdict, Verdict::Pass);
        assert!(actions.is_empty());
    }
    let per_call = started.elapsed() / calls;

    let instances = 200;
    let started = Instant::now();
    let kept: Vec<RoomInstance> =
        (0..instances).map(|_| plugin.instantiate("relay:bench").expect("instantiate")).collect();
    let per_instance = started.elapsed() / instances;
    drop(kept);

    // Echo: the guest calls the `send` import once and the call returns one action.
    let echo = load(&runtime, "echo");
    let mut instance = echo.instantiate("echo:bench").expect("instantiate");
    let room = Room::new("echo:bench", &[1, 2]);
    let started = Instant::now();
    for _ in 0..calls {
        let (_, actions) = instance.message(&room.view(), Origin::Member(1), &payload).expect("message");
        assert_eq!(actions.len(), 1);
    }
    let echo_per_call = started.elapsed() / calls;
    eprintln!(
        "relay: {} ns per message call (100-byte text, Pass, no actions); echo: {} ns per \
         message call (one send import, one action); {:.1} µs per instantiation (store + \
         instance + init); {} build",
        per_call.as_nanos(),
        echo_per_call.as_nanos(),
        per_instance.as_secs_f64() * 1e6,
        if cfg!(debug_assertions) { "debug" } else { "release" },
    );
    assert!(per_call < Duration::from_secs(1));
}

fn text_of(action: &Action) -> Option<&str> {
    match action {
        Action::Send { payload: Payload::Text(bytes), .. } => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

#[test]
fn chaos_spin_times_out_and_a_fresh_instance_works() {
    let runtime = runtime();
    let plugin = load_default(&runtime, "chaos");
    let room = Room::new("chaos:spin", &[1]);
    let mut instance = plugin.instantiate("chaos:spin").expect("instantiate");
    let started = Instant::now();
    let error = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("spin"))
        .expect_err("spin must be interrupted");
    let took = started.elapsed();
    assert_eq!(error.kind, FailureKind::Timeout);
    assert_eq!(error.kind.outcome(), "timeout");
    assert_eq!(error.plugin, "chaos");
    assert_eq!(error.room.as_deref(), Some("chaos:spin"));
    let text = error.to_string();
    assert!(text.starts_with("plugin `chaos` in room `chaos:spin`: ran past its 10ms deadline"), "{text}");
    assert!(took >= Duration::from_millis(10), "interrupted early: {took:?}");
    eprintln!("spin interrupted after {took:?}");

    // The failed instance refuses further calls at once.
    assert_eq!(instance.failure(), Some(FailureKind::Timeout));
    let again =
        instance.message(&room.view(), Origin::Member(1), &Payload::text("hello")).expect_err("poisoned");
    assert!(again.to_string().contains("unusable"), "{again}");

    let mut fresh = plugin.instantiate("chaos:spin").expect("fresh instance");
    let (verdict, actions) = fresh
        .message(&room.view(), Origin::Member(1), &Payload::text("hello"))
        .expect("fresh instance works");
    assert_eq!(verdict, Verdict::Pass);
    assert!(actions.is_empty());
}

#[test]
fn the_epoch_ticker_sleeps_while_idle_and_deadlines_still_hold() {
    let runtime = runtime();
    let plugin = load_default(&runtime, "chaos");
    let room = Room::new("chaos:spin", &[1]);
    let mut instance = plugin.instantiate("chaos:spin").expect("instantiate");
    let waited = Instant::now();
    while !runtime.ticker_parked() {
        assert!(waited.elapsed() < Duration::from_secs(5), "the ticker never went to sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A call wakes it: the spin is still interrupted at its deadline.
    let error = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("spin"))
        .expect_err("spin must be interrupted");
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(!runtime.ticker_parked(), "ticking after a call");
}

#[test]
fn steady_short_calls_wake_the_ticker_once_per_deadline_not_every_tick() {
    let runtime = runtime();
    let plugin = load_default(&runtime, "chaos");
    let room = Room::new("chaos", &[1]);
    let mut instance = plugin.instantiate("chaos").expect("instantiate");
    // Short calls, a few thousand a second, for 300 ms: a ticker that woke every 1 ms
    // tick would look about 300 times; with the default 10 ms deadline it looks every 9
    // ticks (and every tick after a look that found a call running, which is rare when
    // calls take a few µs of every 100).
    let start = Instant::now();
    let looks = runtime.ticker_looks();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        instance.message(&room.view(), Origin::Member(1), &Payload::text("hello")).expect("a short call");
        calls += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    let looked = runtime.ticker_looks() - looks;
    // Bounded loosely: a loaded machine preempts calls and so finds more of them
    // running; a ticker of 1 ms ticks would still look far more often.
    assert!(looked <= 100, "{looked} looks for {calls} calls in 300 ms");
    // And the deadline holds for a call that starts while the ticker sleeps between
    // two looks: the spin is stopped.
    let error = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("spin"))
        .expect_err("spin must be interrupted");
    assert_eq!(error.kind, FailureKind::Timeout);
}

#[test]
fn chaos_hog_hits_the_memory_cap() {
    // Filling 32 MiB takes longer than the default 10ms deadline (which would report a
    // timeout): give it time to reach the cap.
    let runtime = runtime();
    let scratch = Scratch::new("hog");
    let file = scratch.plugin("chaos", "chaos", Some("[limits]\ndeadline = \"1s\"\n"));
    let plugin = runtime.load(&file).expect("load");
    let room = Room::new("chaos", &[1]);
    let mut instance = plugin.instantiate("chaos").expect("instantiate");
    let error = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("hog"))
        .expect_err("hog must be stopped");
    assert_eq!(error.kind, FailureKind::Memory, "{error}");
    assert!(error.to_string().contains("exceeded its memory limit of 32MiB in `message`"), "{error}");
}

#[test]
fn chaos_panic_is_a_trap_that_quotes_the_panic() {
    let runtime = runtime();
    let plugin = load(&runtime, "chaos");
    let room = Room::new("chaos", &[1]);
    let mut instance = plugin.instantiate("chaos").expect("instantiate");
    let error =
        instance.message(&room.view(), Origin::Member(1), &Payload::text("panic")).expect_err("panic traps");
    assert_eq!(error.kind, FailureKind::Trap, "{error}");
    let text = error.to_string();
    assert!(text.contains("trapped in `message`"), "{text}");
    assert!(text.contains("chaos panic"), "{text}");
    eprintln!("{text}");
}

#[test]
fn chaos_burst_is_bounded_by_the_action_budget() {
    // With the default 10ms deadline a million `send` calls run out of time: the call
    // fails as a timeout and its actions are discarded.
    let runtime = runtime();
    let plugin = load_default(&runtime, "chaos");
    let room = Room::new("chaos", &[1]);
    let mut instance = plugin.instantiate("chaos").expect("instantiate");
    let error = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("burst"))
        .expect_err("a million sends in 10ms");
    assert_eq!(error.kind, FailureKind::Timeout, "{error}");

    // Given time (this debug build needs about 0.7 s), the call completes, and only the
    // first MAX_ACTIONS_PER_CALL sends were recorded; the rest were refused.
    let runtime =
        PluginRuntime::new(HostCaps { max_deadline: Duration::from_secs(20), ..HostCaps::default() })
            .expect("runtime");
    let scratch = Scratch::new("burst");
    let file = scratch.plugin("chaos", "chaos", Some("[limits]\ndeadline = \"20s\"\n"));
    let plugin = runtime.load(&file).expect("load");
    let mut instance = plugin.instantiate("chaos").expect("instantiate");
    let started = Instant::now();
    let result = instance.message(&room.view(), Origin::Member(1), &Payload::text("burst"));
    eprintln!("burst of 1,000,000 sends took {:?}", started.elapsed());
    let (verdict, actions) = result.expect("burst completes");
    assert_eq!(verdict, Verdict::Drop);
    assert_eq!(actions.len(), MAX_ACTIONS_PER_CALL);
    assert!(actions.iter().all(|action| text_of(action) == Some("x")));
}

#[test]
fn chaos_timers_fire_once_and_members_are_the_view() {
    let runtime = runtime();
    let plugin = load(&runtime, "chaos");
    let room = Room::new("chaos", &[3, 7]);
    let mut instance = plugin.instantiate("chaos").expect("instantiate");

    let (_, actions) =
        instance.message(&room.view(), Origin::Member(7), &Payload::text("members")).expect("members");
    assert_eq!(actions.len(), 1);
    assert_eq!(text_of(&actions[0]), Some("[3,7]"));

    let (verdict, actions) =
        instance.message(&room.view(), Origin::Member(3), &Payload::text("timer:25")).expect("timer");
    assert_eq!(verdict, Verdict::Drop);
    let [Action::SetTimer { id, after }] = actions.as_slice() else {
        panic!("expected one SetTimer, got {actions:?}");
    };
    assert_eq!(*after, Duration::from_millis(25));
    let fired = instance.timer(&room.view(), *id).expect("timer fires");
    assert_eq!(fired.len(), 1);
    assert_eq!(text_of(&fired[0]), Some("timer fired"));
    // A timer that is no longer pending is ignored.
    assert_eq!(instance.timer(&room.view(), *id).expect("stale"), vec![]);
    assert_eq!(instance.timer(&room.view(), 12345).expect("unknown"), vec![]);

    // Forwarded messages and binary ones pass.
    let (verdict, _) = instance
        .message(&room.view(), Origin::Room("elsewhere".into()), &Payload::text("spin"))
        .expect("forwarded");
    assert_eq!(verdict, Verdict::Pass);
}

#[test]
fn chaos_init_failures_fail_the_load() {
    let runtime = runtime();
    let scratch = Scratch::new("init");
    let file = scratch.plugin("chaos", "chaos", Some("[config]\nfail_init = true\n"));
    let error = runtime.load(&file).expect_err("init fails");
    assert_eq!(error.kind, FailureKind::Error);
    assert!(error.to_string().contains("init refused its config: fail_init set"), "{error}");
    let file = scratch.plugin("chaos", "chaos", Some("[config]\npanic_in_init = true\n"));
    let error = runtime.load(&file).expect_err("init panics");
    assert_eq!(error.kind, FailureKind::Trap);
    assert!(error.to_string().contains("panic_in_init set"), "{error}");
}

#[test]
fn counter_state_survives_snapshot_and_restore() {
    let runtime = runtime();
    let plugin = load(&runtime, "counter");
    let room = Room::new("counter", &[1]);
    let count = |instance: &mut RoomInstance| -> u64 {
        let (verdict, actions) =
            instance.message(&room.view(), Origin::Member(1), &Payload::text("tick")).expect("message");
        assert_eq!(verdict, Verdict::Drop);
        let reply: serde_json::Value =
            serde_json::from_str(text_of(&actions[0]).expect("text reply")).expect("json");
        reply["count"].as_u64().expect("count")
    };
    let mut old = plugin.instantiate("counter").expect("instantiate");
    assert_eq!(count(&mut old), 1);
    assert_eq!(count(&mut old), 2);
    assert_eq!(count(&mut old), 3);
    let state = old.snapshot().expect("snapshot").expect("counter keeps state");

    let mut new = plugin.instantiate("counter").expect("instantiate");
    new.restore(&state).expect("restore");
    assert_eq!(count(&mut new), 4);

    let mut refused = plugin.instantiate("counter").expect("instantiate");
    let error = refused.restore(b"abc").expect_err("bad state");
    assert_eq!(error.kind, FailureKind::Error);
    assert!(error.to_string().contains("expected 8 bytes, got 3"), "{error}");

    // A plugin that keeps no state says so.
    let relay = load(&runtime, "relay");
    let mut instance = relay.instantiate("relay").expect("instantiate");
    assert_eq!(instance.snapshot().expect("snapshot"), None);
}

#[test]
fn otherworld_is_refused_for_its_wit_version() {
    let runtime = runtime();
    let error = runtime.check(&plugin_file("otherworld")).expect_err("otherworld");
    assert_eq!(error.kind, FailureKind::Load);
    let text = error.to_string();
    assert!(text.contains("roomcast:plugin/room@0.9.0"), "{text}");
    assert!(text.contains("this host speaks roomcast:plugin@0.2.0"), "{text}");
}

#[test]
fn a_component_of_another_world_is_refused_clearly() {
    // The smallest valid component: a header and nothing else, so no exports.
    let runtime = runtime();
    let scratch = Scratch::new("empty");
    let file = scratch.file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let error = runtime.check(&file).expect_err("empty component");
    assert_eq!(error.kind, FailureKind::Load);
    let text = error.to_string();
    assert!(text.contains("does not implement the `room-plugin` world of roomcast:plugin@0.2.0"), "{text}");
    assert!(text.contains("missing exports `describe`, `init`"), "{text}");
    assert!(text.contains("(it exports: nothing)"), "{text}");
}

#[test]
fn gate_decides_handshakes_from_its_config() {
    let runtime = runtime();
    let scratch = Scratch::new("gate");
    let file = scratch.plugin(
        "gate",
        "gate",
        Some(
            "[config]\ntoken = \"secret\"\norigins = [\"https://app.example.com\"]\n\
             [limits]\ndeadline = \"1s\"\n",
        ),
    );
    let plugin = runtime.load(&file).expect("load gate");
    let request = |query: &str, origin: &str| HandshakeRequest {
        room: "gate".into(),
        path: "/ws/gate".into(),
        query: query.into(),
        headers: vec![("origin".into(), origin.into())],
        remote_addr: "127.0.0.1:4000".into(),
        protocols: vec![],
    };
    assert_eq!(
        plugin.handshake(&request("token=secret", "https://app.example.com")).expect("handshake"),
        HandshakeDecision::Accept { protocol: None, identity: None }
    );
    assert_eq!(
        plugin.handshake(&request("token=wrong", "https://app.example.com")).expect("handshake"),
        HandshakeDecision::Reject { status: 403, reason: "bad token".into() }
    );
    assert!(matches!(
        plugin.handshake(&request("token=secret", "https://evil.example")).expect("handshake"),
        HandshakeDecision::Reject { status: 403, .. }
    ));
}

#[test]
fn a_folder_loads_in_order_and_reports_bad_files() {
    let runtime = runtime();
    let scratch = Scratch::new("folder");
    scratch.plugin("echo", "echo", None);
    scratch.plugin("relay", "relay", Some("rooms = [\"relay\", \"lobby:*\"]\n"));
    scratch.plugin("taga", "tag", None);
    // Claims `tag:*` as specifically as tag.wasm does: refused, as the later file.
    scratch.plugin("tagb", "zzz", Some("rooms = [\"tag:*\"]\n"));
    scratch.file("junk.wasm", b"junk");
    scratch.file("notes.txt", b"not a plugin");

    let (set, errors) = PluginSet::load_dir(&runtime, &scratch.0);
    let names: Vec<&str> = set.plugins().map(|plugin| plugin.name()).collect();
    assert_eq!(names, vec!["echo", "relay", "tag"]);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].plugin, "junk");
    assert_eq!(errors[1].plugin, "zzz");
    assert!(
        errors[1].to_string().contains("`tag:*` conflicts with `tag:*` of plugin `tag`"),
        "{}",
        errors[1]
    );

    let served = |room: &str| set.for_room(room).map(|plugin| plugin.name().to_owned());
    assert_eq!(served("echo").as_deref(), Some("echo"));
    assert_eq!(served("echo:1").as_deref(), Some("echo"));
    assert_eq!(served("tag:x").as_deref(), Some("tag"));
    assert_eq!(served("lobby:1").as_deref(), Some("relay"));
    assert_eq!(served("relay:1"), None, "rooms replaced the defaults");
    assert_eq!(served("echoes"), None);

    // Replacing a plugin by name returns the old one; removing forgets it.
    let mut set = set;
    let again = runtime.load(&scratch.0.join("echo.wasm")).expect("reload");
    let old = set.insert(again).expect("replace").expect("old echo");
    assert_eq!(old.name(), "echo");
    assert_eq!(set.len(), 3);
    assert!(set.remove("echo").is_some());
    assert_eq!(served_after(&set, "echo"), None);

    let missing = PluginSet::load_dir(&runtime, &scratch.0.join("absent"));
    assert!(missing.0.is_empty());
    assert!(missing.1[0].to_string().contains("cannot read the plugins folder"));
}

fn served_after(set: &PluginSet, room: &str) -> Option<String> {
    set.for_room(room).map(|plugin| plugin.name().to_owned())
}

fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mappings() -> Option<usize> {
    Some(std::fs::read_to_string("/proc/self/maps").ok()?.lines().count())
}

/// Ten thousand live rooms of one plugin fit: address space (each memory reserves
/// only the largest allowed memory, not 4 GiB) and memory mappings (the kernel allows
/// 65530) do not run out. Prints what one live instance costs.
#[test]
fn ten_thousand_live_rooms() {
    let runtime = runtime();
    let plugin = load(&runtime, "relay");
    let rooms = 10_000;
    let (rss_before, maps_before) = (proc_status("VmRSS:"), mappings());
    let started = Instant::now();
    let mut instances = Vec::with_capacity(rooms);
    let room = Room::new("relay:many", &[1]);
    for _ in 0..rooms {
        let mut instance = plugin.instantiate("relay:many").expect("instantiate");
        instance.join(&room.view(), &member(1)).expect("join").0.expect("admitted");
        instances.push(instance);
    }
    let took = started.elapsed();
    for instance in &mut instances {
        let (verdict, _) =
            instance.message(&room.view(), Origin::Member(1), &Payload::text("x")).expect("message");
        assert_eq!(verdict, Verdict::Pass);
    }
    let (rss_after, maps_after) = (proc_status("VmRSS:"), mappings());
    if let (Some(before), Some(after), Some(maps_before), Some(maps_after)) =
        (rss_before, rss_after, maps_before, maps_after)
    {
        eprintln!(
            "{rooms} live relay rooms: {:.1} µs per instantiate+join, about {} KiB RSS and {:.1} \
             memory mappings per instance (other tests run alongside: approximate)",
            took.as_secs_f64() * 1e6 / rooms as f64,
            after.saturating_sub(before) / rooms as u64,
            (maps_after as f64 - maps_before as f64) / rooms as f64,
        );
    }
}
