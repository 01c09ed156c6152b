//! The client's background task: connect, exchange rows, keep the connection alive,
//! and on loss fail over round-robin to every hub it knows.
//!
//! Records learned from a lost hub are kept (marked stale) while the client
//! reconnects, so a blip does not empty every query; the next hub's dump confirms
//! them, and whatever it does not confirm is freed at its `synced`. If no hub
//! answers within the timeout, they are all freed.

use super::{Event, OWN, REMOTE, Shared};
use crate::protocol::auth::{SessionKey, sign_challenge};
use crate::protocol::framing::{LineError, LineReader};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::wire::{Row, WireError};
use crate::registry::Registered;
use crate::registry::pattern::Pattern;
use bytes::Bytes;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Longest wait for a TCP connection to a hub.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a session ended.
#[derive(Debug)]
enum End {
    Stopped,
    Closed,
    TimedOut,
    Failed(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Stopped => f.write_str("client closed"),
            End::Closed => f.write_str("closed by the hub"),
            End::TimedOut => f.write_str("no heartbeat from the hub"),
            End::Failed(why) => f.write_str(why),
        }
    }
}

/// Runs until `stop` is cancelled.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut outbox: mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
) {
    let mut turn = 0usize;
    let mut lost_at: Option<Instant> = None;
    loop {
        if let Some(at) = lost_at
            && at.elapsed() >= shared.config.timeout
        {
            forget_remote(&shared);
            lost_at = None;
        }
        let hubs = candidates(&shared);
        let hub = hubs[turn % hubs.len()].clone();
        turn = turn.wrapping_add(1);
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((hub.host.as_str(), hub.port)),
        );
        let stream = tokio::select! {
            r = connect => r,
            () = stop.cancelled() => return,
        };
        match stream {
            Ok(Ok(stream)) => {
                tracing::debug!(%hub, "connected");
                shared.emit(Event::Connect(hub.clone()));
                shared.hear(super::Heard::Up);
                let end = session(stream, &shared, &mut outbox, &stop).await;
                let was_synced = shared.status.borrow().synced;
                shared.status.send_modify(|s| s.synced = false);
                if matches!(end, End::Stopped) {
                    return;
                }
                tracing::info!(%hub, "lost hub connection: {end}");
                shared.emit(Event::Disconnect(hub.clone()));
                shared.hear(super::Heard::Down);
                mark_stale(&shared);
                // A session that synced confirmed what we know: the clock for
                // dropping learned records starts again from this loss.
                if was_synced {
                    lost_at = Some(Instant::now());
                } else {
                    lost_at.get_or_insert_with(Instant::now);
                }
                // Try the next hub at once; only failed attempts wait.
                continue;
            }
            Ok(Err(e)) => tracing::debug!(%hub, "cannot connect: {e}"),
            Err(_) => tracing::debug!(%hub, "cannot connect: timed out"),
        }
        tokio::select! {
            () = tokio::time::sleep(shared.config.reconnect_delay) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The hubs to try: the given ones, then every `seaport` record the client knows.
fn candidates(shared: &Shared) -> Vec<HubAddr> {
    let state = shared.lock();
    let mut hubs = state.hubs.clone();
    if !shared.config.learn_hubs {
        return hubs;
    }
    for record in state.registry.query(&Pattern::all_of_role("seaport")) {
        if let (Some(host), Some(port)) = (record.host(), record.port()) {
            let hub = HubAddr::new(host, port);
            if !hubs.contains(&hub) {
                hubs.push(hub);
            }
        }
    }
    hubs
}

/// One connection's progress: whether our records went out, and the signed-mode
/// session if the hub granted one.
#[derive(Debug)]
struct Link {
    /// How long the hub may stay silent: our timeout, or longer for a hub that
    /// sends heartbeats less often than that allows.
    timeout: Duration,
    dumped: bool,
    awaiting_session: bool,
    session: Option<SessionKey>,
    seq: u64,
}

impl Link {
    fn new(timeout: Duration) -> Self {
        Link {
            timeout,
            dumped: false,
            awaiting_session: false,
            session: None,
            seq: 0,
        }
    }

    /// A row as it must travel: signed under the session, if there is one.
    fn outgoing(&mut self, row: &[u8]) -> Bytes {
        match &self.session {
            Some(key) => {
                self.seq += 1;
                key.sign_row(self.seq, row)
            }
            None => Bytes::copy_from_slice(row),
        }
    }
}

/// What a row from the hub asks of the session.
enum Action {
    None,
    /// Send every own record, then `synced`.
    Dump,
    /// Send this row (our answer to a challenge).
    Send(Bytes),
}

async fn session(
    stream: TcpStream,
    shared: &Shared,
    outbox: &mut mpsc::UnboundedReceiver<Bytes>,
    stop: &CancellationToken,
) -> End {
    let _ = stream.set_nodelay(true);
    let (read_half, out) = stream.into_split();
    let mut lines = LineReader::new(read_half, shared.config.max_line);
    // Rows queued while disconnected are covered by the dump of own records.
    while outbox.try_recv().is_ok() {}
    let mut link = Link::new(shared.config.timeout);
    let heartbeat = shared.config.heartbeat;
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(shared.config.timeout);
    tokio::pin!(deadline);
    loop {
        let pending: Option<Bytes> = tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(line)) => line,
                    Ok(None) => return End::Closed,
                    Err(LineError::TooLong { limit }) => {
                        return End::Failed(format!("hub sent a line longer than {limit} bytes"));
                    }
                    Err(LineError::Io(e)) => return End::Failed(e.to_string()),
                };
                deadline.as_mut().reset(Instant::now() + link.timeout);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let action = match Row::decode(&line) {
                    Ok(row) => apply(shared, row, &mut link),
                    Err(e) => {
                        log_bad_row(&line, &e);
                        Action::None
                    }
                };
                match action {
                    Action::None => None,
                    Action::Send(row) => Some(row),
                    Action::Dump => {
                        link.dumped = true;
                        let mut dump = Vec::new();
                        for row in own_rows(shared) {
                            dump.extend_from_slice(&link.outgoing(&row));
                        }
                        dump.extend_from_slice(&Row::Synced.encode());
                        Some(Bytes::from(dump))
                    }
                }
            }
            row = outbox.recv() => {
                let Some(row) = row else { return End::Stopped };
                link.dumped.then(|| link.outgoing(&row))
            }
            _ = ticker.tick() => Some(Row::Heartbeat.encode()),
            () = &mut deadline => return End::TimedOut,
            () = stop.cancelled() => return End::Stopped,
        };
        let Some(mut bytes) = pending else { continue };
        // A hub that stops reading is as dead as one that stops sending: a write
        // waits at most the timeout. Only a full socket that drains again shows
        // the hub reading (the kernel takes anything else), and restarts it.
        while !bytes.is_empty() {
            match out.try_write(&bytes) {
                Ok(n) => {
                    let _ = bytes.split_to(n);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return End::Failed(e.to_string()),
            }
            tokio::select! {
                ready = out.writable() => match ready {
                    Ok(()) => deadline.as_mut().reset(Instant::now() + link.timeout),
                    Err(e) => return End::Failed(e.to_string()),
                },
                () = &mut deadline => return End::TimedOut,
                () = stop.cancelled() => return End::Stopped,
            }
        }
    }
}

