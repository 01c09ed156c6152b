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
//! Dumps are taken from the registry in parts as the socket takes them, so a
//! thousand connections joining a hub of a million records do not each hold a
//! copy of its rows.

use super::feed::{Feed, Lost, Reader};
use crate::registry::Owner;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The feed position from which this connection is a peer hub's link.
    peer_from: AtomicU64,
    /// The feed position the writer has read up to.
    cursor: AtomicU64,
    cancel: CancellationToken,
}

impl Outbox {
    /// The outgoing side of connection `id`, reading `feed` from where
    /// [`Outbox::start_at`] says, before its writer runs.
    pub(crate) fn new(
        half: OwnedWriteHalf,
        id: Owner,
        feed: Arc<Feed>,
        cancel: CancellationToken,
    ) -> Self {
        Outbox {
            half,
            id,
            feed,
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            peer_from: AtomicU64::new(u64::MAX),
            cursor: AtomicU64::new(0),
            cancel,
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
        self.lock().push_back((at, out));
        self.wake.notify_one();
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
        &self,
        heartbeat: Duration,
        heartbeat_line: Bytes,
        source: &impl Source,
        sent: &Counter,
    ) {
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut published = self.feed.subscribe();
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
                sent.inc_by(written_len);
                // A burst leaves no large buffer behind on an idle connection.
                if batch.capacity() > 4096 && !self.has_more(&writer) {
                    batch = Vec::new();
                }
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                changed = published.changed() => if changed.is_err() { break },
                _ = ticker.tick() => batch.extend_from_slice(&heartbeat_line),
                () = self.cancel.cancelled() => break,
            }
        }
        self.cancel.cancel();
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
        writer.work.is_some() || writer.cursor < self.feed.head() || !self.lock().is_empty()
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
                    match out {
                        Out::Line(line) | Out::Owned { line, .. } => {
                            batch.extend_from_slice(&line);
                        }
                        Out::Left(_) => {}
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
                .read(self.cursor, stop, outbox.reader(), batch, budget);
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
    use crate::hub::feed::{Entry, To};
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
        let outbox = Arc::new(Outbox::new(write, Owner(1), feed, cancel.clone()));
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
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox
                    .run_writer(
                        Duration::from_secs(3600),
                        Bytes::from_static(b"hb\n"),
                        &Nothing,
                        &Counter::default(),
                    )
                    .await;
            })
        };
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
                feed.extend([Entry {
                    to: To::All,
                    except: None,
                    plain: row.clone(),
                    stamped: row,
                }]);
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
}
