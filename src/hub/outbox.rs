//! The outgoing side of one accepted connection: a queue of lines bounded in
//! bytes, written straight to the socket when nothing is in flight, and by a
//! writer task when the socket cannot take everything at once.
//!
//! Rows are queued under the hub's lock and written when the lock is released
//! (see `state::Locked`), so a burst of rows applied together goes out in one
//! system call per connection, and a single row reaches an idle connection with
//! no task wake-up in between (for a wide fan-out, past the first few
//! connections, the writer tasks take over so that both cores write). Only what
//! the socket does not take goes through the writer task, which also sends the
//! heartbeats. Order is kept because whoever writes, the flush or the writer,
//! takes the queue's front under its lock, and the flush stays away while the
//! writer holds bytes it has not finished writing.
//!
//! A reader that falls behind does not pile up history: a queued row about a
//! record is replaced by a newer one about the same record. When what waits is
//! still more than the byte budget, the reader *falls behind*: its queued rows
//! about records are dropped and only the ids of records that change are kept;
//! once it has taken everything else, the hub sends it the state of those
//! records as they are then (see `state`). So a reader that reads, however
//! slowly, is never cut off and ends with the hub's records, and one that stops
//! reading costs at most its budget, the size of the registry and a set of ids.

use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// What a connection's writer sends.
#[derive(Debug)]
pub(crate) enum Out {
    /// One encoded line: a reply, a beat, a heartbeat.
    Line(Bytes),
    /// The row of one record (`register` or `free`): a newer one about the
    /// same record replaces it while it waits.
    Record(Arc<str>, Bytes),
    /// Many lines at once (a dump, or a catch-up), counted as one queue slot
    /// and not against the byte budget: it is the size of the registry.
    Lines(Vec<Bytes>),
    /// For one of our peer links only: every record we hold, stamped, which it
    /// sends as its own records when its connection (re)starts. Everything
    /// queued for the link before it is covered by it.
    Snapshot(Vec<Bytes>),
}

/// Largest batch of queued lines written with one system call.
const WRITE_BATCH: usize = 64 * 1024;

/// What happened to a queued line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Queued; the connection must be flushed when the hub's lock is released.
    Flush,
    /// Queued behind rows already on their way (or noted, for a reader that
    /// fell behind).
    Behind,
    /// The queue passed its byte budget with this many bytes: the reader fell
    /// behind and its rows about records were dropped.
    FellBehind(usize),
    /// Behind already: the record was noted, one of this many.
    Noted(usize),
}

#[derive(Debug, Default)]
struct Pending {
    queue: VecDeque<Out>,
    /// The number, counting from the connection's start, of the entry at the
    /// front of `queue`.
    front: u64,
    /// Where each record's waiting row is, by that number.
    at: HashMap<Arc<str>, u64>,
    /// Bytes of the rows and lines waiting (dumps and catch-ups aside).
    bytes: usize,
    /// The unwritten rest of a partly written batch; goes before `queue`.
    carry: Option<Bytes>,
    /// The writer task holds bytes it has not finished writing.
    writing: bool,
    /// Waiting for a flush already.
    touched: bool,
    /// Fallen behind: the records changed since, to send as they are once
    /// everything else is written.
    behind: Option<HashSet<Arc<str>>>,
}

impl Pending {
    /// Queues a row about record `id`, or replaces the one waiting.
    fn push_record(&mut self, id: Arc<str>, line: Bytes) {
        if let Some(&at) = self.at.get(&id)
            && at >= self.front
            && let Some(Out::Record(_, waiting)) = self.queue.get_mut((at - self.front) as usize)
        {
            self.bytes = self.bytes - waiting.len() + line.len();
            *waiting = line;
            return;
        }
        self.bytes += line.len();
        self.at
            .insert(id.clone(), self.front + self.queue.len() as u64);
        self.queue.push_back(Out::Record(id, line));
    }

    /// The front entry, taken off the queue.
    fn pop(&mut self) -> Option<Out> {
        let out = self.queue.pop_front()?;
        match &out {
            Out::Line(line) => self.bytes -= line.len(),
            Out::Record(id, line) => {
                self.bytes -= line.len();
                if self.at.get(id) == Some(&self.front) {
                    self.at.remove(id);
                }
            }
            Out::Lines(_) | Out::Snapshot(_) => {}
        }
        self.front += 1;
        Some(out)
    }

    /// Puts back the unwritten rest of a taken entry of lines.
    fn unpop(&mut self, rest: Vec<Bytes>) {
        self.front -= 1;
        self.queue.push_front(Out::Lines(rest));
    }

    /// Drops every waiting row about a record, keeping their ids.
    fn fall_behind(&mut self) {
        let mut ids = self.behind.take().unwrap_or_default();
        let queue = std::mem::take(&mut self.queue);
        for out in queue {
            match out {
                Out::Record(id, _) => {
                    ids.insert(id);
                }
                other => self.queue.push_back(other),
            }
        }
        self.at.clear();
        self.bytes = self
            .queue
            .iter()
            .map(|out| match out {
                Out::Line(line) => line.len(),
                _ => 0,
            })
            .sum();
        self.behind = Some(ids);
    }
}

