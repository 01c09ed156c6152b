//! A link from this hub to another: the other hub's records become ours, and ours
//! become its, in both directions, as the Node package's `server.peer()` does.
//!
//! The link is a client of the other hub (so it reconnects, re-sends and signs
//! like any client) and a connection of this hub (so it gets our dump and every
//! forwarded row). Rows forwarded to it become the client's own records; records
//! the client learns become ours, owned by the link, and go when the link's
//! client loses them. It also announces this hub there as `seaport@VERSION`, so
//! the other hub's clients can fail over to us.

use super::HubConfig;
use super::state::{Out, Shared};
use crate::client::{Client, ClientConfig, Event, Registration};
use crate::hub_addr::HubAddr;
use crate::record::Record;
use crate::registry::Owner;
use crate::wire::Row;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How this hub announces itself to its peers.
#[derive(Debug, Clone)]
pub(crate) struct Announcement {
    /// One id for all of this hub's links, so that a hub with several links is
    /// one record everywhere, not one per link.
    pub id: String,
    /// The address clients should use: the listening address when it is a
    /// specific one; otherwise the address each peer sees.
    pub host: Option<String>,
    /// The listening port.
    pub port: u16,
}

/// Runs the link to `target` until `stop` is cancelled.
pub(crate) async fn link(
    target: HubAddr,
    id: Owner,
    shared: Arc<Shared>,
    config: Arc<HubConfig>,
    us: Announcement,
    stop: CancellationToken,
) {
    let client_config = ClientConfig {
        heartbeat: config.heartbeat,
        timeout: config.timeout,
        max_line: config.max_line,
        keypair: config.keypair.clone().map(Arc::new),
        learn_hubs: false,
        ..ClientConfig::default()
    };
    let (client, mut events) = match Client::connect_to(vec![target.clone()], client_config) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(peer = %target, "cannot peer: {e}");
            return;
        }
    };
    let us_id = us.id.clone();
    let mut announce = Registration::new(format!("seaport@{}", env!("CARGO_PKG_VERSION")))
        .port(us.port)
        .id(us.id);
    if let Some(host) = us.host {
        announce = announce.host(host);
    }
    if let Err(e) = client.register_now(announce.clone()) {
        tracing::error!(peer = %target, "cannot announce this hub: {e}");
    }
    let (tx, mut rx) = mpsc::channel(config.max_queue.max(2));
    let cancel = stop.child_token();
    shared.join_peer(id, &target.to_string(), tx, cancel.clone());
    tracing::info!(peer = %target, "peering");
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Line(line)) => pass_on(&client, &line, &us_id),
                Some(Out::Lines(lines)) => {
                    lines.iter().for_each(|line| pass_on(&client, line, &us_id))
                }
                None => break,
            },
            event = events.recv() => match event {
                Ok(Event::Register(record)) if !client.is_own(record.id()) => {
                    let rid = record.id().to_string();
                    shared.register(id, &rid, record.into_meta());
                }
                // Our own announcement, freed somewhere it was relayed to:
                // announce again rather than lose it for good.
                Ok(Event::Free(record)) if record.id() == us_id => {
                    let _ = client.register_now(announce.clone());
                }
                Ok(Event::Free(record)) => {
                    shared.free(id, record.id());
                }
                Ok(Event::Connect(_)) => tracing::info!(peer = %target, "peer link up"),
                Ok(Event::Disconnect(_)) => tracing::warn!(peer = %target, "peer link down; retrying"),
                Ok(Event::Rejected { what, reason, .. }) => {
                    tracing::error!(peer = %target, "peer refused {what}: {reason}");
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => resync(&client, id, &shared),
                Err(RecvError::Closed) => break,
            },
            () = cancel.cancelled() => break,
        }
    }
    client.close();
    shared.leave(id);
}

/// A row our hub forwards to the link: pass it on to the other hub.
/// The copy of our own announcement that peers relay back is never passed on.
fn pass_on(client: &Client, line: &[u8], us_id: &str) {
    match Row::decode(line) {
        Ok(Row::Register { id, .. } | Row::Free(id)) if id == us_id => {}
        Ok(Row::Register { id, meta }) => client.register_record(Record::new(id, meta)),
        Ok(Row::Free(id)) => {
            client.free(&id);
        }
        _ => {}
    }
}

/// The link fell behind its client's events: make our copy of the other hub's
/// records equal to what the client knows now.
fn resync(client: &Client, id: Owner, shared: &Shared) {
    tracing::warn!("peer link fell behind; resynchronising its records");
    let learned = client.learned();
    let keep: HashSet<String> = learned.iter().map(|r| r.id().to_string()).collect();
    for record in learned {
        let rid = record.id().to_string();
        shared.register(id, &rid, record.into_meta());
    }
    for gone in shared.owned_by(id) {
        if !keep.contains(&gone) {
            shared.free(id, &gone);
        }
    }
}
