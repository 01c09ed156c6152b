//! One accepted connection: a reader that turns lines into decisions on the shared
//! state, all the lines that have arrived together at once, and an [`Outbox`]
//! whose writer task sends what the connection is due and heartbeats.

use super::HubConfig;
use super::guard::{Guard, Policy, Verdict, key_name};
use super::metrics::FreeReason;
use super::outbox::{MAX_REPLY_BYTES, Outbox};
use super::state::{Effect, Shared, Sink};
use crate::protocol::framing::{LineError, LineReader};
use crate::protocol::wire::Row;
use crate::registry::Owner;
use crate::transport::{BadRows, End, patience};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The address to report for a peer: IPv4 as `127.0.0.1`, never `::ffff:127.0.0.1`.
pub fn peer_host(addr: &SocketAddr) -> String {
    addr.ip().to_canonical().to_string()
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
    let outbox = Arc::new(Outbox::new(
        write_half,
        id,
        shared.feed(),
        cancel.clone(),
        shared.metrics().sent_bytes(),
    ));
    let challenge = crate::protocol::auth::new_challenge();
    shared.join(id, &host, &challenge, Sink::Socket(outbox.clone()));
    let mut guard = Guard::new(challenge);
    tracing::debug!(%peer, "connected");

    let heartbeat = config.heartbeat;
    let writer = {
        let shared = shared.clone();
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let line = Row::Heartbeat { period_ms: None }.encode();
            outbox.run_writer(heartbeat, line, &*shared).await;
        })
    };
    let mut lines = LineReader::new(read_half, config.max_line);
    let end = read_loop(
        &mut lines, &shared, &outbox, &mut guard, &config, &peer, &cancel,
    )
    .await;
    cancel.cancel();
    let reason = match end {
        End::TimedOut(_) => {
            shared.metrics().heartbeat_expired();
            FreeReason::Timeout
        }
        _ => FreeReason::Disconnect,
    };
    let freed = shared.leave(id, reason);
    match &end {
        End::TooLong(_) => tracing::warn!(%peer, "closing connection: {end}"),
        End::TimedOut(_) => tracing::info!(%peer, freed, "connection timed out: {end}"),
        _ => tracing::debug!(%peer, freed, "disconnected: {end}"),
    }
    let _ = writer.await;
}

/// Most lines applied under one lock.
const BATCH: usize = 256;

/// A liveness deadline met this late means the hub itself was held up.
const STALLED: Duration = Duration::from_millis(100);

/// How long a peer judged after a stall of the hub's gets for what it sent
/// during the stall to arrive.
const STALL_GRACE: Duration = Duration::from_millis(250);

