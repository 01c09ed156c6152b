//! The outgoing side of one accepted connection: its writer task reads the
//! hub's [`Feed`] from its own place on, mixes in what is for this connection
//! alone (replies, the dump, heartbeats) at the place it was queued, and writes
//! it all with as few system calls as the socket allows: each write is one
//! buffer of about [`WRITE_BATCH`] bytes, copied from the shared rows.
//!
//! What waits for a connection is never a copy of the rows: it is a position in
//! the feed and a short queue of its own lines. A reader that falls so far
//! behind that its place drops off the feed is caught up from the registry
//! instead: the latest state of each record that changed, then the feed again.
//! So a reader, however slow, is never cut off and ends with the hub's
//! records, and one that stops reading costs a position and the frees of the
//! records it had (see `changes`).
//!
//! A writer with nothing to send waits on the feed's list, and whoever
//! publishes new rows writes them to its socket straight away
//! ([`Feed::publish`], for the first few dozen connections on the list): one
//! system call per connection, with no task to wake and no hand-off between
//! threads. Only one side writes at a time (see
//! `turn`); what the socket does not take at once, and every connection's own
//! lines, dumps and catch-ups, stay the writer task's.
//!
//! Dumps are taken from the registry in parts as the socket takes them, so a
//! thousand connections joining a hub of a million records do not each hold a
//! copy of its rows.

use super::feed::{Feed, Lost, Reader};
use crate::registry::Owner;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// What is queued for one connection alone.
#[derive(Debug)]
pub(crate) enum Out {
    /// One encoded line: a reply, a beat, a heartbeat.
    Line(Bytes),
    /// Many lines at once.
    Lines(Vec<Bytes>),
    /// For one of our peer links only: every record we hold, stamped, which it
    /// sends as its own records when its connection (re)starts. Everything
    /// queued for the link before it is covered by it.
    Snapshot(Vec<Bytes>),
    /// For the store only: a forwarded row, with the connection that holds
    /// its record (for a register of a record the hub holds).
    Owned {
        /// The connection the record belongs to.
        owner: Option<Owner>,
        /// The row, stamped.
        line: Bytes,
    },
    /// For the store only: connection `0` is gone, and its records with it
    /// (their frees were queued before this).
    Left(Owner),
    /// For the store only: the store dropped this record of ours (its lease
    /// expired, or it was deleted); read its key before writing it again.
    Dropped(String),
    /// For one of our peer links only: connect again, so that both hubs send
    /// each other every record afresh (see `Inner::resync`).
    Reconnect,
    /// Every record that arrived before arrival mark `until`, in arrival
    /// order (`stamped` for a peer hub), taken from the registry as the
    /// socket takes them.
    Dump {
        /// With stamps and owners, as between hubs.
        stamped: bool,
        /// The registry's arrival mark when the dump was queued.
        until: u64,
    },
}

impl Out {
    /// Bytes of lines it holds: replies and corrections, which a peer's
    /// own rows cause. A dump is taken from the registry as the socket
    /// takes it, and holds none.
    fn bytes(&self) -> usize {
        match self {
            Out::Line(line) | Out::Owned { line, .. } => line.len(),
            Out::Lines(lines) | Out::Snapshot(lines) => lines.iter().map(Bytes::len).sum(),
            Out::Left(_) | Out::Dropped(_) | Out::Reconnect | Out::Dump { .. } => 0,
        }
    }
}

/// The most bytes of a connection's own lines (replies, refusals,
/// corrections) that may wait for its socket before the hub stops reading
/// from it (see [`Outbox::replies_below`]): a peer that writes and does not
/// read what it is answered is held back, not buffered for. A batch of rows
/// already read may add its replies on top.
pub(crate) const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// About the most bytes gathered for one write, and so held by a connection
/// whose socket is full (more only by the last row, which is never split).
pub(crate) const WRITE_BATCH: usize = 16 * 1024;

