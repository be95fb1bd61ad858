//! The engines plugins run on (Cranelift's and Winch's, alike but for the compiler:
//! epoch interruption, no parallel compilation), the epoch ticker thread, and turning
//! a plugin file into a linked, initialised [`Plugin`] (or a [`CheckReport`] for
//! `roomcast plugin check`).
//!
//! Two compilers, because a hot reload and the code that then runs want different
//! things. A reload goes live on Winch's code, which Winch compiles about five times
//! faster than Cranelift (a 160 KB plugin: about 45 ms against 210 ms on one core
//! here); but Winch's code runs guest work 30 to 65% slower, so Cranelift compiles the
//! version next, when the reload thread has nothing else to do, and new instances are
//! made from its code from then on ([`PluginRuntime::optimize`]). Start-up and the compiled-plugin cache
//! use Cranelift's code directly.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, StoreContextMut, Strategy, WasmBacktraceDetails};

use super::bindings::{self, Contract, Linked};
use super::instance::{Code, Compiler, Plugin, Tier};
use super::manifest::{self, Manifest};
use super::sandbox::Sandbox;
use super::set::RoomPattern;
use super::source::PluginSource;
use super::state::HostState;
use super::{HostCaps, PluginError, PluginInfo};

/// The WIT package plugins are built against today. The host also runs plugins built
/// for `roomcast:plugin@0.1.0` (see [`bindings::Contract`]).
pub const WIT_PACKAGE: &str = "roomcast:plugin@0.2.0";
/// The epoch's unit: deadlines are counted in ticks of real time.
pub(crate) const TICK: Duration = Duration::from_millis(1);
/// The longest the ticker sleeps between two looks while calls are short (see
/// [`EpochTicker`]); shorter when a loaded plugin's deadline is.
const MAX_COARSE_TICKS: u64 = 10;

/// What `roomcast plugin check FILE.wasm` reports about a plugin that loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// The plugin's name (the file stem).
    pub name: String,
    /// What its `describe` returned.
    pub info: PluginInfo,
    /// The world's exports it has, in WIT order (all of them, or it would not load).
    pub hooks: Vec<String>,
    /// The WIT package its `roomcast:plugin` imports come from (the host's own package
    /// when it imports none).
    pub wit_package: String,
    /// Every import it declares, e.g. `roomcast:plugin/room@0.2.0` and the `wasi:*`
    /// interfaces Rust's std declares (which trap, except `wasi:random`).
    pub imports: Vec<String>,
    /// The rooms it would serve.
    pub rooms: Vec<String>,
    pub sha256: String,
}

impl std::fmt::Display for CheckReport {
    /// The report `roomcast plugin check` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} {} (sha256 {})", self.name, self.info.name, self.info.version, self.sha256)?;
        writeln!(f, "  world:   {} room-plugin", self.wit_package)?;
        writeln!(f, "  hooks:   {}", self.hooks.join(", "))?;
        writeln!(
            f,
            "           (the guest SDK exports every hook; those a plugin does not write run its defaults)"
        )?;
        writeln!(f, "  rooms:   {}", self.rooms.join(", "))?;
        let (answered, trapping): (Vec<&String>, Vec<&String>) = self
            .imports
            .iter()
            .partition(|import| import.starts_with("roomcast:") || import.starts_with("wasi:random/"));
        let list = |imports: &[&String]| imports.iter().map(|i| i.as_str()).collect::<Vec<_>>().join(", ");
        write!(f, "  imports: {}", list(&answered))?;
        if !trapping.is_empty() {
            write!(
                f,
                "\n  trapping: {}\n           (Rust's std declares these in every wasip2 build; the host links them, \
                 but a call traps: log with the `log` import, not println!, and use Room::now, not std::time)",
                list(&trapping)
            )?;
        }
        Ok(())
    }
}

