//! The outgoing side of one accepted connection: a bounded queue of lines, written
//! straight to the socket when nothing is in flight, and by a writer task when
//! the socket cannot take everything at once.
//!
//! Rows are queued under the hub's lock and written when the lock is released
//! (see `state::Locked`), so a burst of rows applied together goes out in one
//! system call per connection, and a single row reaches an idle connection with
//! no task wake-up in between (for a wide fan-out, past the first few
//! connections, the writer tasks take over so that both cores write). Only what the socket does not take goes through the
//! writer task, which also sends the heartbeats. Order is kept because whoever
//! writes, the flush or the writer, takes the queue's front under its lock, and
//! the flush stays away while the writer holds bytes it has not finished writing.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// What a connection's writer sends.
#[derive(Debug)]
pub(crate) enum Out {
    /// One encoded line.
    Line(Bytes),
    /// Many lines at once (the initial dump), counted as one queue slot.
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
    /// Queued behind rows already on their way.
    Behind,
    /// The queue was full: the connection is being cut off.
    Full,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whole queue entries, each counted as one slot of `max_queue`.
    queue: VecDeque<Out>,
    /// The unwritten rest of a partly written batch; goes before `queue`.
    carry: Option<Bytes>,
    /// The writer task holds bytes it has not finished writing.
    writing: bool,
    /// Waiting for a flush already.
    touched: bool,
}

/// The outgoing side of a connection.
#[derive(Debug)]
pub(crate) struct Outbox {
    half: OwnedWriteHalf,
    pending: Mutex<Pending>,
    wake: Notify,
    max_queue: usize,
    cancel: CancellationToken,
}

impl Outbox {
    /// An outbox that cuts the connection off (cancels `cancel`) when more than
    /// `max_queue` entries wait.
    pub(crate) fn new(half: OwnedWriteHalf, max_queue: usize, cancel: CancellationToken) -> Self {
        Outbox {
            half,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            max_queue: max_queue.max(2),
            cancel,
        }
    }

    /// Most entries that may wait.
    pub(crate) fn max_queue(&self) -> usize {
        self.max_queue
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an entry.
    pub(crate) fn push(&self, out: Out) -> Queued {
        let mut pending = self.lock();
        if pending.queue.len() >= self.max_queue {
            return Queued::Full;
        }
        pending.queue.push_back(out);
        if pending.writing || pending.touched {
            Queued::Behind
        } else {
            pending.touched = true;
            Queued::Flush
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
    }

    /// Leaves the queued rows to the writer task.
    pub(crate) fn hand_off(&self) {
        self.wake.notify_one();
    }

    /// The writer task: writes what the flushes left, and a heartbeat every
    /// `heartbeat`, until the connection is cancelled or a write fails.
    pub(crate) async fn run_writer(&self, heartbeat: Duration, heartbeat_line: Bytes) {
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                _ = ticker.tick() => {
                    let mut pending = self.lock();
                    pending.queue.push_back(Out::Line(heartbeat_line.clone()));
                    pending.writing = true;
                }
                () = self.cancel.cancelled() => break,
            }
            if self.drain().await.is_err() {
                break;
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
        && let Some(Out::Line(_)) = pending.queue.front()
        && let Some(Out::Line(line)) = pending.queue.pop_front()
    {
        return Some(line);
    }
    let mut buf = Vec::new();
    while buf.len() < WRITE_BATCH {
        match pending.queue.pop_front() {
            Some(Out::Line(line)) => buf.extend_from_slice(&line),
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
                    pending.queue.push_front(Out::Lines(rest));
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
    if pending.queue.is_empty() && pending.queue.capacity() > 16 {
        pending.queue = VecDeque::new();
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
                    .run_writer(Duration::from_secs(3600), Bytes::from_static(b"hb\n"))
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

    #[tokio::test]
    async fn a_full_queue_is_reported() {
        let (outbox, _peer, _cancel) = pair(2).await;
        // Nobody flushes: the entries stay queued.
        assert_eq!(outbox.push(Out::Line(line(0))), Queued::Flush);
        assert_eq!(outbox.push(Out::Line(line(1))), Queued::Behind);
        assert_eq!(outbox.push(Out::Line(line(2))), Queued::Full);
    }
}