async fn read_loop(
    lines: &mut LineReader,
    shared: &Shared,
    outbox: &Outbox,
    guard: &mut Guard,
    config: &HubConfig,
    peer: &SocketAddr,
    cancel: &CancellationToken,
) -> End {
    let id = outbox.id();
    let mut bad_rows = BadRows::new(peer.to_string());
    let mut proved = false;
    // Until the peer says how often it beats, it may be a Node client on its
    // default: it gets three of those, however short our own heartbeats are.
    let mut allowed = patience(config.timeout, None);
    let deadline = tokio::time::sleep(allowed);
    tokio::pin!(deadline);
    // What the rows of one batch do; kept while full batches follow one
    // another, so that a busy connection does not grow a new one for each,
    // and let go otherwise, so that an idle one holds none.
    let mut effects = Vec::new();
    loop {
        // A peer that writes faster than it reads what it is answered: what
        // it sends waits in the sockets until it has read half of that.
        let held_back = outbox.replies_queued() > MAX_REPLY_BYTES;
        if held_back {
            tracing::debug!(%peer, "not reading the hub's replies; reading from it waits");
        }
        let line = tokio::select! {
            // What has arrived is read first: a busy hub judges a peer by the
            // bytes it sent in time, not by how soon the hub got to them.
            biased;
            line = lines.next_line(), if !held_back => line,
            () = outbox.replies_below(MAX_REPLY_BYTES / 2), if held_back => continue,
            () = &mut deadline => {
                if lines.received() {
                    deadline.as_mut().reset(Instant::now() + allowed);
                    continue;
                }
                // A deadline met late means this hub was not running: what
                // the peer sent meanwhile may still be on its way into the
                // socket. It is judged again after a short grace.
                let late = Instant::now().saturating_duration_since(deadline.deadline());
                if late > STALLED {
                    deadline.as_mut().reset(Instant::now() + STALL_GRACE);
                    continue;
                }
                return End::TimedOut(allowed);
            }
            () = cancel.cancelled() => return End::Stopped,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return End::Closed,
            Err(LineError::TooLong { limit } | LineError::Skipped { limit, .. }) => {
                return End::TooLong(limit);
            }
            Err(LineError::Io(e)) => return End::Failed(e),
        };
        // Any row proves the peer alive, not only heartbeats.
        let heard = Instant::now();
        // This line and every other complete one that arrived with it.
        let mut next = Some(line);
        let mut ended = None;
        let policy = shared.policy();
        while let Some(line) = next.take() {
            if !line.iter().all(u8::is_ascii_whitespace) {
                tracing::trace!(%peer, id = id.0, "row {:?}", String::from_utf8_lossy(&line));
                match Row::decode_keeping(&line) {
                    Ok(Row::Heartbeat {
                        period_ms: Some(ms),
                    }) => allowed = patience(config.timeout, Some(Duration::from_millis(ms))),
                    // Answered in order, after what came before it.
                    Ok(Row::Ping(token)) => effects.push(Effect::Reply(Row::Pong(token).encode())),
                    // One proof per connection: signing costs the hub.
                    // Ahead of the dump: the client takes nothing until then.
                    Ok(Row::Prove(nonce)) if !proved => {
                        proved = true;
                        outbox.push_ahead(prove(config, &nonce).encode());
                    }
                    Ok(row) => effects.extend(decide(guard, row, &policy, peer, shared)),
                    Err(e) => bad_rows.log(&line, &e),
                }
            }
            if effects.len() >= BATCH {
                break;
            }
            match lines.buffered_line() {
                Ok(line) => next = line,
                Err(LineError::TooLong { limit } | LineError::Skipped { limit, .. }) => {
                    ended = Some(End::TooLong(limit));
                }
                Err(LineError::Io(e)) => ended = Some(End::Failed(e)),
            }
        }
        deadline.as_mut().reset(heard + allowed);
        let more = effects.len() >= BATCH && lines.pending() > 0;
        if !effects.is_empty() {
            shared.apply(id, effects.drain(..));
        }
        if !more {
            effects = Vec::new();
        }
        if let Some(end) = ended {
            return end;
        }
    }
}

/// The hub's proof that it holds its key, for a client that asked with `nonce`.
fn prove(config: &HubConfig, nonce: &str) -> Row {
    let refuse = |reason: String| Row::Reject {
        what: "prove".into(),
        id: None,
        reason,
        fingerprint: None,
    };
    match &config.keypair {
        Some(pair) => match crate::protocol::auth::sign_hub_proof(pair, nonce) {
            Ok(signature) => Row::Proof {
                public: pair.public_pem(),
                signature,
            },
            Err(e) => refuse(e.to_string()),
        },
        None => refuse("this hub has no key of its own".into()),
    }
}

/// Lets the guard decide what a row may do under the keys in force, and logs
/// refusals.
fn decide(
    guard: &mut Guard,
    row: Row,
    policy: &Policy,
    peer: &SocketAddr,
    shared: &Shared,
) -> Option<Effect> {
    match guard.check(row, policy) {
        Verdict::Apply(row, writer) => Some(Effect::Apply(row, writer)),
        Verdict::Ignore => None,
        Verdict::Reply(row) => {
            if let Row::Session { fingerprint, .. } = &row {
                tracing::info!(%peer, key = %fingerprint, "authenticated");
            }
            Some(Effect::Reply(row.encode()))
        }
        Verdict::Refuse(refusal) => {
            shared.metrics().rejected(refusal.cause);
            let key = key_name(refusal.fingerprint.as_ref());
            tracing::warn!(
                %peer,
                %key,
                "refused {} {}: {}",
                refusal.what,
                refusal.id.as_deref().unwrap_or("-"),
                refusal.reason
            );
            Some(Effect::Reply(refusal.row().encode()))
        }
    }
}
