//! The [`Room`] handle and [`log`](crate::log()): Roomcast's wrappers over the WIT
//! `room` imports, the only things a plugin may ask of the host.

use serde::Serialize;

use crate::runtime::bindings::roomcast::plugin::room as host;
use crate::{LogLevel, MemberId, Message, RoomError, TimerId};

/// The room whose hook is running. Everything sent through it is applied by the host
/// when the hook returns successfully; a hook that traps has no effect at all.
///
/// Hooks that run inside a room receive a `&Room`. `Room` is a plain handle, so
/// `init` and `restore` (which receive none) may use the value `Room` directly, e.g.
/// `Room.set_timer(1000)` to start a periodic tick. Every call returning
/// `Result<_, RoomError>` is refused without effect when the member or room is unknown
/// or the hook's action budget is spent; on the instance that answers handshakes, which
/// has no room, they return [`RoomError::Unavailable`] and [`name`](Room::name) is
/// empty.
#[derive(Clone, Copy, Debug)]
pub struct Room;

impl Room {
    /// Sends a message to one member of this room.
    pub fn send(&self, to: MemberId, message: impl Into<Message>) -> Result<(), RoomError> {
        host::send(to, &message.into().into()).map_err(Into::into)
    }

    /// Sends `value` as a JSON text message to one member (see [`Message::to_json`]).
    pub fn send_json<T: Serialize + ?Sized>(&self, to: MemberId, value: &T) -> Result<(), RoomError> {
        self.send(to, Message::to_json(value))
    }

    /// Sends a message to every member of this room, the sender included.
    pub fn broadcast(&self, message: impl Into<Message>) -> Result<(), RoomError> {
        self.broadcast_except(message, &[])
    }

    /// Sends `value` as a JSON text message to every member of this room.
    pub fn broadcast_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), RoomError> {
        self.broadcast(Message::to_json(value))
    }

    /// Sends `value` as a JSON text message to every member of this room except those
    /// listed.
    pub fn broadcast_json_except<T: Serialize + ?Sized>(
        &self,
        value: &T,
        except: &[MemberId],
    ) -> Result<(), RoomError> {
        self.broadcast_except(Message::to_json(value), except)
    }

    /// Sends a message to every member of this room except those listed.
    pub fn broadcast_except(
        &self,
        message: impl Into<Message>,
        except: &[MemberId],
    ) -> Result<(), RoomError> {
        host::broadcast(&message.into().into(), except).map_err(Into::into)
    }

    /// Hands a message to another live room on this host, whose plugin sees it as
    /// coming from [`Origin::Room`](crate::Origin::Room) with this room's name.
    /// Forwarding stops after 4 hops.
    pub fn forward(&self, room: &str, message: impl Into<Message>) -> Result<(), RoomError> {
        host::forward(room, &message.into().into()).map_err(Into::into)
    }

    /// Closes a member's connection. Allowed codes: 1000, 1001, 1008, 1011 and 3000 to
    /// 4999; the reason is at most 123 bytes.
    pub fn close(&self, member: MemberId, code: u16, reason: &str) -> Result<(), RoomError> {
        host::close(member, code, reason).map_err(Into::into)
    }

    /// Adds a member of this room to room `room` as well, as if its client had joined
    /// it with `params` (JSON text) as the join's parameters: that room's plugin
    /// decides. The client gets `joined` (no `ref`) or an `error` naming the room.
    /// Room-protocol connections only (`member.protocol` is `roomcast.v1`): a raw
    /// connection is in one room by design, and for it this does nothing. An invalid
    /// room name is [`RoomError::UnknownRoom`].
    pub fn add_to_room(&self, member: MemberId, room: &str, params: Option<&str>) -> Result<(), RoomError> {
        host::add_to_room(member, room, params).map_err(Into::into)
    }

    /// Ends a member's membership of this room, keeping its connection and its other
    /// rooms: the client gets `left` with code 1000 and `reason` (at most 123 bytes).
    /// A raw connection, in this room only, is closed with 1000.
    pub fn remove(&self, member: MemberId, reason: &str) -> Result<(), RoomError> {
        host::remove(member, reason).map_err(Into::into)
    }

    /// The members of this room, in join order.
    pub fn members(&self) -> Vec<MemberId> {
        host::members()
    }

    /// This room's name, e.g. `chat:lobby`.
    pub fn name(&self) -> String {
        host::room_name()
    }

    /// A monotonic clock in nanoseconds. Only differences are meaningful. This is the
    /// only clock a plugin has: `std::time` needs WASI, which the host does not give.
    pub fn now(&self) -> u64 {
        host::now()
    }

    /// Calls [`Plugin::timer`](crate::Plugin::timer) with the returned id after
    /// `after_ms` milliseconds.
    pub fn set_timer(&self, after_ms: u32) -> Result<TimerId, RoomError> {
        host::set_timer(after_ms).map_err(Into::into)
    }

    /// Cancels a pending timer; unknown ids are ignored.
    pub fn cancel_timer(&self, timer: TimerId) {
        host::cancel_timer(timer)
    }
}

/// Writes a line to the host's log, tagged with the plugin and room. Works in every
/// hook, including `init` and `handshake`.
///
/// This is a plugin's only output: the host gives no WASI, so `println!`, `eprintln!`
/// and `dbg!` trap. The [`info!`](crate::info) family of macros formats and calls this.
pub fn log(level: LogLevel, message: &str) {
    host::log(level.into(), message)
}
