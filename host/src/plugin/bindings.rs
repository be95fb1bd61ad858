//! The only file that names `bindgen!` output: the `room-plugin` world's generated types,
//! the host side of the `room` interface, and conversions to and from Roomcast's types.

use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{AsContextMut, Engine, Result, Store};

use super::state::{HostState, LogLevel, Refusal};
use super::{
    HandshakeDecision, HandshakeRequest, MemberId, MemberInfo, Origin, Payload, PluginInfo, Refused, Verdict,
};
use crate::types::CloseReason;

#[allow(
    unsafe_code,
    reason = "bindgen! output calls TypedFunc::new_unchecked after checking the types itself"
)]
mod generated {
    /// `roomcast:plugin@0.2.0`, the contract plugins are built against today.
    pub(super) mod current {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "room-plugin",
            // Exports borrow their arguments: a text payload crosses as `&str` straight
            // from the host's `Bytes`, with no intermediate `String`.
            ownership: Borrowing { duplicate_if_necessary: true },
        });
    }

    /// `roomcast:plugin@0.1.0`, kept so that plugins built before 0.2.0 run unchanged:
    /// the host adapts them (see [`super::Exports`]).
    pub(super) mod legacy {
        wasmtime::component::bindgen!({
            path: "../wit/0.1.0",
            world: "room-plugin",
            ownership: Borrowing { duplicate_if_necessary: true },
        });
    }
}

use generated::{current, legacy};

/// The names of the world's exports, in WIT order (the same in both versions).
pub(crate) const HOOKS: [&str; 9] =
    ["describe", "init", "handshake", "join", "leave", "message", "timer", "snapshot", "restore"];

/// The contract versions this host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Contract {
    /// `roomcast:plugin@0.2.x`.
    Current,
    /// `roomcast:plugin@0.1.x`: no identity, no join parameters, joins cannot be
    /// refused by `join` (the `handshake` hook decides them), no moving members.
    Legacy,
}

impl Contract {
    /// The contract of a `roomcast:plugin` import's version (`0.2.0`), if this host
    /// runs it.
    pub(crate) fn of_version(version: &str) -> Option<Contract> {
        if version.contains(['-', '+']) {
            return None;
        }
        if version.starts_with("0.2.") {
            Some(Contract::Current)
        } else if version.starts_with("0.1.") {
            Some(Contract::Legacy)
        } else {
            None
        }
    }

    pub(crate) fn package(self) -> &'static str {
        match self {
            Contract::Current => "roomcast:plugin@0.2.0",
            Contract::Legacy => "roomcast:plugin@0.1.0",
        }
    }
}

