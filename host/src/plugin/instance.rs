//! A loaded [`Plugin`], its per-room [`RoomInstance`]s, and the store data behind every
//! instance: the `room` imports, the actions a call records, the per-call bounds, the
//! memory limiter and the deadline, and how a failed call is classified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};

use super::bindings::{Exports, Linked};
use super::runtime::{Shared, TICK};
use super::set::RoomPattern;
use super::{
    Action, FailureKind, HandshakeDecision, HandshakeRequest, Limits, MAX_ACTION_BYTES_PER_CALL,
    MAX_ACTIONS_PER_CALL, MAX_CLOSE_REASON_BYTES, MAX_TIMERS_PER_ROOM, MemberId, MemberInfo, Origin, Payload,
    PluginError, PluginInfo, RoomExists, RoomView, Verdict,
};
use crate::types::CloseReason;

/// Log lines one call may write; the rest are counted and reported in one line.
const MAX_LOG_LINES_PER_CALL: u32 = 64;
/// Longer log lines are cut (on a char boundary) and marked.
const MAX_LOG_LINE_BYTES: usize = 4096;
/// Idle handshake instances a plugin keeps; more are made when handshakes overlap.
const MAX_IDLE_HANDSHAKE_INSTANCES: usize = 4;
/// Table elements one store may have (each is a pointer on the host).
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// The most bytes one `wasi:random` call may ask for.
const MAX_RANDOM_BYTES: u64 = 1 << 20;
/// Rooms with more members than this get a hash set for membership checks.
const LINEAR_MEMBER_SCAN: usize = 32;

/// Everything needed to make sandboxes of one plugin: its code, limits and config.
pub(crate) struct Code {
    pub(crate) name: String,
    pub(crate) linked: Linked,
    pub(crate) limits: Limits,
    /// `limits.deadline` in epoch ticks (see `runtime::ticks`), for the hooks.
    pub(crate) deadline_ticks: u64,
    /// The deadline of the once-per-instance calls: instantiation, `init`, `describe`,
    /// `snapshot`, `restore` (the host's largest deadline, or the plugin's if longer).
    /// Epoch deadlines count wall-clock time, so a thread preempted on a busy machine
    /// loses time too; these calls decide whether a room can exist at all, so they
    /// get room for that. Hooks that run per event keep the plugin's own deadline.
    pub(crate) setup_deadline: Duration,
    pub(crate) setup_ticks: u64,
    pub(crate) config_json: String,
    /// Keeps the epoch ticker alive while any plugin or instance exists.
    pub(crate) shared: Arc<Shared>,
}

impl Code {
    fn is_setup(hook: &str) -> bool {
        matches!(hook, "instantiation" | "init" | "describe" | "snapshot" | "restore")
    }

    fn deadline_for(&self, hook: &str) -> Duration {
        if Code::is_setup(hook) { self.setup_deadline } else { self.limits.deadline }
    }

    fn ticks_for(&self, hook: &str) -> u64 {
        if Code::is_setup(hook) { self.setup_ticks } else { self.deadline_ticks }
    }
}

/// A plugin file, compiled and linked. Cheap to instantiate per room.
pub struct Plugin {
    pub(crate) code: Code,
    pub(crate) file: PathBuf,
    pub(crate) sha256: String,
    pub(crate) info: PluginInfo,
    pub(crate) patterns: Vec<RoomPattern>,
    pub(crate) loaded_at: SystemTime,
    /// Instances that answer handshakes. They hold no room: their `room` imports answer
    /// `unavailable`. One is taken out for each handshake (so concurrent handshakes do
    /// not wait on each other) and put back unless it failed.
    pub(crate) handshakes: Mutex<Vec<Sandbox>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.code.name)
            .field("file", &self.file)
            .field("info", &self.info)
            .field("patterns", &self.patterns)
            .field("limits", &self.code.limits)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's name: its file stem.
    pub fn name(&self) -> &str {
        &self.code.name
    }

    /// The `.wasm` file it was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The SHA-256 of the `.wasm` file, lower-case hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// What the plugin's `describe` returned.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The rooms it serves.
    pub fn patterns(&self) -> &[RoomPattern] {
        &self.patterns
    }

    /// Its limits (from `NAME.toml`, else the defaults).
    pub fn limits(&self) -> Limits {
        self.code.limits
    }

    /// The `[config]` table of `NAME.toml` as JSON text, as handed to `init`.
    pub fn config_json(&self) -> &str {
        &self.code.config_json
    }

    /// When it was loaded.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// Decide an upgrade request, on an instance that holds no room state.
    ///
    /// A decision that accepts with a subprotocol the client did not offer is refused
    /// (`FailureKind::Error`); a rejection's status outside 400..=599 becomes 403 and its
    /// reason is put on one line of at most 512 bytes.
    pub fn handshake(&self, request: &HandshakeRequest) -> Result<HandshakeDecision, PluginError> {
        let idle = self.handshakes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let mut sandbox = match idle {
            Some(sandbox) => sandbox,
            None => Sandbox::create(&self.code, None)?.0,
        };
        sandbox.store.data_mut().enter(Scope::Detached);
        let (decision, _) = sandbox
            .call(&self.code, None, "handshake", |exports, store| exports.handshake(store, request))?;
        let mut idle = self.handshakes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_HANDSHAKE_INSTANCES {
            idle.push(sandbox);
        }
        drop(idle);
        match decision {
            HandshakeDecision::Accept { protocol: Some(protocol) }
                if !request.protocols.contains(&protocol) =>
            {
                Err(PluginError::new(
                    self.name(),
                    None,
                    FailureKind::Error,
                    format!(
                        "handshake accepted with subprotocol `{protocol}`, which the client did not offer"
                    ),
                ))
            }
            HandshakeDecision::Reject { status, reason } => Ok(HandshakeDecision::Reject {
                status: if (400..=599).contains(&status) { status } else { 403 },
                reason: one_line(&reason, 512),
            }),
            accept => Ok(accept),
        }
    }

    /// A new instance for `room`: a fresh store, instantiated and given its config.
    ///
    /// Timers that `init` set are actions too: take them with
    /// [`RoomInstance::take_setup_actions`] right away, or they come first in the
    /// actions of the instance's next successful call.
    pub fn instantiate(self: &Arc<Self>, room: &str) -> Result<RoomInstance, PluginError> {
        let (sandbox, setup_actions) = Sandbox::create(&self.code, Some(room))?;
        Ok(RoomInstance { sandbox, plugin: Arc::clone(self), room: room.to_owned(), setup_actions })
    }
}

