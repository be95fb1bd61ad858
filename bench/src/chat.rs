//! Realistic chat messages for the compression scenario: JSON objects of 200 B to 2 KB
//! of the kind a chat room broadcasts (an id, the room, a timestamp, the author with a
//! few nested fields, a text of ordinary words, sometimes mentions, reactions, a reply
//! or a link preview), the same for every server and every run: message `g` of seed
//! `s` is always the same bytes but for its id, which carries the delivery stamp.
//!
//! Every message starts with `{"id":"` and the 32 characters of a [`client::stamp`],
//! so the fan-out's loss and latency accounting works on them unchanged.

use std::fmt::Write as _;

use crate::client;

/// What comes before the stamp in every message.
pub const PREFIX: &[u8] = b"{\"id\":\"";

/// How message `g` of a run is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatParams {
    pub seed: u64,
    /// Sizes are spread uniformly over `min..=max` bytes.
    pub min: usize,
    pub max: usize,
}

impl Default for ChatParams {
    fn default() -> Self {
        Self { seed: 15, min: 200, max: 2048 }
    }
}

/// splitmix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, g: u64) -> Self {
        let mut rng = Rng(seed ^ g.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// A word, common ones far more often than rare ones (as in text): a little under
    /// half the time one of the 40 most common, otherwise any, the earlier in
    /// [`WORDS`] the likelier.
    fn word(&mut self) -> &'static str {
        let n = WORDS.len();
        if self.chance(45) {
            return WORDS[self.below(40)];
        }
        WORDS[n - 1 - ((self.below(n * n) as f64).sqrt() as usize).min(n - 1)]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "to", "and", "a", "I", "you", "it", "of", "is", "that", "in", "we", "for", "this", "on",
    "be", "have", "it's", "can", "with", "not", "just", "but", "so", "do", "are", "was", "if", "at",
    "me", "think", "what", "about", "will", "like", "get", "know", "all", "they", "there", "one",
    "my", "out", "up", "yes", "no", "would", "should", "could", "today", "tomorrow", "now", "time",
    "meeting", "deploy", "release", "build", "test", "tests", "branch", "review", "PR", "merge",
    "issue", "bug", "fix", "fixed", "broken", "server", "client", "latency", "queue", "room",
    "message", "messages", "config", "staging", "production", "rollback", "dashboard", "metrics",
    "alert", "page", "docs", "team", "lunch", "coffee", "weekend", "morning", "afternoon", "please",
    "thanks", "sure", "sounds", "good", "great", "looks", "maybe", "probably", "actually",
    "already", "still", "again", "before", "after", "because", "when", "then", "than", "more",
    "less", "some", "any", "also", "only", "really", "very", "much", "need", "want", "look", "see",
    "said", "going", "make", "made", "take", "check", "checked", "try", "tried", "run", "running",
    "works", "working", "change", "changes", "update", "updated", "new", "old", "first", "last",
    "next", "week", "day", "minutes", "hours", "customer", "customers", "users", "request",
    "requests", "error", "errors", "timeout", "retry", "cache", "database", "migration", "schema",
    "index", "query", "slow", "fast", "memory", "CPU", "disk", "network", "logs", "trace",
    "version", "plan", "question", "answer", "idea", "problem", "reason", "point", "part", "case",
    "side", "way", "thing", "things", "people", "someone", "everyone", "anyone", "here", "where",
    "which", "who", "how", "why", "right", "left", "back", "down", "over", "into", "from", "by",
    "as", "or", "an", "our", "your", "their", "them", "us", "him", "her", "he", "she", "has", "had",
    "did", "does", "been", "being", "were", "may", "might", "must", "let's", "don't", "can't",
    "won't", "didn't", "isn't", "I'm", "I'll", "we're", "that's", "there's", "ok", "okay", "hmm",
    "lol", "nice", "cool", "agreed", "exactly", "anyway",
];

/// Words by length, to end a text on exactly the right size.
#[rustfmt::skip]
const BY_LENGTH: &[&str] = &[
    "", "a", "ok", "the", "then", "about", "little", "another", "together", "something",
    "everything", "information", "neighborhood",
];

