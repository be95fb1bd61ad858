//! A folder of plugins and the room → plugin matching: room patterns, their
//! specificity, and the conflicts that make a plugin fail to load.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::instance::Plugin;
use super::{FailureKind, PluginError, PluginRuntime};
use crate::types::is_room_byte;

/// A room pattern from `rooms` in `NAME.toml`: a room name in which `*` stands for any
/// run of room-name characters (including none). Without `*` it is an exact name.
///
/// Specificity, highest first: an exact name, then the pattern with the longer literal
/// prefix (the text before the first `*`). A room goes to its most specific pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoomPattern {
    text: String,
}

impl RoomPattern {
    /// Parse a pattern: 1 to 128 characters of `A-Z a-z 0-9 . _ : -` and `*`.
    pub fn parse(text: &str) -> Result<RoomPattern, String> {
        if text.is_empty() || text.len() > 128 {
            return Err(format!("`{text}` is not a room pattern: it must have 1 to 128 characters"));
        }
        let allowed = |c: char| c == '*' || (c.is_ascii() && is_room_byte(c as u8));
        if let Some(bad) = text.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "`{text}` is not a room pattern: `{bad}` is not allowed (use A-Z a-z 0-9 . _ : - \
                 and `*` as the wildcard)"
            ));
        }
        // `**` means the same as `*`; keep one so equal patterns compare equal.
        let mut normal = String::with_capacity(text.len());
        for c in text.chars() {
            if !(c == '*' && normal.ends_with('*')) {
                normal.push(c);
            }
        }
        Ok(RoomPattern { text: normal })
    }

    /// The patterns of a plugin named `name` without `rooms`: `name` and `name:*`.
    pub fn defaults_for(name: &str) -> Vec<RoomPattern> {
        vec![RoomPattern { text: name.to_owned() }, RoomPattern { text: format!("{name}:*") }]
    }

    /// The pattern as written (with runs of `*` collapsed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern is an exact room name.
    pub fn is_exact(&self) -> bool {
        !self.text.contains('*')
    }

    /// The text before the first `*`.
    pub fn literal_prefix(&self) -> &str {
        match self.text.find('*') {
            Some(star) => &self.text[..star],
            None => &self.text,
        }
    }

    /// Orders patterns by how specifically they claim a room (greater wins).
    fn specificity(&self) -> (bool, usize) {
        (self.is_exact(), self.literal_prefix().len())
    }

    /// Whether `room` matches the pattern.
    pub fn matches(&self, room: &str) -> bool {
        glob_match(self.text.as_bytes(), room.as_bytes())
    }

    /// Whether some room name matches both patterns.
    pub fn overlaps(&self, other: &RoomPattern) -> bool {
        globs_intersect(self.text.as_bytes(), other.text.as_bytes())
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Glob matching with `*` only: linear, backtracking to the last star.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&byte| byte == b'*')
}

/// Whether two `*`-globs over the same alphabet match a common string: a search over
/// pairs of positions (at most 129 × 129 of them), memoised.
fn globs_intersect(a: &[u8], b: &[u8]) -> bool {
    let width = b.len() + 1;
    let mut seen = vec![false; (a.len() + 1) * width];
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        if std::mem::replace(&mut seen[i * width + j], true) {
            continue;
        }
        let (x, y) = (a.get(i).copied(), b.get(j).copied());
        match (x, y) {
            (None, None) => return true,
            (Some(b'*'), _) | (_, Some(b'*')) => {
                // A star may match nothing, or swallow the other side's next symbol
                // (a literal, or whatever the other side's star produces).
                if x == Some(b'*') {
                    stack.push((i + 1, j));
                    if y.is_some() {
                        stack.push((i, j + 1));
                    }
                }
                if y == Some(b'*') {
                    stack.push((i, j + 1));
                    if x.is_some() {
                        stack.push((i + 1, j));
                    }
                }
            }
            (Some(x), Some(y)) if x == y => stack.push((i + 1, j + 1)),
            _ => {}
        }
    }
    false
}

/// The loaded plugins and which rooms they serve. A room is served by at most one
/// plugin: its most specific pattern wins, and two plugins may not claim a room with
/// equally specific patterns.
#[derive(Clone, Debug, Default)]
pub struct PluginSet {
    /// Sorted by name.
    plugins: Vec<Arc<Plugin>>,
}

