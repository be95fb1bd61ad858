//! The glue between wit-bindgen's generated exports and the [`Plugin`] trait: the one
//! place that names generated types, the instance's state cell and the panic hook.
//! Reached from plugin crates only through the hidden `__private` module that the
//! [`export!`](crate::export) macro expands to.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Once;

use crate::{
    Config, HandshakeDecision, HandshakeRequest, LeaveReason, LogLevel, Member, Message, Origin, Plugin,
    Refusal, Room, RoomError, Verdict,
};

/// The generated bindings for world `room-plugin`. Nothing outside this file names
/// them, except the `export!` macro through `__private`.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "room-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
        default_bindings_module: "::roomcast_guest::__private::bindings",
    });
}

use bindings::roomcast::plugin::types as wit;

/// Name and version of the plugin crate; the `export!` macro implements it with
/// `env!("CARGO_PKG_NAME")` and `env!("CARGO_PKG_VERSION")` of the plugin's crate.
pub trait Describe {
    /// The plugin crate's name.
    const NAME: &'static str;
    /// The plugin crate's version.
    const VERSION: &'static str;
}

/// Implements the generated `Guest` trait for a [`Plugin`]; `export!` names it.
pub struct Export<P>(PhantomData<P>);

thread_local! {
    /// The instance's plugin state, set by a successful `init`. Wasm instances are
    /// single-threaded and the host calls one hook at a time, so the cell is never
    /// borrowed twice.
    static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Runs `f` with the state `init` built; panics (a trap, logged first) when there is
/// none, which only happens when the host calls a hook after `init` failed.
fn with_state<P: Plugin, R>(f: impl FnOnce(&mut P) -> R) -> R {
    install_panic_hook();
    STATE.with_borrow_mut(|state| {
        let plugin = state
            .as_mut()
            .and_then(|state| state.downcast_mut::<P>())
            .expect("roomcast: a hook was called before init succeeded");
        f(plugin)
    })
}

/// Replaces std's panic hook, which writes to stderr (a WASI import the host defines
/// as a trap), with one that logs the panic through the `log` import at error level.
/// The trap that follows the panic is then reported with its reason.
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            crate::log(LogLevel::Error, &format!("plugin {info}"));
        }));
    });
}

impl<P: Plugin + Describe> bindings::Guest for Export<P> {
    fn describe() -> wit::PluginInfo {
        wit::PluginInfo { name: P::NAME.to_owned(), version: P::VERSION.to_owned() }
    }

    fn init(config: String) -> Result<(), String> {
        install_panic_hook();
        let plugin = P::init(Config::new(config))?;
        STATE.with_borrow_mut(|state| *state = Some(Box::new(plugin)));
        Ok(())
    }

    fn handshake(request: wit::HandshakeRequest) -> wit::HandshakeDecision {
        let request = HandshakeRequest {
            room: request.room,
            path: request.path,
            query: request.query,
            headers: request.headers,
            remote_addr: request.remote_addr,
            protocols: request.protocols,
        };
        match with_state(|plugin: &mut P| plugin.handshake(&request)) {
            HandshakeDecision::Accept { protocol, identity } => {
                wit::HandshakeDecision::Accept(wit::Acceptance { protocol, identity })
            }
            HandshakeDecision::Reject { status, reason } => {
                wit::HandshakeDecision::Reject(wit::Rejection { status, reason })
            }
        }
    }

    fn join(member: wit::MemberInfo) -> Result<(), wit::Rejection> {
        let member = Member {
            id: member.id,
            query: member.query,
            remote_addr: member.remote_addr,
            protocol: member.protocol,
            identity: member.identity,
            params: member.params,
        };
        with_state(|plugin: &mut P| {
            plugin
                .admit(&Room, &member)
                .map_err(|Refusal { status, reason }| wit::Rejection { status, reason })?;
            plugin.join(&Room, member);
            Ok(())
        })
    }

    fn leave(member: u64, reason: wit::LeaveReason) {
        let reason = match reason {
            wit::LeaveReason::Client => LeaveReason::Client,
            wit::LeaveReason::Heartbeat => LeaveReason::Heartbeat,
            wit::LeaveReason::SlowConsumer => LeaveReason::SlowConsumer,
            wit::LeaveReason::TooBig => LeaveReason::TooBig,
            wit::LeaveReason::Protocol => LeaveReason::Protocol,
            wit::LeaveReason::Reset => LeaveReason::Reset,
            wit::LeaveReason::Shutdown => LeaveReason::Shutdown,
            wit::LeaveReason::ClosedByPlugin => LeaveReason::ClosedByPlugin,
            wit::LeaveReason::PluginFailure => LeaveReason::PluginFailure,
        };
        with_state(|plugin: &mut P| plugin.leave(&Room, member, reason))
    }

    fn message(sender: wit::Origin, message: wit::Payload) -> wit::Verdict {
        let origin = match sender {
            wit::Origin::Member(id) => Origin::Member(id),
            wit::Origin::Room(name) if name.is_empty() => Origin::Server,
            wit::Origin::Room(name) => Origin::Room(name),
        };
        match with_state(|plugin: &mut P| plugin.message(&Room, origin, message.into())) {
            Verdict::Pass => wit::Verdict::Pass,
            Verdict::Drop => wit::Verdict::Drop,
        }
    }

    fn timer(id: u64) {
        with_state(|plugin: &mut P| plugin.timer(&Room, id))
    }

    fn snapshot() -> Option<Vec<u8>> {
        with_state(|plugin: &mut P| plugin.snapshot())
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        with_state(|plugin: &mut P| plugin.restore(state))
    }
}

impl From<wit::Payload> for Message {
    fn from(payload: wit::Payload) -> Self {
        match payload {
            wit::Payload::Text(text) => Message::Text(text),
            wit::Payload::Binary(bytes) => Message::Binary(bytes),
        }
    }
}

impl From<Message> for wit::Payload {
    fn from(message: Message) -> Self {
        match message {
            Message::Text(text) => wit::Payload::Text(text),
            Message::Binary(bytes) => wit::Payload::Binary(bytes),
        }
    }
}

impl From<wit::RoomError> for RoomError {
    fn from(error: wit::RoomError) -> Self {
        match error {
            wit::RoomError::UnknownMember => RoomError::UnknownMember,
            wit::RoomError::UnknownRoom => RoomError::UnknownRoom,
            wit::RoomError::TooManyActions => RoomError::TooManyActions,
            wit::RoomError::TooManyTimers => RoomError::TooManyTimers,
            wit::RoomError::InvalidCloseCode => RoomError::InvalidCloseCode,
            wit::RoomError::Unavailable => RoomError::Unavailable,
            wit::RoomError::InvalidArgument => RoomError::InvalidArgument,
        }
    }
}

impl From<LogLevel> for wit::LogLevel {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Trace => wit::LogLevel::Trace,
            LogLevel::Debug => wit::LogLevel::Debug,
            LogLevel::Info => wit::LogLevel::Info,
            LogLevel::Warn => wit::LogLevel::Warn,
            LogLevel::Error => wit::LogLevel::Error,
        }
    }
}
