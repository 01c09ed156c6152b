//! Accepting connections under a cap: a listener's next connection is taken
//! only once a place is free, so that a flood of clients waits in the
//! kernel's accept queue instead of costing memory here (the router and the
//! admin endpoint serve their HTTP connections this way).

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Places for at most `max` connections at once (at least one).
pub fn places(max: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)))
}

/// An HTTP/1 server whose clients have `header_timeout` to send a request's
/// headers, which may take at most `max_headers` bytes (more: 431).
pub fn http1_server(header_timeout: Duration, max_headers: usize) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_headers);
    builder
}

/// How long to wait after a failed accept (out of file descriptors, say)
/// before trying again.
const RETRY: Duration = Duration::from_millis(50);

/// The next connection of `listener` and its place among `places`, once one
/// is free; `None` once `stop` is cancelled (or the places are closed).
/// Meanwhile the ended tasks of `connections` are reaped. A failed accept is
/// logged, naming `what`, and tried again.
pub async fn next_connection(
    listener: &TcpListener,
    places: &Arc<Semaphore>,
    connections: &mut JoinSet<()>,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let place = tokio::select! {
            () = stop.cancelled() => return None,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            place = places.clone().acquire_owned() => place.ok()?,
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => return Some((stream, peer, place)),
            Err(e) => {
                tracing::warn!("{what}: cannot accept: {e}");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
