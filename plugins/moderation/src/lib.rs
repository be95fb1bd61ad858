//! Moderation: drops messages with banned words, over-long messages and floods, tells
//! the sender why, and closes members who keep flooding. Everything else passes to
//! the other members unchanged.
//!
//! Build and run:
//!
//! ```text
//! cd plugins && cargo build --release
//! cp target/wasm32-wasip2/release/moderation.wasm /path/to/plugins-dir/
//! roomcast serve --plugins /path/to/plugins-dir
//! # then connect to ws://127.0.0.1:8080/ws/moderation (or /ws/moderation:anything)
//! ```
//!
//! # Configuration
//!
//! The `[config]` table of `moderation.toml`; every key is optional:
//!
//! ```toml
//! [config]
//! banned_words = ["spam", "scam"]          # default: none
//! max_length = 500                         # default 500; 0 means no limit
//! rate_limit = { messages = 5, per_ms = 1000 }  # default 5 messages per 1000 ms
//! close_after = 3                          # default 3; 0 means never close
//! ```
//!
//! # Rules
//!
//! Only messages from members are checked (messages forwarded from another room pass).
//! The checks run in this order and the first that fails drops the message and sends
//! the sender one JSON text:
//!
//! 1. **Rate limit**, on every message: time is cut into fixed windows of `per_ms`
//!    milliseconds (window `n` covers `[n * per_ms, (n + 1) * per_ms)` on the host's
//!    monotonic clock); a member's messages past the first `messages` of a window get
//!    `{"type":"moderation","reason":"rate limited"}`. A window in which a member was
//!    rate limited is a violation; when a member has violations in `close_after`
//!    consecutive windows, it gets the reply above and is then closed with code 1008 and
//!    reason `rate limit`. A window without a violation resets the count.
//! 2. **Length**: a text longer than `max_length` characters (a binary message longer
//!    than `max_length` bytes) gets `{"type":"moderation","reason":"too long"}`.
//! 3. **Banned words**: a text that contains any banned word as a substring, ignoring
//!    case, gets `{"type":"moderation","reason":"banned word"}`.

use std::collections::BTreeMap;

use roomcast_guest::{Config, LeaveReason, MemberId, Message, Origin, Plugin, Room, Verdict};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    banned_words: Vec<String>,
    max_length: usize,
    rate_limit: RateLimit,
    close_after: u32,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RateLimit {
    messages: u32,
    per_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            banned_words: Vec::new(),
            max_length: 500,
            rate_limit: RateLimit::default(),
            close_after: 3,
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { messages: 5, per_ms: 1000 }
    }
}

/// A member's rate-limit window and violation streak.
#[derive(Default)]
struct Window {
    /// The index of the current window.
    index: u64,
    /// Messages seen in it.
    count: u32,
    /// The last window with a violation, and how many consecutive windows up to it had one.
    last_violation: Option<u64>,
    streak: u32,
}

struct Moderation {
    settings: Settings,
    /// Banned words, lower-cased once.
    banned: Vec<String>,
    windows: BTreeMap<MemberId, Window>,
}

/// What the sender of a dropped message gets.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Notice {
    Moderation { reason: &'static str },
}

enum Check {
    Pass,
    Drop(&'static str),
    Close,
}

impl Moderation {
    /// Counts a message against the member's window.
    fn rate(&mut self, member: MemberId, now_ns: u64) -> Check {
        let limit = &self.settings.rate_limit;
        let index = now_ns / 1_000_000 / limit.per_ms;
        let window = self.windows.entry(member).or_default();
        if window.index != index {
            window.index = index;
            window.count = 0;
        }
        window.count = window.count.saturating_add(1);
        if window.count <= limit.messages {
            return Check::Pass;
        }
        if window.last_violation != Some(index) {
            window.streak = match window.last_violation {
                Some(last) if last + 1 == index => window.streak + 1,
                _ => 1,
            };
            window.last_violation = Some(index);
        }
        let close_after = self.settings.close_after;
        if close_after > 0 && window.streak >= close_after {
            Check::Close
        } else {
            Check::Drop("rate limited")
        }
    }

