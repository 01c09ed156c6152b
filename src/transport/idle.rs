//! How long an HTTP client connection has been silent: every byte read from
//! or written to it counts as activity, so one timeout bounds a request body
//! that stops arriving, a response (or event stream) the client stops
//! reading, and an upgraded tunnel where neither side speaks.

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
}

/// A request awaiting its backend's answer, until dropped.
#[derive(Debug)]
pub struct Awaiting<'a>(&'a Activity);

impl Drop for Awaiting<'_> {
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
        })
    }

    /// Notes a request awaiting its backend's answer, until the guard drops.
    pub fn awaiting(&self) -> Awaiting<'_> {
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        Awaiting(self)
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
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
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.touch();
        }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