/// What every plugin shares: the engines, the epoch ticker, the seed for guests'
/// `wasi:random`. Plugins hold it too, so the ticker lives while any instance exists
/// (parked while no guest code runs).
pub(crate) struct Shared {
    /// Cranelift's engine, then Winch's: code and stores belong to the engine that
    /// compiled the code.
    engines: [Engine; 2],
    /// Taken and stopped on drop, when the runtime and every plugin are gone.
    ticker: Option<EpochTicker>,
    secret: [u8; 32],
    stores: AtomicU64,
}

impl Shared {
    fn engine(&self, compiler: Compiler) -> &Engine {
        match compiler {
            Compiler::Cranelift => &self.engines[0],
            Compiler::Winch => &self.engines[1],
        }
    }

    /// A fresh key for one store's `wasi:random` generator.
    pub(crate) fn store_key(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.secret);
        hasher.update(self.stores.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        hasher.finalize().into()
    }

    /// What to add to a deadline in ticks so that it counts from now: how far the
    /// engines' epoch lags real time while the ticker sleeps between looks.
    pub(crate) fn epoch_lag(&self) -> u64 {
        self.ticker.as_ref().map_or(0, |ticker| ticker.state.lag())
    }

    /// A plugin with this deadline per call is loaded: the ticker looks at least that
    /// often, so such a call is still stopped within a tick of its deadline.
    fn deadline_loaded(&self, deadline_ticks: u64) {
        if let Some(ticker) = &self.ticker {
            // `ticks` added one tick of slack: the look must come a tick before.
            ticker.state.coarse.fetch_min(deadline_ticks.saturating_sub(1).max(1), Ordering::Relaxed);
        }
    }

    /// Run `guest` (a call into guest code): the epoch ticks meanwhile.
    pub(crate) fn running<R>(&self, guest: impl FnOnce() -> R) -> R {
        if let Some(ticker) = &self.ticker {
            ticker.state.started.fetch_add(1, Ordering::Relaxed);
            // Pairs with the ticker's store of `parked` and load of `calls`: either it
            // sees this call and keeps ticking, or this sees it parked and wakes it.
            if ticker.state.calls.fetch_add(1, Ordering::SeqCst) == 0
                && ticker.state.parked.load(Ordering::SeqCst)
            {
                ticker.thread.thread().unpark();
            }
        }
        // A guard, so a panic does not leave the call counted.
        let _running = Running { shared: self };
        guest()
    }
}

/// Guest code is running (see [`Shared::running`]).
struct Running<'a> {
    shared: &'a Shared,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(ticker) = &self.shared.ticker {
            ticker.state.calls.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.stop();
        }
    }
}

/// After this many ticks without a call into a guest, the ticker sleeps until the next
/// call: an idle server (or one without plugins) has no thread waking every tick.
const IDLE_TICKS: u64 = 100;

/// The longest the ticker stays parked: then it brings the epochs up to real time and
/// parks again. A call that starts after a park counts its deadline from real time, and
/// the ticker's first look catches up every tick the park lasted, one increment each:
/// without this bound, the first call after a day without calls could run for as long
/// as 86 million increments take before its deadline is seen.
const MAX_PARK: Duration = Duration::from_secs(60);

/// The thread that keeps the engines' epochs in step with real time (one epoch per
/// [`TICK`] since it started); stopped by [`EpochTicker::stop`].
///
/// It does not wake every tick. Between two looks it sleeps `coarse` ticks (at most
/// [`MAX_COARSE_TICKS`], and less than the shortest deadline of any loaded plugin),
/// then advances the epochs by every tick that passed. A call's deadline is set from
/// real time (the lag is added, [`Shared::epoch_lag`]), so a late advance only ever
/// reaches deadlines that are due. When a look finds guest code running, the ticker
/// looks every tick until none runs: a call that outlives its deadline is seen
/// running at a look no later than that deadline, and is stopped within a tick of it,
/// as with a ticker that ticked every millisecond. Steady traffic of short calls thus
/// costs `1000 / coarse` wake-ups a second instead of 1000 (each one preempts whatever
/// shares the ticker's core: a worker, when the server is pinned to one core).
struct EpochTicker {
    state: Arc<TickerState>,
    thread: JoinHandle<()>,
}