/// One live room's instance of a plugin. Calls run one at a time (`&mut self`), on
/// the caller's thread, each under the plugin's deadline and memory cap.
///
/// After a call fails, every further call returns an error at once: drop the instance
/// and make a new one.
///
/// What the `room` imports may do depends on the call:
///
/// | call | send, broadcast, forward, close | set-timer, cancel-timer | members |
/// |---|---|---|---|
/// | `join`, `leave`, `message`, `timer` | checked against the [`RoomView`] | yes | the view's |
/// | `init`, `restore` | `unavailable` | yes (see [`take_setup_actions`]) | empty |
/// | `snapshot`, and `handshake` on [`Plugin`] | `unavailable` | `unavailable` | empty |
///
/// `room-name` is the room's name everywhere but in `handshake` (empty); `log` and
/// `now` always work.
///
/// [`take_setup_actions`]: RoomInstance::take_setup_actions
pub struct RoomInstance {
    plugin: Arc<Plugin>,
    room: String,
    sandbox: Sandbox,
    /// Timer actions from `init` and `restore`, which return no actions: handed out by
    /// `take_setup_actions`, or ahead of the next successful call's actions.
    setup_actions: Vec<Action>,
}

impl std::fmt::Debug for RoomInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomInstance")
            .field("plugin", &self.plugin.name())
            .field("room", &self.room)
            .field("failed", &self.sandbox.failed)
            .finish_non_exhaustive()
    }
}

impl RoomInstance {
    /// The plugin this is an instance of.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// The room it serves.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// How an earlier call failed, if one did (the instance then refuses calls).
    pub fn failure(&self) -> Option<FailureKind> {
        self.sandbox.failed
    }

