//! Giving memory back to the system after a burst.
//!
//! The hub's memory follows its load: thousands of connections and their
//! buffers come and go in a storm. glibc's allocator keeps what was freed in
//! its per-thread arenas, and a few small allocations that outlive the storm
//! (records, tables) keep whole pages of them resident: measured after a
//! storm of 5,000 connections × 3 records, the hub held 0.6 MB of live data
//! in 37 MB of arenas, and its RSS stayed at 49-54 MiB for as long as we
//! watched. `malloc_trim(0)` releases the free pages inside the arenas: the
//! RSS came back to 11 MiB (from 6 MiB before the storm) within a second.
//! jemalloc got there by itself, but only after its ten-second decay, and
//! mimalloc kept 77 MiB; neither is worth a C library in the build when one
//! call, made when the hub has shrunk, does it (docs/performance.md has the
//! figures).
//!
//! The call walks every arena under its lock, so it is made only when the
//! hub has shrunk: to half its connections, or its records, since the
//! largest it has been since the last call.
//!
//! The trim can only give back pages that hold nothing live, and a storm
//! spreads the few allocations that outlive it over many: after one, half a
//! megabyte of live data in 62 MB of arenas kept 11 to 45 MiB resident,
//! depending on where it had landed. Most of a storm's memory is connection
//! buffers of [`MMAP_THRESHOLD`] bytes, so those get mappings of their own
//! (glibc's `M_MMAP_THRESHOLD`, set when a hub starts, see
//! [`keep_buffers_apart`]): they go back to the system when freed and no
//! longer scatter the arenas, and every measured storm ended within 1.4 × the
//! hub's size before it.

use super::outbox::WRITE_BATCH;
use crate::protocol::framing::READ_CHUNK;

/// When the hub last gave memory back, and how large it has been since.
#[derive(Debug, Default)]
pub(crate) struct GiveBack {
    /// The most connections since the last call.
    connections: usize,
    /// The most records since the last call.
    records: usize,
    /// Call once more at the next look: what was still being torn down at
    /// the last one is free by then.
    again: bool,
}

/// Below this much shrinking, a call is not worth making.
const MIN_SHRINK: usize = 256;

impl GiveBack {
    /// Notes the hub's size now; whether to give freed memory back (with
    /// [`give_back`], outside the hub's lock): it has shrunk by half, and by at
    /// least [`MIN_SHRINK`] connections or records, since the largest it has
    /// been.
    pub(crate) fn due(&mut self, connections: usize, records: usize) -> bool {
        self.connections = self.connections.max(connections);
        self.records = self.records.max(records);
        let shrunk = |high: usize, now: usize| now <= high / 2 && high - now >= MIN_SHRINK;
        if shrunk(self.connections, connections) || shrunk(self.records, records) {
            self.connections = connections;
            self.records = records;
            self.again = true;
            return true;
        }
        std::mem::take(&mut self.again)
    }
}

/// Allocations of this many bytes and more get a mapping of their own: the
/// smaller of a connection's read chunk and write batch.
pub(crate) const MMAP_THRESHOLD: usize = if READ_CHUNK < WRITE_BATCH {
    READ_CHUNK
} else {
    WRITE_BATCH
};

/// Makes the allocator serve allocations of [`MMAP_THRESHOLD`] bytes and more
/// from their own mappings, once per process. Below that (rows, records,
/// tables, an HTTP connection's 8 KiB buffers) nothing changes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn keep_buffers_apart() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let threshold = i32::try_from(MMAP_THRESHOLD).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a parameter of the allocator; glibc
        // takes its own lock for it, so it is safe from any thread.
        let set = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, threshold) };
        if set != 1 {
            tracing::debug!("the allocator kept its mmap threshold");
        }
    });
}

/// Other allocators place memory their own way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn keep_buffers_apart() {}

/// Gives the memory freed since the hub was larger back to the system.
pub(crate) fn give_back() {
    let began = std::time::Instant::now();
    trim();
    tracing::debug!(
        took_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
        "gave freed memory back to the system"
    );
}

/// Releases the free memory of every arena to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only reorganises the allocator's free lists; it is
    // safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Other allocators give memory back by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_gives_back_after_halving_and_then_from_the_new_size() {
        let mut give = GiveBack::default();
        assert!(!give.due(5000, 10));
        assert!(!give.due(2600, 10), "not yet half");
        assert!(give.due(2400, 10));
        assert!(
            give.due(2400, 10),
            "once more, for what was being torn down"
        );
        assert!(!give.due(2400, 10));
        assert!(give.due(100, 10), "counts from the last time");
        assert!(give.due(100, 10));
        // Small hubs never call it.
        assert!(!give.due(200, 10));
        assert!(!give.due(10, 10));
        // Records count too.
        assert!(!give.due(10, 100_000));
        assert!(give.due(10, 1_000));
        give_back();
    }
}
