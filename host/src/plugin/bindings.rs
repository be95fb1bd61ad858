//! The only file that names `bindgen!` output: the `room-plugin` world's generated types,
//! the host side of the `room` interface, and conversions to and from Roomcast's types.

use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{AsContextMut, Engine, Result, Store};

use super::state::{HostState, LogLevel, Refusal};
use super::{
    HandshakeDecision, HandshakeRequest, MemberId, MemberInfo, Origin, Payload, PluginInfo, Verdict,
};
use crate::types::CloseReason;

#[allow(
    unsafe_code,
    reason = "bindgen! output calls TypedFunc::new_unchecked after checking the types itself"
)]
mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "room-plugin",
        // Exports borrow their arguments: a text payload crosses as `&str` straight from
        // the host's `Bytes`, with no intermediate `String`.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

use generated::roomcast::plugin::{room, types as wit};
use generated::{RoomPlugin, RoomPluginPre};

/// The names of the world's exports, in WIT order.
pub(crate) const HOOKS: [&str; 9] =
    ["describe", "init", "handshake", "join", "leave", "message", "timer", "snapshot", "restore"];

/// Define the `room` interface (and the type-only `types` interface) on `linker`.
pub(crate) fn add_room_interface(linker: &mut Linker<HostState>) -> Result<()> {
    RoomPlugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

/// A plugin linked against the host: instantiating it is cheap (no type checks, no
/// import resolution), which is what makes an instance per room affordable.
#[derive(Clone)]
pub(crate) struct Linked {
    pre: RoomPluginPre<HostState>,
}

impl Linked {
    /// Link `component` with `linker`, checking that it exports the world's hooks with
    /// the right types.
    pub(crate) fn new(linker: &Linker<HostState>, component: &Component) -> Result<Linked> {
        let pre: InstancePre<HostState> = linker.instantiate_pre(component)?;
        Ok(Linked { pre: RoomPluginPre::new(pre)? })
    }

    pub(crate) fn engine(&self) -> &Engine {
        self.pre.engine()
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> Result<Exports> {
        Ok(Exports(self.pre.instantiate(store)?))
    }
}

/// The exported hooks of one instance, called with Roomcast's types.
pub(crate) struct Exports(RoomPlugin);

impl Exports {
    pub(crate) fn describe(&self, store: impl AsContextMut<Data = HostState>) -> Result<PluginInfo> {
        let info = self.0.call_describe(store)?;
        Ok(PluginInfo { name: info.name, version: info.version })
    }

    /// `Ok(Err(message))` when the plugin refused its configuration.
    pub(crate) fn init(
        &self,
        store: impl AsContextMut<Data = HostState>,
        config: &str,
    ) -> Result<Result<(), String>> {
        self.0.call_init(store, config)
    }

    pub(crate) fn handshake(
        &self,
        store: impl AsContextMut<Data = HostState>,
        request: &HandshakeRequest,
    ) -> Result<HandshakeDecision> {
        let headers: Vec<(&str, &str)> =
            request.headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        let protocols: Vec<&str> = request.protocols.iter().map(String::as_str).collect();
        let decision = self.0.call_handshake(
            store,
            wit::HandshakeRequest {
                room: &request.room,
                path: &request.path,
                query: &request.query,
                headers: &headers,
                remote_addr: &request.remote_addr,
                protocols: &protocols,
            },
        )?;
        Ok(match decision {
            wit::HandshakeDecision::Accept(protocol) => HandshakeDecision::Accept { protocol },
            wit::HandshakeDecision::Reject(rejection) => {
                HandshakeDecision::Reject { status: rejection.status, reason: rejection.reason }
            }
        })
    }

    pub(crate) fn join(&self, store: impl AsContextMut<Data = HostState>, member: &MemberInfo) -> Result<()> {
        self.0.call_join(
            store,
            wit::MemberInfo {
                id: member.id,
                query: &member.query,
                remote_addr: &member.remote_addr,
                protocol: member.protocol.as_deref(),
            },
        )
    }

    pub(crate) fn leave(
        &self,
        store: impl AsContextMut<Data = HostState>,
        member: MemberId,
        reason: CloseReason,
    ) -> Result<()> {
        let reason = match reason {
            CloseReason::Client => wit::LeaveReason::Client,
            CloseReason::Heartbeat => wit::LeaveReason::Heartbeat,
            CloseReason::SlowConsumer => wit::LeaveReason::SlowConsumer,
            CloseReason::TooBig => wit::LeaveReason::TooBig,
            CloseReason::Protocol => wit::LeaveReason::Protocol,
            CloseReason::Reset => wit::LeaveReason::Reset,
            CloseReason::Shutdown => wit::LeaveReason::Shutdown,
            CloseReason::Plugin => wit::LeaveReason::ClosedByPlugin,
            CloseReason::PluginFailure => wit::LeaveReason::PluginFailure,
        };
        self.0.call_leave(store, member, reason)
    }

    pub(crate) fn message(
        &self,
        store: impl AsContextMut<Data = HostState>,
        origin: &Origin,
        payload: &Payload,
    ) -> Result<Verdict> {
        let origin = match origin {
            Origin::Member(id) => wit::Origin::Member(*id),
            Origin::Room(room) => wit::Origin::Room(room),
            Origin::Server => wit::Origin::Room(""),
        };
        // A text payload is valid UTF-8 by construction; checking costs a scan but no
        // copy, and keeps this file free of `unsafe`. Should a caller break the
        // guarantee, the guest gets the text with replacement characters.
        let lossy;
        let payload = match payload {
            Payload::Text(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => wit::PayloadParam::Text(text),
                Err(_) => {
                    lossy = String::from_utf8_lossy(bytes);
                    wit::PayloadParam::Text(&lossy)
                }
            },
            Payload::Binary(bytes) => wit::PayloadParam::Binary(bytes),
        };
        Ok(match self.0.call_message(store, origin, payload)? {
            wit::Verdict::Pass => Verdict::Pass,
            wit::Verdict::Drop => Verdict::Drop,
        })
    }

    pub(crate) fn timer(&self, store: impl AsContextMut<Data = HostState>, id: u64) -> Result<()> {
        self.0.call_timer(store, id)
    }

    pub(crate) fn snapshot(&self, store: impl AsContextMut<Data = HostState>) -> Result<Option<Vec<u8>>> {
        self.0.call_snapshot(store)
    }

    /// `Ok(Err(message))` when the plugin refused the state.
    pub(crate) fn restore(
        &self,
        store: impl AsContextMut<Data = HostState>,
        state: &[u8],
    ) -> Result<Result<(), String>> {
        self.0.call_restore(store, state)
    }
}

fn payload_from_wit(payload: wit::PayloadResult) -> Payload {
    match payload {
        // wasmtime checked the guest's string when it lifted it; no copy here.
        wit::PayloadResult::Text(text) => Payload::text(text),
        wit::PayloadResult::Binary(data) => Payload::binary(data),
    }
}

fn refusal_to_wit(refusal: Refusal) -> wit::RoomError {
    match refusal {
        Refusal::UnknownMember => wit::RoomError::UnknownMember,
        Refusal::UnknownRoom => wit::RoomError::UnknownRoom,
        Refusal::TooManyActions => wit::RoomError::TooManyActions,
        Refusal::TooManyTimers => wit::RoomError::TooManyTimers,
        Refusal::InvalidCloseCode => wit::RoomError::InvalidCloseCode,
        Refusal::Unavailable => wit::RoomError::Unavailable,
    }
}

impl wit::Host for HostState {}

impl room::Host for HostState {
    fn send(&mut self, to: MemberId, message: wit::PayloadResult) -> Result<(), wit::RoomError> {
        HostState::send(self, to, payload_from_wit(message)).map_err(refusal_to_wit)
    }

    fn broadcast(
        &mut self,
        message: wit::PayloadResult,
        except: Vec<MemberId>,
    ) -> Result<(), wit::RoomError> {
        HostState::broadcast(self, payload_from_wit(message), except).map_err(refusal_to_wit)
    }

    fn forward(&mut self, room: String, message: wit::PayloadResult) -> Result<(), wit::RoomError> {
        HostState::forward(self, room, payload_from_wit(message)).map_err(refusal_to_wit)
    }

    fn close(&mut self, member: MemberId, code: u16, reason: String) -> Result<(), wit::RoomError> {
        HostState::close(self, member, code, reason).map_err(refusal_to_wit)
    }

    fn members(&mut self) -> Vec<MemberId> {
        HostState::members(self)
    }

    fn room_name(&mut self) -> String {
        HostState::room_name(self)
    }

    fn log(&mut self, level: wit::LogLevel, message: String) {
        let level = match level {
            wit::LogLevel::Trace => LogLevel::Trace,
            wit::LogLevel::Debug => LogLevel::Debug,
            wit::LogLevel::Info => LogLevel::Info,
            wit::LogLevel::Warn => LogLevel::Warn,
            wit::LogLevel::Error => LogLevel::Error,
        };
        HostState::log(self, level, &message);
    }

    fn now(&mut self) -> u64 {
        HostState::now(self)
    }

    fn set_timer(&mut self, after_ms: u32) -> Result<u64, wit::RoomError> {
        HostState::set_timer(self, after_ms).map_err(refusal_to_wit)
    }

    fn cancel_timer(&mut self, id: u64) {
        HostState::cancel_timer(self, id);
    }
}
