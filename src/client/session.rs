//! The client's background task: connect, exchange rows, keep the connection alive,
//! and on loss fail over round-robin to every hub it knows.
//!
//! Records learned from a lost hub are kept (marked stale) while the client
//! reconnects, so a blip does not empty every query; the next hub's dump confirms
//! them, and whatever it does not confirm is freed at its `synced`. If no hub
//! answers within the timeout, they are all freed.

use super::{Event, OWN, Outgoing, REMOTE, Shared};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::wire::{Meta, Row};
use crate::registry::Registered;
use crate::registry::pattern::Pattern;
use crate::transport::End;
use crate::transport::link::{Heard, Link, LinkConfig};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A connection lost sooner than this after it began was brief: two brief
/// ones in a row, and the next try waits the reconnect delay.
const BRIEF: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs until `stop` is cancelled.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    stop: CancellationToken,
) {
    let config = LinkConfig {
        heartbeat: shared.config.heartbeat,
        timeout: shared.config.timeout,
        max_line: shared.config.max_line,
        keypair: shared.config.keypair.clone(),
        hub_keys: shared.config.hub_keys.clone(),
        max_unsent: crate::transport::link::DEFAULT_MAX_UNSENT,
    };
    let mut turn = 0usize;
    let mut lost_at: Option<Instant> = None;
    // Writes and pings that wait for the own records to go out: kept across
    // connections, so that one lost before then loses none of them.
    let mut held: Vec<Outgoing> = Vec::new();
    // The last connection error of each hub said at warning level, said
    // again only when it changes (a hub that stays down is not a warning a
    // second); forgotten once a hub answers.
    let mut said: HashMap<HubAddr, String> = HashMap::new();
    // Whether the last connection was brief: synced, then lost within BRIEF.
    let mut hasty = false;
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
        let link = tokio::select! {
            link = Link::connect(&hub, &config) => link,
            () = stop.cancelled() => return,
        };
        match link {
            Ok(link) => {
                tracing::debug!(%hub, "connected");
                said.clear();
                shared.emit(Event::Connect(hub.clone()));
                let began = Instant::now();
                let end = session(link, &shared, &mut outbox, &mut held, &stop).await;
                let was_synced = shared.status.borrow().synced;
                shared.status.send_modify(|s| s.synced = false);
                if matches!(end, End::Stopped) {
                    return;
                }
                tracing::info!(%hub, "lost hub connection: {end}");
                shared.emit(Event::Disconnect(hub.clone()));
                mark_stale(&shared);
                // A session that synced confirmed what we know: the clock for
                // dropping learned records starts again from this loss.
                if was_synced {
                    lost_at = Some(Instant::now());
                } else {
                    lost_at.get_or_insert_with(Instant::now);
                }
                // After a connection that got going, the next hub is tried at
                // once; one that ended before its dump (a hub that closes at
                // once, or proves no key) waits as a failed attempt does, and
                // so does the second in a row that ended within a second of
                // its start (a hub that drops what we send).
                if was_synced {
                    let brief = began.elapsed() < BRIEF;
                    if !(brief && hasty) {
                        hasty = brief;
                        continue;
                    }
                }
            }
            Err(e) => {
                let error = format!("cannot connect to the hub at {hub}: {e}");
                if said.get(&hub) == Some(&error) {
                    tracing::debug!("{error}");
                } else {
                    tracing::warn!("{error}; trying again");
                    said.insert(hub.clone(), error);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(shared.config.reconnect_delay) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The hubs to try: the given ones, then (unless told not to discover hubs)
/// every `seaport` record the client knows; given hub keys, only records a hub
/// wrote with one of them.
fn candidates(shared: &Shared) -> Vec<HubAddr> {
    let state = shared.lock();
    let mut hubs = state.hubs.clone();
    if !shared.config.discover {
        return hubs;
    }
    let trusted = |record: &crate::registry::record::Record| {
        shared.config.hub_keys.is_empty()
            || matches!(
                record.holder(),
                Some(crate::protocol::owner::Holder::Key(key))
                    if shared.config.hub_keys.allows_text(key)
            )
    };
    for record in state
        .registry
        .query(&Pattern::all_of_role("seaport"))
        .into_iter()
        .filter(trusted)
    {
        if let (Some(host), Some(port)) = (record.host(), record.port()) {
            let hub = HubAddr::new(host, port);
            if !hubs.contains(&hub) {
                hubs.push(hub);
            }
        }
    }
    hubs
}

/// One connection: rows from the hub applied as they come, our writes sent.
async fn session(
    mut link: Link,
    shared: &Shared,
    outbox: &mut mpsc::UnboundedReceiver<Outgoing>,
    held: &mut Vec<Outgoing>,
    stop: &CancellationToken,
) -> End {
    // Own writes queued while disconnected are covered by the dump of own
    // records; writes of others' records, and pings (which confirm what was
    // sent before them), wait for it.
    while let Ok(out) = outbox.try_recv() {
        if !matches!(out, Outgoing::Own(_)) {
            held.push(out);
        }
    }
    // Own records changed or freed by someone else, to put back once a second
    // has passed since they last were (two writers fighting over one id must
    // not flood the hub).
    let mut restore_at: Option<Instant> = None;
    loop {
        let due = async {
            match restore_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            heard = link.next() => match heard {
                Ok(heard) => {
                    apply(shared, heard, &mut link);
                    if link.own_sent() {
                        for out in held.drain(..) {
                            send(&mut link, out);
                        }
                    }
                    restore_at = restore(shared, &mut link);
                }
                Err(end) => return end,
            },
            () = due => restore_at = restore(shared, &mut link),
            out = outbox.recv() => match out {
                Some(Outgoing::Own(row)) => {
                    link.send(&row);
                }
                Some(out) if !link.own_sent() => held.push(out),
                Some(out) => send(&mut link, out),
                None => return End::Stopped,
            },
            () = stop.cancelled() => return End::Stopped,
        }
    }
}

/// Sends a write or a ping on a link whose own records have gone out.
fn send(link: &mut Link, out: Outgoing) {
    match out {
        Outgoing::Own(row) | Outgoing::Write(row) => {
            link.send(&row);
        }
        Outgoing::Ping(token) => link.send_plain(&Row::Ping(token).encode()),
    }
}

/// Applies what the hub said.
fn apply(shared: &Shared, heard: Heard, link: &mut Link) {
    match heard {
        Heard::Helo { addr, .. } => learn_host(shared, addr),
        Heard::SendOwn => link.send_own(own_rows(shared)),
        Heard::Rejected {
            what,
            id,
            reason,
            fingerprint,
        } => reject(shared, &what, id, &reason, fingerprint.as_deref()),
        Heard::Row(Row::Register { id, meta, ext, .. }) => {
            let mut state = shared.lock();
            if state.registry.owner(&id) == Some(OWN) {
                drop(state);
                changed_by_others(shared, &id, meta);
                return;
            }
            state.stale.remove(&id);
            let outcome = state.registry.store(&id, meta, REMOTE, None, ext.owner);
            let record = match outcome {
                Registered::Added | Registered::Updated => state.registry.get(&id),
                Registered::Unchanged | Registered::TooLarge(_) => None,
            };
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Register(record));
                shared.changed.notify_waiters();
            }
        }
        Heard::Row(Row::Free { id, .. }) => {
            let mut state = shared.lock();
            if state.registry.owner(&id) == Some(OWN) {
                // Ours, freed by someone else: the hub is told the truth again.
                let name = state
                    .registry
                    .get(&id)
                    .map(|r| r.name())
                    .unwrap_or_default();
                tracing::warn!("{name} [{id}]: freed by someone else; putting it back");
                state.restore_due.insert(id);
                return;
            }
            state.stale.remove(&id);
            state.auto_host.remove(&id);
            let record = state.registry.free(&id);
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Free(record));
            }
        }
        Heard::Row(Row::Pong(token)) => {
            shared.pong.send_replace(token);
        }
        Heard::Row(Row::Synced) => {
            let stale: Vec<String> = shared.lock().stale.drain().collect();
            free_remote(shared, stale);
            shared.status.send_modify(|s| s.synced = true);
            shared.emit(Event::Synced);
        }
        Heard::Row(_) => {}
    }
}