    /// The actions (`SetTimer`, `CancelTimer`) that `init` and `restore` recorded and
    /// nobody has taken yet. Apply them right after [`Plugin::instantiate`] and
    /// [`RoomInstance::restore`]; whatever is not taken comes first in the actions of
    /// the next successful call.
    pub fn take_setup_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.setup_actions)
    }

    /// A member joined the room (`view.members` should already include it).
    pub fn join(&mut self, view: &RoomView, member: &MemberInfo) -> Result<Vec<Action>, PluginError> {
        self.call(Scope::Hook(view), "join", |exports, store| exports.join(store, member))
            .map(|((), actions)| actions)
    }

    /// A member left the room (`view.members` should no longer include it).
    pub fn leave(
        &mut self,
        view: &RoomView,
        member: MemberId,
        reason: CloseReason,
    ) -> Result<Vec<Action>, PluginError> {
        self.call(Scope::Hook(view), "leave", |exports, store| exports.leave(store, member, reason))
            .map(|((), actions)| actions)
    }

    /// A data message arrived from a member or was forwarded from another room.
    pub fn message(
        &mut self,
        view: &RoomView,
        origin: Origin,
        payload: &Payload,
    ) -> Result<(Verdict, Vec<Action>), PluginError> {
        self.call(Scope::Hook(view), "message", |exports, store| exports.message(store, &origin, payload))
    }

    /// A timer fired. Ids that are not pending (cancelled, already fired, or set by an
    /// earlier instance) are ignored without calling the plugin.
    pub fn timer(&mut self, view: &RoomView, id: u64) -> Result<Vec<Action>, PluginError> {
        if !self.sandbox.store.data_mut().timers.remove(&id) {
            return Ok(Vec::new());
        }
        self.call(Scope::Hook(view), "timer", |exports, store| exports.timer(store, id))
            .map(|((), actions)| actions)
    }

    /// The room's state for the next version of the plugin. The `room` imports that
    /// act answer `unavailable` during this call.
    pub fn snapshot(&mut self) -> Result<Option<Vec<u8>>, PluginError> {
        self.call(Scope::Detached, "snapshot", |exports, store| exports.snapshot(store))
            .map(|(state, _)| state)
    }

    /// Take over the state a previous version returned from `snapshot`. Timers of the
    /// previous instance are not carried over: the plugin may set new ones here (see
    /// [`RoomInstance::take_setup_actions`]); sending answers `unavailable`.
    ///
    /// When the plugin refuses the state (`FailureKind::Error`), the instance stays
    /// usable, with the fresh state its `init` built; a trap or timeout makes it
    /// unusable like any failed call.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), PluginError> {
        let (result, actions) =
            self.call(Scope::Setup, "restore", |exports, store| exports.restore(store, state))?;
        self.setup_actions.extend(actions);
        result.map_err(|message| {
            PluginError::new(
                self.plugin.name(),
                Some(&self.room),
                FailureKind::Error,
                format!("restore refused the state: {}", one_line(&message, 512)),
            )
        })
    }

    fn call<R>(
        &mut self,
        scope: Scope,
        hook: &str,
        body: impl FnOnce(&Exports, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Vec<Action>), PluginError> {
        if let Scope::Hook(view) = scope {
            debug_assert_eq!(view.room, self.room, "a view of another room");
        }
        self.sandbox.store.data_mut().enter(scope);
        let result = self.sandbox.call(&self.plugin.code, Some(&self.room), hook, body);
        match result {
            Ok((value, actions)) if matches!(scope, Scope::Hook(_)) => {
                if self.setup_actions.is_empty() {
                    Ok((value, actions))
                } else {
                    let mut all = std::mem::take(&mut self.setup_actions);
                    all.extend(actions);
                    Ok((value, all))
                }
            }
            Ok(done) => Ok(done),
            Err(error) => {
                self.setup_actions.clear();
                Err(error)
            }
        }
    }
}

/// A store and the instance in it. The unit of isolation: dropping it frees the
/// instance's memory.
pub(crate) struct Sandbox {
    store: Store<HostState>,
    exports: Exports,
    /// Set by the first failed call; the sandbox then refuses calls.
    failed: Option<FailureKind>,
}

impl Sandbox {
    /// Instantiate `code` in a new store and call `init` with its config. Returns the
    /// actions `init` recorded (timers, in a room instance).
    pub(crate) fn create(code: &Code, room: Option<&str>) -> Result<(Sandbox, Vec<Action>), PluginError> {
        let engine = code.linked.engine();
        let state = HostState::new(&code.name, room, code.limits.memory, code.shared.store_key());
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().deadline_reached()));
        store.data_mut().begin_call(code.setup_ticks);
        store.set_epoch_deadline(code.setup_ticks);
        let exports = match code.shared.running(|| code.linked.instantiate(&mut store)) {
            Ok(exports) => exports,
            Err(error) => {
                let kind = classify(&error, store.data().limiter.refused);
                return Err(failure(code, room, "instantiation", kind, &error, None));
            }
        };
        let mut sandbox = Sandbox { store, exports, failed: None };
        let scope = if room.is_some() { Scope::Setup } else { Scope::Detached };
        sandbox.store.data_mut().enter(scope);
        let (result, actions) =
            sandbox.call(code, room, "init", |exports, store| exports.init(store, &code.config_json))?;
        result.map_err(|message| {
            PluginError::new(
                &code.name,
                room,
                FailureKind::Error,
                format!("init refused its config: {}", one_line(&message, 512)),
            )
        })?;
        Ok((sandbox, actions))
    }

    /// `describe`, on a fresh sandbox.
    pub(crate) fn describe(&mut self, code: &Code) -> Result<PluginInfo, PluginError> {
        self.store.data_mut().enter(Scope::Detached);
        let (info, _) = self.call(code, None, "describe", |exports, store| exports.describe(store))?;
        Ok(PluginInfo { name: one_line(&info.name, 128), version: one_line(&info.version, 128) })
    }

    /// Run one hook under the deadline. On success, return what it returned and the
    /// actions it recorded; on failure, discard them and refuse further calls.
    fn call<R>(
        &mut self,
        code: &Code,
        room: Option<&str>,
        hook: &str,
        body: impl FnOnce(&Exports, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<(R, Vec<Action>), PluginError> {
        if let Some(kind) = self.failed {
            return Err(PluginError::new(
                &code.name,
                room,
                FailureKind::Error,
                format!("instance is unusable after an earlier failure ({kind})"),
            ));
        }
        let ticks = code.ticks_for(hook);
        self.store.data_mut().begin_call(ticks);
        self.store.set_epoch_deadline(ticks);
        let result = code.shared.running(|| body(&self.exports, &mut self.store));
        let state = self.store.data_mut();
        state.end_call();
        match result {
            Ok(value) => Ok((value, std::mem::take(&mut state.actions))),
            Err(error) => {
                state.actions = Vec::new();
                let kind = classify(&error, state.limiter.refused);
                self.failed = Some(kind);
                let logged = state.last_error_log.take();
                Err(failure(code, room, hook, kind, &error, logged.as_deref()))
            }
        }
    }
}

/// How many extra windows a call may get because its thread was preempted.
const MAX_PREEMPTION_WINDOWS: u32 = 20;

/// The calling thread's CPU time so far (Linux: `/proc/thread-self/schedstat`).
/// Read only when a call reaches its deadline, never per call.
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Timeout if the epoch deadline interrupted the guest, Memory if the limiter refused
/// growth during the call (the guest then aborts), Trap for anything else.
fn classify(error: &wasmtime::Error, memory_refused: bool) -> FailureKind {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => FailureKind::Timeout,
        _ if memory_refused => FailureKind::Memory,
        _ => FailureKind::Trap,
    }
}

