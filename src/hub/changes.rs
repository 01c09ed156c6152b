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

use crate::registry::numbered::Numbered;
use crate::registry::{Changed, Registry, ShrinkSparse};
use std::collections::HashMap;
use std::sync::Arc;

/// Freed records kept before the first look for ones nobody needs.
const MIN_FREED: usize = 10_000;

/// The latest position of each record: kept in the registry's entry for a
/// record it holds (no table of its own to look up for every row), and here
/// for one that went.
#[derive(Debug)]
pub(crate) struct Changes {
    /// Freed records kept: where they went, and since when they had existed.
    freed: HashMap<Arc<str>, Changed, foldhash::fast::RandomState>,
    /// Every record noted, held or freed, at its latest position.
    by_position: Numbered<Arc<str>>,
    /// How many freed records are kept before the next look.
    look_at: usize,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            freed: HashMap::default(),
            by_position: Numbered::default(),
            look_at: MIN_FREED,
        }
    }
}

impl Changes {
    /// Record `id` changed at position `at`: `registry` holds it after the
    /// change, or it went.
    pub(crate) fn note(&mut self, registry: &mut Registry, id: &str, at: u64) {
        // Its places so far: while held, and before a removal since the last
        // note (taken out and put back without a note between, it never went
        // for a reader).
        let removed = registry.take_removed(id);
        let held = registry.changed_mut(id);
        let noted = held.as_ref().and_then(|(_, changed)| **changed);
        for old in [noted, removed].into_iter().flatten() {
            self.by_position.remove(old.at);
        }
        // It has existed since then; otherwise (new, back after it went, or
        // gone already) the change is news only to readers placed after it.
        let since = match noted.or(removed) {
            Some(old) => old.since,
            None => {
                if let Some(old) = self.take_freed(id) {
                    self.by_position.remove(old.at);
                }
                at
            }
        };
        let changed = Changed { at, since };
        match held {
            Some((shared, slot)) => {
                *slot = Some(changed);
                self.by_position.insert(at, shared.clone());
            }
            None => {
                let id: Arc<str> = Arc::from(id);
                self.freed.insert(id.clone(), changed);
                self.by_position.insert(at, id);
            }
        }
    }

    fn take_freed(&mut self, id: &str) -> Option<Changed> {
        if self.freed.is_empty() {
            return None;
        }
        self.freed.remove(id)
    }

    /// Takes the records `registry` removed without a note of their free:
    /// kept as gone from where they last changed, so that a reader placed
    /// before that is told they went; one put back meanwhile, also without a
    /// note, keeps its place as if it never went.
    pub(crate) fn take_removed(&mut self, registry: &mut Registry) {
        for (id, changed) in registry.drain_removed() {
            match registry.changed_mut(&id) {
                Some((_, slot)) if slot.is_none() => *slot = Some(changed),
                _ => {
                    self.freed.insert(id, changed);
                }
            }
        }
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
        self.freed.len() > self.look_at
    }

    /// Forgets the freed records no reader needs: those that went before
    /// `feed_start` (the oldest position the feed still has) and whose life
    /// spans none of `lost`, the places of the readers behind the feed. The
    /// next look comes when twice as many are kept, or half as many as the
    /// hub's `records`, so that looking costs little per free.
    pub(crate) fn forget_freed(&mut self, feed_start: u64, lost: &[u64], records: usize) {
        let mut lost = lost.to_vec();
        lost.sort_unstable();
        let needed = |c: &Changed| {
            // A reader at place p has everything before p: it has the record
            // if it appeared before p, and lacks the free if it went at p or
            // after.
            let first = lost.partition_point(|&p| p <= c.since);
            lost.get(first).is_some_and(|&p| p <= c.at)
        };
        let gone: Vec<(u64, Arc<str>)> = self
            .by_position
            .range(0..feed_start)
            .filter(|(at, id)| {
                self.freed
                    .get(&***id)
                    .is_some_and(|c| c.at == *at && !needed(c))
            })
            .map(|(at, id)| (at, id.clone()))
            .collect();
        for (at, id) in gone {
            self.by_position.remove(at);
            self.freed.remove(&id);
        }
        self.look_at = self
            .freed
            .len()
            .saturating_mul(2)
            .max(MIN_FREED)
            .max(records / 2);
    }

    /// Gives back the memory of a table a burst left mostly empty.
    pub(crate) fn shrink(&mut self) {
        self.freed.shrink_sparse();
        self.by_position.shrink();
    }

    /// Whether the free of `id` is kept for readers that may need it.
    pub(crate) fn keeps_free_of(&self, id: &str) -> bool {
        self.freed.contains_key(id)
    }

    /// Number of freed records kept.
    pub(crate) fn freed(&self) -> usize {
        self.freed.len()
    }