impl PluginSet {
    /// An empty set.
    pub fn new() -> PluginSet {
        PluginSet::default()
    }

    /// Load every `*.wasm` file in `dir`, in file-name order. A file that fails to load
    /// (or conflicts with one loaded before it) is reported and skipped; the others load.
    pub fn load_dir(runtime: &PluginRuntime, dir: &Path) -> (PluginSet, Vec<PluginError>) {
        let mut set = PluginSet::new();
        let mut errors = Vec::new();
        let files = match wasm_files(dir) {
            Ok(files) => files,
            Err(error) => {
                errors.push(PluginError::load(
                    dir.display().to_string(),
                    format!("cannot read the plugins folder {}: {error}", dir.display()),
                ));
                return (set, errors);
            }
        };
        for file in files {
            match runtime.load(&file).and_then(|plugin| set.insert(plugin)) {
                Ok(_) => {}
                Err(error) => errors.push(error),
            }
        }
        (set, errors)
    }

    /// Add a plugin, replacing the one of the same name (which is returned). A pattern
    /// that claims a room as specifically as another plugin's pattern is an error, and
    /// the set is left unchanged.
    pub fn insert(&mut self, plugin: Arc<Plugin>) -> Result<Option<Arc<Plugin>>, PluginError> {
        for other in &self.plugins {
            if other.name() == plugin.name() {
                continue;
            }
            if let Some((mine, theirs)) = find_conflict(plugin.patterns(), other.patterns()) {
                return Err(PluginError::new(
                    plugin.name(),
                    None,
                    FailureKind::Load,
                    format!(
                        "its room pattern `{mine}` conflicts with `{theirs}` of plugin `{}`: \
                         both claim the same rooms equally specifically; set `rooms` in one \
                         of their TOML files",
                        other.name()
                    ),
                ));
            }
        }
        match self.plugins.binary_search_by(|probe| probe.name().cmp(plugin.name())) {
            Ok(index) => Ok(Some(std::mem::replace(&mut self.plugins[index], plugin))),
            Err(index) => {
                self.plugins.insert(index, plugin);
                Ok(None)
            }
        }
    }

    /// Remove the plugin of that name.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Plugin>> {
        let index = self.plugins.binary_search_by(|probe| probe.name().cmp(name)).ok()?;
        Some(self.plugins.remove(index))
    }

    /// The plugin of that name.
    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        let index = self.plugins.binary_search_by(|probe| probe.name().cmp(name)).ok()?;
        Some(&self.plugins[index])
    }

    /// The plugin that serves `room`, if any.
    pub fn for_room(&self, room: &str) -> Option<Arc<Plugin>> {
        best_match(room, self.plugins.iter().map(|plugin| (plugin.patterns(), plugin))).map(Arc::clone)
    }

    /// The plugins, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.iter()
    }

    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}

/// The first pair of patterns, one from each list, that claim a room equally
/// specifically.
fn find_conflict<'a>(
    mine: &'a [RoomPattern],
    theirs: &'a [RoomPattern],
) -> Option<(&'a RoomPattern, &'a RoomPattern)> {
    mine.iter().find_map(|a| {
        theirs.iter().find(|b| a.specificity() == b.specificity() && a.overlaps(b)).map(|b| (a, b))
    })
}

/// The candidate whose patterns claim `room` most specifically.
fn best_match<'a, T>(room: &str, candidates: impl Iterator<Item = (&'a [RoomPattern], T)>) -> Option<T> {
    candidates
        .filter_map(|(patterns, candidate)| {
            patterns
                .iter()
                .filter(|pattern| pattern.matches(room))
                .map(RoomPattern::specificity)
                .max()
                .map(|specificity| (specificity, candidate))
        })
        .max_by_key(|(specificity, _)| *specificity)
        .map(|(_, candidate)| candidate)
}

