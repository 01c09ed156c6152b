//! The client's background task: connect, exchange rows, keep the connection alive,
//! and on loss fail over round-robin to every hub it knows.
//!
//! Records learned from a lost hub are kept (marked stale) while the client
//! reconnects, so a blip does not empty every query; the next hub's dump confirms
//! them, and whatever it does not confirm is freed at its `synced`. If no hub
//! answers within the timeout, they are all freed.

use super::{Event, OWN, REMOTE, Shared};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::wire::Row;
use crate::registry::Registered;
use crate::registry::pattern::Pattern;
use crate::transport::End;
use crate::transport::link::{Heard, Link, LinkConfig};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Runs until `stop` is cancelled.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut outbox: mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
) {
    let config = LinkConfig {
        heartbeat: shared.config.heartbeat,
        timeout: shared.config.timeout,
        max_line: shared.config.max_line,
        keypair: shared.config.keypair.clone(),
    };
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
        let link = tokio::select! {
            link = Link::connect(&hub, &config) => link,
            () = stop.cancelled() => return,
        };
        match link {
            Ok(link) => {
                tracing::debug!(%hub, "connected");
                shared.emit(Event::Connect(hub.clone()));
                let end = session(link, &shared, &mut outbox, &stop).await;
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
                // Try the next hub at once; only failed attempts wait.
                continue;
            }
            Err(e) => tracing::debug!(%hub, "cannot connect: {e}"),
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

/// One connection: rows from the hub applied as they come, our writes sent.
async fn session(
    mut link: Link,
    shared: &Shared,
    outbox: &mut mpsc::UnboundedReceiver<Bytes>,
    stop: &CancellationToken,
) -> End {
    // Rows queued while disconnected are covered by the dump of own records.
    while outbox.try_recv().is_ok() {}
    loop {
        tokio::select! {
            heard = link.next() => match heard {
                Ok(heard) => apply(shared, heard, &mut link),
                Err(end) => return end,
            },
            row = outbox.recv() => match row {
                Some(row) => {
                    link.send(&row);
                }
                None => return End::Stopped,
            },
            () = stop.cancelled() => return End::Stopped,
        }
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
        Heard::Row(Row::Register { id, meta, .. }) => {
            let mut state = shared.lock();
            if state.registry.owner(&id) == Some(OWN) {
                // Our own record relayed back: ours is authoritative.
                return;
            }
            state.stale.remove(&id);
            let outcome = state.registry.register(&id, meta, REMOTE);
            let record = match outcome {
                Registered::Added | Registered::Updated => state.registry.get(&id),
                Registered::Unchanged => None,
            };
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Register(record));
                shared.changed.notify_waiters();
            }
        }
        Heard::Row(Row::Free { id, .. }) => {
            let mut state = shared.lock();
            state.stale.remove(&id);
            state.auto_host.remove(&id);
            let record = state.registry.free(&id);
            drop(state);
            if let Some(record) = record {
                shared.emit(Event::Free(record));
            }
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
        .filter_map(|id| state.registry.row(id))
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

/// Frees learned records the hub did not confirm in its dump.
fn free_remote(shared: &Shared, ids: Vec<String>) {
    for id in ids {
        let record = shared.lock().registry.free(&id);
        if let Some(record) = record {
            shared.emit(Event::Free(record));
        }
    }
}