/// The outgoing side of a connection.
#[derive(Debug)]
pub(crate) struct Outbox {
    half: OwnedWriteHalf,
    pending: Mutex<Pending>,
    wake: Notify,
    max_bytes: usize,
    cancel: CancellationToken,
}

impl Outbox {
    /// An outbox that lets at most `max_bytes` of rows wait before the reader
    /// falls behind.
    pub(crate) fn new(half: OwnedWriteHalf, max_bytes: usize, cancel: CancellationToken) -> Self {
        Outbox {
            half,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            max_bytes,
            cancel,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an entry.
    pub(crate) fn push(&self, out: Out) -> Queued {
        let mut pending = self.lock();
        match out {
            Out::Record(id, line) => {
                if let Some(behind) = &mut pending.behind {
                    behind.insert(id);
                    return Queued::Noted(behind.len());
                }
                pending.push_record(id, line);
            }
            Out::Line(line) => {
                pending.bytes += line.len();
                pending.queue.push_back(Out::Line(line));
            }
            other => pending.queue.push_back(other),
        }
        if pending.bytes > self.max_bytes && pending.behind.is_none() {
            let bytes = pending.bytes;
            pending.fall_behind();
            return Queued::FellBehind(bytes);
        }
        if pending.writing || pending.touched {
            Queued::Behind
        } else {
            pending.touched = true;
            Queued::Flush
        }
    }

    /// For a reader that fell behind and has taken everything else: the
    /// records changed since, to send as they are now; it is caught up then.
    /// `None` when it is not behind, or still has rows waiting.
    pub(crate) fn take_behind(&self) -> Option<HashSet<Arc<str>>> {
        let mut pending = self.lock();
        if pending.queue.is_empty() && pending.carry.is_none() {
            pending.behind.take()
        } else {
            None
        }
    }

    /// Writes what is queued straight to the socket, as far as it takes it
    /// without waiting; hands the rest to the writer task.
    pub(crate) fn flush(&self) {
        let mut pending = self.lock();
        pending.touched = false;
        if pending.writing {
            return;
        }
        while let Some(batch) = take_batch(&mut pending) {
            match write_now(&self.half, &batch) {
                Ok(n) if n == batch.len() => continue,
                Ok(n) => {
                    pending.carry = Some(batch.slice(n..));
                    pending.writing = true;
                    self.wake.notify_one();
                    return;
                }
                Err(e) => {
                    tracing::debug!("write failed: {e}");
                    self.cancel.cancel();
                    return;
                }
            }
        }
        release_if_empty(&mut pending);
        if pending.behind.is_some() {
            // All written: the writer task has the reader caught up.
            self.wake.notify_one();
        }
    }

    /// Leaves the queued rows to the writer task.
    pub(crate) fn hand_off(&self) {
        self.wake.notify_one();
    }

    /// The writer task: writes what the flushes left, and a heartbeat every
    /// `heartbeat`, until the connection is cancelled or a write fails. When a
    /// reader that fell behind has taken everything, `catch_up` queues what it
    /// missed.
    pub(crate) async fn run_writer(
        &self,
        heartbeat: Duration,
        heartbeat_line: Bytes,
        catch_up: impl Fn(),
    ) {
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                _ = ticker.tick() => {
                    let mut pending = self.lock();
                    pending.bytes += heartbeat_line.len();
                    pending.queue.push_back(Out::Line(heartbeat_line.clone()));
                    pending.writing = true;
                }
                () = self.cancel.cancelled() => break,
            }
            loop {
                if self.drain().await.is_err() {
                    self.cancel.cancel();
                    return;
                }
                let behind = self.lock().behind.is_some();
                if !behind {
                    break;
                }
                catch_up();
                if self.lock().queue.is_empty() {
                    break;
                }
            }
        }
        self.cancel.cancel();
    }