/// Applies one row from the hub and says what the session must do next.
///
/// Without a key, own records go out at `helo`. With a key they wait: for the
/// session a `challenge` leads to (then signed), for `synced` when the hub sent no
/// challenge (a Node hub; then plain), or for the refusal of the key (then plain,
/// so that each record's refusal reaches its owner).
fn apply(shared: &Shared, row: Row, link: &mut Link) -> Action {
    let keypair = shared.config.keypair.as_deref();
    let dump_unless_done = |link: &Link| {
        if link.dumped {
            Action::None
        } else {
            Action::Dump
        }
    };
    match row {
        Row::Helo {
            addr,
            hub,
            heartbeat_ms,
        } => {
            link.timeout = silence_allowed(shared.config.timeout, hub.as_deref(), heartbeat_ms);
            shared.lock().hub_id = hub;
            learn_host(shared, &addr);
            match keypair {
                None => dump_unless_done(link),
                Some(_) => Action::None,
            }
        }
        Row::Challenge(challenge) => {
            let Some(pair) = keypair else {
                return Action::None;
            };
            match sign_challenge(pair, &challenge) {
                Ok(signature) => {
                    link.awaiting_session = true;
                    Action::Send(
                        Row::Auth {
                            public: pair.public_pem(),
                            signature,
                        }
                        .encode(),
                    )
                }
                Err(e) => {
                    tracing::error!("{e}");
                    dump_unless_done(link)
                }
            }
        }
        Row::Session {
            sealed,
            fingerprint,
        } => {
            let Some(pair) = keypair else {
                return Action::None;
            };
            link.awaiting_session = false;
            match SessionKey::open(pair, &sealed) {
                Ok(key) => {
                    tracing::info!("authenticated to the hub as {fingerprint}");
                    link.session = Some(key);
                }
                Err(e) => tracing::error!("hub sent a session key we cannot use: {e}"),
            }
            dump_unless_done(link)
        }
        Row::Reject {
            what,
            id,
            reason,
            fingerprint,
        } => {
            reject(shared, &what, id, &reason, fingerprint.as_deref());
            if what == "auth" {
                link.awaiting_session = false;
                dump_unless_done(link)
            } else {
                Action::None
            }
        }
        Row::Register { id, meta, stamp } => {
            if passes_on(shared, stamp.as_ref()) {
                shared.hear(super::Heard::Row(Row::Register {
                    id: id.clone(),
                    meta: meta.clone(),
                    stamp: stamp.clone(),
                }));
            }
            let mut state = shared.lock();
            if state.registry.owner(&id) == Some(OWN) {
                // Our own record relayed back: ours is authoritative.
                return Action::None;
            }
            state.stale.remove(&id);
            // A hub that keeps versions sends its first dump without them: keep
            // the version already known rather than forget it.
            let stamp = match stamp {
                None if state.hub_id.is_some() => state.registry.stamp(&id).cloned(),
                stamp => stamp,
            };
            let outcome = state.registry.register_stamped(&id, meta, REMOTE, stamp);
            let record = match outcome {
                Registered::Added | Registered::Updated => state.registry.get(&id),
                Registered::Unchanged => None,
            };
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Register(record));
                shared.changed.notify_waiters();
            }
            Action::None
        }
        Row::Free { id, stamp } => {
            if passes_on(shared, stamp.as_ref()) {
                shared.hear(super::Heard::Row(Row::Free {
                    id: id.clone(),
                    stamp,
                }));
            }
            let mut state = shared.lock();
            state.stale.remove(&id);
            state.auto_host.remove(&id);
            let record = state.registry.free(&id);
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Free(record));
            }
            Action::None
        }
        Row::Synced => {
            let stale: Vec<String> = shared.lock().stale.drain().collect();
            free_remote(shared, stale);
            shared.status.send_modify(|s| s.synced = true);
            shared.emit(Event::Synced);
            if link.awaiting_session {
                Action::None
            } else {
                dump_unless_done(link)
            }
        }
        row @ Row::Beat { .. } => {
            shared.hear(super::Heard::Row(row));
            Action::None
        }
        Row::Heartbeat | Row::Other(_) | Row::Auth { .. } | Row::Signed { .. } => Action::None,
    }
}

