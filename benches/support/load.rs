//! Load generation over the raw protocol: a hub is "any hub" that speaks seaport's
//! lines over TCP, so the same bytes go to ours and to Node's.
//!
//! Rows are serialised before the clock starts, and connections are opened and
//! synced before it starts too: the figures time the hub, not the generator.
//! Counting what a hub forwards needs no JSON parsing: every row is one line, and
//! a forwarded `register` line starts with `["register",` from both hubs.

use super::{Res, wrap};
use memchr::memchr;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How many connections are being opened at once (keeps the hub's accept backlog
/// from overflowing, which would add SYN retransmission seconds).
const CONNECT_CONCURRENCY: usize = 128;

/// Longest wait for one connection to open and receive its dump.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A record id: 32 upper-case hex digits like our client's, unique within the
/// benchmark run (a new `tag` per measurement).
pub fn record_id(tag: u32, conn: u32, rec: u32) -> String {
    format!("{tag:08X}{conn:08X}{rec:016X}")
}

/// A fresh tag for [`record_id`].
pub fn next_tag() -> u32 {
    static TAG: AtomicU32 = AtomicU32::new(1);
    TAG.fetch_add(1, Ordering::Relaxed)
}

/// A complete `register` line. It carries `host` and `id` itself, so neither hub
/// has to add anything (the Node hub would not), and a meta object (the Node hub
/// crashes on a `register` without one).
pub fn register_row(id: &str, port: u16) -> String {
    format!(
        "[\"register\",\"{id}\",{{\"role\":\"bench\",\"version\":\"1.0.0\",\"host\":\"127.0.0.1\",\"port\":{port},\"id\":\"{id}\"}}]\n"
    )
}

/// A port number for record `n` (any valid port: nothing listens on it).
pub fn record_port(n: usize) -> u16 {
    10_000 + (n % 50_000) as u16
}

/// Splits off the complete lines at the front of `buf` from `*pos`, calling `f` on
/// each (without its newline); returns `true` if `f` asked to stop.
pub fn each_line(buf: &[u8], pos: &mut usize, mut f: impl FnMut(&[u8]) -> bool) -> bool {
    while let Some(i) = memchr(b'\n', &buf[*pos..]) {
        let line = &buf[*pos..*pos + i];
        *pos += i + 1;
        if f(line) {
            return true;
        }
    }
    false
}

/// Reads until the hub's `["synced"]` (after `helo`, our hub's `challenge` and the
/// dump); returns the bytes read after it.
pub async fn until_synced(stream: &mut TcpStream) -> Res<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut pos = 0;
    loop {
        if each_line(&buf, &mut pos, |l| l == b"[\"synced\"]") {
            return Ok(buf.split_off(pos));
        }
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(wrap("read the dump"))?
            == 0
        {
            return Err("the hub closed the connection before synced".into());
        }
    }
}

/// Connects and reads the dump: a client ready to be timed.
pub async fn connect_synced(addr: SocketAddr) -> Res<TcpStream> {
    let fut = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(wrap(format!("connect {addr}")))?;
        let _ = stream.set_nodelay(true);
        until_synced(&mut stream).await?;
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| format!("connect to {addr} and read its dump: over {CONNECT_TIMEOUT:?}"))?
}

