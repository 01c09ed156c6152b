//! Versions of records between hubs: which of two rows about one id is newer.
//!
//! Every write a hub accepts from its own clients gets a [`Stamp`]: a
//! hybrid-logical-clock value and the hub's id (its *origin*). Stamps are totally
//! ordered, so every hub that has seen the same rows holds the same version of
//! each record, whatever order the rows came in and however many paths they took.
//! A hub applies and forwards a row only when it is newer than what it holds,
//! which is what makes rows stop after one pass around any cycle of peers.
//!
//! The clock is the larger of the wall clock in milliseconds and one more than
//! the last value given or seen, so a restarted hub stamps above what it wrote
//! before and a hub that has seen a row always stamps above it.

use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// The version of one write: clock value, then origin hub as tie-breaker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Hybrid logical clock value (milliseconds since the epoch, or just above).
    pub v: u64,
    /// The id of the hub that accepted the write from its client.
    pub origin: Arc<str>,
}

impl Ord for Stamp {
    fn cmp(&self, other: &Self) -> Ordering {
        self.v
            .cmp(&other.v)
            .then_with(|| self.origin.cmp(&other.origin))
    }
}

impl PartialOrd for Stamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Stamp {
    /// The stamp as it travels: `{"o": ORIGIN, "v": V}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("o".into(), Value::String(self.origin.to_string()));
        map.insert("v".into(), Value::from(self.v));
        Value::Object(map)
    }

    /// Reads a stamp element; anything else (absent, or another shape) is `None`,
    /// so rows from implementations without stamps stay valid.
    pub fn from_json(value: &Value) -> Option<Stamp> {
        Stamp::of(value.get("o")?.as_str()?, value.get("v")?.as_u64()?)
    }

    /// The stamp of origin `origin` at `v`; `None` for an empty origin.
    pub fn of(origin: &str, v: u64) -> Option<Stamp> {
        if origin.is_empty() {
            return None;
        }
        Some(Stamp {
            v,
            origin: Arc::from(origin),
        })
    }
}

/// A hybrid logical clock.
#[derive(Debug, Default)]
pub struct Clock {
    last: u64,
}

impl Clock {
    /// The next value: above everything given or seen, and at least the wall clock.
    pub fn tick(&mut self) -> u64 {
        self.last = self.last.saturating_add(1).max(wall_ms());
        self.last
    }

    /// Takes note of a value seen on the wire. A value more than a day ahead of
    /// the wall clock is a broken or hostile peer, not a clock: it is not
    /// followed, so one bad row cannot push every later stamp to the end of time.
    pub fn observe(&mut self, v: u64) {
        if Clock::plausible(v) {
            self.last = self.last.max(v);
        }
    }

    /// Whether `v` could come from a working clock: not more than a day ahead.
    pub fn plausible(v: u64) -> bool {
        v <= wall_ms().saturating_add(MAX_AHEAD_MS)
    }
}

/// How far ahead of the wall clock an observed value may be (a day).
const MAX_AHEAD_MS: u64 = 24 * 60 * 60 * 1000;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Stamps of recent frees, so that an older copy of a freed record arriving late
/// (a re-send after a reconnect, a row that took a longer path) is refused rather
/// than brought back. Kept for a while, then forgotten.
#[derive(Debug, Default)]
pub struct Tombstones {
    freed: HashMap<String, (Stamp, Instant)>,
}

impl Tombstones {
    /// Remembers that `id` was freed at `stamp`.
    pub fn insert(&mut self, id: &str, stamp: Stamp, now: Instant) {
        self.freed.insert(id.to_string(), (stamp, now));
    }

    /// The stamp of the free of `id`, if one is remembered.
    pub fn get(&self, id: &str) -> Option<&Stamp> {
        self.freed.get(id).map(|(stamp, _)| stamp)
    }

    /// Forgets the free of `id` (the record is back).
    pub fn remove(&mut self, id: &str) {
        self.freed.remove(id);
    }

    /// Forgets frees older than `keep`, but those `needed` still says are.
    pub fn prune(&mut self, now: Instant, keep: Duration, needed: impl Fn(&str) -> bool) {
        self.freed
            .retain(|id, (_, at)| now.saturating_duration_since(*at) < keep || needed(id));
        if self.freed.capacity() > 64 && self.freed.len() < self.freed.capacity() / 4 {
            self.freed.shrink_to_fit();
        }
    }

    /// Every remembered free.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Stamp)> {
        self.freed
            .iter()
            .map(|(id, (stamp, _))| (id.as_str(), stamp))
    }

    /// Number of remembered frees.
    pub fn len(&self) -> usize {
        self.freed.len()
    }

    /// Whether no free is remembered.
    pub fn is_empty(&self) -> bool {
        self.freed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamp(v: u64, origin: &str) -> Stamp {
        Stamp {
            v,
            origin: Arc::from(origin),
        }
    }

    #[test]
    fn order_is_clock_then_origin() {
        assert!(stamp(2, "a") > stamp(1, "z"));
        assert!(stamp(2, "b") > stamp(2, "a"));
        assert_eq!(stamp(2, "a").cmp(&stamp(2, "a")), Ordering::Equal);
    }

    #[test]
    fn json_round_trip_and_tolerance() {
        let s = stamp(1_790_000_000_000, "hub1");
        assert_eq!(s.to_json(), json!({"o":"hub1","v":1_790_000_000_000u64}));
        assert_eq!(Stamp::from_json(&s.to_json()), Some(s));
        assert_eq!(Stamp::from_json(&json!({"o":"x"})), None);
        assert_eq!(Stamp::from_json(&json!({"o":"","v":1})), None);
        assert_eq!(Stamp::from_json(&json!({"o":"x","v":-1})), None);
        assert_eq!(Stamp::from_json(&json!("x")), None);
    }

    #[test]
    fn clock_moves_past_what_it_sees() {
        let mut clock = Clock::default();
        let a = clock.tick();
        assert!(clock.tick() > a);
        let ahead = wall_ms() + 60_000;
        clock.observe(ahead);
        assert_eq!(clock.tick(), ahead + 1);
        clock.observe(5);
        assert_eq!(clock.tick(), ahead + 2);
        // A value from the end of time is not followed, and nothing overflows.
        clock.observe(u64::MAX);
        assert_eq!(clock.tick(), ahead + 3);
        let mut end = Clock { last: u64::MAX };
        assert_eq!(end.tick(), u64::MAX);
    }

    #[test]
    fn tombstones_expire() {
        let mut t = Tombstones::default();
        let now = Instant::now();
        t.insert("a", stamp(1, "h"), now);
        assert_eq!(t.get("a"), Some(&stamp(1, "h")));
        t.prune(now + Duration::from_secs(1), Duration::from_secs(2), |_| {
            false
        });
        assert_eq!(t.len(), 1);
        t.insert("b", stamp(2, "h"), now);
        // One still needed outlives its time.
        t.prune(now + Duration::from_secs(3), Duration::from_secs(2), |id| {
            id == "b"
        });
        assert_eq!(t.get("a"), None);
        assert_eq!(t.get("b"), Some(&stamp(2, "h")));
        t.prune(now + Duration::from_secs(3), Duration::from_secs(2), |_| {
            false
        });
        assert!(t.is_empty());
    }
}