/// Where a writer gets what the feed no longer has, a part of about `budget`
/// bytes at a time.
pub(crate) trait Source {
    /// Part of a dump: see [`Out::Dump`] and `Registry::rows_between`.
    fn dump(
        &self,
        after: u64,
        until: u64,
        stamped: bool,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Option<u64>;

    /// Part of a catch-up for connection `id`: the latest state of the records
    /// that changed at feed positions from `from` up to `until`; the position
    /// to go on from (`None`: done).
    fn catch_up(
        &self,
        id: Owner,
        from: u64,
        until: u64,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Option<u64>;
}

/// A part of the data the writer is in the middle of.
#[derive(Debug)]
enum Work {
    Lines(std::vec::IntoIter<Bytes>),
    Dump {
        after: u64,
        until: u64,
        stamped: bool,
    },
    CatchUp {
        from: u64,
        until: u64,
        /// Rows sent so far.
        rows: usize,
    },
}

/// Who writes to the socket now: one side at a time, so that bytes never
/// interleave. The writer task holds it while it has anything to send; when
/// it has nothing, it waits, and whoever publishes feed rows may take the
/// socket to write them itself ([`Feed::publish`]).
mod turn {
    /// The writer task writes.
    pub(super) const WRITER: u8 = 0;
    /// The writer task waits; a publisher may take the socket.
    pub(super) const WAITING: u8 = 1;
    /// A publisher writes.
    pub(super) const PUBLISHER: u8 = 2;
    /// A publisher left what it could not write to the writer task.
    pub(super) const HANDED_OFF: u8 = 3;
    /// The writer task has ended.
    pub(super) const ENDED: u8 = 4;
}

/// The outgoing side of a connection.
#[derive(Debug)]
pub(crate) struct Outbox {
    half: OwnedWriteHalf,
    id: Owner,
    feed: Arc<Feed>,
    /// Lines for this connection alone, each with the feed position it goes
    /// out at: after every entry before that position.
    queue: Mutex<VecDeque<(u64, Out)>>,
    wake: Notify,
    /// Bytes of the lines in `queue`.
    queued: AtomicUsize,
    /// Lines that go ahead of a dump under way (see [`Outbox::push_ahead`]),
    /// and whether there are any.
    ahead: Mutex<Vec<Bytes>>,
    has_ahead: AtomicBool,
    /// Notified when the writer takes lines from `queue`.
    took: Notify,
    /// The feed position from which this connection is a peer hub's link.
    peer_from: AtomicU64,
    /// The feed position the writer has read up to.
    cursor: AtomicU64,
    cancel: CancellationToken,
    /// Who writes to the socket now (see [`turn`]).
    turn: AtomicU8,
    /// Whether the connection is on the feed's list of waiting ones.
    listed: AtomicBool,
    /// Whether the writer task waits for a publisher to finish.
    wanted: AtomicBool,
    /// What a publisher read for the connection and the socket did not take:
    /// the writer task sends it first.
    unsent: Mutex<Vec<u8>>,
    /// Bytes written, for the hub's metrics.
    sent: Counter,
}

/// How a publisher's delivery to one connection went.
enum Delivered {
    /// Everything that was due is written.
    All,
    /// The writer task has the rest to do: lines of its own, a catch-up, or
    /// bytes the socket did not take.
    Rest,
    /// The connection failed.
    Failed,
}

impl Outbox {
    /// The outgoing side of connection `id`, reading `feed` from where
    /// [`Outbox::start_at`] says, before its writer runs.
    pub(crate) fn new(
        half: OwnedWriteHalf,
        id: Owner,
        feed: Arc<Feed>,
        cancel: CancellationToken,
        sent: Counter,
    ) -> Self {
        Outbox {
            half,
            id,
            feed,
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            queued: AtomicUsize::new(0),
            ahead: Mutex::new(Vec::new()),
            has_ahead: AtomicBool::new(false),
            took: Notify::new(),
            peer_from: AtomicU64::new(u64::MAX),
            cursor: AtomicU64::new(0),
            cancel,
            turn: AtomicU8::new(turn::WRITER),
            listed: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
            unsent: Mutex::new(Vec::new()),
            sent,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(u64, Out)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer starts reading the feed at position `at`.
    pub(crate) fn start_at(&self, at: u64) {
        self.cursor.store(at, Ordering::Relaxed);
    }

    /// Queues `out` to go after every feed entry before position `at`.
    pub(crate) fn push(&self, at: u64, out: Out) {
        self.queued.fetch_add(out.bytes(), Ordering::Relaxed);
        self.lock().push_back((at, out));
        self.wake.notify_one();
    }

    /// Sends `line` ahead of the dump: before it if it has not started,
    /// between two of its parts if it has. For a line that depends on no
    /// record (a hub's proof of its key), which a client waits for before it
    /// takes anything else.
    pub(crate) fn push_ahead(&self, line: Bytes) {
        {
            let mut queue = self.lock();
            let dump = queue
                .iter()
                .position(|(_, out)| matches!(out, Out::Dump { .. }));
            if let Some(i) = dump {
                let at = queue[i].0;
                self.queued.fetch_add(line.len(), Ordering::Relaxed);
                queue.insert(i, (at, Out::Line(line)));
                drop(queue);
                self.wake.notify_one();
                return;
            }
        }
        self.ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        self.has_ahead.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Moves the lines that go ahead into `batch`.
    fn take_ahead(&self, batch: &mut Vec<u8>) {
        // A load first: this runs for every part the writer gathers, and
        // almost never finds a line.
        if self.has_ahead.load(Ordering::Acquire) && self.has_ahead.swap(false, Ordering::AcqRel) {
            let lines = std::mem::take(&mut *self.ahead.lock().unwrap_or_else(|p| p.into_inner()));
            for line in lines {
                batch.extend_from_slice(&line);
            }
        }
    }

    /// The writer took `out` from the queue.
    fn took(&self, out: &Out) {
        self.queued.fetch_sub(out.bytes(), Ordering::Relaxed);
        self.took.notify_waiters();
    }

    /// Returns once at most `max` bytes of this connection's own lines wait
    /// in its queue, or the connection is cancelled.
    pub(crate) async fn replies_below(&self, max: usize) {
        loop {
            let took = self.took.notified();
            tokio::pin!(took);
            took.as_mut().enable();
            if self.queued.load(Ordering::Relaxed) <= max || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = took => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Closes the connection.
    pub(crate) fn close(&self) {
        self.cancel.cancel();
    }

    /// The connection.
    pub(crate) fn id(&self) -> Owner {
        self.id
    }

    /// Bytes of this connection's own lines waiting in its queue.
    pub(crate) fn replies_queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// From feed position `at` on, this connection is a peer hub's link.
    pub(crate) fn become_peer(&self, at: u64) {
        self.peer_from.fetch_min(at, Ordering::Relaxed);
    }

    /// The feed position the writer has read up to.
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    fn reader(&self) -> Reader {
        Reader {
            id: self.id,
            peer_from: self.peer_from.load(Ordering::Relaxed),
        }
    }

    /// The writer task: writes what is due, and a heartbeat every `heartbeat`
    /// when idle, until the connection is cancelled or a write fails.
    pub(crate) async fn run_writer(
        self: &Arc<Self>,
        heartbeat: Duration,
        heartbeat_line: Bytes,
        source: &impl Source,
    ) {
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut writer = Writer {
            cursor: self.cursor(),
            work: None,
            report: CatchUps::default(),
        };
        let mut batch = Vec::new();
        loop {
            writer.fill(self, source, &mut batch);
            self.cursor.store(writer.cursor, Ordering::Relaxed);
            if !batch.is_empty() {
                let written_len = batch.len() as u64;
                let written = tokio::select! {
                    r = self.write_all(&mut batch) => r,
                    () = self.cancel.cancelled() => break,
                };
                if let Err(e) = written {
                    tracing::debug!(conn = self.id.0, "write failed: {e}");
                    break;
                }
                self.sent.inc_by(written_len);
                // A burst leaves no large buffer behind on an idle connection.
                if batch.capacity() > 4096 && !self.has_more(&writer) {
                    batch = Vec::new();
                }
                continue;
            }
            // Nothing to send: wait, and let publishers write new rows.
            self.turn.store(turn::WAITING, Ordering::SeqCst);
            self.list();
            // Rows published before the connection was listed are not the
            // publisher's to deliver. (Lines of its own wake the task.)
            if !(self.cursor() < self.feed.head() && self.take_turn()) {
                tokio::select! {
                    () = self.wake.notified() => {}
                    _ = ticker.tick() => batch.extend_from_slice(&heartbeat_line),
                    () = self.cancel.cancelled() => break,
                }
                if !self.wait_turn().await {
                    break;
                }
            }
            self.resume(&mut writer, &mut batch);
        }
        self.turn.store(turn::ENDED, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// The writer task, its turn taken back, goes on from where publishers
    /// got to, with what they could not write first.
    fn resume(&self, writer: &mut Writer, batch: &mut Vec<u8>) {
        writer.cursor = self.cursor();
        let mut unsent = std::mem::take(&mut *self.lock_unsent());
        if !unsent.is_empty() {
            unsent.extend_from_slice(batch);
            *batch = unsent;
        }
    }

    /// Puts the connection on the feed's list of waiting ones, once.
    fn list(self: &Arc<Self>) {
        if !self.listed.swap(true, Ordering::SeqCst) {
            self.feed.wait(Arc::downgrade(self));
        }
    }

    /// The writer task takes the socket back from waiting; false when a
    /// publisher has it.
    fn take_turn(&self) -> bool {
        self.turn
            .compare_exchange(
                turn::WAITING,
                turn::WRITER,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// The writer task takes the socket back, waiting for a publisher that
    /// has it to finish; false when the connection is cancelled.
    async fn wait_turn(&self) -> bool {
        loop {
            if self.take_turn() {
                return true;
            }
            match self.turn.load(Ordering::SeqCst) {
                turn::HANDED_OFF => {
                    self.turn.store(turn::WRITER, Ordering::SeqCst);
                    return true;
                }
                turn::PUBLISHER => {
                    self.wanted.store(true, Ordering::SeqCst);
                    if self.turn.load(Ordering::SeqCst) == turn::PUBLISHER {
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = self.cancel.cancelled() => return false,
                        }
                    }
                }
                turn::ENDED => return false,
                // Between a publisher's turn and the writer's: try again.
                other => debug_assert_eq!(other, turn::WAITING),
            }
        }
    }

    /// Wakes the writer task to send what the feed has for this connection
    /// (it is no longer on the feed's list).
    pub(crate) fn wake_writer(&self) {
        self.listed.store(false, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// A publisher's delivery: when the writer task waits, writes the feed
    /// rows due to this connection (up to [`WRITE_BATCH`] bytes, gathered in
    /// `buffer`) in one system call, and hands what is left to the writer.
    pub(crate) fn deliver(self: &Arc<Self>, buffer: &mut Vec<u8>) {
        self.listed.store(false, Ordering::SeqCst);
        if self
            .turn
            .compare_exchange(
                turn::WAITING,
                turn::PUBLISHER,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return;
        }
        buffer.clear();
        let delivered = self.write_due(buffer);
        let next = match delivered {
            Delivered::All => turn::WAITING,
            Delivered::Rest => turn::HANDED_OFF,
            Delivered::Failed => {
                self.cancel.cancel();
                turn::HANDED_OFF
            }
        };
        // Only from the publisher's turn: the writer may have ended meanwhile.
        let _ =
            self.turn
                .compare_exchange(turn::PUBLISHER, next, Ordering::SeqCst, Ordering::SeqCst);
        if next == turn::HANDED_OFF {
            self.wanted.store(false, Ordering::SeqCst);
            self.wake.notify_one();
            return;
        }
        if self.wanted.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
        self.list();
        // Rows another publisher published while this one wrote: the writer
        // task sends them.
        if self.cursor() < self.feed.head()
            && self
                .turn
                .compare_exchange(
                    turn::WAITING,
                    turn::HANDED_OFF,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Writes the feed rows due to this connection, from its cursor on.
    fn write_due(&self, buffer: &mut Vec<u8>) -> Delivered {
        let cursor = self.cursor();
        let read = {
            let queue = self.lock();
            if !queue.is_empty() {
                return Delivered::Rest;
            }
            self.feed
                .read(cursor, u64::MAX, || self.reader(), buffer, WRITE_BATCH)
        };
        let Ok(next) = read else {
            // Its place dropped off the feed: the writer catches it up.
            return Delivered::Rest;
        };
        let written = if buffer.is_empty() {
            0
        } else {
            match self.half.try_write(buffer) {
                Ok(0) => return Delivered::Failed,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    tracing::debug!(conn = self.id.0, "write failed: {e}");
                    return Delivered::Failed;
                }
            }
        };
        self.cursor.store(next, Ordering::Relaxed);
        self.sent.inc_by(written as u64);
        if written < buffer.len() {
            self.lock_unsent().extend_from_slice(&buffer[written..]);
            return Delivered::Rest;
        }
        Delivered::All
    }

    fn lock_unsent(&self) -> MutexGuard<'_, Vec<u8>> {
        self.unsent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes all of `batch`, emptying it.
    async fn write_all(&self, batch: &mut Vec<u8>) -> io::Result<()> {
        let mut written = 0;
        while written < batch.len() {
            match self.half.try_write(&batch[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.half.writable().await?,
                Err(e) => return Err(e),
            }
        }
        batch.clear();
        Ok(())
    }

    /// Whether the writer has more to send at once.
    fn has_more(&self, writer: &Writer) -> bool {
        writer.work.is_some()
            || writer.cursor < self.feed.head()
            || self.has_ahead.load(Ordering::Acquire)
            || !self.lock().is_empty()
    }
}

/// The writer task's place.
struct Writer {
    /// Feed position read up to.
    cursor: u64,
    /// What it is in the middle of.
    work: Option<Work>,
    report: CatchUps,
}

/// How often a connection was caught up, told at most once a minute.
#[derive(Default)]
struct CatchUps {
    told: Option<Instant>,
    times: u64,
    rows: u64,
}

impl CatchUps {
    const EVERY: Duration = Duration::from_secs(60);

    fn caught_up(&mut self, id: Owner, rows: usize) {
        self.times += 1;
        self.rows += rows as u64;
        tracing::debug!(conn = id.0, rows, "caught a reader up");
        if self.told.is_none_or(|at| at.elapsed() >= Self::EVERY) {
            tracing::info!(
                conn = id.0,
                times = self.times,
                rows = self.rows,
                "caught a reader up: it fell behind the rows the hub forwards, and \
                 got the latest state of the records that changed instead"
            );
            self.told = Some(Instant::now());
            self.times = 0;
            self.rows = 0;
        }
    }
}

impl Writer {
    /// Gathers about [`WRITE_BATCH`] bytes of what is due into `batch`.
    fn fill(&mut self, outbox: &Outbox, source: &impl Source, batch: &mut Vec<u8>) {
        while batch.len() < WRITE_BATCH {
            outbox.take_ahead(batch);
            if let Some(work) = &mut self.work {
                let done = match work {
                    Work::Lines(lines) => {
                        for line in lines.by_ref() {
                            batch.extend_from_slice(&line);
                            if batch.len() >= WRITE_BATCH {
                                break;
                            }
                        }
                        lines.len() == 0
                    }
                    Work::Dump {
                        after,
                        until,
                        stamped,
                    } => match source.dump(
                        *after,
                        *until,
                        *stamped,
                        batch,
                        WRITE_BATCH - batch.len(),
                    ) {
                        Some(last) => {
                            *after = last;
                            false
                        }
                        None => true,
                    },
                    Work::CatchUp { from, until, rows } => {
                        let before = batch.len();
                        let budget = WRITE_BATCH - batch.len();
                        let next = source.catch_up(outbox.id, *from, *until, batch, budget);
                        *rows += lines_in(&batch[before..]);
                        match next {
                            Some(next) => {
                                *from = next;
                                false
                            }
                            None => {
                                self.report.caught_up(outbox.id, *rows);
                                self.cursor = *until;
                                true
                            }
                        }
                    }
                };
                if done {
                    self.work = None;
                }
                continue;
            }
            let mut queue = outbox.lock();
            if let Some((at, _)) = queue.front()
                && *at <= self.cursor
            {
                if let Some((_, out)) = queue.pop_front() {
                    drop(queue);
                    outbox.took(&out);
                    match out {
                        Out::Line(line) | Out::Owned { line, .. } => {
                            batch.extend_from_slice(&line);
                        }
                        Out::Left(_) | Out::Dropped(_) | Out::Reconnect => {}
                        Out::Lines(lines) | Out::Snapshot(lines) => {
                            self.work = Some(Work::Lines(lines.into_iter()));
                        }
                        Out::Dump { stamped, until } => {
                            self.work = Some(Work::Dump {
                                after: 0,
                                until,
                                stamped,
                            });
                        }
                    }
                }
                continue;
            }
            // Read the feed up to the next line of our own, under the queue's
            // lock: a line queued meanwhile goes after what is read here.
            let stop = queue.front().map_or(u64::MAX, |(at, _)| *at);
            let budget = WRITE_BATCH - batch.len();
            let read = outbox
                .feed
                .read(self.cursor, stop, || outbox.reader(), batch, budget);
            drop(queue);
            match read {
                Ok(next) if next == self.cursor => break,
                Ok(next) => self.cursor = next,
                Err(Lost) => {
                    let until = outbox.feed.head();
                    self.work = Some(Work::CatchUp {
                        from: self.cursor,
                        until,
                        rows: 0,
                    });
                }
            }
        }
    }
}

/// How many lines `bytes` holds.
fn lines_in(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::feed::{Entry, INLINE_FAN_OUT, To};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A source with no registry: dumps and catch-ups are empty.
    struct Nothing;

    impl Source for Nothing {
        fn dump(&self, _: u64, _: u64, _: bool, _: &mut Vec<u8>, _: usize) -> Option<u64> {
            None
        }

        fn catch_up(&self, _: Owner, _: u64, _: u64, _: &mut Vec<u8>, _: usize) -> Option<u64> {
            None
        }
    }

    /// An outbox on one end of a loopback connection, and the other end.
    async fn pair(feed: Arc<Feed>) -> (Arc<Outbox>, TcpStream, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_, write) = client.expect("connect").into_split();
        let cancel = CancellationToken::new();
        let start = feed.head();
        let outbox = Arc::new(Outbox::new(
            write,
            Owner(1),
            feed,
            cancel.clone(),
            Counter::default(),
        ));
        outbox.start_at(start);
        (outbox, accepted.expect("accept").0, cancel)
    }

    fn line(n: usize) -> Bytes {
        Bytes::from(format!("[\"row\",{n},\"{}\"]\n", "x".repeat(200)))
    }

    #[tokio::test]
    async fn feed_rows_and_own_lines_arrive_in_the_order_they_were_queued() {
        let feed = Arc::new(Feed::new(1 << 30));
        let (outbox, mut peer, _cancel) = pair(feed.clone()).await;
        let writer = start_writer(&outbox);
        // Far more than a socket buffer holds, while more rows keep coming.
        let total = 20_000;
        let mut expected = Vec::new();
        for n in 0..total {
            let row = line(n);
            expected.extend_from_slice(&row);
            if n % 7 == 0 {
                let out = if n % 100 == 0 {
                    Out::Lines(vec![row])
                } else {
                    Out::Line(row)
                };
                outbox.push(feed.head(), out);
            } else {
                feed.extend([entry_of(row)]);
                feed.publish();
            }
            if n % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(20), peer.read_exact(&mut got))
            .await
            .expect("every row within 20 s")
            .expect("read");
        assert!(got == expected, "rows arrived out of order or changed");
        writer.abort();
    }

    /// Starts the writer task of `outbox`.
    fn start_writer(outbox: &Arc<Outbox>) -> tokio::task::JoinHandle<()> {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            outbox
                .run_writer(
                    Duration::from_secs(3600),
                    Bytes::from_static(b"hb\n"),
                    &Nothing,
                )
                .await;
        })
    }

    fn entry_of(row: Bytes) -> Entry {
        Entry {
            to: To::All,
            except: None,
            plain: row.clone(),
            stamped: row,
        }
    }

    /// A client that no feed entry comes from.
    const ANY_CLIENT: Reader = Reader {
        id: Owner(u64::MAX),
        peer_from: u64::MAX,
    };

    /// Everything the feed holds for a client, in feed order.
    fn whole_feed(feed: &Feed) -> Vec<u8> {
        let mut all = Vec::new();
        let read = feed.read(0, u64::MAX, || ANY_CLIENT, &mut all, usize::MAX);
        assert_eq!(read, Ok(feed.head()));
        all
    }

    /// Reads `len` bytes slowly, so that the socket fills and publishers
    /// leave what it did not take to the writer task.
    async fn read_slowly(peer: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut chunk = [0u8; 4096];
        while got.len() < len {
            let n = peer.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed after {} of {len} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
            if got.len() % (64 * 1024) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_published_from_two_threads_and_own_lines_from_a_third_reach_a_slow_reader_in_order()
     {
        const ROWS: usize = 10_000;
        const OWN: usize = 2_000;
        let own_line = |k: usize| Bytes::from(format!("[\"own\",{k}]\n"));
        let feed = Arc::new(Feed::new(1 << 30));
        let (outbox, mut peer, _cancel) = pair(feed.clone()).await;
        let writer = start_writer(&outbox);
        let total: usize = (0..2)
            .flat_map(|thread| (0..ROWS).map(move |n| line(thread * 100_000 + n).len()))
            .chain((0..OWN).map(|k| own_line(k).len()))
            .sum();
        let reader = tokio::spawn(async move { read_slowly(&mut peer, total).await });
        // As in the hub: rows are added and lines queued under one lock, and
        // published after it.
        let hub = Arc::new(Mutex::new(()));
        let publishers: Vec<_> = (0..2)
            .map(|thread| {
                let (feed, hub) = (feed.clone(), hub.clone());
                std::thread::spawn(move || {
                    for n in 0..ROWS {
                        let locked = hub.lock().expect("hub lock");
                        feed.extend([entry_of(line(thread * 100_000 + n))]);
                        drop(locked);
                        feed.publish();
                    }
                })
            })
            .collect();
        // Lines of the connection's own, each after every row before the
        // feed's head when it was queued: each wakes the writer, which may
        // then be on the feed's list while publishers deliver.
        let pusher = {
            let (feed, outbox, hub) = (feed.clone(), outbox.clone(), hub.clone());
            std::thread::spawn(move || {
                (0..OWN)
                    .map(|k| {
                        let locked = hub.lock().expect("hub lock");
                        let at = feed.head();
                        outbox.push(at, Out::Line(own_line(k)));
                        drop(locked);
                        std::thread::yield_now();
                        at
                    })
                    .collect::<Vec<u64>>()
            })
        };
        for publisher in publishers {
            publisher.join().expect("publisher");
        }
        let pushed_at = pusher.join().expect("pusher");
        let mut expected = Vec::with_capacity(total);
        let mut own = pushed_at.iter().enumerate().peekable();
        for position in 0..=feed.head() {
            while let Some((k, _)) = own.next_if(|(_, at)| **at <= position) {
                expected.extend_from_slice(&own_line(k));
            }
            if position < feed.head() {
                let read = feed.read(
                    position,
                    position + 1,
                    || ANY_CLIENT,
                    &mut expected,
                    1 << 20,
                );
                assert_eq!(read, Ok(position + 1));
            }
        }
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("every row within 30 s")
            .expect("reader");
        if got != expected {
            let at = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let from = at.saturating_sub(300);
            panic!(
                "rows arrived out of order, twice or cut at byte {at}:\ngot      {}\nexpected {}",
                String::from_utf8_lossy(&got[from..(at + 300).min(got.len())]).replace('x', ""),
                String::from_utf8_lossy(&expected[from..(at + 300).min(expected.len())])
                    .replace('x', "")
            );
        }
        writer.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_that_takes_its_turn_back_goes_on_from_where_publishers_got_to() {
        // Short rows from three threads to a reader that keeps up: the
        // writer goes idle between publications all the time, and each
        // publisher's rows must go out once, whoever writes them.
        const ROWS: usize = 100_000;
        let short = |n: usize| Bytes::from(format!("r{n}\n"));
        let feed = Arc::new(Feed::new(1 << 30));
        let (outbox, mut peer, _cancel) = pair(feed.clone()).await;
        let writer = start_writer(&outbox);
        let total: usize = (0..3)
            .flat_map(|thread| (0..ROWS).map(move |n| short(thread * 10_000_000 + n).len()))
            .sum();
        let reader = tokio::spawn(async move {
            let mut got = Vec::with_capacity(total);
            let mut chunk = vec![0u8; 1 << 16];
            while got.len() < total {
                let n = peer.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed after {} of {total} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let publishers: Vec<_> = (0..3)
            .map(|thread| {
                let feed = feed.clone();
                std::thread::spawn(move || {
                    for n in 0..ROWS {
                        feed.extend([entry_of(short(thread * 10_000_000 + n))]);
                        feed.publish();
                        if n % 3 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.join().expect("publisher");
        }
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("every row within 30 s")
            .expect("reader");
        assert!(
            got == whole_feed(&feed),
            "rows arrived out of order, twice or cut"
        );
        writer.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publisher_writes_to_some_connections_and_wakes_the_rest_and_each_gets_every_row() {
        let feed = Arc::new(Feed::new(1 << 30));
        let mut pairs = Vec::new();
        for _ in 0..INLINE_FAN_OUT + 8 {
            let (outbox, peer, _cancel) = pair(feed.clone()).await;
            let writer = start_writer(&outbox);
            pairs.push((outbox, peer, writer));
        }
        let publisher = {
            let feed = feed.clone();
            tokio::spawn(async move {
                for n in 0..2_000 {
                    feed.extend([entry_of(line(n))]);
                    feed.publish();
                    if n % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        publisher.await.expect("publisher");
        let expected = whole_feed(&feed);
        for (_, mut peer, writer) in pairs {
            let got = tokio::time::timeout(
                Duration::from_secs(30),
                read_slowly(&mut peer, expected.len()),
            )
            .await
            .expect("every row within 30 s");
            assert!(got == expected, "rows arrived out of order, twice or cut");
            writer.abort();
        }
    }
}
