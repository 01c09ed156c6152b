//! Our stdout and stderr as the long-running commands use them: written by a
//! thread of their own, so that a reader that stops (a paused terminal, a
//! `| less`, a journal under load) never blocks the async runtime.
//!
//! A line is queued whole, and written whole, so lines from different sources
//! never interleave. What waits to be written is bounded in bytes
//! ([`MAX_QUEUED`]); a line that does not fit is dropped and counted, and once
//! the stream takes lines again it gets one saying how many were lost.
//! [`flush`] waits, for a bounded time, until what was queued is written: the
//! last lines before the process exits.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Bytes queued for one stream at most.
pub const MAX_QUEUED: usize = 1024 * 1024;

/// Lines queued for one stream at most (each bounded by [`MAX_QUEUED`] too).
const MAX_LINES: usize = 16 * 1024;

/// Which of our streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Our stdout.
    Stdout,
    /// Our stderr.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`.
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The stream, locked for as long as the writer is kept.
    fn lock(self) -> Box<dyn Write> {
        match self {
            Stream::Stdout => Box::new(std::io::stdout().lock()),
            Stream::Stderr => Box::new(std::io::stderr().lock()),
        }
    }
}

/// What the writer thread and the writers share.
#[derive(Debug, Default)]
struct Counts {
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    /// Lines dropped since the last notice.
    dropped: AtomicU64,
}

/// One stream's queue and its writer thread.
#[derive(Debug)]
struct Console {
    lines: SyncSender<Vec<u8>>,
    counts: Arc<Counts>,
}

static STDOUT: OnceLock<Console> = OnceLock::new();
static STDERR: OnceLock<Console> = OnceLock::new();

fn console(stream: Stream) -> &'static Console {
    match stream {
        Stream::Stdout => STDOUT.get_or_init(|| Console::start(stream)),
        Stream::Stderr => STDERR.get_or_init(|| Console::start(stream)),
    }
}

impl Console {
    fn start(stream: Stream) -> Console {
        let (lines, rx) = sync_channel(MAX_LINES);
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let name = format!("seaport-{}", stream.name());
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || write_out(stream, &rx, &shared));
        if let Err(e) = spawned {
            // Without its thread the queue fills and every line is dropped
            // and counted: output is lost, the process goes on.
            eprintln!("seaport: cannot start the {name} writer: {e}");
        }
        Console { lines, counts }
    }

    fn queue(&self, line: Vec<u8>) {
        let len = line.len();
        let queued = self.counts.queued.fetch_add(len, Ordering::AcqRel);
        if queued + len > MAX_QUEUED {
            self.drop_one(len);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(line)
        {
            self.drop_one(len);
        }
    }

    fn drop_one(&self, len: usize) {
        self.counts.queued.fetch_sub(len, Ordering::AcqRel);
        self.counts.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The writer thread: writes each line, and after a run of them, flushes and
/// says how many were dropped meanwhile.
fn write_out(stream: Stream, rx: &Receiver<Vec<u8>>, counts: &Counts) {
    while let Ok(first) = rx.recv() {
        let mut out = stream.lock();
        let mut written = 0;
        // A closed stream (a pipe to `head`) loses the lines, nothing more.
        for line in std::iter::once(first).chain(rx.try_iter()) {
            let _ = out.write_all(&line);
            written += line.len();
        }
        let dropped = counts.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let s = if dropped == 1 { "" } else { "s" };
            let _ = writeln!(
                out,
                "seaport: {dropped} line{s} of output dropped: {} was not read fast enough",
                stream.name()
            );
        }
        let _ = out.flush();
        counts.queued.fetch_sub(written, Ordering::AcqRel);
    }
}

/// Queues `line` (which should end in a newline) for `stream`; never blocks.
pub fn line(stream: Stream, line: Vec<u8>) {
    console(stream).queue(line);
}

/// Waits until the lines queued so far are written, or `within` has passed.
pub fn flush(within: Duration) {
    let end = Instant::now() + within;
    for console in [&STDOUT, &STDERR].into_iter().filter_map(OnceLock::get) {
        while console.counts.queued.load(Ordering::Acquire) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A writer for `tracing`'s log lines: each event, written in one call, is
/// queued as one line of [`Stream::Stderr`].
#[derive(Debug, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        line(Stream::Stderr, buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (lines, rx) = sync_channel(MAX_LINES);
        let console = Console {
            lines,
            counts: Arc::new(Counts::default()),
        };
        // No thread writes: the queue fills to its byte bound, then drops.
        let line = vec![b'x'; 1000];
        for _ in 0..2000 {
            console.queue(line.clone());
        }
        let kept = MAX_QUEUED / 1000;
        assert_eq!(rx.try_iter().count(), kept);
        assert_eq!(
            console.counts.dropped.load(Ordering::Relaxed),
            (2000 - kept) as u64
        );
        assert_eq!(console.counts.queued.load(Ordering::Relaxed), kept * 1000);
    }
}
