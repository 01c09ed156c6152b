//! How long an HTTP client connection has been silent: every byte read from
//! or written to it counts as activity, so one timeout bounds a request body
//! that stops arriving, a response (or event stream) the client stops
//! reading, and an upgraded tunnel where neither side speaks.
//!
//! Where the server makes its answers itself (the admin endpoint), silence
//! while an answer is being made is the server's, not the client's: there
//! [`Activity::stalled_for`] counts only the time a write has waited for
//! the client to read, and silence only between requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last moved a byte, shared by its reader and writer,
/// and whether one of its requests awaits a backend's answer (then it is
/// not silent: the response timeout bounds that wait).
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    awaiting: AtomicUsize,
    /// Since when (milliseconds after `start`, plus one) a write has waited
    /// for room in the socket; 0 while none waits.
    blocked: AtomicU64,
}

/// An answer underway, until dropped: a request awaiting its backend's
/// answer (the router), or an answer being made (the admin endpoint).
#[derive(Debug)]
pub struct Awaiting(Arc<Activity>);

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.0.awaiting.fetch_sub(1, Ordering::Relaxed);
        // The silence is counted from the end of the wait.
        self.0.touch();
    }
}

impl Activity {
    /// Activity that starts now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            awaiting: AtomicUsize::new(0),
            blocked: AtomicU64::new(0),
        })
    }

    /// Notes an answer underway, until the guard drops.
    pub fn awaiting(self: &Arc<Self>) -> Awaiting {
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        Awaiting(Arc::clone(self))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    /// A write moved bytes: whatever waited is done.
    fn wrote_some(&self) {
        self.touch();
        self.blocked.store(0, Ordering::Relaxed);
    }

    /// A write found the socket full.
    fn block(&self) {
        let now = self.now() + 1;
        let _ = self
            .blocked
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Since when a write has waited for room, if one waits.
    fn blocked_since(&self) -> Option<Instant> {
        match self.blocked.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.start + Duration::from_millis(at - 1)),
        }
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Returns once no byte has moved for `limit`, and no request awaited
    /// an answer meanwhile.
    pub async fn silent_for(&self, limit: Duration) {
        loop {
            let now = Instant::now();
            if self.awaiting.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep_until(now + limit).await;
                continue;
            }
            let due = self.last() + limit;
            if now >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    /// Returns once a write has waited `limit` for the client to read, or,
    /// with no answer being made, no byte has moved for `limit`. An answer
    /// the server is slow to make is not the client's silence.
    pub async fn stalled_for(&self, limit: Duration) {
        loop {
            let now = Instant::now();
            let mut next = now + limit;
            if let Some(blocked) = self.blocked_since() {
                if now >= blocked + limit {
                    return;
                }
                next = next.min(blocked + limit);
            }
            if self.awaiting.load(Ordering::Relaxed) == 0 {
                let due = self.last() + limit;
                if now >= due {
                    return;
                }
                next = next.min(due);
            }
            tokio::time::sleep_until(next).await;
        }
    }
}

/// A stream that records its [`Activity`].
#[derive(Debug)]
pub struct Watched<S> {
    stream: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// `stream`, recording into `activity`.
    pub fn new(stream: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { stream, activity }
    }

    /// Notes what a write did: bytes moved, or a wait for room.
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.wrote_some(),
            Poll::Pending => self.activity.block(),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Polls `write` once more; it must still be waiting for room.
    async fn still_waits<F: Future>(write: Pin<&mut F>, otherwise: &str) {
        tokio::select! {
            _ = write => panic!("{otherwise}"),
            () = tokio::task::yield_now() => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_counted_from_the_last_byte_either_way() {
        let (near, mut far) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut watched = Watched::new(near, Arc::clone(&activity));
        let limit = Duration::from_secs(10);
        // A read, then (6 s later) a write: silence counts from the write.
        tokio::time::advance(Duration::from_secs(6)).await;
        far.write_all(b"y").await.expect("write");
        let mut byte = [0u8; 1];
        watched.read_exact(&mut byte).await.expect("read");
        let read_at = Instant::now();
        tokio::time::advance(Duration::from_secs(6)).await;
        watched.write_all(b"x").await.expect("write");
        activity.silent_for(limit).await;
        assert_eq!(read_at.elapsed(), Duration::from_secs(6) + limit);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_being_made_is_not_a_stall_but_a_write_that_waits_is() {
        let (near, mut far) = tokio::io::duplex(4);
        let activity = Activity::new();
        let mut watched = Watched::new(near, Arc::clone(&activity));
        let limit = Duration::from_secs(10);
        let began = Instant::now();
        let answering = activity.awaiting();
        let stalled = activity.stalled_for(limit);
        tokio::pin!(stalled);
        // The server makes its answer for 30 s: no byte moves, no stall.
        tokio::select! {
            () = &mut stalled => panic!("stalled while the answer was being made"),
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Then it writes more than the client reads: the write waits.
        let write = watched.write_all(b"0123456789");
        tokio::pin!(write);
        still_waits(write.as_mut(), "the write did not wait").await;
        let blocked_at = Instant::now();
        // A client that reads, however slowly, moves the wait on.
        tokio::time::advance(Duration::from_secs(8)).await;
        let mut some = [0u8; 2];
        far.read_exact(&mut some).await.expect("read");
        still_waits(write.as_mut(), "the write finished early").await;
        let moved_at = Instant::now();
        tokio::select! {
            () = &mut stalled => {}
            _ = &mut write => panic!("the write finished"),
            () = tokio::time::sleep(3 * limit) => panic!("a write waited, and no stall"),
        }
        assert!(moved_at > blocked_at);
        assert_eq!(moved_at.elapsed(), limit);
        assert!(began.elapsed() >= Duration::from_secs(48));
        drop(answering);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_but_does_not_read_still_stalls() {
        let (near, mut far) = tokio::io::duplex(4);
        let activity = Activity::new();
        let (mut reader, mut writer) = tokio::io::split(Watched::new(near, Arc::clone(&activity)));
        let limit = Duration::from_secs(10);
        let _answering = activity.awaiting();
        let write = writer.write_all(b"0123456789");
        tokio::pin!(write);
        still_waits(write.as_mut(), "the write did not wait").await;
        let blocked_at = Instant::now();
        // The client sends a byte now and then, and reads nothing.
        tokio::time::advance(Duration::from_secs(6)).await;
        far.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).await.expect("read");
        tokio::select! {
            () = activity.stalled_for(limit) => {}
            _ = &mut write => panic!("the write finished"),
            () = tokio::time::sleep(3 * limit) => panic!("a write waited, and no stall"),
        }
        assert_eq!(blocked_at.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn between_answers_silence_is_a_stall() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let answering = activity.awaiting();
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(answering);
        let ended = Instant::now();
        activity.stalled_for(limit).await;
        assert_eq!(ended.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_awaiting_its_answer_is_not_silence() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let began = Instant::now();
        let waiting = activity.awaiting();
        let silent = activity.silent_for(limit);
        tokio::pin!(silent);
        tokio::select! {
            () = &mut silent => panic!("silent while awaiting an answer"),
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        drop(waiting);
        silent.await;
        assert!(began.elapsed() >= Duration::from_secs(30) + limit);
    }
}