/// A Node hub's heartbeat interval unless it was started with another one.
const NODE_HEARTBEAT: Duration = Duration::from_secs(15);

/// How long a hub may stay silent before the client gives up on it: its own
/// timeout, but never less than three of the hub's heartbeats (which our hub
/// tells in `helo`; a hub that does not is taken for a Node hub on its default),
/// so that a client with short heartbeats does not drop a hub with long ones.
fn silence_allowed(timeout: Duration, hub: Option<&str>, heartbeat_ms: Option<u64>) -> Duration {
    let heartbeat = match (hub, heartbeat_ms) {
        (_, Some(ms)) => Duration::from_millis(ms),
        (None, None) => NODE_HEARTBEAT,
        (Some(_), None) => return timeout,
    };
    timeout.max(heartbeat * 3)
}

/// Whether a peer link passes a `register` or `free` on to its hub. A hub that
/// keeps versions (its `helo` gave its id) sends rows without stamps only before
/// it knows the link is a hub, and sends them all again with stamps once it does:
/// the unstamped ones carry no version to decide by and are not passed on.
fn passes_on(shared: &Shared, stamp: Option<&crate::protocol::stamp::Stamp>) -> bool {
    shared.tap.is_some() && (stamp.is_some() || shared.lock().hub_id.is_none())
}

/// The hub refused something of ours: tell the user, and stop offering a refused
/// record (it would only be refused again on every reconnect).
fn reject(shared: &Shared, what: &str, id: Option<String>, reason: &str, key: Option<&str>) {
    let key = key.unwrap_or("none");
    match &id {
        Some(id) => tracing::error!("hub refused {what} of {id} (key {key}): {reason}"),
        None => tracing::error!("hub refused {what} (key {key}): {reason}"),
    }
    if let Some(id) = &id {
        let mut state = shared.lock();
        if state.registry.owner(id) == Some(OWN) {
            state.registry.free(id);
            state.auto_host.remove(id);
            state.rejected.insert(id.clone(), reason.to_string());
        }
    }
    shared.hear(super::Heard::Rejected {
        what: what.to_string(),
        reason: reason.to_string(),
    });
    shared.emit(Event::Rejected {
        what: what.to_string(),
        id,
        reason: reason.to_string(),
    });
    shared.rejections.notify_waiters();
}