struct TickerState {
    stop: AtomicBool,
    /// Calls into guests running now.
    calls: AtomicUsize,
    /// Calls started so far: a call that began and ended between two ticks counts.
    started: AtomicU64,
    /// The thread is parked or about to park.
    parked: AtomicBool,
    /// When tick 0 was.
    origin: Instant,
    /// The engines' epoch: ticks since `origin` as of the ticker's last look.
    epoch: AtomicU64,
    /// Ticks between two looks while no guest code runs.
    coarse: AtomicU64,
    /// Looks so far (what tests count).
    looks: AtomicU64,
}

impl TickerState {
    fn new() -> Self {
        Self {
            stop: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            origin: Instant::now(),
            epoch: AtomicU64::new(0),
            coarse: AtomicU64::new(MAX_COARSE_TICKS),
            looks: AtomicU64::new(0),
        }
    }

    /// Ticks since `origin`.
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos() / TICK.as_nanos()).unwrap_or(u64::MAX)
    }

    fn lag(&self) -> u64 {
        self.now().saturating_sub(self.epoch.load(Ordering::Acquire))
    }
}

impl EpochTicker {
    fn start(engines: [Engine; 2]) -> std::io::Result<EpochTicker> {
        let state = Arc::new(TickerState::new());
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new().name("roomcast-epoch".to_owned()).spawn(move || {
            let state = shared;
            let mut idle = 0;
            let mut seen = 0;
            let mut running = false;
            while !state.stop.load(Ordering::Acquire) {
                if idle >= IDLE_TICKS {
                    state.parked.store(true, Ordering::SeqCst);
                    if state.calls.load(Ordering::SeqCst) == 0 && !state.stop.load(Ordering::SeqCst) {
                        std::thread::park_timeout(MAX_PARK);
                    }
                    state.parked.store(false, Ordering::SeqCst);
                    idle = 0;
                    continue;
                }
                let ticks = if running { 1 } else { state.coarse.load(Ordering::Relaxed).max(1) };
                std::thread::sleep(TICK * u32::try_from(ticks).unwrap_or(1));
                // Every tick that passed, also those slept through while parked; a call
                // that started meanwhile counted its deadline from real time.
                let now = state.now();
                let passed = now.saturating_sub(state.epoch.load(Ordering::Relaxed));
                for engine in &engines {
                    for _ in 0..passed {
                        engine.increment_epoch();
                    }
                }
                state.epoch.store(now, Ordering::Release);
                state.looks.fetch_add(1, Ordering::Relaxed);
                running = state.calls.load(Ordering::SeqCst) > 0;
                let started = state.started.load(Ordering::Relaxed);
                if started == seen && !running {
                    idle += passed;
                } else {
                    (idle, seen) = (0, started);
                }
            }
        })?;
        Ok(EpochTicker { state, thread })
    }

    fn stop(self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }

    #[cfg(test)]
    fn is_parked(&self) -> bool {
        self.state.parked.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    fn looks(&self) -> u64 {
        self.state.looks.load(Ordering::Relaxed)
    }
}

/// The wasmtime engines plugins run on, with the host's caps on what a plugin may ask.
pub struct PluginRuntime {
    shared: Arc<Shared>,
    /// Where Cranelift's code is kept between runs (`None`: always compile).
    cache_dir: Option<PathBuf>,
    /// The `room` interface, on Cranelift's engine then on Winch's; cloned per plugin,
    /// which adds its `wasi:*` stubs.
    linkers: [Linker<HostState>; 2],
    caps: HostCaps,
}

/// A compiled component, by which compiler, and how long that took (`None`: Cranelift's
/// code from the cache).
struct Compiled {
    component: Component,
    compiler: Compiler,
    took: Option<Duration>,
}

/// A component linked as a plugin, and what `roomcast plugin check` reports of it.
struct Linking {
    linked: Linked,
    wit_package: String,
    imports: Vec<String>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").field("caps", &self.caps).finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// Whether the epoch ticker sleeps (no guest code ran for a while).
    #[cfg(test)]
    pub(crate) fn ticker_parked(&self) -> bool {
        self.shared.ticker.as_ref().is_some_and(EpochTicker::is_parked)
    }

