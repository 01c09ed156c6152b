//! Giving memory back to the system after a burst.
//!
//! The hub's memory follows its load: thousands of connections and their
//! buffers come and go in a storm. An allocator keeps what was freed for
//! the next allocations, and a few small allocations that outlive the storm
//! (records, tables) keep whole pages of it resident. So once the hub has
//! shrunk, to half its connections or its records since the largest it has
//! been, it asks the allocator to give back the free pages it holds:
//!
//! - jemalloc, which the `seaport` binary allocates with (see `main.rs`):
//!   purging every arena's unused pages (`arena.<all>.purge`) at once,
//!   instead of after its ten-second decay;
//! - glibc's allocator, for a program that embeds the hub without choosing
//!   one: `malloc_trim(0)`, which walks every arena under its lock. glibc
//!   also scatters a storm's connection buffers over its arenas, where the few
//!   allocations that outlive the storm pin them, so buffers of
//!   [`MMAP_THRESHOLD`] bytes and more get mappings of their own there (its
//!   `M_MMAP_THRESHOLD`, set when a hub starts, see [`keep_buffers_apart`]).
//!
//! docs/performance.md ("Memory after a storm") has the figures of each.

use super::outbox::WRITE_BATCH;
use crate::protocol::framing::READ_CHUNK;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the process allocates with jemalloc, as the program said.
static JEMALLOC: AtomicBool = AtomicBool::new(false);

/// Tells the hub that the process's global allocator is jemalloc
/// (`tikv_jemallocator::Jemalloc`), as in the `seaport` binary: the hub then
/// gives memory back through jemalloc instead of glibc. Call it before
/// starting a hub.
pub fn allocating_with_jemalloc() {
    JEMALLOC.store(true, Ordering::Relaxed);
}

fn jemalloc() -> bool {
    JEMALLOC.load(Ordering::Relaxed)
}

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
/// tables, an HTTP connection's 8 KiB buffers) nothing changes. Only for
/// glibc's allocator: jemalloc keeps large allocations apart by itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn keep_buffers_apart() {
    if jemalloc() {
        return;
    }
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
fn trim() {
    if jemalloc() {
        purge_jemalloc();
    } else {
        trim_glibc();
    }
}

/// Purges the unused pages of every jemalloc arena.
#[allow(unsafe_code)]
fn purge_jemalloc() {
    // `MALLCTL_ARENAS_ALL`: every arena.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated, and `arena.<i>.purge` reads and
    // writes nothing (null pointers, zero length); jemalloc takes its own
    // locks, so it is safe from any thread.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if failed != 0 {
        tracing::debug!(error = failed, "jemalloc did not purge its arenas");
    }
}

/// Releases the free pages of glibc's arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_glibc() {
    // SAFETY: malloc_trim only reorganises the allocator's free lists; it is
    // safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Other C libraries' allocators give memory back by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() {}

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
