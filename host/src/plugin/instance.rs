//! A loaded [`Plugin`], its per-room [`RoomInstance`]s, and the store data behind every
//! instance: the `room` imports, the actions a call records, the per-call bounds, the
//! memory limiter and the deadline, and how a failed call is classified.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use wasmtime::Store;

use super::bindings::{Exports, Linked};
use super::runtime::Shared;
use super::sandbox::*;
use super::set::RoomPattern;
use super::state::*;
use super::{
    Action, FailureKind, HandshakeDecision, HandshakeRequest, HistorySettings, Limits,
    MAX_CLOSE_REASON_BYTES, MAX_IDENTITY_BYTES, MemberId, MemberInfo, Origin, Payload, PluginError,
    PluginInfo, Refused, RoomView, Verdict,
};
use crate::types::CloseReason;

/// Log lines one call may write; the rest are counted and reported in one line.
pub(super) const MAX_LOG_LINES_PER_CALL: u32 = 64;
/// Longer log lines are cut (on a char boundary) and marked.
pub(super) const MAX_LOG_LINE_BYTES: usize = 4096;
/// Idle handshake instances a plugin keeps; more are made when handshakes overlap.
pub(super) const MAX_IDLE_HANDSHAKE_INSTANCES: usize = 4;
/// Table elements one store may have (each is a pointer on the host).
pub(super) const MAX_TABLE_ELEMENTS: usize = 100_000;
/// The most bytes one `wasi:random` call may ask for.
pub(super) const MAX_RANDOM_BYTES: u64 = 1 << 20;
/// Rooms with more members than this get a hash set for membership checks.
pub(super) const LINEAR_MEMBER_SCAN: usize = 32;

/// Which of wasmtime's compilers made a plugin's machine code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compiler {
    /// Winch, the baseline compiler: a hot reload goes live on its code, which it
    /// compiles about five times faster than Cranelift and which runs slower.
    Winch,
    /// Cranelift, the optimising compiler: the code plugins load with at start-up and
    /// from the compiled-plugin cache, and that replaces Winch's after a hot reload.
    Cranelift,
}

impl Compiler {
    /// `winch` or `cranelift`, as the admin API and the log show it.
    pub fn label(self) -> &'static str {
        match self {
            Compiler::Winch => "winch",
            Compiler::Cranelift => "cranelift",
        }
    }
}

/// The linked code new instances of a plugin are made from.
pub(crate) struct Tier {
    pub(crate) linked: Linked,
    pub(crate) compiler: Compiler,
    /// How long Cranelift took, when it replaced Winch's code after a hot reload.
    pub(crate) optimized_in: Option<Duration>,
}

/// Everything needed to make sandboxes of one plugin: its code, limits and config.
pub(crate) struct Code {
    pub(crate) name: String,
    /// What new sandboxes are made from. Replaced once, when Cranelift's code takes
    /// over from Winch's (see `PluginRuntime::optimize`); a sandbox keeps running the
    /// code it was made from (its store belongs to that code's engine).
    pub(crate) tier: RwLock<Tier>,
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
    /// The linked code new sandboxes are made from now.
    pub(crate) fn linked(&self) -> Linked {
        self.tier.read().unwrap_or_else(|e| e.into_inner()).linked.clone()
    }

    pub(super) fn is_setup(hook: &str) -> bool {
        matches!(hook, "instantiation" | "init" | "describe" | "snapshot" | "restore")
    }

    pub(super) fn deadline_for(&self, hook: &str) -> Duration {
        if Code::is_setup(hook) { self.setup_deadline } else { self.limits.deadline }
    }

    pub(super) fn ticks_for(&self, hook: &str) -> u64 {
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
    /// How long compiling it took before it went live; `None` when the compiled-plugin
    /// cache had it.
    pub(crate) compiled_in: Option<Duration>,
    pub(crate) history: Option<HistorySettings>,
    /// Whether its rooms' messages may be compressed (`compression` in `NAME.toml`).
    pub(crate) compression: bool,
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

    /// Its rooms' history (`[history]` in `NAME.toml`), if they keep one.
    pub fn history(&self) -> Option<HistorySettings> {
        self.history
    }

    /// Whether its rooms' messages may be compressed (`compression` in `NAME.toml`,
    /// default true).
    pub fn compression(&self) -> bool {
        self.compression
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

    /// How long compiling this version took before it went live; `None` when it came
    /// from the compiled-plugin cache.
    pub fn compiled_in(&self) -> Option<Duration> {
        self.compiled_in
    }

    /// The compiler whose code new instances of it run.
    pub fn compiler(&self) -> Compiler {
        self.code.tier.read().unwrap_or_else(|e| e.into_inner()).compiler
    }

    /// How long Cranelift took to replace Winch's code, after a hot reload.
    pub fn optimized_in(&self) -> Option<Duration> {
        self.code.tier.read().unwrap_or_else(|e| e.into_inner()).optimized_in
    }

    /// Make new instances from `tier` (Cranelift's code, after a hot reload went live
    /// on Winch's). `sandbox`, made from it, replaces the idle handshake instances.
    pub(crate) fn replace_tier(&self, tier: Tier, sandbox: Sandbox) {
        *self.code.tier.write().unwrap_or_else(|e| e.into_inner()) = tier;
        let mut idle = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        *idle = vec![sandbox];
    }

    /// Whether it was built for `roomcast:plugin@0.1.0`: its `handshake` hook decides
    /// room-protocol joins too, since its `join` cannot refuse.
    pub fn legacy(&self) -> bool {
        self.code.linked().contract() == super::bindings::Contract::Legacy
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
            HandshakeDecision::Accept { protocol: Some(protocol), .. }
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
            HandshakeDecision::Accept { identity: Some(identity), .. }
                if identity.len() > MAX_IDENTITY_BYTES
                    || serde_json::from_str::<serde::de::IgnoredAny>(&identity).is_err() =>
            {
                Err(PluginError::new(
                    self.name(),
                    None,
                    FailureKind::Error,
                    format!(
                        "handshake attached an identity that is not JSON text of at most \
                         {MAX_IDENTITY_BYTES} bytes ({} bytes)",
                        identity.len()
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

    /// A member joins the room (`view.members` should already include it). `Err` in
    /// the verdict: the plugin refused it, and the caller removes it again (the
    /// actions still apply, but none can reach a member that is gone). A plugin built
    /// for `roomcast:plugin@0.1.0` admits everyone.
    pub fn join(
        &mut self,
        view: &RoomView,
        member: &MemberInfo,
    ) -> Result<(Result<(), Refused>, Vec<Action>), PluginError> {
        let (verdict, actions) =
            self.call(Scope::Hook(view), "join", |exports, store| exports.join(store, member))?;
        let verdict = verdict.map_err(|Refused { status, reason }| Refused {
            status: if (400..=599).contains(&status) { status } else { 403 },
            reason: one_line(&reason, MAX_CLOSE_REASON_BYTES),
        });
        Ok((verdict, actions))
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
