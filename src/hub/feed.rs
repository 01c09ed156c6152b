//! The rows the hub forwards, kept once for every connection.
//!
//! Every row the hub sends to more than one connection (a register, a free, a
//! beat) is appended to the feed once, numbered, and each connection's writer
//! reads on from where it is, skipping what is not for it. A row going out to
//! five thousand connections is one entry, not five thousand queued copies, and
//! the cost of a reader that falls behind is one position.
//!
//! The feed keeps at most its byte budget of rows. A reader whose position
//! drops off the front has *lost its place*: it is then caught up from the
//! registry (see `changes`), with the latest state of each record that changed
//! since, and reads on from the feed after that. Entries every reader has
//! passed are dropped as well (see [`Feed::trim_below`]), so a hub whose readers
//! keep up holds next to nothing here.

use super::outbox::Outbox;
use crate::registry::Owner;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// Connections waiting for rows that a publisher writes to itself; the
/// writers of the others are woken.
pub(crate) const INLINE_FAN_OUT: usize = 32;

/// Who an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum To {
    /// Every connection: clients get the plain line, peer hubs the stamped one.
    All,
    /// Peer hubs only.
    Peers,
    /// Clients only.
    Clients,
}

/// One forwarded row.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Who it is for.
    pub(crate) to: To,
    /// The connection it came from, which does not get it back.
    pub(crate) except: Option<Owner>,
    /// The line for clients.
    pub(crate) plain: Bytes,
    /// The line for peer hubs (the same bytes when there is no difference).
    pub(crate) stamped: Bytes,
}

impl Entry {
    /// Bytes this entry keeps alive: its lines and its bookkeeping.
    fn weight(&self) -> usize {
        let stamped = if self.stamped.as_ptr() == self.plain.as_ptr() {
            0
        } else {
            self.stamped.len()
        };
        self.plain.len() + stamped + std::mem::size_of::<Entry>()
    }

    /// The line reader `reader` gets at position `at`, if any.
    fn line_for(&self, reader: Reader, at: u64) -> Option<&Bytes> {
        self.line(reader.id, at >= reader.peer_from)
    }

    /// The line connection `id` gets, a `peer` hub's link or a client, if any.
    pub(crate) fn line(&self, id: Owner, peer: bool) -> Option<&Bytes> {
        if self.except == Some(id) {
            return None;
        }
        match (self.to, peer) {
            (To::All, false) | (To::Clients, false) => Some(&self.plain),
            (To::All, true) | (To::Peers, true) => Some(&self.stamped),
            (To::Peers, false) | (To::Clients, true) => None,
        }
    }
}

/// A connection reading the feed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader {
    /// Its connection number.
    pub(crate) id: Owner,
    /// The position from which it is a peer hub's link (`u64::MAX`: a client).
    pub(crate) peer_from: u64,
}

/// The reader's place dropped off the front of the feed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Lost;

#[derive(Debug, Default)]
struct Ring {
    /// Position of `entries[0]`.
    first: u64,
    entries: VecDeque<Entry>,
    /// Sum of the entries' weights.
    bytes: usize,
}

impl Ring {
    fn head(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn pop_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.weight();
            self.first += 1;
        }
    }

    /// Gives back the memory of a queue that emptied after a burst.
    fn shrink(&mut self) {
        if self.entries.capacity() > 1024 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }
}

/// The shared feed of forwarded rows.
#[derive(Debug)]
pub(crate) struct Feed {
    ring: RwLock<Ring>,
    /// The position after the last entry: only [`Feed::extend`] moves it, and
    /// it is read without the ring's lock.
    end: AtomicU64,
    /// The connections whose writers wait for more (see [`Feed::publish`]).
    waiting: Mutex<Vec<Weak<Outbox>>>,
    max_bytes: AtomicUsize,
}