    /// Number of records kept, freed ones included.
    pub(crate) fn len(&self) -> usize {
        self.by_position.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::meta_of;
    use crate::registry::Owner;
    use serde_json::json;

    /// A registry and its changes index, changed as a hub changes them.
    #[derive(Default)]
    struct Index {
        registry: Registry,
        changes: Changes,
    }

    impl Index {
        /// Record `id` is registered (`live`) or freed, in a row at `at`.
        fn note(&mut self, id: &str, at: u64, live: bool) {
            if live {
                let meta = meta_of(json!({"role": "web", "port": at}));
                self.registry.register(id, meta, Owner(1));
            } else {
                self.registry.discard(id);
            }
            self.changes.note(&mut self.registry, id, at);
        }

        /// Frees `id` at `at`, then forgets the frees a reader placed at
        /// `reader` does not need; returns what is left.
        fn free_and_forget(&mut self, id: &str, at: u64, reader: u64) -> Vec<(u64, String)> {
            self.note(id, at, false);
            self.changes.forget_freed(100, &[reader], 0);
            self.found(0, 100, 100)
        }

        /// Up to `max` of what `between(from, until)` finds.
        fn found(&self, from: u64, until: u64, max: usize) -> Vec<(u64, String)> {
            self.changes
                .between(from, until)
                .take(max)
                .map(|(at, rid)| (at, rid.to_string()))
                .collect()
        }
    }

    fn at(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
        pairs.iter().map(|(at, id)| (*at, id.to_string())).collect()
    }

    #[test]
    fn each_record_is_found_once_at_its_latest_change() {
        let mut index = Index::default();
        index.note("a", 1, true);
        index.note("b", 2, true);
        index.note("b", 3, true);
        index.note("a", 5, false);
        assert_eq!(index.found(0, 10, 100), at(&[(3, "b"), (5, "a")]));
        assert_eq!(index.found(4, 10, 100), at(&[(5, "a")]));
        assert_eq!(index.found(0, 10, 1), at(&[(3, "b")]));
        assert_eq!(index.found(0, 5, 100), at(&[(3, "b")]));
        assert_eq!(index.changes.len(), 2);
        assert_eq!(index.changes.freed(), 1);
        assert!(index.changes.keeps_free_of("a"));
        assert!(!index.changes.keeps_free_of("b"));
    }

    #[test]
    fn a_free_is_kept_only_for_readers_placed_while_the_record_existed() {
        let mut index = Index::default();
        // "old" existed from 1 to 10; "brief" from 20 to 21; "live" stays.
        index.note("old", 1, true);
        index.note("old", 10, false);
        index.note("brief", 20, true);
        index.note("brief", 21, false);
        index.note("live", 30, true);
        // A reader stuck at 5 had "old" and lacks its free; nobody lacks
        // brief's free.
        index.changes.forget_freed(100, &[5], 0);
        assert_eq!(index.found(0, 100, 10), at(&[(10, "old"), (30, "live")]));
        // Without it, only what the feed still holds, and the living, stay.
        index.note("late", 40, true);
        index.note("late", 50, false);
        index.changes.forget_freed(45, &[], 0);
        assert_eq!(index.found(0, 100, 10), at(&[(30, "live"), (50, "late")]));
    }

    #[test]
    fn a_record_registered_again_is_news_from_its_new_start() {
        let mut index = Index::default();
        index.note("a", 1, true);
        index.note("a", 2, false);
        index.note("a", 8, true);
        assert_eq!(index.changes.freed(), 0);
        index.note("a", 9, false);
        // A reader at 5 never saw the second life, and saw the first one end.
        index.changes.forget_freed(100, &[5], 0);
        assert_eq!(index.changes.len(), 0);
    }

    #[test]
    fn a_record_removed_without_a_note_is_gone_from_where_it_last_changed() {
        let mut index = Index::default();
        index.note("a", 1, true);
        index.note("b", 2, true);
        index.note("b", 3, true);
        index.registry.discard("a");
        index.registry.discard("b");
        index.changes.take_removed(&mut index.registry);
        assert_eq!(index.changes.freed(), 2);
        assert_eq!(index.found(0, 10, 10), at(&[(1, "a"), (3, "b")]));
        // Gone where they last changed: a reader at 3 (after b's first
        // register, at b's update) lacks b's free; nobody lacks a's.
        index.changes.forget_freed(100, &[3], 0);
        assert_eq!(index.changes.freed(), 1);
        assert!(index.changes.keeps_free_of("b"));
        index.changes.forget_freed(100, &[], 0);
        assert_eq!(index.changes.freed(), 0);
        assert_eq!(index.found(0, 10, 10), at(&[]));
    }

    #[test]
    fn a_record_taken_out_and_put_back_between_notes_never_went() {
        let mut index = Index::default();
        index.note("a", 1, true);
        index.registry.discard("a");
        index.note("a", 4, true);
        assert_eq!(index.found(0, 10, 10), at(&[(4, "a")]));
        // A reader at 2 had it all along, and lacks its free.
        assert_eq!(index.free_and_forget("a", 6, 2), at(&[(6, "a")]));
    }

    #[test]
    fn a_record_taken_out_and_put_back_within_a_section_keeps_its_place() {
        let mut index = Index::default();
        index.note("a", 1, true);
        index.note("a", 3, true);
        index.registry.discard("a");
        let meta = meta_of(json!({"role": "web", "port": 9}));
        index.registry.register("a", meta, Owner(1));
        index.changes.take_removed(&mut index.registry);
        assert_eq!(index.changes.freed(), 0);
        assert!(!index.changes.keeps_free_of("a"));
        assert_eq!(index.found(0, 10, 10), at(&[(3, "a")]));
        // A reader at 2 had it all along (since 1), and lacks its free.
        assert_eq!(index.free_and_forget("a", 7, 2), at(&[(7, "a")]));
    }

    #[test]
    fn the_next_look_waits_for_twice_what_had_to_stay() {
        let mut index = Index::default();
        for n in 0..=MIN_FREED as u64 {
            index.note(&format!("r{n}"), 2 * n, true);
            index.note(&format!("r{n}"), 2 * n + 1, false);
        }
        assert!(index.changes.due());
        // A reader at 1 needs only r0's free.
        index.changes.forget_freed(u64::MAX, &[1], 0);
        assert_eq!(index.changes.len(), 1);
        assert!(!index.changes.due());
    }
}