#[rustfmt::skip]
const FIRST: &[&str] = &[
    "Maria", "James", "Aiko", "Olu", "Sofia", "Liam", "Priya", "Chen", "Fatima", "Lukas", "Emma",
    "Mateo", "Zanele", "Noah", "Ines", "Arjun", "Hana", "Tomasz", "Lea", "Diego",
];
#[rustfmt::skip]
const LAST: &[&str] = &[
    "Lopez", "Smith", "Tanaka", "Adeyemi", "Rossi", "Murphy", "Sharma", "Wei", "Haddad", "Becker",
    "Dubois", "Garcia", "Dlamini", "Jensen", "Costa", "Patel", "Kim", "Nowak", "Martin", "Silva",
];
const ROOMS: &[&str] = &["general", "dev-backend", "incidents", "random", "release-train", "support"];
const ROLES: &[&str] = &["member", "moderator", "admin", "guest"];
const REACTIONS: &[&str] = &["thumbs_up", "heart", "laughing", "eyes", "tada", "rocket", "white_check_mark"];
const PLATFORMS: &[&str] = &["web", "ios", "android", "desktop"];
const SITES: &[&str] =
    &["github.com", "docs.rs", "news.example.org", "status.example.com", "wiki.example.net"];

/// Write message `g` into `out` (cleared first): `params.min..=params.max` bytes, the
/// size uniform over that range, with 32 placeholder characters after [`PREFIX`] that
/// [`stamp`] fills.
pub fn message(params: &ChatParams, g: u64, out: &mut Vec<u8>) {
    let mut rng = Rng::new(params.seed, g);
    let span = params.max.saturating_sub(params.min) + 1;
    let size = params.min + rng.below(span);
    let mut s = String::with_capacity(size + 64);
    s.push_str(std::str::from_utf8(PREFIX).unwrap_or_default());
    s.push_str(&"0".repeat(client::STAMP_LEN));
    let user = rng.below(50_000);
    let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
    // 2026-12-05, through the day.
    let secs = 1_796_428_800 + g * 7 + rng.below(5) as u64;
    let (h, m, sec) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let _ = write!(
        s,
        "\",\"type\":\"message\",\"room\":\"{}\",\"ts\":\"2026-12-05T{h:02}:{m:02}:{sec:02}.{:03}Z\",\
         \"user\":{{\"id\":\"u_{user}\",\"name\":\"{first} {last}\"",
        rng.pick(ROOMS),
        rng.below(1000),
    );
    // Optional parts while there is room for them and for some text (the smallest
    // messages are the id, room, time, author and a short text).
    let room_for = |s: &String, more: usize| s.len() + more + 40 <= size;
    if room_for(&s, 80) {
        let _ = write!(
            s,
            ",\"avatar\":\"https://cdn.example.com/a/{user}.png\",\"roles\":[\"{}\"]",
            rng.pick(ROLES)
        );
    }
    s.push('}');
    if room_for(&s, 60) {
        let _ = write!(
            s,
            ",\"client\":{{\"platform\":\"{}\",\"version\":\"5.{}.{}\"}},\"edited\":{}",
            rng.pick(PLATFORMS),
            rng.below(12),
            rng.below(30),
            rng.chance(10)
        );
    }
    if room_for(&s, 60) && rng.chance(30) {
        let _ = write!(s, ",\"reply_to\":\"{:016x}\"", rng.next());
    }
    if room_for(&s, 80) && rng.chance(35) {
        s.push_str(",\"mentions\":[");
        for i in 0..1 + rng.below(3) {
            let _ = write!(s, "{}\"u_{}\"", if i > 0 { "," } else { "" }, rng.below(50_000));
        }
        s.push(']');
    }
    if room_for(&s, 120) && rng.chance(40) {
        s.push_str(",\"reactions\":{");
        for i in 0..1 + rng.below(3) {
            let _ =
                write!(s, "{}\"{}\":{}", if i > 0 { "," } else { "" }, rng.pick(REACTIONS), 1 + rng.below(9));
        }
        s.push('}');
    }
    if room_for(&s, 400) && rng.chance(50) {
        let site = rng.pick(SITES);
        let _ = write!(s, ",\"attachments\":[{{\"type\":\"link\",\"url\":\"https://{site}/");
        for i in 0..2 + rng.below(3) {
            let _ = write!(
                s,
                "{}{}",
                if i > 0 { "/" } else { "" },
                rng.word().to_ascii_lowercase().replace('\'', "")
            );
        }
        let _ = write!(s, "-{}\",\"title\":\"", rng.below(100_000));
        let words = 4 + rng.below(6);
        sentence(&mut rng, &mut s, words, false);
        s.push_str("\",\"description\":\"");
        let words = 12 + rng.below(20);
        sentence(&mut rng, &mut s, words, true);
        s.push_str("\"}]");
    }
    s.push_str(",\"text\":\"");
    // The text fills the rest, in sentences, to exactly `size` with the closing `"}`.
    let end = size.saturating_sub(2);
    let mut capital = true;
    while s.len() + 13 < end {
        let word = rng.word();
        if !s.ends_with('"') {
            s.push(' ');
        }
        push_word(&mut s, word, capital);
        capital = false;
        if rng.chance(9) {
            s.push_str(rng.pick(&[".", ".", ".", "?", "!", ","]));
            capital = !s.ends_with(',');
        }
    }
    let rest = end.saturating_sub(s.len());
    if rest >= 2 {
        s.push(' ');
        s.push_str(BY_LENGTH[rest - 1]);
    } else if rest == 1 {
        s.push('.');
    }
    s.push_str("\"}");
    out.clear();
    out.extend_from_slice(s.as_bytes());
}