    /// How often the epoch ticker has woken to advance the epochs.
    #[cfg(test)]
    pub(crate) fn ticker_looks(&self) -> u64 {
        self.shared.ticker.as_ref().map_or(0, EpochTicker::looks)
    }

    /// Cranelift's and Winch's engines, with epoch interruption and a 1 ms ticker
    /// thread (asleep while no guest code runs).
    pub fn new(caps: HostCaps) -> Result<Self, PluginError> {
        let fail = |detail: String| PluginError::load("(runtime)", detail);
        let engine = |compiler| {
            Engine::new(&engine_config(&caps, compiler))
                .map_err(|error| fail(format!("{} engine: {error}", compiler.label())))
        };
        let engines = [engine(Compiler::Cranelift)?, engine(Compiler::Winch)?];
        let ticker = EpochTicker::start(engines.clone())
            .map_err(|error| fail(format!("cannot start the epoch ticker: {error}")))?;
        let linker = |engine: &Engine| {
            let mut linker = Linker::new(engine);
            bindings::add_room_interface(&mut linker).map_err(|error| fail(format!("linker: {error}")))?;
            Ok::<_, PluginError>(linker)
        };
        let linkers = [linker(&engines[0])?, linker(&engines[1])?];
        Ok(PluginRuntime {
            shared: Arc::new(Shared {
                engines,
                ticker: Some(ticker),
                secret: host_secret(),
                stores: AtomicU64::new(0),
            }),
            linkers,
            caps,
            cache_dir: None,
        })
    }

    fn linker(&self, compiler: Compiler) -> &Linker<HostState> {
        match compiler {
            Compiler::Cranelift => &self.linkers[0],
            Compiler::Winch => &self.linkers[1],
        }
    }

    /// Keep Cranelift's code in `dir`, keyed by content hash and engine settings, so a
    /// restart does not compile plugins again. The folder is created (owner-only) if
    /// needed; it must not be the watched plugins folder.
    pub fn set_cache_dir(&mut self, dir: PathBuf) {
        self.cache_dir = Some(dir);
    }
}

/// The settings of both engines; only the compiler differs.
fn engine_config(caps: &HostCaps, compiler: Compiler) -> Config {
    let mut config = Config::new();
    config
        .strategy(match compiler {
            Compiler::Cranelift => Strategy::Cranelift,
            Compiler::Winch => Strategy::Winch,
        })
        // (Compilation is single-threaded: wasmtime's `parallel-compilation` feature is
        // off in Cargo.toml, so a reload never takes both cores from traffic.)
        .epoch_interruption(true)
        // Concurrency support made plain sync calls 2.4x slower in a trial here.
        .concurrency_support(false)
        // Reserve only what the largest allowed memory needs: with the default 4 GiB
        // per memory, tens of thousands of rooms would exhaust the address space.
        // Memories then never move (the limiter refuses growth past the cap).
        .memory_reservation(caps.max_memory.next_multiple_of(64 << 10))
        .wasm_backtrace_details(WasmBacktraceDetails::Disable)
        .memory_init_cow(false)
        .guard_before_linear_memory(false);
    config
}

impl PluginRuntime {
    /// The caps this runtime enforces on `NAME.toml` limits.
    pub fn caps(&self) -> HostCaps {
        self.caps
    }

    /// Read a plugin file (and `NAME.toml` beside it if present), then
    /// [`load_source`](PluginRuntime::load_source).
    ///
    /// Synchronous and CPU-heavy (tens of milliseconds): run it off the async workers.
    pub fn load(&self, wasm_path: &Path) -> Result<Arc<Plugin>, PluginError> {
        self.load_source(&read_source(wasm_path)?)
    }

    /// Compile (with Cranelift, or from the cache) and link the plugin `source` holds,
    /// create its handshake instance, call `init` and `describe` on it. The reload
    /// reads the files once, hashes them, and hands the same bytes here.
    ///
    /// Synchronous and CPU-heavy (tens of milliseconds): run it off the async workers.
    pub fn load_source(&self, source: &PluginSource) -> Result<Arc<Plugin>, PluginError> {
        Ok(Arc::new(self.prepare(source, false)?.plugin))
    }

