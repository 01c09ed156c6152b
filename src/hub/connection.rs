//! One accepted connection: a reader that turns lines into decisions on the shared
//! state, and a writer that drains the connection's bounded queue and sends
//! heartbeats.

use super::HubConfig;
use super::guard::{Guard, Verdict};
use super::state::{Out, Shared};
use crate::framing::{LineError, LineReader};
use crate::registry::Owner;
use crate::wire::{Row, WireError};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Bad rows logged per connection before the rest are only counted.
const LOGGED_BAD_ROWS: u32 = 10;

/// Largest batch of queued lines written with one system call.
const WRITE_BATCH: usize = 64 * 1024;

/// The address to report for a peer: IPv4 as `127.0.0.1`, never `::ffff:127.0.0.1`.
pub fn peer_host(addr: &SocketAddr) -> String {
    addr.ip().to_canonical().to_string()
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    TimedOut(Duration),
    TooLong(usize),
    Failed(std::io::Error),
    Cut,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => write!(f, "closed by peer"),
            End::TimedOut(t) => write!(f, "no heartbeat for {} ms", t.as_millis()),
            End::TooLong(limit) => write!(f, "line longer than {limit} bytes"),
            End::Failed(e) => write!(f, "{e}"),
            End::Cut => write!(f, "closed by hub"),
        }
    }
}

/// Serves one connection until it closes, errs, times out or the hub stops, then
/// frees its records.
pub(crate) async fn serve(
    stream: TcpStream,
    id: Owner,
    shared: Arc<Shared>,
    config: Arc<HubConfig>,
    cancel: CancellationToken,
) {
    let peer = match stream.peer_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!("dropping connection without a peer address: {e}");
            return;
        }
    };
    let host = peer_host(&peer);
    let _ = stream.set_nodelay(true);
    let (read_half, write_half) = stream.into_split();
    let (tx, rx) = mpsc::channel(config.max_queue.max(2));
    let challenge = crate::auth::new_challenge();
    shared.join(id, &host, &challenge, tx, cancel.clone());
    let mut guard = Guard::new(challenge);
    tracing::debug!(%peer, "connected");

    let writer = tokio::spawn(write_loop(write_half, rx, cancel.clone(), config.heartbeat));
    let mut lines = LineReader::new(read_half, config.max_line);
    let end = read_loop(&mut lines, id, &shared, &mut guard, &config, &peer, &cancel).await;
    cancel.cancel();
    let freed = shared.leave(id);
    match &end {
        End::TooLong(_) => tracing::warn!(%peer, "closing connection: {end}"),
        End::TimedOut(_) => tracing::info!(%peer, freed, "connection timed out: {end}"),
        _ => tracing::debug!(%peer, freed, "disconnected: {end}"),
    }
    let _ = writer.await;
}

async fn read_loop(
    lines: &mut LineReader,
    id: Owner,
    shared: &Shared,
    guard: &mut Guard,
    config: &HubConfig,
    peer: &SocketAddr,
    cancel: &CancellationToken,
) -> End {
    let mut bad_rows = 0u32;
    let deadline = tokio::time::sleep(config.timeout);
    tokio::pin!(deadline);
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            () = &mut deadline => return End::TimedOut(config.timeout),
            () = cancel.cancelled() => return End::Cut,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return End::Closed,
            Err(LineError::TooLong { limit }) => return End::TooLong(limit),
            Err(LineError::Io(e)) => return End::Failed(e),
        };
        // Any row proves the peer alive, not only heartbeats.
        deadline.as_mut().reset(Instant::now() + config.timeout);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match Row::decode(&line) {
            Ok(row) => apply(shared, id, guard, row, peer),
            Err(e) => {
                bad_rows += 1;
                log_bad_row(peer, &line, &e, bad_rows);
            }
        }
    }
}

/// Lets the guard decide, then carries the decision out.
fn apply(shared: &Shared, id: Owner, guard: &mut Guard, row: Row, peer: &SocketAddr) {
    match guard.check(row, &shared.authorized()) {
        Verdict::Apply(Row::Register {
            id: rid,
            meta,
            stamp,
        }) => shared.register(id, &rid, meta, stamp),
        Verdict::Apply(Row::Free { id: rid, stamp }) => shared.free(id, &rid, stamp),
        Verdict::Apply(Row::Beat {
            origin,
            v,
            period_ms,
        }) => shared.beat(id, &origin, v, Duration::from_millis(period_ms)),
        Verdict::Apply(Row::Synced) => shared.synced(id),
        Verdict::Apply(_) | Verdict::Ignore => {}
        Verdict::Reply(row) => {
            if let Row::Session { fingerprint, .. } = &row {
                tracing::info!(%peer, key = %fingerprint, "authenticated");
            }
            shared.send_to(id, row.encode());
        }
        Verdict::Refuse(refusal) => {
            let key = refusal
                .fingerprint
                .as_ref()
                .map_or_else(|| "none".to_string(), ToString::to_string);
            tracing::warn!(
                %peer,
                %key,
                "refused {} {}: {}",
                refusal.what,
                refusal.id.as_deref().unwrap_or("-"),
                refusal.reason
            );
            shared.send_to(id, refusal.row().encode());
        }
    }
}

fn log_bad_row(peer: &SocketAddr, line: &[u8], error: &WireError, count: u32) {
    if count <= LOGGED_BAD_ROWS {
        let excerpt = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        tracing::warn!(%peer, "dropped row: {error}: {excerpt:?}");
    }
    if count == LOGGED_BAD_ROWS {
        tracing::warn!(%peer, "further bad rows from this connection are dropped without logging");
    }
}

async fn write_loop(
    half: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    cancel: CancellationToken,
    heartbeat: Duration,
) {
    let heartbeat_line = Row::Heartbeat.encode();
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut out = BatchWriter {
        half,
        cancel: cancel.clone(),
        buf: Vec::new(),
    };
    loop {
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(next) => next,
                None => break,
            },
            _ = ticker.tick() => Out::Line(heartbeat_line.clone()),
            () = cancel.cancelled() => break,
        };
        if out.push(first).await.is_err() {
            break;
        }
        // Take whatever else is already queued into the same write.
        let mut failed = false;
        while out.buf.len() < WRITE_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            if out.push(next).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || out.flush().await.is_err() {
            break;
        }
    }
    cancel.cancel();
}

/// Gathers queued lines into writes of about [`WRITE_BATCH`] bytes.
struct BatchWriter {
    half: OwnedWriteHalf,
    cancel: CancellationToken,
    buf: Vec<u8>,
}

impl BatchWriter {
    async fn push(&mut self, out: Out) -> Result<(), ()> {
        match out {
            Out::Line(line) => self.push_line(&line).await,
            Out::Lines(lines) => {
                for line in &lines {
                    self.push_line(line).await?;
                }
                Ok(())
            }
        }
    }

    async fn push_line(&mut self, line: &Bytes) -> Result<(), ()> {
        self.buf.extend_from_slice(line);
        if self.buf.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the gathered bytes, giving up when the connection is cancelled: a peer
    /// that stopped reading must not hold the writer forever.
    async fn flush(&mut self) -> Result<(), ()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = tokio::select! {
            r = self.half.write_all(&self.buf) => r.map_err(|_| ()),
            () = self.cancel.cancelled() => Err(()),
        };
        // An idle connection keeps no write buffer: with thousands of mostly idle
        // connections, a few kilobytes each add up, and an allocation per wake-up
        // costs far less than the system call it goes with.
        self.buf = Vec::new();
        result
    }
}