/// The `*.wasm` files in `dir`, sorted by file name.
fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(texts: &[&str]) -> Vec<RoomPattern> {
        texts.iter().map(|text| RoomPattern::parse(text).expect("pattern")).collect()
    }

    #[test]
    fn patterns_parse_and_match() {
        let exact = RoomPattern::parse("chat").expect("exact");
        assert!(exact.is_exact());
        assert!(exact.matches("chat"));
        assert!(!exact.matches("chat:x"));
        assert!(!exact.matches("cha"));

        let prefix = RoomPattern::parse("chat:*").expect("prefix");
        assert_eq!(prefix.literal_prefix(), "chat:");
        assert!(prefix.matches("chat:"));
        assert!(prefix.matches("chat:lobby"));
        assert!(!prefix.matches("chat"));
        assert!(!prefix.matches("chatter"));

        let inner = RoomPattern::parse("a*b*c").expect("inner");
        assert!(inner.matches("abc"));
        assert!(inner.matches("a-x-b-y-c"));
        assert!(inner.matches("abcbc"));
        assert!(!inner.matches("acb"));
        assert!(RoomPattern::parse("*").expect("any").matches("anything"));
        assert_eq!(RoomPattern::parse("a**b").expect("stars").as_str(), "a*b");

        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(RoomPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(RoomPattern::defaults_for("chat"), patterns(&["chat", "chat:*"]));
    }

    #[test]
    fn overlap_of_patterns() {
        let overlap = |a: &str, b: &str| {
            let (a, b) = (&patterns(&[a])[0], &patterns(&[b])[0]);
            assert_eq!(a.overlaps(b), b.overlaps(a), "symmetric");
            a.overlaps(b)
        };
        assert!(overlap("chat:*", "chat:*"));
        assert!(overlap("chat:*", "*:lobby"));
        assert!(overlap("a*", "*b"));
        assert!(overlap("x", "*"));
        assert!(overlap("a*b", "a*"));
        assert!(!overlap("chat:*x", "chat:*y"));
        assert!(!overlap("chat:*", "game:*"));
        assert!(!overlap("a", "b"));
        assert!(!overlap("a*", "b*"));
        assert!(overlap("*a*", "*b*"));
    }

    #[test]
    fn an_exact_name_beats_a_pattern_and_a_longer_prefix_a_shorter_one() {
        let chat = patterns(&["chat", "chat:*"]);
        let vip = patterns(&["chat:vip:*"]);
        let lobby = patterns(&["chat:lobby"]);
        let anything = patterns(&["*"]);
        let candidates = || {
            [
                (chat.as_slice(), "chat"),
                (vip.as_slice(), "vip"),
                (lobby.as_slice(), "lobby"),
                (anything.as_slice(), "anything"),
            ]
            .into_iter()
        };
        assert_eq!(best_match("chat", candidates()), Some("chat"));
        assert_eq!(best_match("chat:x", candidates()), Some("chat"));
        assert_eq!(best_match("chat:vip:1", candidates()), Some("vip"));
        assert_eq!(best_match("chat:lobby", candidates()), Some("lobby"));
        assert_eq!(best_match("game", candidates()), Some("anything"));
        assert_eq!(best_match("game", [(chat.as_slice(), "chat")].into_iter()), None);
    }

    #[test]
    fn equally_specific_overlapping_patterns_conflict() {
        let chat = patterns(&["chat", "chat:*"]);
        assert!(find_conflict(&chat, &patterns(&["chat:*"])).is_some());
        assert!(find_conflict(&chat, &patterns(&["chat"])).is_some());
        // Different literal prefix lengths (5 and 6): the longer one wins, no conflict.
        assert!(find_conflict(&patterns(&["chat:*x"]), &patterns(&["chat:x*"])).is_none());
        let (a, b) = (patterns(&["x", "chat:*"]), patterns(&["*", "chat:*"]));
        let (mine, theirs) = find_conflict(&a, &b).expect("conflict");
        assert_eq!((mine.as_str(), theirs.as_str()), ("chat:*", "chat:*"));
        assert!(find_conflict(&patterns(&["ab*"]), &patterns(&["a*b"])).is_none());
        assert!(find_conflict(&patterns(&["a*b"]), &patterns(&["a*c"])).is_none());
        assert!(find_conflict(&patterns(&["a*b*"]), &patterns(&["a*c*"])).is_some());
        // More specific claims do not conflict with less specific ones.
        assert!(find_conflict(&chat, &patterns(&["chat:lobby", "chat:vip:*", "*"])).is_none());
        assert!(find_conflict(&chat, &patterns(&["game", "game:*"])).is_none());
    }
}
