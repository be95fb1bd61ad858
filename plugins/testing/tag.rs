//! The plugin shared by the `taga` and `tagb` test plugins: it rewrites every text
//! message `m` to `<TAG>:m` and broadcasts it to everyone, the sender included (the
//! original is dropped; binary messages pass unchanged). Hot-reload tests swap one
//! build for the other and tell the versions apart by the tag.

use roomcast_guest::{Config, Message, Origin, Plugin, Room, Verdict};

/// Tags every text message with `TAG`.
pub struct Tag<const TAG: char>;

impl<const TAG: char> Plugin for Tag<TAG> {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Tag)
    }

    fn message(&mut self, room: &Room, _from: Origin, message: Message) -> Verdict {
        match message {
            Message::Text(text) => {
                let _ = room.broadcast(format!("{TAG}:{text}"));
                Verdict::Drop
            }
            Message::Binary(_) => Verdict::Pass,
        }
    }
}