fn failure(
    code: &Code,
    room: Option<&str>,
    hook: &str,
    kind: FailureKind,
    error: &wasmtime::Error,
    logged: Option<&str>,
) -> PluginError {
    let detail = match kind {
        FailureKind::Timeout => {
            format!("ran past its {} deadline in `{hook}`", format_duration(code.deadline_for(hook)))
        }
        FailureKind::Memory => {
            format!("exceeded its memory limit of {} in `{hook}`", format_size(code.limits.memory))
        }
        _ => match logged {
            Some(logged) => {
                format!("trapped in `{hook}`: {} (its last error log line: {logged})", trap_message(error))
            }
            None => format!("trapped in `{hook}`: {}", trap_message(error)),
        },
    };
    PluginError::new(&code.name, room, kind, detail)
}

/// The first line of the error's own message and of its root cause, without the wasm
/// backtrace wasmtime attaches as context.
fn trap_message(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or("").trim();
        if first.is_empty() || first.starts_with("error while executing at wasm backtrace") {
            continue;
        }
        if !parts.iter().any(|part| part == first) {
            parts.push(first.to_owned());
        }
    }
    if parts.is_empty() { "unknown error".to_owned() } else { one_line(&parts.join(": "), 1024) }
}

/// `10ms`, `2s`.
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis >= 1000 && millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{millis}ms")
    } else {
        format!("{duration:?}")
    }
}

/// `32MiB`, `1536KiB`, `1000`.
pub(crate) fn format_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// `text` on one line (its lines joined with spaces), cut to at most `max` bytes on a
/// char boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max));
    for part in text.lines().map(str::trim).filter(|part| !part.is_empty()) {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(part);
        if line.len() >= max {
            break;
        }
    }
    let keep = truncate(&line, max).len();
    line.truncate(keep);
    line
}

/// `text` cut to at most `max` bytes on a char boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What a call into an instance may do through the `room` imports.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scope<'a> {
    /// `handshake`, `describe`, `snapshot`: nothing acts, no timers.
    Detached,
    /// `init` and `restore` of a room instance: timers only.
    Setup,
    /// `join`, `leave`, `message`, `timer`: everything, checked against the view.
    Hook(&'a RoomView<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeKind {
    Detached,
    Setup,
    Hook,
}

/// Why a `room` import refused a call (mapped to the WIT `room-error` in bindings.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    UnknownMember,
    UnknownRoom,
    TooManyActions,
    TooManyTimers,
    InvalidCloseCode,
    Unavailable,
}

/// The `log-level` of the `room` interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Caps a store's linear memory (all memories together) and table sizes, and records
/// whether it refused growth, so that the trap that follows is reported as `Memory`.
pub(crate) struct MemoryLimiter {
    cap: usize,
    total: usize,
    pub(crate) refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.cap {
            self.refused = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }
}

/// A per-store generator for `wasi:random`: SHA-256 in counter mode over a key the host
/// derives from its own secret and a per-store counter. Guests cannot see or reseed it.
pub(crate) struct GuestRng {
    key: [u8; 32],
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl GuestRng {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        GuestRng { key, counter: 0, block: [0; 32], used: 32 }
    }

    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == self.block.len() {
                let mut hasher = Sha256::new();
                hasher.update(self.key);
                hasher.update(self.counter.to_le_bytes());
                self.block = hasher.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut bytes = [0; 8];
        self.fill(&mut bytes);
        u64::from_le_bytes(bytes)
    }
}

