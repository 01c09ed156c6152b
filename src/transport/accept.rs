//! Listening with a long accept queue ([`listen`]), and accepting
//! connections under a cap: a listener's next connection is taken
//! only once a place is free, so that a flood of clients waits in the
//! kernel's accept queue instead of costing memory here (the router and the
//! admin endpoint serve their HTTP connections this way).

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A listening socket on `addr` (an IPv6 one takes IPv4 too), with
/// SO_REUSEADDR as servers set it and the longest accept queue the kernel
/// allows (`net.core.somaxconn`). With the 1,024 that a plain bind gets, a
/// storm of thousands of clients connecting at once overflows the queue,
/// and each connection dropped there waits for a SYN-ACK retry: a second,
/// then two, four, up to half a minute.
pub fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // The kernel caps it at net.core.somaxconn.
    socket.listen(i32::MAX)?;
    Ok(socket.into())
}

/// [`listen`] for the current tokio runtime.
pub fn listen_async(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = listen(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    #[test]
    fn a_burst_larger_than_a_plain_backlog_waits_in_the_accept_queue() {
        // A plain bind's queue holds 1,025; the kernel allows somaxconn
        // (4,096 since Linux 5.4).
        let burst: usize = 1_500;
        let most: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("read net.core.somaxconn")
            .trim()
            .parse()
            .expect("net.core.somaxconn is a number");
        assert!(most >= burst, "net.core.somaxconn is {most}, below {burst}");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        if soft < 4_096 {
            setrlimit(Resource::RLIMIT_NOFILE, 4_096.min(hard), hard).expect("setrlimit");
        }
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).expect("listen");
        let addr = listener.local_addr().expect("address");
        // Nobody accepts: every connection waits in the queue (one that
        // does not fit would wait for SYN retries, and time out here).
        let waiting: Vec<_> = (0..burst)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i} of {burst}: {e}"))
            })
            .collect();
        // And all of them are there to be accepted.
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = std::iter::from_fn(|| listener.accept().ok()).count();
        assert_eq!(accepted, burst);
        drop(waiting);
    }
}
