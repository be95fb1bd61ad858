//! Room history: every broadcast of a room that keeps history gets the next offset in
//! the room's one order, within the room's epoch, and its room-protocol frame (tagged,
//! with the offset) is kept, bounded in messages, bytes and age, so that a client that
//! comes back with `since` gets exactly what it missed.
//!
//! The frame is kept, not the payload: a replay is a push of the same `Bytes` the live
//! members got, with no plugin call and no encoding per replayed message. Raw members
//! cannot recover (they have no offsets), so nothing is kept for them.
//!
//! Memory: each room's history is bounded by its size, by half of a member's outbound
//! queue in bytes (so a replay fits an empty queue), and all histories together by the
//! server's `history_memory`. A history that would pass the shared budget starts over
//! from the new message (older offsets answer `recovered: false`), so a flood in one
//! room costs other rooms' recoverability, never memory.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::cluster::StoredEntry;
use crate::metrics::Metrics;

/// How much history a room keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages kept (at least 1).
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
    /// Bytes of frames kept.
    pub bytes: usize,
}

/// What all histories of a server share: the memory budget, counted on the gauges
/// `roomcast_history_bytes` and `roomcast_history_messages`.
#[derive(Debug)]
pub struct HistoryBudget {
    /// Bytes all histories may hold together.
    pub limit: usize,
    pub metrics: Arc<Metrics>,
}

impl HistoryBudget {
    fn bytes(&self) -> &AtomicI64 {
        &self.metrics.history_bytes
    }

    fn messages(&self) -> &AtomicI64 {
        &self.metrics.history_messages
    }
}

/// One room's history.
#[derive(Debug)]
pub struct History {
    epoch: Arc<str>,
    /// The epoch a takeover continued from, and its last offset: a position in it up
    /// to that offset is a position in this one (the offsets carry on).
    previous: Option<(String, u64)>,
    /// The last offset given (0: none yet).
    last: u64,
    /// Kept frames, oldest first, with consecutive offsets ending at `last`.
    entries: VecDeque<Entry>,
    bytes: usize,
    limits: HistoryLimits,
    budget: Arc<HistoryBudget>,
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    frame: Bytes,
    at: Instant,
}

/// What a join with `since` gets.
#[derive(Debug)]
pub enum Recovery {
    /// Every message after the client's offset, in order (possibly none).
    Recovered(Vec<Bytes>),
    /// The position cannot be served (another epoch, trimmed, expired, or ahead of
    /// the room): only live messages follow.
    NotRecovered,
}

impl History {
    /// A history starting afresh, in a new epoch.
    pub fn new(limits: HistoryLimits, budget: Arc<HistoryBudget>) -> Self {
        Self {
            epoch: new_epoch(),
            previous: None,
            last: 0,
            entries: VecDeque::new(),
            bytes: 0,
            limits,
            budget,
        }
    }