    /// [`load_source`](PluginRuntime::load_source) for a hot reload, which should go
    /// live soon: Cranelift's code if the cache has it, else Winch's (or Cranelift's,
    /// for what Winch cannot compile). [`optimize`](PluginRuntime::optimize) then
    /// replaces Winch's code.
    pub fn load_source_fast(&self, source: &PluginSource) -> Result<Arc<Plugin>, PluginError> {
        Ok(Arc::new(self.prepare(source, true)?.plugin))
    }

    /// Compile `wasm` (the bytes `plugin` was loaded from) with Cranelift and make new
    /// instances of `plugin` from that code; instances made before keep Winch's code.
    /// Returns how long compiling took, or `None` when there was nothing to do (the
    /// plugin already runs Cranelift's code) or the cache had it.
    ///
    /// Synchronous and CPU-heavy (a few hundred milliseconds for a large plugin): run it
    /// off the async workers, and not before a reload that is waiting.
    pub fn optimize(&self, plugin: &Plugin, wasm: &[u8]) -> Result<Option<Duration>, PluginError> {
        if plugin.compiler() == Compiler::Cranelift {
            return Ok(None);
        }
        let name = plugin.name();
        let compiled = self.compile(plugin.file(), wasm, false).map_err(|e| PluginError::load(name, e))?;
        let linked = self.link(name, plugin.file(), &compiled.component, compiled.compiler)?.linked;
        // A handshake instance made from the new code, before any room gets one.
        let (sandbox, _) = Sandbox::create_from(&plugin.code, &linked, None)?;
        let tier = Tier { linked, compiler: compiled.compiler, optimized_in: compiled.took };
        plugin.replace_tier(tier, sandbox);
        Ok(compiled.took)
    }

    /// For `roomcast plugin check FILE.wasm`: load the plugin as [`load`] would and
    /// report what it is, or say clearly why it cannot be loaded.
    ///
    /// [`load`]: PluginRuntime::load
    pub fn check(&self, wasm_path: &Path) -> Result<CheckReport, PluginError> {
        let prepared = self.prepare(&read_source(wasm_path)?, false)?;
        let plugin = prepared.plugin;
        Ok(CheckReport {
            name: plugin.name().to_owned(),
            info: plugin.info().clone(),
            hooks: prepared.hooks,
            wit_package: prepared.wit_package,
            imports: prepared.imports,
            rooms: plugin.patterns().iter().map(|p| p.to_string()).collect(),
            sha256: plugin.sha256().to_owned(),
        })
    }

    /// Load `source`: `fast`, as [`load_source_fast`](PluginRuntime::load_source_fast).
    fn prepare(&self, source: &PluginSource, fast: bool) -> Result<Prepared, PluginError> {
        let wasm_path = source.wasm_path();
        let name = plugin_name(wasm_path)?;
        let load_error = |detail: String| PluginError::load(&name, detail);
        let bytes = source.wasm();
        let manifest = match source.manifest() {
            Some(text) => manifest::parse(text, &source.manifest_path(), &self.caps).map_err(load_error)?,
            None => Manifest::defaults(&self.caps),
        };
        let patterns = match manifest.rooms {
            Some(patterns) => patterns,
            None => RoomPattern::defaults_for(&name),
        };
        let sha256 = hex(&Sha256::digest(bytes));

        let compiled = self.compile(wasm_path, bytes, fast).map_err(load_error)?;
        let Linking { linked, wit_package, imports } =
            self.link(&name, wasm_path, &compiled.component, compiled.compiler)?;

        let setup_deadline = self.caps.max_deadline.max(manifest.limits.deadline);
        let code = Code {
            name: name.clone(),
            tier: RwLock::new(Tier { linked, compiler: compiled.compiler, optimized_in: None }),
            limits: manifest.limits,
            deadline_ticks: ticks(manifest.limits.deadline),
            setup_deadline,
            setup_ticks: ticks(setup_deadline),
            config_json: manifest.config_json,
            shared: Arc::clone(&self.shared),
        };
        self.shared.deadline_loaded(code.deadline_ticks);
        let (mut sandbox, _) = Sandbox::create(&code, None)?;
        let info = sandbox.describe(&code)?;
        let plugin = Plugin {
            code,
            file: wasm_path.to_path_buf(),
            sha256,
            info,
            patterns,
            loaded_at: SystemTime::now(),
            compiled_in: compiled.took,
            history: manifest.history,
            compression: manifest.compression,
            handshakes: Mutex::new(vec![sandbox]),
        };
        Ok(Prepared {
            plugin,
            hooks: bindings::HOOKS.iter().map(|hook| (*hook).to_owned()).collect(),
            wit_package,
            imports,
        })
    }