/// Define the `room` interface (and the type-only `types` interface) of both contract
/// versions on `linker`.
pub(crate) fn add_room_interface(linker: &mut Linker<HostState>) -> Result<()> {
    current::RoomPlugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    legacy::RoomPlugin::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

/// A plugin linked against the host: instantiating it is cheap (no type checks, no
/// import resolution), which is what makes an instance per room affordable.
#[derive(Clone)]
pub(crate) enum Linked {
    Current(current::RoomPluginPre<HostState>),
    Legacy(legacy::RoomPluginPre<HostState>),
}

impl Linked {
    /// Link `component` with `linker` as a plugin of `contract`, checking that it
    /// exports the world's hooks with the right types.
    pub(crate) fn new(
        linker: &Linker<HostState>,
        component: &Component,
        contract: Contract,
    ) -> Result<Linked> {
        let pre: InstancePre<HostState> = linker.instantiate_pre(component)?;
        Ok(match contract {
            Contract::Current => Linked::Current(current::RoomPluginPre::new(pre)?),
            Contract::Legacy => Linked::Legacy(legacy::RoomPluginPre::new(pre)?),
        })
    }

    pub(crate) fn contract(&self) -> Contract {
        match self {
            Linked::Current(_) => Contract::Current,
            Linked::Legacy(_) => Contract::Legacy,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        match self {
            Linked::Current(pre) => pre.engine(),
            Linked::Legacy(pre) => pre.engine(),
        }
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> Result<Exports> {
        Ok(match self {
            Linked::Current(pre) => Exports::Current(pre.instantiate(store)?),
            Linked::Legacy(pre) => Exports::Legacy(pre.instantiate(store)?),
        })
    }
}

/// The exported hooks of one instance, called with Roomcast's types. A 0.1.0 plugin is
/// adapted here: its handshake attaches no identity, its members carry none, and its
/// `join` admits everyone.
pub(crate) enum Exports {
    Current(current::RoomPlugin),
    Legacy(legacy::RoomPlugin),
}

/// What an accepted handshake carries, in either version: 0.2.0's `acceptance`, or
/// 0.1.0's bare subprotocol (no identity).
trait Accepted {
    fn into_parts(self) -> (Option<String>, Option<String>);
}

impl Accepted for current::roomcast::plugin::types::Acceptance {
    fn into_parts(self) -> (Option<String>, Option<String>) {
        (self.protocol, self.identity)
    }
}

impl Accepted for Option<String> {
    fn into_parts(self) -> (Option<String>, Option<String>) {
        (self, None)
    }
}

/// The same call on either version's bindings, whose types differ only in name.
macro_rules! either {
    ($exports:expr, $plugin:ident => $body:expr) => {
        match $exports {
            Exports::Current($plugin) => $body,
            Exports::Legacy($plugin) => $body,
        }
    };
    ($exports:expr, $plugin:ident, $wit:ident => $body:expr) => {
        match $exports {
            Exports::Current($plugin) => {
                use current::roomcast::plugin::types as $wit;
                $body
            }
            Exports::Legacy($plugin) => {
                use legacy::roomcast::plugin::types as $wit;
                $body
            }
        }
    };
}

impl Exports {
    pub(crate) fn describe(&self, store: impl AsContextMut<Data = HostState>) -> Result<PluginInfo> {
        let (name, version) = either!(self, plugin => {
            let info = plugin.call_describe(store)?;
            (info.name, info.version)
        });
        Ok(PluginInfo { name, version })
    }

    /// `Ok(Err(message))` when the plugin refused its configuration.
    pub(crate) fn init(
        &self,
        store: impl AsContextMut<Data = HostState>,
        config: &str,
    ) -> Result<Result<(), String>> {
        either!(self, plugin => plugin.call_init(store, config))
    }

    pub(crate) fn handshake(
        &self,
        store: impl AsContextMut<Data = HostState>,
        request: &HandshakeRequest,
    ) -> Result<HandshakeDecision> {
        let headers: Vec<(&str, &str)> =
            request.headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        let protocols: Vec<&str> = request.protocols.iter().map(String::as_str).collect();
        Ok(either!(self, plugin, wit => {
            let request = wit::HandshakeRequest {
                room: &request.room,
                path: &request.path,
                query: &request.query,
                headers: &headers,
                remote_addr: &request.remote_addr,
                protocols: &protocols,
            };
            match plugin.call_handshake(store, request)? {
                wit::HandshakeDecision::Accept(accepted) => {
                    let (protocol, identity) = accepted.into_parts();
                    HandshakeDecision::Accept { protocol, identity }
                }
                wit::HandshakeDecision::Reject(rejection) => {
                    HandshakeDecision::Reject { status: rejection.status, reason: rejection.reason }
                }
            }
        }))
    }

    /// `Ok(Err(refusal))` when the plugin refused the member.
    pub(crate) fn join(
        &self,
        store: impl AsContextMut<Data = HostState>,
        member: &MemberInfo,
    ) -> Result<Result<(), Refused>> {
        match self {
            Exports::Current(plugin) => {
                use current::roomcast::plugin::types as wit;
                let verdict = plugin.call_join(
                    store,
                    wit::MemberInfo {
                        id: member.id,
                        query: &member.query,
                        remote_addr: &member.remote_addr,
                        protocol: member.protocol.as_deref(),
                        identity: member.identity.as_deref(),
                        params: member.params.as_deref(),
                    },
                )?;
                Ok(verdict
                    .map_err(|rejection| Refused { status: rejection.status, reason: rejection.reason }))
            }
            Exports::Legacy(plugin) => {
                use legacy::roomcast::plugin::types as wit;
                plugin.call_join(
                    store,
                    wit::MemberInfo {
                        id: member.id,
                        query: &member.query,
                        remote_addr: &member.remote_addr,
                        protocol: member.protocol.as_deref(),
                    },
                )?;
                Ok(Ok(()))
            }
        }
    }

    pub(crate) fn leave(
        &self,
        store: impl AsContextMut<Data = HostState>,
        member: MemberId,
        reason: CloseReason,
    ) -> Result<()> {
        either!(self, plugin, wit => {
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
            plugin.call_leave(store, member, reason)
        })
    }

    pub(crate) fn message(
        &self,
        store: impl AsContextMut<Data = HostState>,
        origin: &Origin,
        payload: &Payload,
    ) -> Result<Verdict> {
        // A text payload is valid UTF-8 by construction; checking costs a scan but no
        // copy, and keeps this file free of `unsafe`. Should a caller break the
        // guarantee, the guest gets the text with replacement characters.
        let lossy;
        let text = match payload {
            Payload::Text(bytes) => Some(match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    lossy = String::from_utf8_lossy(bytes);
                    &*lossy
                }
            }),
            Payload::Binary(_) => None,
        };
        let pass = either!(self, plugin, wit => {
            let origin = match origin {
                Origin::Member(id) => wit::Origin::Member(*id),
                Origin::Room(room) => wit::Origin::Room(room),
                Origin::Server => wit::Origin::Room(""),
            };
            let payload = match (text, payload) {
                (Some(text), _) => wit::PayloadParam::Text(text),
                (None, Payload::Binary(bytes) | Payload::Text(bytes)) => wit::PayloadParam::Binary(bytes),
            };
            matches!(plugin.call_message(store, origin, payload)?, wit::Verdict::Pass)
        });
        Ok(if pass { Verdict::Pass } else { Verdict::Drop })
    }

    pub(crate) fn timer(&self, store: impl AsContextMut<Data = HostState>, id: u64) -> Result<()> {
        either!(self, plugin => plugin.call_timer(store, id))
    }

    pub(crate) fn snapshot(&self, store: impl AsContextMut<Data = HostState>) -> Result<Option<Vec<u8>>> {
        either!(self, plugin => plugin.call_snapshot(store))
    }

    /// `Ok(Err(message))` when the plugin refused the state.
    pub(crate) fn restore(
        &self,
        store: impl AsContextMut<Data = HostState>,
        state: &[u8],
    ) -> Result<Result<(), String>> {
        either!(self, plugin => plugin.call_restore(store, state))
    }
}

/// The host side of one version's `room` interface; `$extra` holds what only that
/// version has.
macro_rules! room_host {
    ($version:ident, $invalid_argument:ident { $($extra:item)* }) => {
        const _: () = {
            use $version::roomcast::plugin::{room, types as wit};

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
                    Refusal::InvalidArgument => wit::RoomError::$invalid_argument,
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

                $($extra)*
            }
        };
    };
}

room_host!(current, InvalidArgument {
    fn add_to_room(
        &mut self,
        member: MemberId,
        room: String,
        params: Option<String>,
    ) -> Result<(), wit::RoomError> {
        HostState::add_to_room(self, member, room, params).map_err(refusal_to_wit)
    }

    fn remove(&mut self, member: MemberId, reason: String) -> Result<(), wit::RoomError> {
        HostState::remove(self, member, reason).map_err(refusal_to_wit)
    }
});

// 0.1.0 has no call that can be refused as an invalid argument.
room_host!(legacy, Unavailable {});