    /// A history continued from what a room's previous owner stored (cluster mode),
    /// oldest first; `None` when nothing usable was stored. It takes a new epoch that
    /// answers for the stored one up to its last stored offset, and continues the
    /// offsets: a client that saw a message the old owner sent but never stored (it
    /// died first) holds an offset past that point, which is not served, rather than
    /// served with another message under the same number.
    pub fn restore(
        limits: HistoryLimits,
        budget: Arc<HistoryBudget>,
        stored: &[StoredEntry],
    ) -> Option<Self> {
        let newest = stored.last()?;
        // The newest epoch's entries win; an older epoch's count only below them (an
        // owner that stalled past its lease may have written after its successor).
        let first_newest = stored.iter().filter(|e| e.epoch == newest.epoch).map(|e| e.offset).min()?;
        let mut chosen: Vec<&StoredEntry> =
            stored.iter().filter(|e| e.epoch == newest.epoch || e.offset < first_newest).collect();
        chosen.sort_by_key(|e| e.offset);
        chosen.dedup_by_key(|e| e.offset);
        let last = chosen.last()?.offset;
        // Only the run of consecutive offsets that ends at `last` is complete.
        let mut start = chosen.len() - 1;
        while start > 0 && chosen[start - 1].offset + 1 == chosen[start].offset {
            start -= 1;
        }
        let mut history = Self::new(limits, budget);
        history.previous = Some((newest.epoch.clone(), last));
        history.last = last;
        let now = Instant::now();
        for entry in &chosen[start..] {
            if entry.age < limits.ttl
                && entry.frame.len() <= limits.bytes
                && !history.over_budget(entry.frame.len())
            {
                let at = now.checked_sub(entry.age).unwrap_or(now);
                history.push(entry.offset, entry.frame.clone(), at);
            } else {
                history.clear();
            }
        }
        history.trim(now);
        Some(history)
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    /// How long a message is kept.
    pub fn ttl(&self) -> Duration {
        self.limits.ttl
    }

    /// The last offset given (0 before the first message).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Apply new limits (a plugin reload, say), trimming what no longer fits.
    pub fn set_limits(&mut self, limits: HistoryLimits) {
        self.limits = limits;
        self.trim(Instant::now());
    }

    /// The next offset; `frame(offset)` is the room-protocol frame carrying it, kept
    /// here and returned for the live members.
    pub fn record(&mut self, frame: impl FnOnce(u64) -> Bytes) -> (u64, Bytes) {
        self.last += 1;
        let offset = self.last;
        let frame = frame(offset);
        let now = Instant::now();
        self.trim(now);
        let size = frame.len();
        if size > self.limits.bytes || self.over_budget(size) {
            // Too big for this room, or the server's budget is spent: start over from
            // here, so nothing older can be claimed to be complete.
            self.clear();
            if size <= self.limits.bytes && !self.over_budget(size) {
                self.push(offset, frame.clone(), now);
            }
        } else {
            while self.entries.len() >= self.limits.size || self.bytes + size > self.limits.bytes {
                self.pop();
            }
            self.push(offset, frame.clone(), now);
        }
        (offset, frame)
    }

    /// The messages after `offset` of `epoch`, if this history holds all of them.
    pub fn since(&mut self, epoch: &str, offset: u64) -> Recovery {
        self.trim(Instant::now());
        let continued =
            self.previous.as_ref().is_some_and(|(previous, last)| previous == epoch && offset <= *last);
        if (epoch != &*self.epoch && !continued) || offset > self.last {
            return Recovery::NotRecovered;
        }
        // Everything after `offset` must still be here: the oldest kept is at most
        // `offset + 1` (or nothing is missing because nothing came since).
        let first = self.entries.front().map_or(self.last + 1, |entry| entry.offset);
        if offset + 1 < first {
            return Recovery::NotRecovered;
        }
        let skip = usize::try_from(offset + 1 - first).unwrap_or(usize::MAX);
        Recovery::Recovered(self.entries.iter().skip(skip).map(|entry| entry.frame.clone()).collect())
    }

    /// Whether anything is still held (a retained history with nothing is dropped).
    pub fn is_empty(&mut self) -> bool {
        self.trim(Instant::now());
        self.entries.is_empty()
    }

    /// Whether `size` more bytes would pass the server's budget.
    fn over_budget(&self, size: usize) -> bool {
        let held = usize::try_from(self.budget.bytes().load(Relaxed)).unwrap_or(0);
        held.saturating_add(size) > self.budget.limit
    }

    /// Drop what is older than the time to live.
    fn trim(&mut self, now: Instant) {
        while self.entries.front().is_some_and(|entry| now.duration_since(entry.at) >= self.limits.ttl) {
            self.pop();
        }
        while self.entries.len() > self.limits.size || self.bytes > self.limits.bytes {
            self.pop();
        }
    }

    fn push(&mut self, offset: u64, frame: Bytes, at: Instant) {
        self.bytes += frame.len();
        self.budget.bytes().fetch_add(frame.len() as i64, Relaxed);
        self.budget.messages().fetch_add(1, Relaxed);
        self.entries.push_back(Entry { offset, frame, at });
    }

    fn pop(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.frame.len();
            self.budget.bytes().fetch_sub(entry.frame.len() as i64, Relaxed);
            self.budget.messages().fetch_sub(1, Relaxed);
        }
    }

