//! Plugin timers: pending deadlines by id, fired in deadline order between events.

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use super::actor::RoomActor;

/// A room's pending plugin timers. Setting an id again moves its deadline; ties fire
/// in id order.
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// Deadline → id, in firing order.
    queue: BTreeSet<(Instant, u64)>,
    /// Id → deadline, for moving and cancelling.
    deadlines: HashMap<u64, Instant>,
}

impl Timers {
    /// Fire timer `id` at `at` (replacing its earlier deadline, if any).
    pub(super) fn set(&mut self, id: u64, at: Instant) {
        if let Some(old) = self.deadlines.insert(id, at) {
            self.queue.remove(&(old, id));
        }
        self.queue.insert((at, id));
    }

    pub(super) fn cancel(&mut self, id: u64) {
        if let Some(at) = self.deadlines.remove(&id) {
            self.queue.remove(&(at, id));
        }
    }

    pub(super) fn clear(&mut self) {
        self.queue.clear();
        self.deadlines.clear();
    }

    /// The earliest pending deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _)| *at)
    }

    /// Remove and return the earliest timer due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<u64> {
        let &(at, id) = self.queue.first()?;
        if at > now {
            return None;
        }
        self.queue.remove(&(at, id));
        self.deadlines.remove(&id);
        Some(id)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.deadlines.len()
    }
}

impl RoomActor {
    /// Call the plugin's `timer` hook for every timer due now, in deadline order.
    pub(super) fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(id) = self.timers.pop_due(now) {
            if let Some(result) = self.with_instance(|instance, view| instance.timer(view, id)) {
                match result {
                    Ok(actions) => self.apply(actions, 0),
                    Err(error) => self.recover(&error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_and_a_reset_moves_one() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut timers = Timers::default();
        timers.set(1, at(30));
        timers.set(2, at(10));
        timers.set(3, at(20));
        timers.set(1, at(5)); // moved ahead of the others
        assert_eq!(timers.len(), 3);
        assert_eq!(timers.next(), Some(at(5)));
        assert_eq!(timers.pop_due(at(4)), None, "nothing is due before its deadline");
        let fired: Vec<u64> = std::iter::from_fn(|| timers.pop_due(at(25))).collect();
        assert_eq!(fired, [1, 2, 3]);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn cancelled_and_cleared_timers_never_fire() {
        let start = Instant::now();
        let mut timers = Timers::default();
        timers.set(7, start);
        timers.set(8, start);
        timers.cancel(7);
        timers.cancel(99); // unknown ids are ignored
        assert_eq!(timers.pop_due(start), Some(8));
        assert_eq!(timers.pop_due(start), None);
        timers.set(9, start);
        timers.clear();
        assert_eq!((timers.len(), timers.pop_due(start)), (0, None));
    }
}
