//! The store data behind every instance: the `room` imports, the actions a call
//! records, and the per-call bounds.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::instance::*;
use super::runtime::TICK;
use super::sandbox::*;
use super::{
    Action, MAX_ACTION_BYTES_PER_CALL, MAX_ACTIONS_PER_CALL, MAX_CLOSE_REASON_BYTES, MAX_TIMERS_PER_ROOM,
    MemberId, Payload, RoomExists, RoomView,
};

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
pub(super) enum ScopeKind {
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
    InvalidArgument,
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

/// The data of every store: what the `room` imports need and what a call records.
pub(crate) struct HostState {
    pub(super) plugin: Arc<str>,
    /// `None` in handshake instances.
    pub(super) room: Option<Arc<str>>,
    pub(crate) limiter: MemoryLimiter,
    pub(super) created: Instant,
    pub(crate) rng: GuestRng,

    // Per call. `view` fills these before the call; they stay allocated between calls.
    /// What the call may do: see [`Scope`].
    pub(super) scope: ScopeKind,
    pub(super) members: Vec<MemberId>,
    /// Built on the first membership check of a call in a large room.
    pub(super) member_set: HashSet<MemberId>,
    pub(super) member_set_ready: bool,
    pub(super) room_exists: Option<RoomExists>,
    pub(super) actions: Vec<Action>,
    pub(super) action_bytes: usize,
    pub(super) log_lines: u32,
    pub(super) log_dropped: u32,
    /// The call's last error-level log line: the guest SDK logs a panic's message
    /// there before trapping, and the failure report quotes it.
    pub(super) last_error_log: Option<String>,

    /// The deadline of the call in progress, in ticks (one preemption window).
    pub(super) window_ticks: u64,
    /// The thread's CPU time when the current window was granted; `None` until the
    /// call first reaches its deadline.
    pub(super) window_cpu: Option<Duration>,
    /// Windows granted to the call in progress because its thread was preempted.
    pub(super) extensions: u32,