    /// Link `component` (made by `compiler`) as plugin `name`: its `roomcast:plugin`
    /// imports decide the contract, `wasi:random` is answered, every other `wasi:*`
    /// import traps, anything else is refused, and it must export every hook.
    fn link(
        &self,
        name: &str,
        wasm_path: &Path,
        component: &Component,
        compiler: Compiler,
    ) -> Result<Linking, PluginError> {
        let load_error = |detail: String| PluginError::load(name, detail);
        let engine = self.shared.engine(compiler);
        let component_type = component.component_type();
        let mut imports = Vec::new();
        let mut wit_package = None;
        let mut contract = None;
        let mut linker = self.linker(compiler).clone();
        for (import, item) in component_type.imports(engine) {
            imports.push(import.to_owned());
            if let Some(version) = roomcast_import_version(import) {
                let Some(this) = Contract::of_version(version) else {
                    return Err(load_error(format!(
                        "{} imports `{import}`, but this host speaks {WIT_PACKAGE} (and runs \
                         plugins built for roomcast:plugin@0.1.0): rebuild it against the \
                         host's wit/roomcast.wit",
                        wasm_path.display()
                    )));
                };
                if contract.is_some_and(|seen| seen != this) {
                    return Err(load_error(format!(
                        "{} imports `{import}` beside another version of roomcast:plugin: \
                         build it against one version",
                        wasm_path.display()
                    )));
                }
                contract = Some(this);
                wit_package.get_or_insert_with(|| format!("roomcast:plugin@{version}"));
            } else if import.starts_with("wasi:random/") {
                define_random(&mut linker, engine, import, &item.ty)
                    .map_err(|error| load_error(format!("cannot provide `{import}`: {error}")))?;
            } else if !import.starts_with("wasi:") {
                return Err(load_error(format!(
                    "{} imports `{import}`, which Roomcast does not provide: plugins get \
                     {WIT_PACKAGE}'s `room` interface only",
                    wasm_path.display()
                )));
            }
        }
        let exports: Vec<String> =
            component_type.exports(engine).map(|(export, _)| export.to_owned()).collect();
        let missing: Vec<&str> = bindings::HOOKS
            .iter()
            .copied()
            .filter(|hook| !exports.iter().any(|export| export == hook))
            .collect();
        if !missing.is_empty() {
            return Err(load_error(format!(
                "{} does not implement the `room-plugin` world of {WIT_PACKAGE}: missing \
                 exports {} (it exports: {})",
                wasm_path.display(),
                quoted(&missing),
                if exports.is_empty() { "nothing".to_owned() } else { quoted(&exports) },
            )));
        }
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(|error| load_error(format!("cannot stub its imports: {error}")))?;
        // A plugin that imports nothing of ours is tried as today's contract, then 0.1.0.
        let linked = match contract {
            Some(contract) => Linked::new(&linker, component, contract),
            None => Linked::new(&linker, component, Contract::Current)
                .or_else(|_| Linked::new(&linker, component, Contract::Legacy)),
        }
        .map_err(|error| {
            load_error(format!(
                "{} does not match the `room-plugin` world of {}: {}",
                wasm_path.display(),
                contract.unwrap_or(Contract::Current).package(),
                error_chain(&error)
            ))
        })?;
        let wit_package = wit_package.unwrap_or_else(|| linked.contract().package().to_owned());
        Ok(Linking { linked, wit_package, imports })
    }

