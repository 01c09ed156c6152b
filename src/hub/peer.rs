//! A link from this hub to another: the other hub's records become ours, and ours
//! become its, in both directions, as the Node package's `server.peer()` does.
//!
//! The link is a client of the other hub (so it reconnects, re-sends and signs
//! like any client) and a connection of this hub (so it gets our dump and every
//! forwarded row). Rows forwarded to it become the client's own records, stamps
//! and all; rows the client hears from the other hub are applied to ours as
//! they arrived, and the shared state decides by their stamps what is news. It
//! also announces this hub there as `seaport@VERSION`, so the other hub's clients
//! can fail over to us.

use super::HubConfig;
use super::state::{Out, Shared};
use crate::client::{Client, ClientConfig, Heard};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::wire::{Meta, Row};
use crate::registry::Owner;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
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
    let announce = |shared: &Shared| Row::Register {
        id: us.id.clone(),
        meta: announcement(&us),
        stamp: Some(shared.fresh_stamp()),
    };
    // Not bounded: the link only moves rows from our hub into its client, and
    // cutting it off would leave the hubs unlinked.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = stop.child_token();
    let dump = shared.join_peer(id, &target.to_string(), tx, cancel.clone());
    let mut own = vec![announce(&shared)];
    own.extend(dump.iter().filter_map(|line| Row::decode(line).ok()));
    let (client, mut heard) = match Client::connect_link(target.clone(), client_config, own) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(peer = %target, "cannot peer: {e}");
            shared.leave(id);
            return;
        }
    };
    tracing::info!(peer = %target, "peering");
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Line(line)) => pass_on(&client, &line),
                Some(Out::Lines(lines)) => {
                    lines.iter().for_each(|line| pass_on(&client, line))
                }
                Some(Out::Forget(ids)) => client.forget(&ids),
                None => break,
            },
            news = heard.recv() => match news {
                Some(Heard::Row(Row::Register { id: rid, meta, stamp })) => {
                    shared.register(id, &rid, meta, stamp);
                }
                // Our own announcement, freed where it was relayed to: announce
                // again, newer, rather than lose it for good (unless it is our
                // own farewell coming back).
                Some(Heard::Row(Row::Free { id: rid, .. })) if rid == us.id => {
                    if !shared.is_stopping() {
                        client.relay(announce(&shared));
                    }
                }
                Some(Heard::Row(Row::Free { id: rid, stamp })) => shared.free(id, &rid, stamp),
                Some(Heard::Row(Row::Beat { origin, v, period_ms })) => {
                    shared.beat(id, &origin, v, Duration::from_millis(period_ms));
                }
                Some(Heard::Row(_)) => {}
                Some(Heard::Up) => tracing::info!(peer = %target, "peer link up"),
                Some(Heard::Down) => tracing::warn!(peer = %target, "peer link down; retrying"),
                Some(Heard::Rejected { what, reason }) => {
                    tracing::error!(peer = %target, "peer refused {what}: {reason}");
                }
                None => break,
            },
            () = cancel.cancelled() => break,
        }
    }
    client.close();
    shared.leave(id);
}

/// The metadata of this hub's `seaport` record.
fn announcement(us: &Announcement) -> Meta {
    let mut meta = Meta::new();
    meta.insert("role".into(), Value::String("seaport".into()));
    meta.insert(
        "version".into(),
        Value::String(env!("CARGO_PKG_VERSION").into()),
    );
    if let Some(host) = &us.host {
        meta.insert("host".into(), Value::String(host.clone()));
    }
    meta.insert("port".into(), Value::from(us.port));
    meta
}

/// A row our hub forwards to the link: pass it on to the other hub.
fn pass_on(client: &Client, line: &[u8]) {
    if let Ok(row @ (Row::Register { .. } | Row::Free { .. } | Row::Beat { .. })) =
        Row::decode(line)
    {
        client.relay(row);
    }
}