/// The data of every store: what the `room` imports need and what a call records.
pub(crate) struct HostState {
    plugin: Arc<str>,
    /// `None` in handshake instances.
    room: Option<Arc<str>>,
    pub(crate) limiter: MemoryLimiter,
    created: Instant,
    pub(crate) rng: GuestRng,

    // Per call. `view` fills these before the call; they stay allocated between calls.
    /// What the call may do: see [`Scope`].
    scope: ScopeKind,
    members: Vec<MemberId>,
    /// Built on the first membership check of a call in a large room.
    member_set: HashSet<MemberId>,
    member_set_ready: bool,
    room_exists: Option<RoomExists>,
    actions: Vec<Action>,
    action_bytes: usize,
    log_lines: u32,
    log_dropped: u32,
    /// The call's last error-level log line: the guest SDK logs a panic's message
    /// there before trapping, and the failure report quotes it.
    last_error_log: Option<String>,

    /// The deadline of the call in progress, in ticks (one preemption window).
    window_ticks: u64,
    /// The thread's CPU time when the current window was granted; `None` until the
    /// call first reaches its deadline.
    window_cpu: Option<Duration>,
    /// Windows granted to the call in progress because its thread was preempted.
    extensions: u32,

    // For the instance's life.
    timers: HashSet<u64>,
    next_timer: u64,
}

impl HostState {
    pub(crate) fn new(plugin: &str, room: Option<&str>, memory: u64, rng_key: [u8; 32]) -> Self {
        HostState {
            plugin: Arc::from(plugin),
            room: room.map(Arc::from),
            limiter: MemoryLimiter {
                cap: usize::try_from(memory).unwrap_or(usize::MAX),
                total: 0,
                refused: false,
            },
            created: Instant::now(),
            rng: GuestRng::new(rng_key),
            scope: ScopeKind::Detached,
            members: Vec::new(),
            member_set: HashSet::new(),
            member_set_ready: false,
            room_exists: None,
            actions: Vec::new(),
            action_bytes: 0,
            log_lines: 0,
            log_dropped: 0,
            last_error_log: None,
            window_ticks: 1,
            window_cpu: None,
            extensions: 0,
            timers: HashSet::new(),
            next_timer: 1,
        }
    }

    /// Called by wasmtime when a call reaches its epoch deadline. Epochs count
    /// wall-clock time, so on a busy machine a preempted thread could "time out"
    /// without having run. The first time a call reaches its deadline it gets one more
    /// window, and the thread's CPU time is noted; at the end of a window the call is
    /// interrupted if its thread ran for at least half of it (a runaway guest), and
    /// gets another window if it mostly waited for a CPU, at most
    /// [`MAX_PREEMPTION_WINDOWS`] times. A guest that spins is stopped after about two
    /// deadlines of CPU time; an honest one is not failed by the scheduler.
    fn deadline_reached(&mut self) -> UpdateDeadline {
        let Some(cpu) = thread_cpu_time() else { return UpdateDeadline::Interrupt };
        let window = TICK * u32::try_from(self.window_ticks).unwrap_or(u32::MAX);
        let grant = match self.window_cpu {
            None => true,
            Some(start) => cpu.saturating_sub(start) < window / 2 && self.extensions < MAX_PREEMPTION_WINDOWS,
        };
        if grant {
            self.window_cpu = Some(cpu);
            self.extensions += 1;
            UpdateDeadline::Continue(self.window_ticks)
        } else {
            UpdateDeadline::Interrupt
        }
    }

    /// Take in what the next call may do and know about its room.
    pub(crate) fn enter(&mut self, scope: Scope) {
        self.members.clear();
        self.member_set_ready = false;
        self.scope = match scope {
            Scope::Detached => ScopeKind::Detached,
            Scope::Setup => ScopeKind::Setup,
            Scope::Hook(_) => ScopeKind::Hook,
        };
        if let Scope::Hook(view) = scope {
            self.members.extend_from_slice(view.members);
            let same = self.room_exists.as_ref().is_some_and(|known| Arc::ptr_eq(known, view.room_exists));
            if !same {
                self.room_exists = Some(Arc::clone(view.room_exists));
            }
        }
    }

    pub(crate) fn begin_call(&mut self, window_ticks: u64) {
        self.window_ticks = window_ticks;
        self.window_cpu = None;
        self.extensions = 0;
        self.actions.clear();
        self.action_bytes = 0;
        self.log_lines = 0;
        self.log_dropped = 0;
        self.last_error_log = None;
        self.limiter.refused = false;
    }

    pub(crate) fn end_call(&mut self) {
        if self.log_dropped > 0 {
            tracing::warn!(
                target: "roomcast::plugin::guest",
                plugin = %self.plugin,
                room = self.room.as_deref().unwrap_or(""),
                "dropped {} log lines past {MAX_LOG_LINES_PER_CALL} in one call",
                self.log_dropped,
            );
        }
    }