/// The hub holds another version of one of our own records: someone else
/// wrote it. What makes the record true (role, version, host, port) is put
/// back; other metadata is left as they set it.
fn changed_by_others(shared: &Shared, id: &str, theirs: Meta) {
    let mut state = shared.lock();
    let Some(ours) = state.registry.get(id) else {
        return;
    };
    let mut merged = theirs;
    let mut changed = Vec::new();
    for key in ["role", "version", "host", "port", "id"] {
        let mine = ours.meta().get(key);
        if merged.get(key) != mine {
            if key != "id" {
                changed.push(key);
            }
            match mine {
                Some(value) => {
                    merged.insert(key.to_string(), value.clone());
                }
                None => {
                    merged.shift_remove(key);
                }
            }
        }
    }
    if merged == *ours.meta() {
        // The hub holds what we hold (a dump after a reconnect, say).
        return;
    }
    state.registry.register(id, merged, OWN);
    if changed.is_empty() {
        // Only metadata others may set: keep theirs, nothing to put back.
        return;
    }
    tracing::warn!(
        "{} [{id}]: {} changed by someone else; putting it back",
        ours.name(),
        changed.join(", ")
    );
    state.restore_due.insert(id.to_string());
}

/// Sends again the own records due to be put back, each at most once a
/// second; returns when to come back for those that must wait.
fn restore(shared: &Shared, link: &mut Link) -> Option<Instant> {
    let mut state = shared.lock();
    if state.restore_due.is_empty() {
        return None;
    }
    let now = Instant::now();
    let due: Vec<String> = state.restore_due.iter().cloned().collect();
    let mut later: Option<Instant> = None;
    for id in due {
        let next = state.restored.get(&id).map(|at| *at + RESTORE_EVERY);
        if let Some(next) = next.filter(|next| *next > now) {
            later = Some(later.map_or(next, |l| l.min(next)));
            continue;
        }
        state.restore_due.remove(&id);
        if let Some(row) = state.own_row(&id) {
            state.restored.insert(id, now);
            link.send(&row);
        }
    }
    state
        .restored
        .retain(|_, at| now.duration_since(*at) < RESTORE_EVERY);
    later
}