    fn clear(&mut self) {
        while !self.entries.is_empty() {
            self.pop();
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A fresh epoch: 16 hex digits no earlier epoch of any process is likely to have
/// (std's randomly keyed hasher over the time, the process and a counter).
fn new_epoch() -> Arc<str> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(since.as_nanos());
    }
    Arc::from(format!("{:016x}", hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> Arc<HistoryBudget> {
        Arc::new(HistoryBudget { limit, metrics: Arc::default() })
    }

    fn limits(size: usize) -> HistoryLimits {
        HistoryLimits { size, ttl: Duration::from_secs(60), bytes: 1 << 20 }
    }

    fn frame(offset: u64) -> Bytes {
        Bytes::from(format!("m{offset}"))
    }

    fn recovered(history: &mut History, offset: u64) -> Option<Vec<String>> {
        let epoch = history.epoch().to_owned();
        match history.since(&epoch, offset) {
            Recovery::Recovered(frames) => {
                Some(frames.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect())
            }
            Recovery::NotRecovered => None,
        }
    }

    #[test]
    fn offsets_count_from_one_and_since_returns_what_followed() {
        let mut history = History::new(limits(3), budget(1 << 20));
        assert_eq!(history.last(), 0);
        assert_eq!(recovered(&mut history, 0), Some(vec![]), "nothing missed in an empty room");
        for expected in 1..=5 {
            assert_eq!(history.record(frame).0, expected);
        }
        assert_eq!(recovered(&mut history, 2), Some(vec!["m3".into(), "m4".into(), "m5".into()]));
        assert_eq!(recovered(&mut history, 4), Some(vec!["m5".into()]));
        assert_eq!(recovered(&mut history, 5), Some(vec![]));
        assert_eq!(recovered(&mut history, 1), None, "offset 2 was trimmed");
        assert_eq!(recovered(&mut history, 6), None, "ahead of the room");
        assert!(matches!(history.since("another epoch", 4), Recovery::NotRecovered));
    }

    #[test]
    fn bytes_and_the_shared_budget_bound_it() {
        let shared = budget(10);
        let mut one =
            History::new(HistoryLimits { size: 100, ttl: Duration::from_secs(60), bytes: 6 }, shared.clone());
        for _ in 0..4 {
            one.record(frame); // 2 bytes each: 3 fit in 6
        }
        assert_eq!(recovered(&mut one, 1), Some(vec!["m2".into(), "m3".into(), "m4".into()]));
        assert_eq!(shared.bytes().load(Relaxed), 6);
        let mut two = History::new(limits(100), shared.clone());
        two.record(frame);
        two.record(frame);
        // 6 + 4 = 10: the budget is spent; the next message starts `two` over.
        two.record(frame);
        assert_eq!(recovered(&mut two, 1), None);
        assert_eq!(recovered(&mut two, 2), Some(vec!["m3".into()]));
        assert!(shared.bytes().load(Relaxed) <= 10);
        drop(one);
        drop(two);
        assert_eq!((shared.bytes().load(Relaxed), shared.messages().load(Relaxed)), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn messages_expire_by_age() {
        let mut history = History::new(
            HistoryLimits { size: 100, ttl: Duration::from_secs(5), bytes: 1 << 20 },
            budget(1 << 20),
        );
        history.record(frame);
        tokio::time::advance(Duration::from_secs(3)).await;
        history.record(frame);
        assert_eq!(recovered(&mut history, 0), Some(vec!["m1".into(), "m2".into()]));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(recovered(&mut history, 0), None, "m1 expired");
        assert_eq!(recovered(&mut history, 1), Some(vec!["m2".into()]));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(history.is_empty());
        assert_eq!(recovered(&mut history, 2), Some(vec![]), "nothing was missed after m2");
    }

    fn stored(epoch: &str, offsets: std::ops::RangeInclusive<u64>) -> Vec<StoredEntry> {
        offsets
            .map(|offset| StoredEntry {
                epoch: epoch.into(),
                offset,
                frame: frame(offset),
                except: Vec::new(),
                age: Duration::ZERO,
            })
            .collect()
    }

    #[test]
    fn a_restored_history_continues_the_offsets_under_a_new_epoch() {
        let mut entries = stored("old", 1..=6);
        entries.remove(1); // offset 2 was never stored: only 3..=6 are complete
        let mut history = History::restore(limits(100), budget(1 << 20), &entries).expect("restored");
        assert_ne!(history.epoch(), "old");
        assert_eq!(history.last(), 6);
        let served = |history: &mut History, offset| match history.since("old", offset) {
            Recovery::Recovered(frames) => Some(frames.len()),
            Recovery::NotRecovered => None,
        };
        assert_eq!(served(&mut history, 2), Some(4), "3 to 6");
        assert_eq!(served(&mut history, 1), None, "2 is missing");
        assert_eq!(history.record(frame).0, 7);
        assert_eq!(served(&mut history, 6), Some(1), "the old epoch up to its end, then the new");
        assert_eq!(served(&mut history, 7), None, "7 was never the old epoch's");
        assert!(History::restore(limits(100), budget(1 << 20), &[]).is_none());
    }

    #[test]
    fn the_newest_epoch_wins_over_a_stale_owners_late_writes() {
        // The successor continued at 4 under "new"; the stalled owner still wrote 4 and 5.
        let mut entries = stored("old", 1..=3);
        entries.extend(stored("new", 4..=5));
        entries.extend(stored("old", 4..=5));
        entries.extend(stored("new", 6..=6));
        let mut history = History::restore(limits(100), budget(1 << 20), &entries).expect("restored");
        let epoch = "new".to_owned();
        match history.since(&epoch, 3) {
            Recovery::Recovered(frames) => assert_eq!(frames.len(), 3),
            Recovery::NotRecovered => panic!("4 to 6 are held"),
        }
    }

    #[test]
    fn every_history_has_its_own_epoch() {
        let a = History::new(limits(1), budget(100));
        let b = History::new(limits(1), budget(100));
        assert_ne!(a.epoch(), b.epoch());
        assert_eq!(a.epoch().len(), 16);
    }
}