    fn is_member(&mut self, id: MemberId) -> bool {
        if self.members.len() <= LINEAR_MEMBER_SCAN {
            return self.members.contains(&id);
        }
        if !self.member_set_ready {
            self.member_set.clear();
            self.member_set.extend(self.members.iter().copied());
            self.member_set_ready = true;
        }
        self.member_set.contains(&id)
    }

    /// Record an action carrying `bytes` bytes, if the call's bounds allow it.
    fn record(&mut self, action: Action, bytes: usize) -> Result<(), Refusal> {
        self.check_room(bytes)?;
        self.action_bytes += bytes;
        self.actions.push(action);
        Ok(())
    }

    fn check_room(&self, bytes: usize) -> Result<(), Refusal> {
        if self.actions.len() >= MAX_ACTIONS_PER_CALL
            || self.action_bytes.saturating_add(bytes) > MAX_ACTION_BYTES_PER_CALL
        {
            return Err(Refusal::TooManyActions);
        }
        Ok(())
    }

    /// Sending needs a hook call's view of the room.
    fn require_room(&self) -> Result<(), Refusal> {
        if self.scope == ScopeKind::Hook { Ok(()) } else { Err(Refusal::Unavailable) }
    }

    /// Timers need a room instance (not `snapshot`, not the handshake instance).
    fn allows_timers(&self) -> bool {
        matches!(self.scope, ScopeKind::Hook | ScopeKind::Setup)
    }

    pub(crate) fn send(&mut self, to: MemberId, payload: Payload) -> Result<(), Refusal> {
        self.require_room()?;
        if !self.is_member(to) {
            return Err(Refusal::UnknownMember);
        }
        let bytes = payload.len();
        self.record(Action::Send { to, payload }, bytes)
    }

    pub(crate) fn broadcast(&mut self, payload: Payload, except: Vec<MemberId>) -> Result<(), Refusal> {
        self.require_room()?;
        let bytes = payload.len() + except.len() * size_of::<MemberId>();
        self.record(Action::Broadcast { payload, except }, bytes)
    }

    pub(crate) fn forward(&mut self, room: String, payload: Payload) -> Result<(), Refusal> {
        self.require_room()?;
        let live = crate::types::valid_room_name(&room)
            && self.room_exists.as_ref().is_some_and(|room_exists| room_exists(&room));
        if !live {
            return Err(Refusal::UnknownRoom);
        }
        let bytes = payload.len() + room.len();
        self.record(Action::Forward { room, payload }, bytes)
    }

    pub(crate) fn close(&mut self, member: MemberId, code: u16, mut reason: String) -> Result<(), Refusal> {
        self.require_room()?;
        if !matches!(code, 1000 | 1001 | 1008 | 1011 | 3000..=4999) {
            return Err(Refusal::InvalidCloseCode);
        }
        if !self.is_member(member) {
            return Err(Refusal::UnknownMember);
        }
        let keep = truncate(&reason, MAX_CLOSE_REASON_BYTES).len();
        reason.truncate(keep);
        let bytes = reason.len();
        self.record(Action::Close { member, code, reason }, bytes)
    }

    pub(crate) fn members(&mut self) -> Vec<MemberId> {
        self.members.clone()
    }

    pub(crate) fn room_name(&mut self) -> String {
        self.room.as_deref().unwrap_or("").to_owned()
    }

    pub(crate) fn log(&mut self, level: LogLevel, message: &str) {
        if level == LogLevel::Error {
            self.last_error_log = Some(one_line(message, 512));
        }
        if self.log_lines >= MAX_LOG_LINES_PER_CALL {
            self.log_dropped += 1;
            return;
        }
        self.log_lines += 1;
        let text = truncate(message, MAX_LOG_LINE_BYTES);
        let cut = if text.len() < message.len() { " [truncated]" } else { "" };
        let plugin = &*self.plugin;
        let room = self.room.as_deref().unwrap_or("");
        macro_rules! emit {
            ($macro:ident) => {
                tracing::$macro!(target: "roomcast::plugin::guest", plugin, room, "{text}{cut}")
            };
        }
        match level {
            LogLevel::Trace => emit!(trace),
            LogLevel::Debug => emit!(debug),
            LogLevel::Info => emit!(info),
            LogLevel::Warn => emit!(warn),
            LogLevel::Error => emit!(error),
        }
    }