    // For the instance's life.
    pub(super) timers: HashSet<u64>,
    pub(super) next_timer: u64,
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
    pub(super) fn deadline_reached(&mut self) -> UpdateDeadline {
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

    pub(super) fn is_member(&mut self, id: MemberId) -> bool {
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
    pub(super) fn record(&mut self, action: Action, bytes: usize) -> Result<(), Refusal> {
        self.check_room(bytes)?;
        self.action_bytes += bytes;
        self.actions.push(action);
        Ok(())
    }

    pub(super) fn check_room(&self, bytes: usize) -> Result<(), Refusal> {
        if self.actions.len() >= MAX_ACTIONS_PER_CALL
            || self.action_bytes.saturating_add(bytes) > MAX_ACTION_BYTES_PER_CALL
        {
            return Err(Refusal::TooManyActions);
        }
        Ok(())
    }

    /// Sending needs a hook call's view of the room.
    pub(super) fn require_room(&self) -> Result<(), Refusal> {
        if self.scope == ScopeKind::Hook { Ok(()) } else { Err(Refusal::Unavailable) }
    }

    /// Timers need a room instance (not `snapshot`, not the handshake instance).
    pub(super) fn allows_timers(&self) -> bool {
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

    pub(crate) fn add_to_room(
        &mut self,
        member: MemberId,
        room: String,
        params: Option<String>,
    ) -> Result<(), Refusal> {
        self.require_room()?;
        if !crate::types::valid_room_name(&room) {
            return Err(Refusal::UnknownRoom);
        }
        if !self.is_member(member) {
            return Err(Refusal::UnknownMember);
        }
        if let Some(params) = &params
            && (params.len() > super::MAX_PARAMS_BYTES
                || serde_json::from_str::<serde::de::IgnoredAny>(params).is_err())
        {
            return Err(Refusal::InvalidArgument);
        }
        let bytes = room.len() + params.as_ref().map_or(0, String::len);
        self.record(Action::AddToRoom { member, room, params }, bytes)
    }

    pub(crate) fn remove(&mut self, member: MemberId, mut reason: String) -> Result<(), Refusal> {
        self.require_room()?;
        if !self.is_member(member) {
            return Err(Refusal::UnknownMember);
        }
        let keep = truncate(&reason, MAX_CLOSE_REASON_BYTES).len();
        reason.truncate(keep);
        let bytes = reason.len();
        self.record(Action::Remove { member, reason }, bytes)
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
    use wasmtime::ResourceLimiter as _;

    use super::*;

    pub(super) fn state() -> HostState {
        HostState::new("unit", Some("unit:room"), 1 << 20, [7; 32])
    }

    pub(super) fn room_exists() -> RoomExists {
        Arc::new(|room: &str| room == "other")
    }

    pub(super) fn in_call(state: &mut HostState, members: &[MemberId], exists: &RoomExists) {
        let view = RoomView { room: "unit:room", members, room_exists: exists };
        state.enter(Scope::Hook(&view));
        state.begin_call(10);
    }

    #[test]
    pub(super) fn sends_and_closes_only_to_members() {
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
    pub(super) fn membership_in_a_large_room() {
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
    pub(super) fn adds_and_removes_are_checked() {
        let exists = room_exists();
        let mut state = state();
        in_call(&mut state, &[1], &exists);
        let params = Some(r#"{"seat":1}"#.to_owned());
        assert_eq!(state.add_to_room(1, "match:1".into(), params.clone()), Ok(()));
        assert_eq!(state.add_to_room(1, "match:2".into(), None), Ok(()));
        // Any valid name: the target room need not be live yet.
        assert_eq!(state.add_to_room(2, "match:1".into(), None), Err(Refusal::UnknownMember));
        assert_eq!(state.add_to_room(1, "no spaces".into(), None), Err(Refusal::UnknownRoom));
        assert_eq!(state.add_to_room(1, "m".into(), Some("not json".into())), Err(Refusal::InvalidArgument));
        let huge = format!("\"{}\"", "x".repeat(crate::plugin::MAX_PARAMS_BYTES));
        assert_eq!(state.add_to_room(1, "m".into(), Some(huge)), Err(Refusal::InvalidArgument));
        assert_eq!(state.remove(2, "bye".into()), Err(Refusal::UnknownMember));
        assert_eq!(state.remove(1, "é".repeat(100)), Ok(()));
        assert_eq!(
            state.actions[..2],
            [
                Action::AddToRoom { member: 1, room: "match:1".into(), params },
                Action::AddToRoom { member: 1, room: "match:2".into(), params: None },
            ]
        );
        let Some(Action::Remove { reason, .. }) = state.actions.last() else { panic!("no remove") };
        assert_eq!(reason.len(), 122, "cut like a close reason");
    }

    #[test]
    pub(super) fn close_codes_and_reasons() {
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
    pub(super) fn forwards_only_to_live_valid_rooms() {
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
    pub(super) fn actions_per_call_are_bounded_by_count_and_bytes() {
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
    pub(super) fn timers_are_bounded_and_tracked() {
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
    pub(super) fn without_a_room_the_acting_imports_are_unavailable() {
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
    pub(super) fn init_and_restore_may_set_timers_but_not_send() {
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
    pub(super) fn random_bytes_are_keyed_per_store_and_bounded() {
        let mut a = HostState::new("unit", None, 1 << 20, [1; 32]);
        let mut b = HostState::new("unit", None, 1 << 20, [2; 32]);
        let x = a.random_bytes(64).expect("bytes");
        assert_eq!(x.len(), 64);
        assert_ne!(x, b.random_bytes(64).expect("bytes"));
        assert_ne!(x, a.random_bytes(64).expect("bytes"), "the stream advances");
        assert!(a.random_bytes(MAX_RANDOM_BYTES + 1).is_err());
    }

    #[test]
    pub(super) fn memory_limiter_counts_all_memories_and_records_refusals() {
        let mut limiter = MemoryLimiter { cap: 100, total: 0, refused: false };
        assert!(limiter.memory_growing(0, 60, None).expect("grow"));
        assert!(limiter.memory_growing(0, 40, None).expect("second memory"));
        assert!(!limiter.refused);
        assert!(!limiter.memory_growing(60, 61, None).expect("over"));
        assert!(limiter.refused);
    }

    #[test]
    fn one_line_and_truncate_cut_on_char_boundaries() {
        assert_eq!(one_line("a\n  b\r\n\nc", 10), "a b c");
        assert_eq!(one_line("abc\ndef", 5), "abc d");
        assert_eq!(truncate("aé", 2), "a");
    }
}