    /// Writes batches until the queue is empty, then leaves writing to flushes.
    async fn drain(&self) -> io::Result<()> {
        loop {
            let batch = {
                let mut pending = self.lock();
                match take_batch(&mut pending) {
                    Some(batch) => {
                        pending.writing = true;
                        pending.touched = false;
                        batch
                    }
                    None => {
                        pending.writing = false;
                        release_if_empty(&mut pending);
                        return Ok(());
                    }
                }
            };
            tokio::select! {
                r = self.write_all(&batch) => r?,
                () = self.cancel.cancelled() => {
                    return Err(io::Error::other("connection cut off"));
                }
            }
        }
    }

    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.half.writable().await?;
            match self.half.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Writes without waiting: how much the socket took (0 when it is full).
fn write_now(half: &OwnedWriteHalf, bytes: &[u8]) -> io::Result<usize> {
    match half.try_write(bytes) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// The next bytes to write: the carried rest, a single queued line as it is, or
/// queued lines joined up to about [`WRITE_BATCH`] bytes.
fn take_batch(pending: &mut Pending) -> Option<Bytes> {
    if let Some(carry) = pending.carry.take() {
        return Some(carry);
    }
    if pending.queue.len() == 1
        && matches!(pending.queue.front(), Some(Out::Line(_) | Out::Record(..)))
        && let Some(Out::Line(line) | Out::Record(_, line)) = pending.pop()
    {
        return Some(line);
    }
    let mut buf = Vec::new();
    while buf.len() < WRITE_BATCH {
        match pending.pop() {
            Some(Out::Line(line) | Out::Record(_, line)) => buf.extend_from_slice(&line),
            Some(Out::Lines(lines) | Out::Snapshot(lines)) => {
                let mut rest = lines.into_iter();
                for line in rest.by_ref() {
                    buf.extend_from_slice(&line);
                    if buf.len() >= WRITE_BATCH {
                        break;
                    }
                }
                let rest: Vec<Bytes> = rest.collect();
                if !rest.is_empty() {
                    pending.unpop(rest);
                }
            }
            None => break,
        }
    }
    (!buf.is_empty()).then(|| Bytes::from(buf))
}

/// An idle connection keeps no queue memory: with thousands of mostly idle
/// connections, a few hundred bytes each add up.
fn release_if_empty(pending: &mut Pending) {
    if pending.queue.is_empty() {
        if pending.queue.capacity() > 16 {
            pending.queue = VecDeque::new();
        }
        if pending.at.capacity() > 16 {
            pending.at = HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// An outbox on one end of a loopback connection, and the other end.
    async fn pair(max_queue: usize) -> (Arc<Outbox>, TcpStream, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_, write) = client.expect("connect").into_split();
        let cancel = CancellationToken::new();
        let outbox = Arc::new(Outbox::new(write, max_queue, cancel.clone()));
        (outbox, accepted.expect("accept").0, cancel)
    }

    fn line(n: usize) -> Bytes {
        Bytes::from(format!("[\"row\",{n},\"{}\"]\n", "x".repeat(200)))
    }

    #[tokio::test]
    async fn rows_arrive_in_order_whoever_writes_them() {
        let (outbox, mut peer, _cancel) = pair(1_000_000).await;
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox
                    .run_writer(
                        Duration::from_secs(3600),
                        Bytes::from_static(b"hb\n"),
                        || {},
                    )
                    .await;
            })
        };
        // Far more than a socket buffer holds, so flushes hand over to the
        // writer task midway, while more rows keep coming.
        let total = 20_000;
        let mut expected = Vec::new();
        for n in 0..total {
            let row = line(n);
            expected.extend_from_slice(&row);
            let out = if n % 100 == 0 {
                Out::Lines(vec![row])
            } else {
                Out::Line(row)
            };
            if outbox.push(out) == Queued::Flush {
                outbox.flush();
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

    fn record(id: &str, n: usize) -> Out {
        Out::Record(Arc::from(id), line(n))
    }

    #[tokio::test]
    async fn a_newer_row_about_a_record_replaces_the_waiting_one() {
        let (outbox, _peer, _cancel) = pair(1 << 20).await;
        // Nobody flushes: the entries stay queued.
        assert_eq!(outbox.push(record("a", 1)), Queued::Flush);
        assert_eq!(outbox.push(record("b", 2)), Queued::Behind);
        assert_eq!(outbox.push(record("a", 3)), Queued::Behind);
        let mut pending = outbox.lock();
        let waiting: Vec<Bytes> = std::iter::from_fn(|| pending.pop())
            .map(|out| match out {
                Out::Record(_, line) => line,
                _ => Bytes::new(),
            })
            .collect();
        assert_eq!(waiting, [line(3), line(2)]);
        assert_eq!(pending.bytes, 0);
        assert!(pending.at.is_empty());
    }

    #[tokio::test]
    async fn past_its_budget_a_reader_falls_behind_and_only_ids_are_kept() {
        let row = line(0).len();
        let (outbox, _peer, _cancel) = pair(3 * row).await;
        outbox.push(Out::Lines(vec![line(0); 100]));
        outbox.push(record("a", 1));
        outbox.push(Out::Line(line(2)));
        outbox.push(record("b", 3));
        assert!(matches!(outbox.push(record("c", 4)), Queued::FellBehind(_)));
        assert_eq!(outbox.push(record("d", 5)), Queued::Noted(4));
        assert_eq!(outbox.take_behind(), None, "not while rows wait");
        {
            let mut pending = outbox.lock();
            // The dump and the reply stay; the records' rows are gone.
            assert!(matches!(pending.pop(), Some(Out::Lines(_))));
            assert!(matches!(pending.pop(), Some(Out::Line(_))));
            assert!(pending.pop().is_none());
            assert_eq!(pending.bytes, 0);
        }
        let mut behind: Vec<String> = outbox
            .take_behind()
            .into_iter()
            .flatten()
            .map(|id| id.to_string())
            .collect();
        behind.sort();
        assert_eq!(behind, ["a", "b", "c", "d"]);
        // Caught up: rows wait again.
        outbox.push(record("e", 6));
        assert!(matches!(outbox.lock().pop(), Some(Out::Record(..))));
    }
}