    pub(crate) fn now(&mut self) -> u64 {
        u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn set_timer(&mut self, after_ms: u32) -> Result<u64, Refusal> {
        if !self.allows_timers() {
            return Err(Refusal::Unavailable);
        }
        if self.timers.len() >= MAX_TIMERS_PER_ROOM {
            return Err(Refusal::TooManyTimers);
        }
        self.check_room(0)?;
        let id = self.next_timer;
        self.next_timer += 1;
        self.timers.insert(id);
        let after = Duration::from_millis(u64::from(after_ms));
        self.record(Action::SetTimer { id, after }, 0)?;
        Ok(id)
    }

    /// Unknown ids are ignored. The timer stops being pending even when the call has no
    /// room left for a `CancelTimer` action: [`RoomInstance::timer`] ignores it then.
    pub(crate) fn cancel_timer(&mut self, id: u64) {
        if self.allows_timers() && self.timers.remove(&id) {
            let _ = self.record(Action::CancelTimer { id }, 0);
        }
    }

    /// `wasi:random` asks for `len` bytes; more than a MiB traps.
    pub(crate) fn random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            wasmtime::bail!("asked `wasi:random` for {len} bytes; the most is {MAX_RANDOM_BYTES}");
        }
        let mut bytes = vec![0; len as usize];
        self.rng.fill(&mut bytes);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HostState {
        HostState::new("unit", Some("unit:room"), 1 << 20, [7; 32])
    }

    fn room_exists() -> RoomExists {
        Arc::new(|room: &str| room == "other")
    }

    fn in_call(state: &mut HostState, members: &[MemberId], exists: &RoomExists) {
        let view = RoomView { room: "unit:room", members, room_exists: exists };
        state.enter(Scope::Hook(&view));
        state.begin_call(10);
    }

