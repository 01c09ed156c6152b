//! The registry's entries, each at a numbered place that stays its own
//! while it lives, in chunks of a fixed size.
//!
//! One growing `Vec` of entries copied every entry into new memory each
//! time it doubled: at 100,000 records of 200 bytes, 20 MB copied into pages
//! touched for the first time, a few per cent of the hub's CPU per record.
//! Past the first chunk (which grows as a registry of a few records needs),
//! a chunk is made at its full size and never moves; growing adds one.

/// Places per chunk: 1,024 entries of about 200 bytes, 200 KB.
const CHUNK: usize = 1024;

/// Values at numbered places; a freed place is taken again.
#[derive(Debug)]
pub(super) struct Slab<T> {
    chunks: Vec<Vec<Option<T>>>,
    /// Places freed, taken again before new ones.
    vacant: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            vacant: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Number of places, taken or free.
    pub(super) fn places(&self) -> usize {
        match self.chunks.last() {
            Some(last) => (self.chunks.len() - 1) * CHUNK + last.len(),
            None => 0,
        }
    }

    /// A free place, kept for [`Slab::fill`]: a freed one, or a new one at
    /// the end.
    pub(super) fn reserve(&mut self) -> usize {
        if let Some(at) = self.vacant.pop() {
            return at;
        }
        let at = self.places();
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(None),
            // The first chunk grows as a registry of a few records needs;
            // the others take their room at once.
            Some(_) => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(None);
                self.chunks.push(chunk);
            }
            None => self.chunks.push(vec![None]),
        }
        at
    }

    /// Puts `value` at place `at`, which [`Slab::reserve`] gave.
    pub(super) fn fill(&mut self, at: usize, value: T) {
        let place = self.place(at);
        debug_assert!(
            place.as_ref().is_some_and(|place| place.is_none()),
            "place {at} was not reserved"
        );
        if let Some(place) = place {
            *place = Some(value);
        }
    }

    /// Takes the value at `at` away; its place is free again.
    pub(super) fn remove(&mut self, at: usize) -> Option<T> {
        let value = self.place(at)?.take()?;
        self.vacant.push(at);
        Some(value)
    }

    /// The value at `at`.
    pub(super) fn get(&self, at: usize) -> Option<&T> {
        self.chunks.get(at / CHUNK)?.get(at % CHUNK)?.as_ref()
    }

    /// The value at `at`, to change.
    pub(super) fn get_mut(&mut self, at: usize) -> Option<&mut T> {
        self.place(at)?.as_mut()
    }

    fn place(&mut self, at: usize) -> Option<&mut Option<T>> {
        self.chunks.get_mut(at / CHUNK)?.get_mut(at % CHUNK)
    }

    /// Every value, in the order of their places.
    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten().flatten()
    }

    /// Moves every value to the front, in order, and gives back the memory
    /// of the places left; returns where each place's value went (`None`
    /// for a free place), by old place.
    pub(super) fn compact(&mut self) -> Vec<Option<usize>> {
        let mut moved = Vec::with_capacity(self.places());
        let mut packed = Slab::default();
        for value in std::mem::take(&mut self.chunks).into_iter().flatten() {
            moved.push(value.map(|value| {
                let at = packed.reserve();
                packed.fill(at, value);
                at
            }));
        }
        *self = packed;
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_stay_across_chunks_and_freed_ones_are_taken_again() {
        let mut slab = Slab::default();
        let places: Vec<usize> = (0..3 * CHUNK + 5)
            .map(|n| {
                let at = slab.reserve();
                slab.fill(at, n);
                at
            })
            .collect();
        assert_eq!(places, (0..3 * CHUNK + 5).collect::<Vec<_>>());
        assert_eq!(slab.get(CHUNK + 1), Some(&(CHUNK + 1)));
        assert_eq!(slab.remove(CHUNK + 1), Some(CHUNK + 1));
        assert_eq!(slab.remove(CHUNK + 1), None, "a free place holds nothing");
        assert_eq!(slab.get(CHUNK + 1), None);
        assert_eq!(slab.reserve(), CHUNK + 1, "a freed place first");
        assert_eq!(slab.reserve(), 3 * CHUNK + 5, "then a new one");
        assert_eq!(slab.get(10 * CHUNK), None);
        if let Some(value) = slab.get_mut(7) {
            *value = 70;
        }
        assert_eq!(
            slab.iter().take(9).copied().collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6, 70, 8]
        );
    }

    #[test]
    fn compacting_packs_values_in_order_and_says_where_each_went() {
        let mut slab = Slab::default();
        for n in 0..2 * CHUNK {
            let at = slab.reserve();
            slab.fill(at, n);
        }
        for at in (0..2 * CHUNK).filter(|at| at % 3 != 0) {
            slab.remove(at);
        }
        let moved = slab.compact();
        assert_eq!(moved.len(), 2 * CHUNK);
        let kept = (0..2 * CHUNK).filter(|n| n % 3 == 0).count();
        assert_eq!(slab.places(), kept);
        for (old, new) in moved.iter().enumerate() {
            match new {
                Some(new) => assert_eq!(slab.get(*new), Some(&old)),
                None => assert_ne!(old % 3, 0),
            }
        }
        assert_eq!(slab.reserve(), kept, "no place was left free");
    }
}