/// How often one own record is put back, at most.
const RESTORE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

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
            state.claims.remove(id);
            state.restore_due.remove(id);
            state.rejected.insert(id.clone(), reason.to_string());
        }
    }
    shared.emit(Event::Rejected {
        what: what.to_string(),
        id,
        reason: reason.to_string(),
    });
    shared.rejections.notify_waiters();
}

/// Takes our address from `helo` and corrects own records that were registered
/// under the address another hub saw.
fn learn_host(shared: &Shared, host: String) {
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
    // Under the lock: a registration made meanwhile takes the new host.
    shared.status.send_modify(|s| s.host = Some(host));
    drop(state);
}

/// The encoded register row of every own record.
fn own_rows(shared: &Shared) -> Vec<Bytes> {
    let state = shared.lock();
    state
        .registry
        .owned_by(OWN)
        .into_iter()
        .filter_map(|id| state.own_row(id))
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
fn forget_remote(shared: &Shared) {
    let mut state = shared.lock();
    state.stale.clear();
    let freed = state.registry.free_owner(REMOTE);
    drop(state);
    for record in freed {
        shared.emit(Event::Free(record));
    }
}

/// Frees learned records the hub did not confirm in its dump (not own
/// records registered under one of their ids meanwhile).
fn free_remote(shared: &Shared, ids: Vec<String>) {
    for id in ids {
        let record = {
            let mut state = shared.lock();
            match state.registry.owner(&id) {
                Some(REMOTE) => state.registry.free(&id),
                _ => None,
            }
        };
        if let Some(record) = record {
            shared.emit(Event::Free(record));
        }
    }
}