    #[test]
    fn sends_and_closes_only_to_members() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1, 2], &exists);
        assert_eq!(state.send(1, Payload::text("a")), Ok(()));
        assert_eq!(state.send(3, Payload::text("b")), Err(Refusal::UnknownMember));
        assert_eq!(state.close(3, 1000, "x".into()), Err(Refusal::UnknownMember));
        assert_eq!(state.close(2, 1000, "bye".into()), Ok(()));
        assert_eq!(state.members(), vec![1, 2]);
        assert_eq!(state.room_name(), "unit:room");
        assert_eq!(
            state.actions,
            vec![
                Action::Send { to: 1, payload: Payload::text("a") },
                Action::Close { member: 2, code: 1000, reason: "bye".into() },
            ]
        );
    }

    #[test]
    fn membership_in_a_large_room() {
        let exists = room_exists();
        let mut state = state();
        let members: Vec<MemberId> = (100..1100).collect();
        in_call(&mut state, &members, &exists);
        assert_eq!(state.send(1099, Payload::text("a")), Ok(()));
        assert_eq!(state.send(99, Payload::text("a")), Err(Refusal::UnknownMember));
        // The next call's view replaces the set.
        in_call(&mut state, &[5], &exists);
        assert_eq!(state.send(1099, Payload::text("a")), Err(Refusal::UnknownMember));
        assert_eq!(state.send(5, Payload::text("a")), Ok(()));
    }

    #[test]
    fn close_codes_and_reasons() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1], &exists);
        for code in [1000, 1001, 1008, 1011, 3000, 4000, 4999] {
            assert_eq!(state.close(1, code, String::new()), Ok(()), "{code}");
        }
        for code in [0, 999, 1002, 1005, 1006, 1009, 1015, 2999, 5000, u16::MAX] {
            assert_eq!(state.close(1, code, String::new()), Err(Refusal::InvalidCloseCode), "{code}");
        }
        // 200 bytes of two-byte characters: cut to 122 bytes, on a char boundary.
        state.begin_call(10);
        let long = "é".repeat(100);
        assert_eq!(state.close(1, 4000, long), Ok(()));
        let Some(Action::Close { reason, .. }) = state.actions.last() else {
            panic!("no close action");
        };
        assert_eq!(reason.len(), 122);
        assert!(reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn forwards_only_to_live_valid_rooms() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1], &exists);
        assert_eq!(state.forward("other".into(), Payload::text("a")), Ok(()));
        assert_eq!(state.forward("nowhere".into(), Payload::text("a")), Err(Refusal::UnknownRoom));
        assert_eq!(state.forward("bad/name".into(), Payload::text("a")), Err(Refusal::UnknownRoom));
        assert_eq!(state.forward(String::new(), Payload::text("a")), Err(Refusal::UnknownRoom));
        assert_eq!(
            state.actions,
            vec![Action::Forward { room: "other".into(), payload: Payload::text("a") }]
        );
    }

    #[test]
    fn actions_per_call_are_bounded_by_count_and_bytes() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1], &exists);
        for _ in 0..MAX_ACTIONS_PER_CALL {
            assert_eq!(state.send(1, Payload::text("x")), Ok(()));
        }
        assert_eq!(state.send(1, Payload::text("x")), Err(Refusal::TooManyActions));
        assert_eq!(state.broadcast(Payload::text("x"), vec![]), Err(Refusal::TooManyActions));
        assert_eq!(state.set_timer(10), Err(Refusal::TooManyActions));
        assert_eq!(state.actions.len(), MAX_ACTIONS_PER_CALL);

        // A new call starts with a fresh budget.
        in_call(&mut state, &[1], &exists);
        let mib = Payload::binary(vec![0u8; 1 << 20]);
        for _ in 0..16 {
            assert_eq!(state.broadcast(mib.clone(), vec![]), Ok(()));
        }
        assert_eq!(state.send(1, Payload::binary(vec![0u8; 1])), Err(Refusal::TooManyActions));
        assert_eq!(state.send(1, Payload::binary(Vec::new())), Ok(()));
    }

    #[test]
    fn timers_are_bounded_and_tracked() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1], &exists);
        let mut ids = Vec::new();
        for _ in 0..MAX_TIMERS_PER_ROOM {
            ids.push(state.set_timer(5).expect("timer"));
        }
        assert_eq!(state.set_timer(5), Err(Refusal::TooManyTimers));
        assert_eq!(state.actions[0], Action::SetTimer { id: ids[0], after: Duration::from_millis(5) });
        // Cancelling frees a slot; unknown ids are ignored without an action.
        in_call(&mut state, &[1], &exists);
        state.cancel_timer(ids[3]);
        state.cancel_timer(999_999);
        assert_eq!(state.actions, vec![Action::CancelTimer { id: ids[3] }]);
        let next = state.set_timer(1).expect("slot freed");
        assert!(!ids.contains(&next), "ids are not reused");
    }

    #[test]
    fn without_a_room_the_acting_imports_are_unavailable() {
        let mut state = HostState::new("unit", None, 1 << 20, [7; 32]);
        state.enter(Scope::Detached);
        state.begin_call(10);
        assert_eq!(state.send(1, Payload::text("a")), Err(Refusal::Unavailable));
        assert_eq!(state.broadcast(Payload::text("a"), vec![]), Err(Refusal::Unavailable));
        assert_eq!(state.forward("other".into(), Payload::text("a")), Err(Refusal::Unavailable));
        assert_eq!(state.close(1, 1000, String::new()), Err(Refusal::Unavailable));
        assert_eq!(state.set_timer(1), Err(Refusal::Unavailable));
        state.cancel_timer(1);
        assert_eq!(state.members(), Vec::<MemberId>::new());
        assert_eq!(state.room_name(), "");
        assert!(state.actions.is_empty());
        // Logging and the clock still work.
        state.log(LogLevel::Info, &"long line ".repeat(1000));
        let (a, b) = (state.now(), state.now());
        assert!(b >= a);
    }

    #[test]
    fn init_and_restore_may_set_timers_but_not_send() {
        let mut state = state();
        state.enter(Scope::Setup);
        state.begin_call(10);
        assert_eq!(state.send(1, Payload::text("a")), Err(Refusal::Unavailable));
        assert_eq!(state.broadcast(Payload::text("a"), vec![]), Err(Refusal::Unavailable));
        assert_eq!(state.close(1, 1000, String::new()), Err(Refusal::Unavailable));
        let id = state.set_timer(1000).expect("timers work in init");
        assert_eq!(state.members(), Vec::<MemberId>::new());
        assert_eq!(state.room_name(), "unit:room");
        assert_eq!(state.actions, vec![Action::SetTimer { id, after: Duration::from_secs(1) }]);
        // `snapshot` may not touch timers.
        state.enter(Scope::Detached);
        state.begin_call(10);
        assert_eq!(state.set_timer(5), Err(Refusal::Unavailable));
        state.cancel_timer(id);
        assert!(state.actions.is_empty());
        assert!(state.timers.contains(&id));
    }

    #[test]
    fn random_bytes_are_keyed_per_store_and_bounded() {
        let mut a = HostState::new("unit", None, 1 << 20, [1; 32]);
        let mut b = HostState::new("unit", None, 1 << 20, [2; 32]);
        let x = a.random_bytes(64).expect("bytes");
        assert_eq!(x.len(), 64);
        assert_ne!(x, b.random_bytes(64).expect("bytes"));
        assert_ne!(x, a.random_bytes(64).expect("bytes"), "the stream advances");
        assert!(a.random_bytes(MAX_RANDOM_BYTES + 1).is_err());
    }

    #[test]
    fn memory_limiter_counts_all_memories_and_records_refusals() {
        let mut limiter = MemoryLimiter { cap: 100, total: 0, refused: false };
        assert!(limiter.memory_growing(0, 60, None).expect("grow"));
        assert!(limiter.memory_growing(0, 40, None).expect("second memory"));
        assert!(!limiter.refused);
        assert!(!limiter.memory_growing(60, 61, None).expect("over"));
        assert!(limiter.refused);
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration(Duration::from_millis(10)), "10ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_size(32 << 20), "32MiB");
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(one_line("a\n  b\r\n\nc", 10), "a b c");
        assert_eq!(one_line("abc\ndef", 5), "abc d");
        assert_eq!(truncate("aé", 2), "a");
    }
}