    /// Compile `bytes`: Cranelift's code from the cache if there; else, when `fast`,
    /// with Winch; else (or when Winch cannot) with Cranelift, and cache that.
    fn compile(&self, path: &Path, bytes: &[u8], fast: bool) -> Result<Compiled, String> {
        const MAGIC: &[u8] = b"\0asm";
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(format!(
                "{} is not a WebAssembly file (no `\\0asm` header); build the plugin with \
                 `cargo build --target wasm32-wasip2`",
                path.display()
            ));
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(format!(
                "{} is a core WebAssembly module, not a component; build with --target \
                 wasm32-wasip2",
                path.display()
            ));
        }
        let cached = self.cache_dir.as_ref().map(|dir| dir.join(self.cache_key(bytes)));
        if let Some(cached) = &cached
            && let Some(component) = self.load_cached(cached)
        {
            return Ok(Compiled { component, compiler: Compiler::Cranelift, took: None });
        }
        if fast {
            let started = Instant::now();
            match Component::from_binary(self.shared.engine(Compiler::Winch), bytes) {
                Ok(component) => {
                    return Ok(Compiled {
                        component,
                        compiler: Compiler::Winch,
                        took: Some(started.elapsed()),
                    });
                }
                // Cranelift then says what is wrong with the file, or compiles what Winch
                // does not support.
                Err(error) => {
                    tracing::debug!(file = %path.display(), error = %error_chain(&error), "Winch cannot compile it")
                }
            }
        }
        let started = Instant::now();
        let component =
            Component::from_binary(self.shared.engine(Compiler::Cranelift), bytes).map_err(|error| {
                format!("{} is not a valid WebAssembly component: {}", path.display(), error_chain(&error))
            })?;
        let took = started.elapsed();
        if let Some(cached) = cached {
            self.store_cached(&cached, &component);
        }
        Ok(Compiled { component, compiler: Compiler::Cranelift, took: Some(took) })
    }

    /// The cache file name: the component's SHA-256 and a hash of Cranelift's engine
    /// settings (an artifact compiled under other settings is never looked up).
    fn cache_key(&self, bytes: &[u8]) -> String {
        let mut engine = std::hash::DefaultHasher::new();
        self.shared.engine(Compiler::Cranelift).precompile_compatibility_hash().hash(&mut engine);
        format!("{}-{:016x}.cwasm", hex(&Sha256::digest(bytes)), engine.finish())
    }

    /// A compiled component from the cache, if present and accepted by the engine.
    #[allow(unsafe_code)]
    fn load_cached(&self, file: &Path) -> Option<Component> {
        if !file.is_file() {
            return None;
        }
        // SAFETY: `deserialize_file` trusts its input to be wasmtime's own output. The
        // cache folder is the host's (created owner-only, outside the watched plugins
        // folder), every file in it was written by `store_cached` from a component
        // this engine compiled, and its name carries both the source's SHA-256 and the
        // engine's compatibility hash, which wasmtime checks again on load.
        match unsafe { Component::deserialize_file(self.shared.engine(Compiler::Cranelift), file) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(file = %file.display(), error = %error_chain(&error), "ignoring a cached plugin");
                None
            }
        }
    }

    /// Write a compiled component to the cache (write to a temporary name, then
    /// rename, so a reader never sees half a file). Failures only cost a recompile.
    fn store_cached(&self, file: &Path, component: &Component) {
        let Some(dir) = file.parent() else { return };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            let bytes = component.serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
            let temp = file.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&temp, bytes)?;
            std::fs::rename(&temp, file)
        };
        if let Err(error) = write() {
            tracing::warn!(file = %file.display(), %error, "cannot cache a compiled plugin");
        }
    }
}

struct Prepared {
    plugin: Plugin,
    hooks: Vec<String>,
    wit_package: String,
    imports: Vec<String>,
}

