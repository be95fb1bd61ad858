//! The sandbox around every call: the epoch deadline (with extra windows for a
//! preempted thread), the memory limiter, the guest's random source, and how a failed
//! call is classified and described.

use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{ResourceLimiter, Store, Trap};

use super::bindings::{Exports, Linked};
use super::instance::*;
use super::state::*;
use super::{Action, FailureKind, PluginError, PluginInfo};
use crate::units::{format_duration, format_size};

/// A store and the instance in it. The unit of isolation: dropping it frees the
/// instance's memory.
pub(crate) struct Sandbox {
    pub(super) store: Store<HostState>,
    pub(super) exports: Exports,
    /// Set by the first failed call; the sandbox then refuses calls.
    pub(super) failed: Option<FailureKind>,
}

impl Sandbox {
    /// Instantiate `code` in a new store and call `init` with its config. Returns the
    /// actions `init` recorded (timers, in a room instance).
    pub(crate) fn create(code: &Code, room: Option<&str>) -> Result<(Sandbox, Vec<Action>), PluginError> {
        Sandbox::create_from(code, &code.linked(), room)
    }

    /// [`create`](Sandbox::create) from `linked` rather than the code's current tier.
    pub(crate) fn create_from(
        code: &Code,
        linked: &Linked,
        room: Option<&str>,
    ) -> Result<(Sandbox, Vec<Action>), PluginError> {
        let state = HostState::new(&code.name, room, code.limits.memory, code.shared.store_key());
        let mut store = Store::new(linked.engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().deadline_reached()));
        store.data_mut().begin_call(code.setup_ticks);
        store.set_epoch_deadline(code.setup_ticks + code.shared.epoch_lag());
        let exports = match code.shared.running(|| linked.instantiate(&mut store)) {
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
    pub(super) fn call<R>(
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
        self.store.set_epoch_deadline(ticks + code.shared.epoch_lag());
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
pub(super) const MAX_PREEMPTION_WINDOWS: u32 = 20;

/// The calling thread's CPU time so far (Linux: `/proc/thread-self/schedstat`).
/// Read only when a call reaches its deadline, never per call.
pub(super) fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Timeout if the epoch deadline interrupted the guest, Memory if the limiter refused
/// growth during the call (the guest then aborts), Trap for anything else.
pub(super) fn classify(error: &wasmtime::Error, memory_refused: bool) -> FailureKind {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => FailureKind::Timeout,
        _ if memory_refused => FailureKind::Memory,
        _ => FailureKind::Trap,
    }
}

pub(super) fn failure(
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
pub(super) fn trap_message(error: &wasmtime::Error) -> String {
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

/// `text` on one line (its lines joined with spaces), cut to at most `max` bytes on a
/// char boundary.
pub(super) fn one_line(text: &str, max: usize) -> String {
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
pub(super) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Caps a store's linear memory (all memories together) and table sizes, and records
/// whether it refused growth, so that the trap that follows is reported as `Memory`.
pub(crate) struct MemoryLimiter {
    pub(super) cap: usize,
    pub(super) total: usize,
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
    pub(super) key: [u8; 32],
    pub(super) counter: u64,
    pub(super) block: [u8; 32],
    pub(super) used: usize,
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
