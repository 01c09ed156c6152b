//! Where in the feed each record last changed: what a reader that lost its
//! place in the feed is caught up with.
//!
//! Each record id sits at the feed position of its latest row; walking the
//! positions from where a reader lost its place to where the feed resumes gives
//! every record that changed meanwhile, once, in the order of their latest
//! changes.
//!
//! A freed record is kept only while a reader may need its free: one whose
//! place is after the record appeared and not after it went. Frees still in the
//! feed may be needed by any reader; older ones only by the readers that have
//! lost their place, and only for the records that existed at that place. So a
//! reader that stops reading costs at most the records the hub held when it
//! stopped, however many come and go after, and it is never cut off.

use crate::registry::ShrinkSparse;
use crate::registry::numbered::Numbered;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

/// Freed records kept before the first look for ones nobody needs.
const MIN_FREED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Change {
    /// Position of its latest row.
    at: u64,
    /// Position from which it existed (its first register after it last
    /// went); for a freed record, the free is news to readers placed after it.
    since: u64,
    /// Whether it is gone.
    freed: bool,
}

/// The latest position of each record.
#[derive(Debug)]
pub(crate) struct Changes {
    ids: HashMap<Arc<str>, Change, foldhash::fast::RandomState>,
    by_position: Numbered<Arc<str>>,
    /// Freed records kept.
    freed: usize,
    /// How many freed records are kept before the next look.
    look_at: usize,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            ids: HashMap::default(),
            by_position: Numbered::default(),
            freed: 0,
            look_at: MIN_FREED,
        }
    }
}

impl Changes {
    /// Record `id` changed at position `at`: it exists after the change
    /// (`live`), or it went.
    pub(crate) fn note(&mut self, id: &Arc<str>, at: u64, live: bool) {
        let freed = !live;
        match self.ids.entry(id.clone()) {
            Entry::Occupied(mut slot) => {
                let old = slot.get_mut();
                self.by_position.remove(old.at);
                if old.freed {
                    self.freed -= 1;
                    old.since = at;
                }
                old.at = at;
                old.freed = freed;
            }
            Entry::Vacant(slot) => {
                slot.insert(Change {
                    at,
                    since: at,
                    freed,
                });
            }
        }
        if freed {
            self.freed += 1;
        }
        self.by_position.insert(at, id.clone());
    }

    /// The records that changed at positions from `from` up to `until`, with
    /// their positions, in order.
    pub(crate) fn between(&self, from: u64, until: u64) -> impl Iterator<Item = (u64, &str)> {
        self.by_position
            .range(from..until)
            .map(|(at, id)| (at, &**id))
    }

    /// Whether enough freed records are kept to look for ones nobody needs.
    pub(crate) fn due(&self) -> bool {
        self.freed > self.look_at
    }

    /// Forgets the freed records no reader needs: those that went before
    /// `feed_start` (the oldest position the feed still has) and whose life
    /// spans none of `lost`, the places of the readers behind the feed. The
    /// next look comes when twice as many are kept, or half as many as the
    /// hub's `records`, so that looking costs little per free.
    pub(crate) fn forget_freed(&mut self, feed_start: u64, lost: &[u64], records: usize) {
        let mut lost = lost.to_vec();
        lost.sort_unstable();
        let needed = |c: &Change| {
            // A reader at place p has everything before p: it has the record
            // if it appeared before p, and lacks the free if it went at p or
            // after.
            let first = lost.partition_point(|&p| p <= c.since);
            lost.get(first).is_some_and(|&p| p <= c.at)
        };
        let gone: Vec<(u64, Arc<str>)> = self
            .by_position
            .range(0..feed_start)
            .filter(|(_, id)| self.ids.get(&**id).is_some_and(|c| c.freed && !needed(c)))
            .map(|(at, id)| (at, id.clone()))
            .collect();
        for (at, id) in gone {
            self.by_position.remove(at);
            self.ids.remove(&id);
            self.freed -= 1;
        }
        self.look_at = self.freed.saturating_mul(2).max(MIN_FREED).max(records / 2);
    }

    /// Gives back the memory of a table a burst left mostly empty.
    pub(crate) fn shrink(&mut self) {
        self.ids.shrink_sparse();
        self.by_position.shrink();
    }

    /// Whether the free of `id` is kept for readers that may need it.
    pub(crate) fn keeps_free_of(&self, id: &str) -> bool {
        self.ids.get(id).is_some_and(|change| change.freed)
    }

    /// Number of freed records kept.
    pub(crate) fn freed(&self) -> usize {
        self.freed
    }

    /// Number of records kept, freed ones included.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Up to `max` of what `between(from, until)` finds.
    fn found(changes: &Changes, from: u64, until: u64, max: usize) -> Vec<(u64, Arc<str>)> {
        changes
            .between(from, until)
            .take(max)
            .map(|(at, rid)| (at, id(rid)))
            .collect()
    }

    #[test]
    fn each_record_is_found_once_at_its_latest_change() {
        let mut changes = Changes::default();
        changes.note(&id("a"), 1, true);
        changes.note(&id("b"), 2, true);
        changes.note(&id("a"), 5, false);
        assert_eq!(found(&changes, 0, 10, 100), [(2, id("b")), (5, id("a"))]);
        assert_eq!(found(&changes, 3, 10, 100), [(5, id("a"))]);
        assert_eq!(found(&changes, 0, 10, 1), [(2, id("b"))]);
        assert_eq!(found(&changes, 0, 5, 100), [(2, id("b"))]);
    }

    #[test]
    fn a_free_is_kept_only_for_readers_placed_while_the_record_existed() {
        let mut changes = Changes::default();
        // "old" existed from 1 to 10; "brief" from 20 to 21; "live" stays.
        changes.note(&id("old"), 1, true);
        changes.note(&id("old"), 10, false);
        changes.note(&id("brief"), 20, true);
        changes.note(&id("brief"), 21, false);
        changes.note(&id("live"), 30, true);
        // A reader stuck at 5 had "old" and lacks its free; nobody lacks
        // brief's free.
        changes.forget_freed(100, &[5], 0);
        assert_eq!(
            found(&changes, 0, 100, 10),
            [(10, id("old")), (30, id("live"))]
        );
        // Without it, only what the feed still holds, and the living, stay.
        changes.note(&id("late"), 40, true);
        changes.note(&id("late"), 50, false);
        changes.forget_freed(45, &[], 0);
        assert_eq!(
            found(&changes, 0, 100, 10),
            [(30, id("live")), (50, id("late"))]
        );
    }

    #[test]
    fn a_record_registered_again_is_news_from_its_new_start() {
        let mut changes = Changes::default();
        changes.note(&id("a"), 1, true);
        changes.note(&id("a"), 2, false);
        changes.note(&id("a"), 8, true);
        changes.note(&id("a"), 9, false);
        // A reader at 5 never saw the second life, and saw the first one end.
        changes.forget_freed(100, &[5], 0);
        assert_eq!(changes.len(), 0);
    }

    #[test]
    fn the_next_look_waits_for_twice_what_had_to_stay() {
        let mut changes = Changes::default();
        for n in 0..=MIN_FREED as u64 {
            changes.note(&id(&format!("r{n}")), 2 * n, true);
            changes.note(&id(&format!("r{n}")), 2 * n + 1, false);
        }
        assert!(changes.due());
        // A reader at 1 needs only r0's free.
        changes.forget_freed(u64::MAX, &[1], 0);
        assert_eq!(changes.len(), 1);
        assert!(!changes.due());
    }
}