impl Feed {
    /// A feed that keeps at most `max_bytes` of rows.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Feed {
            ring: RwLock::new(Ring::default()),
            end: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            max_bytes: AtomicUsize::new(max_bytes),
        }
    }

    /// Keeps at most `max_bytes` of rows from now on.
    pub(crate) fn limit(&self, max_bytes: usize) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn read_ring(&self) -> RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_ring(&self) -> RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The position the next entry gets.
    pub(crate) fn head(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Bytes the feed keeps now (see `Entry::weight`).
    pub(crate) fn bytes(&self) -> usize {
        self.read_ring().bytes
    }

    /// The oldest position the feed still has.
    pub(crate) fn start(&self) -> u64 {
        self.read_ring().first
    }

    /// Appends entries (numbered from [`Feed::head`] on), dropping the oldest
    /// ones past the byte budget. Readers learn of them at [`Feed::publish`].
    pub(crate) fn extend(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut ring = self.write_ring();
        for entry in entries {
            ring.bytes += entry.weight();
            ring.entries.push_back(entry);
        }
        self.end.store(ring.head(), Ordering::Release);
        let max = self.max_bytes.load(Ordering::Relaxed);
        while ring.bytes > max && ring.entries.len() > 1 {
            ring.pop_front();
        }
    }

    /// Delivers the entries appended so far to the connections waiting for
    /// them. The first [`INLINE_FAN_OUT`] get their rows written to their
    /// sockets here, one system call each, where waking their writer tasks
    /// would add a thread hand-off to every delivery ([`Outbox::deliver`]);
    /// the writer tasks of the others are woken first, so that the other
    /// core can start on them, and each of those sends in one write whatever
    /// has come by the time it runs: in a storm of rows to thousands of
    /// connections, that is many rows per system call, where writing each
    /// publication to each socket at once would be one.
    pub(crate) fn publish(&self) {
        let waiting = std::mem::take(&mut *self.lock_waiting());
        let waiting: Vec<_> = waiting.iter().filter_map(Weak::upgrade).collect();
        let (inline, woken) = waiting.split_at(waiting.len().min(INLINE_FAN_OUT));
        for outbox in woken {
            outbox.wake_writer();
        }
        let mut buffer = Vec::new();
        for outbox in inline {
            outbox.deliver(&mut buffer);
        }
    }

    /// Connection `outbox` waits for entries: the next [`Feed::publish`]
    /// delivers them.
    pub(crate) fn wait(&self, outbox: Weak<Outbox>) {
        let mut waiting = self.lock_waiting();
        // Connections that ended while waiting go, now and then.
        if waiting.len() >= 64 && waiting.len().is_power_of_two() {
            waiting.retain(|w| w.strong_count() > 0);
        }
        waiting.push(outbox);
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Outbox>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the lines for the reader `reader` says from position `from` up
    /// to `stop` (or the head) to `out`, until about `budget` bytes; returns
    /// the position after the last entry looked at. The reader is asked under
    /// the feed's lock, so that a connection that became a peer's link before
    /// an entry was added reads that entry as a link. Copying costs less than
    /// sharing here: a row's bytes are only read, where a shared reference
    /// count would bounce between the cores of every writer.
    pub(crate) fn read(
        &self,
        from: u64,
        stop: u64,
        reader: impl FnOnce() -> Reader,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Result<u64, Lost> {
        let ring = self.read_ring();
        let reader = reader();
        if from < ring.first {
            return Err(Lost);
        }
        let stop = stop.min(ring.head());
        let mut at = from;
        let end = out.len() + budget;
        let skip = usize::try_from(from - ring.first).unwrap_or(usize::MAX);
        for entry in ring.entries.range(skip.min(ring.entries.len())..) {
            if at >= stop || out.len() >= end {
                break;
            }
            if let Some(line) = entry.line_for(reader, at) {
                out.extend_from_slice(line);
            }
            at += 1;
        }
        Ok(at)
    }

    /// Drops the entries before `position`: every reader has passed them.
    pub(crate) fn trim_below(&self, position: u64) {
        let mut ring = self.write_ring();
        while ring.first < position && !ring.entries.is_empty() {
            ring.pop_front();
        }
        ring.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(to: To, except: Option<u64>, text: &str) -> Entry {
        Entry {
            to,
            except: except.map(Owner),
            plain: Bytes::from(format!("{text}\n")),
            stamped: Bytes::from(format!("{text}+\n")),
        }
    }

    fn text(lines: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(lines)
            .lines()
            .map(str::to_string)
            .collect()
    }

    const CLIENT: Reader = Reader {
        id: Owner(1),
        peer_from: u64::MAX,
    };

    #[test]
    fn each_reader_gets_its_own_form_of_each_row_and_never_its_own() {
        let feed = Feed::new(1 << 20);
        feed.extend([
            entry(To::All, None, "a"),
            entry(To::All, Some(1), "mine"),
            entry(To::Peers, None, "beat"),
            entry(To::Clients, None, "c"),
        ]);
        let mut out = Vec::new();
        assert_eq!(feed.read(0, u64::MAX, || CLIENT, &mut out, 1 << 20), Ok(4));
        assert_eq!(text(&out), ["a", "c"]);
        // A connection that became a peer at position 2.
        let peer = Reader {
            id: Owner(2),
            peer_from: 2,
        };
        let mut out = Vec::new();
        assert_eq!(feed.read(0, u64::MAX, || peer, &mut out, 1 << 20), Ok(4));
        assert_eq!(text(&out), ["a", "mine", "beat+"]);
    }

    #[test]
    fn a_read_stops_at_the_stop_and_the_budget() {
        let feed = Feed::new(1 << 20);
        feed.extend((0..10).map(|n| entry(To::All, None, &n.to_string())));
        let mut out = Vec::new();
        assert_eq!(feed.read(2, 5, || CLIENT, &mut out, 1 << 20), Ok(5));
        assert_eq!(text(&out), ["2", "3", "4"]);
        let mut out = Vec::new();
        assert_eq!(feed.read(5, u64::MAX, || CLIENT, &mut out, 3), Ok(7));
        assert_eq!(text(&out), ["5", "6"]);
    }

    #[test]
    fn past_its_budget_the_oldest_rows_go_and_their_readers_lose_their_place() {
        let one = entry(To::All, None, "x").weight();
        let feed = Feed::new(3 * one);
        feed.extend((0..5).map(|_| entry(To::All, None, "x")));
        assert_eq!(feed.bytes(), 3 * one);
        assert_eq!(feed.head(), 5);
        let mut out = Vec::new();
        assert_eq!(
            feed.read(1, u64::MAX, || CLIENT, &mut out, 1 << 20),
            Err(Lost)
        );
        assert_eq!(feed.read(2, u64::MAX, || CLIENT, &mut out, 1 << 20), Ok(5));
        feed.trim_below(4);
        assert_eq!(feed.bytes(), one);
        assert_eq!(
            feed.read(3, u64::MAX, || CLIENT, &mut out, 1 << 20),
            Err(Lost)
        );
    }
}