    fn content(&self, message: &Message) -> Check {
        let max = self.settings.max_length;
        let length = match message {
            Message::Text(text) => text.chars().count(),
            Message::Binary(bytes) => bytes.len(),
        };
        if max > 0 && length > max {
            return Check::Drop("too long");
        }
        if let Some(text) = message.as_text()
            && !self.banned.is_empty()
        {
            let text = text.to_lowercase();
            if self.banned.iter().any(|word| text.contains(word.as_str())) {
                return Check::Drop("banned word");
            }
        }
        Check::Pass
    }
}

impl Plugin for Moderation {
    fn init(config: Config) -> Result<Self, String> {
        let settings: Settings = config.parse()?;
        if settings.rate_limit.messages == 0 || settings.rate_limit.per_ms == 0 {
            return Err("invalid config: rate_limit.messages and per_ms must be at least 1".into());
        }
        let banned = settings
            .banned_words
            .iter()
            .filter(|word| !word.is_empty())
            .map(|word| word.to_lowercase())
            .collect();
        Ok(Moderation { settings, banned, windows: BTreeMap::new() })
    }

    fn leave(&mut self, _room: &Room, member: MemberId, _reason: LeaveReason) {
        self.windows.remove(&member);
    }

    fn message(&mut self, room: &Room, from: Origin, message: Message) -> Verdict {
        let Origin::Member(member) = from else {
            return Verdict::Pass;
        };
        let check = match self.rate(member, room.now()) {
            Check::Pass => self.content(&message),
            other => other,
        };
        let reason = match check {
            Check::Pass => return Verdict::Pass,
            Check::Drop(reason) => reason,
            Check::Close => "rate limited",
        };
        let _ = room.send_json(member, &Notice::Moderation { reason });
        if let Check::Close = check {
            roomcast_guest::info!("closing member {member}: rate limit");
            let _ = room.close(member, 1008, "rate limit");
        }
        Verdict::Drop
    }
}

roomcast_guest::export!(Moderation);

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn moderation(config: &str) -> Moderation {
        Moderation::init(Config::new(config)).unwrap()
    }

    fn burst(moderation: &mut Moderation, now_ms: u64, messages: usize) -> Vec<&'static str> {
        (0..messages)
            .map(|_| match moderation.rate(1, now_ms * MS) {
                Check::Pass => "pass",
                Check::Drop(_) => "drop",
                Check::Close => "close",
            })
            .collect()
    }

    #[test]
    fn closes_after_consecutive_violating_windows() {
        let mut m = moderation(r#"{"rate_limit":{"messages":2,"per_ms":100}}"#);
        assert_eq!(burst(&mut m, 0, 4), ["pass", "pass", "drop", "drop"]);
        assert_eq!(burst(&mut m, 150, 3), ["pass", "pass", "drop"]);
        // A quiet window resets the streak.
        assert_eq!(burst(&mut m, 350, 3), ["pass", "pass", "drop"]);
        assert_eq!(burst(&mut m, 450, 3), ["pass", "pass", "drop"]);
        assert_eq!(burst(&mut m, 550, 3), ["pass", "pass", "close"]);
    }

    #[test]
    fn close_after_zero_never_closes() {
        let mut m = moderation(r#"{"rate_limit":{"messages":1,"per_ms":10},"close_after":0}"#);
        for window in 0..10 {
            assert_eq!(burst(&mut m, window * 10, 2), ["pass", "drop"]);
        }
    }

    #[test]
    fn content_checks() {
        let m = moderation(r#"{"banned_words":["SpAm",""],"max_length":5}"#);
        let reason = |message: Message| match m.content(&message) {
            Check::Pass => "pass",
            Check::Drop(reason) => reason,
            Check::Close => "close",
        };
        assert_eq!(reason("héllo".into()), "pass");
        assert_eq!(reason("hello!".into()), "too long");
        assert_eq!(reason(vec![0; 6].into()), "too long");
        assert_eq!(reason("spam".into()), "banned word");
        assert_eq!(reason("xSPAM".into()), "banned word");
        assert_eq!(reason(b"spam".to_vec().into()), "pass");
        assert!(Moderation::init(Config::new(r#"{"max":1}"#)).is_err());
    }
}
