//! Tests of the plugin runtime against real wasmtime and the real plugin components of
//! `plugins/` (built once per test run by [`plugin_file`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::*;

/// The plugins workspace, beside the host crate.
fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins")
}

/// Build the plugins workspace once (`cargo build --release`, in its own target
/// folder: sharing the host's would deadlock on cargo's lock). The host's rustflags
/// and target folder must not leak into the wasm build. `--keep-going` so that one
/// broken plugin does not hide the others; a test that needs a missing plugin fails
/// in [`plugin_file`], showing the build output.
fn build_plugins() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--keep-going"])
            .current_dir(plugins_dir())
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .output()
            .map_err(|error| format!("cannot run cargo in {}: {error}", plugins_dir().display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    })
}

/// The built `NAME.wasm`.
fn plugin_file(name: &str) -> PathBuf {
    let built = build_plugins();
    let file = plugins_dir().join(format!("target/wasm32-wasip2/release/{name}.wasm"));
    if !file.is_file() {
        panic!(
            "plugin {name} was not built ({}); build output:\n{}",
            file.display(),
            built.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    file
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
        let dir = std::env::temp_dir().join(format!(
            "roomcast-plugin-test-{}-{label}-{n}",
            std::process::id()
        ));
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
        RoomView {
            room: &self.name,
            members: &self.members,
            room_exists: &self.exists,
        }
    }
}

fn member(id: MemberId) -> MemberInfo {
    MemberInfo {
        id,
        query: String::new(),
        remote_addr: "127.0.0.1:1".to_owned(),
        protocol: None,
    }
}

fn load(runtime: &PluginRuntime, name: &str) -> Arc<Plugin> {
    runtime
        .load(&plugin_file(name))
        .unwrap_or_else(|error| panic!("load {name}: {error}"))
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
    assert_eq!(
        instance.join(&room.view(), &member(7)).expect("join"),
        vec![]
    );
    room.members.push(8);
    instance.join(&room.view(), &member(8)).expect("join");

    let text = Payload::text("héllo");
    let (verdict, actions) = instance
        .message(&room.view(), Origin::Member(8), &text)
        .expect("message");
    assert_eq!(verdict, Verdict::Drop);
    assert_eq!(
        actions,
        vec![Action::Send {
            to: 8,
            payload: text
        }]
    );

    let binary = Payload::binary(vec![0u8, 159, 146, 150]);
    let (_, actions) = instance
        .message(&room.view(), Origin::Member(7), &binary)
        .expect("message");
    assert_eq!(
        actions,
        vec![Action::Send {
            to: 7,
            payload: binary
        }]
    );
}

#[test]
fn relay_passes_without_actions_and_accepts_handshakes() {
    let runtime = runtime();
    let plugin = load(&runtime, "relay");
    let room = Room::new("relay", &[1, 2]);
    let mut instance = plugin.instantiate("relay").expect("instantiate");
    let (verdict, actions) = instance
        .message(&room.view(), Origin::Member(1), &Payload::text("hi"))
        .expect("message");
    assert_eq!(verdict, Verdict::Pass);
    assert!(actions.is_empty());
    let (verdict, _) = instance
        .message(
            &room.view(),
            Origin::Room("elsewhere".into()),
            &Payload::text("x"),
        )
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
            HandshakeDecision::Accept { protocol: None }
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
    eprintln!("relay imports: {:#?}", report.imports);
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
        text.contains(
            "is a core WebAssembly module, not a component; build with --target wasm32-wasip2"
        ),
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
    assert!(
        error.to_string().contains("is not a WebAssembly file"),
        "{error}"
    );

    // A component header with nothing valid after it.
    let file = scratch.file("broken.wasm", b"\0asm\x0d\0\x01\0\xff\xff\xff");
    let error = runtime.load(&file).expect_err("broken component");
    assert!(
        error
            .to_string()
            .contains("is not a valid WebAssembly component"),
        "{error}"
    );

    let error = runtime
        .load(&scratch.0.join("absent.wasm"))
        .expect_err("missing file");
    assert!(error.to_string().contains("cannot read"), "{error}");

    let file = scratch.file("bad name.wasm", b"");
    let error = runtime.load(&file).expect_err("bad name");
    assert!(
        error.to_string().contains("not a valid plugin name"),
        "{error}"
    );
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
    a.message(&room.view(), Origin::Member(1), &Payload::text("1"))
        .expect("a works");
    b.message(&room.view(), Origin::Member(1), &Payload::text("2"))
        .expect("b works");
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
        instance
            .message(&room.view(), Origin::Member(1), &payload)
            .expect("warm up");
    }
    let started = Instant::now();
    for _ in 0..calls {
        let (verdict, actions) = instance
            .message(&room.view(), Origin::Member(1), &payload)
            .expect("message");
        assert_eq!(verdict, Verdict::Pass);
        assert!(actions.is_empty());
    }
    let per_call = started.elapsed() / calls;

    let instances = 200;
    let started = Instant::now();
    let kept: Vec<RoomInstance> = (0..instances)
        .map(|_| plugin.instantiate("relay:bench").expect("instantiate"))
        .collect();
    let per_instance = started.elapsed() / instances;
    drop(kept);
    eprintln!(
        "relay: {} ns per message call (100-byte text), {:.1} µs per instantiation \
         (store + instance + init); debug host build: release is faster",
        per_call.as_nanos(),
        per_instance.as_secs_f64() * 1e6
    );
    assert!(per_call < Duration::from_secs(1));
}