/// The files of the plugin at `wasm_path`, read once (see [`PluginSource::read`]); a
/// missing file is an error here.
fn read_source(wasm_path: &Path) -> Result<PluginSource, PluginError> {
    let name = plugin_name(wasm_path)?;
    match PluginSource::read(wasm_path) {
        Ok(Some(source)) => Ok(source),
        Ok(None) => {
            Err(PluginError::load(name, format!("cannot read {}: no such file", wasm_path.display())))
        }
        Err(error) => Err(PluginError::load(name, error.to_string())),
    }
}

/// The plugin's name: the file stem, which must be a valid room name (it is the
/// default room and a metrics label).
fn plugin_name(path: &Path) -> Result<String, PluginError> {
    let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default();
    if !crate::types::valid_room_name(stem) {
        return Err(PluginError::load(
            path.display().to_string(),
            format!(
                "`{stem}` is not a valid plugin name: name the file with 1 to 128 characters \
                 of A-Z a-z 0-9 . _ : -"
            ),
        ));
    }
    Ok(stem.to_owned())
}

/// `Some("0.1.0")` for `roomcast:plugin/room@0.1.0`, `Some("")` for an unversioned or
/// other `roomcast:` import, `None` for anything else.
fn roomcast_import_version(import: &str) -> Option<&str> {
    let rest = import.strip_prefix("roomcast:")?;
    Some(match rest.split_once('@') {
        Some((interface, version)) if interface.starts_with("plugin/") => version,
        _ => "",
    })
}

/// Answer the guest's `wasi:random` functions from its store's generator (Rust's std
/// seeds `HashMap`s from it). Only the functions the import declares are defined.
fn define_random(
    linker: &mut Linker<HostState>,
    engine: &Engine,
    import: &str,
    item: &ComponentItem,
) -> wasmtime::Result<()> {
    let ComponentItem::ComponentInstance(instance) = item else {
        return Ok(());
    };
    let functions: Vec<String> = instance.exports(engine).map(|(name, _)| name.to_owned()).collect();
    let mut scope = linker.instance(import)?;
    for function in functions {
        match function.as_str() {
            "get-random-bytes" | "get-insecure-random-bytes" => {
                scope.func_wrap(&function, |mut store: StoreContextMut<'_, HostState>, (len,): (u64,)| {
                    Ok((store.data_mut().random_bytes(len)?,))
                })?
            }
            "get-random-u64" | "get-insecure-random-u64" => scope
                .func_wrap(&function, |mut store: StoreContextMut<'_, HostState>, (): ()| {
                    Ok((store.data_mut().rng.next_u64(),))
                })?,
            "insecure-seed" => {
                scope.func_wrap(&function, |mut store: StoreContextMut<'_, HostState>, (): ()| {
                    let rng = &mut store.data_mut().rng;
                    Ok(((rng.next_u64(), rng.next_u64()),))
                })?
            }
            _ => {}
        }
    }
    Ok(())
}

/// A deadline in epoch ticks, plus one: the ticker may be about to tick when a call
/// starts, so N ticks can be as short as N - 1 ticks' time.
fn ticks(deadline: Duration) -> u64 {
    let tick = TICK.as_nanos();
    let whole = deadline.as_nanos().div_ceil(tick).max(1);
    u64::try_from(whole).unwrap_or(u64::MAX - 1) + 1
}

/// 32 bytes no guest can guess: SipHash under std's randomly keyed `RandomState`
/// (seeded from the OS), over the time and process id.
fn host_secret() -> [u8; 32] {
    let mut hasher = Sha256::new();
    for round in 0..4u64 {
        let mut sip = RandomState::new().build_hasher();
        sip.write_u64(round);
        sip.write_u32(std::process::id());
        if let Ok(since) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            sip.write_u128(since.as_nanos());
        }
        hasher.update(sip.finish().to_le_bytes());
    }
    hasher.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

fn quoted(names: &[impl AsRef<str>]) -> String {
    names.iter().map(|name| format!("`{}`", name.as_ref())).collect::<Vec<_>>().join(", ")
}

/// Every distinct line of the error and its causes, joined with `: `.
fn error_chain(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