/// The blocking version of [`connect_synced`], for the watcher and sender threads
/// of the latency scenario; returns the bytes read after `synced`.
pub fn connect_synced_blocking(addr: SocketAddr) -> Res<(std::net::TcpStream, Vec<u8>)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(wrap(format!("connect {addr}")))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(wrap("set a timeout"))?;
    let mut buf = Vec::new();
    let mut pos = 0;
    let mut chunk = [0u8; 4096];
    loop {
        if each_line(&buf, &mut pos, |l| l == b"[\"synced\"]") {
            stream
                .set_read_timeout(None)
                .map_err(wrap("clear a timeout"))?;
            return Ok((stream, buf.split_off(pos)));
        }
        let n = stream.read(&mut chunk).map_err(wrap("read the dump"))?;
        if n == 0 {
            return Err("the hub closed the connection before synced".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads and discards everything until the peer closes or `stop` fires: a client
/// that keeps up with what the hub sends it.
pub async fn drain(mut half: OwnedReadHalf, buf_size: usize, stop: CancellationToken) {
    let mut buf = vec![0u8; buf_size];
    loop {
        tokio::select! {
            r = half.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            () = stop.cancelled() => return,
        }
    }
}

/// Many synced connections to one hub.
///
/// With `drain`, each connection reads and discards what the hub forwards (a
/// client keeping up). Without, nothing reads: the kernel buffers what the hub
/// sends, as if the clients were on other machines and cost this one nothing.
pub struct Fleet {
    /// The write halves; dropping one sends FIN (tokio shuts the write side down).
    pub writers: Vec<OwnedWriteHalf>,
    readers: Vec<OwnedReadHalf>,
    stop: CancellationToken,
    drains: JoinSet<()>,
}

impl Fleet {
    /// Opens `n` connections to `addr`, each synced, at most
    /// [`CONNECT_CONCURRENCY`] at a time.
    pub async fn connect(addr: SocketAddr, n: usize, drain_buf: Option<usize>) -> Res<Fleet> {
        let gate = std::sync::Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let mut opening = JoinSet::new();
        for _ in 0..n {
            let gate = gate.clone();
            opening.spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(wrap("semaphore"))?;
                connect_synced(addr).await
            });
        }
        let mut fleet = Fleet {
            writers: Vec::with_capacity(n),
            readers: Vec::new(),
            stop: CancellationToken::new(),
            drains: JoinSet::new(),
        };
        while let Some(opened) = opening.join_next().await {
            let stream = opened.map_err(wrap("connect task"))??;
            fleet.add(stream, drain_buf);
        }
        Ok(fleet)
    }

    /// Adds one synced connection.
    pub fn add(&mut self, stream: TcpStream, drain_buf: Option<usize>) {
        let (read, write) = stream.into_split();
        match drain_buf {
            Some(size) => {
                self.drains.spawn(drain(read, size, self.stop.clone()));
            }
            None => self.readers.push(read),
        }
        self.writers.push(write);
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.writers.len()
    }

    /// Closes every connection: FIN on each, in a tight loop.
    pub fn close(mut self) {
        self.writers.clear();
        self.stop.cancel();
        self.readers.clear();
        self.drains.abort_all();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a [`Watcher`] has seen since it synced.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// `register` rows.
    pub registers: usize,
    /// `free` rows.
    pub frees: usize,
}

/// A synced connection that counts the `register` and `free` rows a hub forwards,
/// with the time of the read that brought each new count.
pub struct Watcher {
    counts: watch::Receiver<(Counts, Instant)>,
    stop: CancellationToken,
}

impl Watcher {
    /// Connects, reads the dump, and starts counting.
    pub async fn connect(addr: SocketAddr) -> Res<Watcher> {
        let mut stream = connect_synced(addr).await?;
        let (tx, counts) = watch::channel((Counts::default(), Instant::now()));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
            loop {
                let read = tokio::select! {
                    r = stream.read_buf(&mut buf) => r,
                    () = stopped.cancelled() => return,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let mut pos = 0;
                each_line(&buf, &mut pos, |line| {
                    if line.starts_with(b"[\"register\",") {
                        counts.registers += 1;
                    } else if line.starts_with(b"[\"free\",") {
                        counts.frees += 1;
                    }
                    false
                });
                buf.drain(..pos);
                tx.send_replace((counts, at));
            }
        });
        Ok(Watcher { counts, stop })
    }

    /// Waits until `done(counts)` holds; returns when the read that made it hold
    /// arrived, or the counts so far if `deadline` passes first.
    pub async fn wait_for(
        &mut self,
        done: impl Fn(&Counts) -> bool,
        deadline: Instant,
    ) -> Result<Instant, Counts> {
        loop {
            let (counts, at) = *self.counts.borrow_and_update();
            if done(&counts) {
                return Ok(at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.counts.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.counts.borrow().0),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends each connection its pre-serialised bytes at once when `start` fires;
/// gives each write half back when its bytes are written (dropping it would close
/// the connection and free its records).
pub fn arm_writers(
    writers: Vec<(OwnedWriteHalf, Vec<u8>)>,
    start: &CancellationToken,
) -> JoinSet<Res<OwnedWriteHalf>> {
    let mut set = JoinSet::new();
    for (mut half, bytes) in writers {
        let start = start.clone();
        set.spawn(async move {
            start.cancelled().await;
            half.write_all(&bytes).await.map_err(wrap("send rows"))?;
            Ok(half)
        });
    }
    set
}