/// Takes our address from `helo` and corrects own records that were registered
/// under the address another hub saw.
fn learn_host(shared: &Shared, addr: &str) {
    let host = match addr.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) => addr.to_string(),
    };
    let mut state = shared.lock();
    let moved: Vec<String> = state
        .auto_host
        .iter()
        .filter(|id| state.registry.host(id) != Some(host.as_str()))
        .cloned()
        .collect();
    for id in moved {
        if let Some(record) = state.registry.get(&id) {
            let mut meta = record.meta().clone();
            meta.insert("host".into(), host.clone().into());
            state.registry.register(&id, meta, OWN);
        }
    }
    drop(state);
    shared.status.send_modify(|s| s.host = Some(host));
}

/// The encoded register row of every own record.
fn own_rows(shared: &Shared) -> Vec<Bytes> {
    let state = shared.lock();
    state
        .registry
        .owned_by(OWN)
        .into_iter()
        .filter_map(|id| state.registry.stamped_row(id))
        .collect()
}

/// Marks every learned record as awaiting confirmation from the next hub.
fn mark_stale(shared: &Shared) {
    let mut state = shared.lock();
    let ids: Vec<String> = state
        .registry
        .owned_by(REMOTE)
        .into_iter()
        .map(String::from)
        .collect();
    state.stale.extend(ids);
}

/// Frees every learned record: no hub has answered for a whole timeout.
///
/// A peer link passes on only the drop of records without a stamp: the others
/// belong to hubs that keep versions, and their hub decides when they go.
fn forget_remote(shared: &Shared) {
    let mut state = shared.lock();
    state.stale.clear();
    // Only a hub without versions (a Node hub) has records without stamps.
    let unstamped: Vec<String> = if state.hub_id.is_some() {
        Vec::new()
    } else {
        state
            .registry
            .owned_by(REMOTE)
            .into_iter()
            .filter(|id| state.registry.stamp(id).is_none())
            .map(String::from)
            .collect()
    };
    let freed = state.registry.free_owner(REMOTE);
    drop(state);
    for id in unstamped {
        shared.hear(super::Heard::Row(Row::Free { id, stamp: None }));
    }
    for record in freed {
        shared.emit(Event::Free(record));
    }
}

/// Frees learned records the hub did not confirm in its dump.
///
/// A peer link passes on the drop of a record without a stamp, and of one whose
/// origin is the hub at the other end (which knows all of its own records), at
/// the version it held; other stamped records are left to their own hub.
fn free_remote(shared: &Shared, ids: Vec<String>) {
    for id in ids {
        let mut state = shared.lock();
        let stamp = state.registry.stamp(&id).cloned();
        let hub = state.hub_id.clone();
        let record = state.registry.free(&id);
        drop(state);
        let Some(record) = record else { continue };
        match stamp {
            None if hub.is_none() => {
                shared.hear(super::Heard::Row(Row::Free { id, stamp: None }));
            }
            None => {}
            Some(stamp) if hub.as_deref() == Some(&*stamp.origin) => {
                shared.hear(super::Heard::Row(Row::Free {
                    id,
                    stamp: Some(stamp),
                }));
            }
            Some(_) => {}
        }
        shared.emit(Event::Free(record));
    }
}

fn log_bad_row(line: &[u8], error: &WireError) {
    let excerpt = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    tracing::warn!("dropped row from hub: {error}: {excerpt:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_with_longer_heartbeats_gets_three_of_them() {
        let short = Duration::from_millis(600);
        let ms = |n: u64| Duration::from_millis(n);
        // Our hub says its heartbeat: three of them, or our timeout if longer.
        assert_eq!(silence_allowed(short, Some("H"), Some(200)), short);
        assert_eq!(silence_allowed(short, Some("H"), Some(15_000)), ms(45_000));
        // A hub that says nothing is a Node hub on its default 15 s.
        assert_eq!(silence_allowed(short, None, None), ms(45_000));
        assert_eq!(silence_allowed(ms(90_000), None, None), ms(90_000));
    }
}