/// Append `word`, with a capital first letter when `capital`.
fn push_word(s: &mut String, word: &str, capital: bool) {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) if capital => {
            s.push(first.to_ascii_uppercase());
            s.push_str(chars.as_str());
        }
        _ => s.push_str(word),
    }
}

/// `words` words of ordinary text (a capital first, a full stop last when `full`).
fn sentence(rng: &mut Rng, s: &mut String, words: usize, full: bool) {
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        push_word(s, rng.word(), i == 0);
    }
    if full {
        s.push('.');
    }
}

/// Write the stamp into a message made by [`message`].
pub fn stamp(message: &mut [u8], sender: u32, seq: u32, sent_ns: u64) {
    let mut stamp = Vec::with_capacity(client::STAMP_LEN);
    client::stamp(sender, seq, sent_ns, client::STAMP_LEN, &mut stamp);
    message[PREFIX.len()..PREFIX.len() + client::STAMP_LEN].copy_from_slice(&stamp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_json_of_the_asked_sizes_and_carry_the_stamp() {
        let params = ChatParams::default();
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for g in 0..2000 {
            message(&params, g, &mut out);
            assert!((params.min..=params.max).contains(&out.len()), "message {g}: {} bytes", out.len());
            stamp(&mut out, 3, g as u32, 123_456_789);
            let value: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!("message {g} is not JSON ({e}): {}", String::from_utf8_lossy(&out))
            });
            assert_eq!(value["type"], "message");
            assert!(value["user"]["name"].is_string());
            assert!(value["text"].as_str().unwrap().contains(' '));
            let rest = out.strip_prefix(PREFIX).unwrap();
            assert_eq!(client::read_stamp(rest), Some((3, g as u32, 123_456_789)));
            sizes.push(out.len());
        }
        // Uniform: each quarter of the range gets about a quarter of the messages.
        let span = (params.max - params.min) as f64;
        for q in 0..4 {
            let lo = params.min as f64 + span * q as f64 / 4.0;
            let n = sizes.iter().filter(|&&s| (s as f64) >= lo && (s as f64) < lo + span / 4.0).count();
            assert!((400..600).contains(&n), "quarter {q}: {n} of 2000");
        }
        // The same message again, byte for byte.
        let mut again = Vec::new();
        message(&params, 1999, &mut again);
        message(&params, 1999, &mut out);
        assert_eq!(out, again);
        message(&ChatParams { seed: 16, ..params }, 1999, &mut again);
        assert_ne!(out, again);
    }

    #[test]
    fn messages_compress_like_chat_does() {
        // Per message, no shared context: JSON chat shrinks to about half or less.
        let params = ChatParams::default();
        let (mut raw, mut packed) = (0, 0);
        let mut out = Vec::new();
        let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
        let mut deflated = Vec::new();
        for g in 0..200 {
            message(&params, g, &mut out);
            client::deflate_message(&mut compress, &out, &mut deflated).unwrap();
            raw += out.len();
            packed += deflated.len();
        }
        let ratio = raw as f64 / packed as f64;
        assert!((1.6..4.0).contains(&ratio), "compression ratio {ratio:.2}");
    }
}
