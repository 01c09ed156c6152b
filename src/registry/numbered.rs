//! Values by increasing number, kept in one array in the order they came.
//!
//! The registry's arrival order and the hub's changes index each number what
//! they add with a counter that only grows, so a new value always goes at the
//! end: a push, where an ordered tree walks down and splits nodes on every
//! insert. A value taken out leaves a hole, found by binary search; the holes
//! are squeezed out once they are half the array, so each removal costs a
//! constant share of that, and a walk over the whole array skips at most as
//! many holes as it finds values (one range may hold more).

use super::ShrinkSparse;
use std::ops::Range;

/// Holes kept before squeezing them out is worth a pass.
const MIN_SQUEEZE: usize = 64;

/// Values by number, in increasing order of number.
#[derive(Debug)]
pub(crate) struct Numbered<V> {
    /// By increasing number; `None` where a value was taken.
    items: Vec<(u64, Option<V>)>,
    /// Number of `None` items.
    holes: usize,
}

impl<V> Default for Numbered<V> {
    fn default() -> Self {
        Numbered {
            items: Vec::new(),
            holes: 0,
        }
    }
}

impl<V> Numbered<V> {
    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        self.items.len() - self.holes
    }

    /// Where number `at` is, or would go.
    fn find(&self, at: u64) -> Result<usize, usize> {
        self.items.binary_search_by_key(&at, |(n, _)| *n)
    }

    /// Puts `value` at number `at`, in place of the one there if any. A number
    /// above every other is a push; others take a search.
    pub(crate) fn insert(&mut self, at: u64, value: V) {
        if self.items.last().is_none_or(|(last, _)| *last < at) {
            self.items.push((at, Some(value)));
            return;
        }
        match self.find(at) {
            Ok(place) => {
                let slot = &mut self.items[place].1;
                if slot.is_none() {
                    self.holes -= 1;
                }
                *slot = Some(value);
            }
            Err(place) => self.items.insert(place, (at, Some(value))),
        }
    }

    /// Takes the value at number `at` out.
    pub(crate) fn remove(&mut self, at: u64) -> Option<V> {
        let place = self.find(at).ok()?;
        let value = self.items[place].1.take()?;
        self.holes += 1;
        if self.holes >= MIN_SQUEEZE && self.holes * 2 >= self.items.len() {
            self.squeeze();
        }
        Some(value)
    }

    /// Drops the holes.
    fn squeeze(&mut self) {
        self.items.retain(|(_, value)| value.is_some());
        self.holes = 0;
    }

    /// The values numbered in `range`, with their numbers, in order.
    pub(crate) fn range(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &V)> {
        let start = self.items.partition_point(|(n, _)| *n < range.start);
        let end = self.items.partition_point(|(n, _)| *n < range.end);
        self.items
            .get(start..end.max(start))
            .unwrap_or_default()
            .iter()
            .filter_map(|(n, value)| value.as_ref().map(|v| (*n, v)))
    }

    /// Every value, in order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.items.iter().filter_map(|(_, value)| value.as_ref())
    }

    /// Every value, to change in place.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.items
            .iter_mut()
            .filter_map(|(_, value)| value.as_mut())
    }

    /// Gives back the memory a burst of values that are gone left: the
    /// holes once they are a quarter of the array (a pass over it is worth
    /// that), then the room.
    pub(crate) fn shrink(&mut self) {
        if self.holes >= MIN_SQUEEZE && self.holes * 4 >= self.items.len() {
            self.squeeze();
        }
        self.items.shrink_sparse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(numbered: &Numbered<&'static str>, range: Range<u64>) -> Vec<(u64, &'static str)> {
        numbered.range(range).map(|(n, v)| (n, *v)).collect()
    }

    #[test]
    fn values_come_out_by_number_whatever_the_order_they_went_in() {
        let mut numbered = Numbered::default();
        numbered.insert(5, "e");
        numbered.insert(9, "i");
        numbered.insert(2, "b");
        numbered.insert(7, "g");
        numbered.insert(5, "E");
        assert_eq!(numbered.len(), 4);
        assert_eq!(
            all(&numbered, 0..u64::MAX),
            [(2, "b"), (5, "E"), (7, "g"), (9, "i")]
        );
        assert_eq!(all(&numbered, 5..9), [(5, "E"), (7, "g")]);
        let (high, low) = (9, 5);
        assert_eq!(
            all(&numbered, high..low),
            [],
            "a range that ends before it starts"
        );
        assert_eq!(numbered.remove(7), Some("g"));
        assert_eq!(numbered.remove(7), None);
        assert_eq!(numbered.remove(8), None);
        assert_eq!(all(&numbered, 3..10), [(5, "E"), (9, "i")]);
        numbered.insert(7, "G");
        assert_eq!(
            numbered.values().copied().collect::<Vec<_>>(),
            ["b", "E", "G", "i"]
        );
    }

    #[test]
    fn holes_are_squeezed_out_once_they_are_half() {
        let mut numbered = Numbered::default();
        for n in 0..1000 {
            numbered.insert(n, n);
        }
        for n in (0..1000).filter(|n| n % 4 != 0) {
            assert_eq!(numbered.remove(n), Some(n));
            assert!(numbered.holes * 2 <= numbered.items.len().max(2 * MIN_SQUEEZE));
        }
        assert_eq!(numbered.len(), 250);
        assert!(numbered.items.len() < 500, "{} items", numbered.items.len());
        let kept: Vec<u64> = numbered.range(0..1000).map(|(n, _)| n).collect();
        assert_eq!(kept, (0..1000).step_by(4).collect::<Vec<_>>());
        for value in numbered.values_mut() {
            *value += 1;
        }
        assert_eq!(numbered.range(4..5).next(), Some((4, &5)));
        numbered.shrink();
        assert_eq!(numbered.values().count(), 250);
        assert!(numbered.holes * 4 < numbered.items.len().max(4 * MIN_SQUEEZE));
    }
}
