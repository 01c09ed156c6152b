//! A link from this hub to another: the other hub's records become ours, and ours
//! become its, in both directions, as the Node package's `server.peer()` does.
//!
//! The link connects to the other hub like a client (a [`Link`]: heartbeats,
//! authentication with the hub's keypair) and is a connection of this hub: rows
//! it hears are applied to the shared state as any connection's are, and the
//! state decides by their stamps what is news; rows the state forwards to it go
//! to the other hub. On every (re)connection it sends every record this hub
//! holds, stamped, as its own records, then only what changes. It reconnects to
//! its one peer on its own, quickly at first (hubs of a cluster often start
//! together), then every reconnect delay.

use super::HubConfig;
use super::outbox::Out;
use super::state::{Effect, Shared};
use crate::protocol::hub_addr::HubAddr;
use crate::registry::Owner;
use crate::transport::End;
use crate::transport::link::{Heard, Link, LinkConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The first retry after a failed connection; it doubles up to the reconnect
/// delay.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// The longest wait between connection attempts, as a client's.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Rows from the other hub applied under one lock, at most.
const BATCH: usize = 256;

/// Runs the link to `target` until `stop` is cancelled.
pub(crate) async fn link(
    target: HubAddr,
    id: Owner,
    shared: Arc<Shared>,
    config: Arc<HubConfig>,
    stop: CancellationToken,
) {
    let link_config = LinkConfig {
        heartbeat: config.heartbeat,
        timeout: config.timeout,
        max_line: config.max_line,
        keypair: config.keypair.clone().map(Arc::new),
    };
    // Not bounded: the link only moves rows from our hub to the other one, and
    // cutting it off would leave the hubs unlinked.
    let (tx, mut rows) = mpsc::unbounded_channel();
    let cancel = stop.child_token();
    shared.join_peer(id, &target.to_string(), tx, cancel.clone());
    tracing::info!(peer = %target, "peering");
    let mut retry = FIRST_RETRY;
    let mut lost_at: Option<Instant> = None;
    loop {
        if let Some(at) = lost_at
            && at.elapsed() >= config.timeout
        {
            shared.link_lost(id);
            lost_at = None;
        }
        let connected = tokio::select! {
            link = Link::connect(&target, &link_config) => link,
            () = cancel.cancelled() => break,
        };
        match connected {
            Ok(link) => {
                tracing::info!(peer = %target, "peer link up");
                retry = FIRST_RETRY;
                shared.link_up(id, None);
                let end = run(link, id, &shared, &mut rows, &cancel).await;
                if matches!(end, End::Stopped) {
                    break;
                }
                tracing::warn!(peer = %target, "peer link down ({end}); reconnecting");
                lost_at.get_or_insert_with(Instant::now);
                continue;
            }
            Err(e) => tracing::debug!(peer = %target, "cannot connect: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = cancel.cancelled() => break,
        }
        retry = (retry * 2).min(RECONNECT_DELAY);
    }
    shared.leave(id);
}

/// One connection of the link: rows both ways until it ends.
async fn run(
    mut link: Link,
    id: Owner,
    shared: &Shared,
    rows: &mut mpsc::UnboundedReceiver<Out>,
    cancel: &CancellationToken,
) -> End {
    // Whatever was queued before this connection is covered by the snapshot.
    while rows.try_recv().is_ok() {}
    let mut snapshot_due = false;
    loop {
        tokio::select! {
            heard = link.next() => {
                let mut effects = Vec::new();
                let mut next = Some(heard);
                while let Some(heard) = next.take() {
                    match heard {
                        Ok(Heard::Row(row)) => effects.push(Effect::Apply(row)),
                        Ok(Heard::Helo { addr, hub }) => {
                            shared.link_up(id, hub.as_deref());
                            shared.seen_at(&addr);
                        }
                        Ok(Heard::SendOwn) => {
                            shared.snapshot_to(id);
                            snapshot_due = true;
                        }
                        Ok(Heard::Rejected { what, id: rid, reason, .. }) => tracing::error!(
                            peer = %link_name(&link),
                            "the peer refused {what} {}: {reason}",
                            rid.as_deref().unwrap_or("-")
                        ),
                        Err(end) => {
                            shared.apply(id, effects);
                            return end;
                        }
                    }
                    if effects.len() < BATCH {
                        next = link.try_next();
                    }
                }
                shared.apply(id, effects);
            }
            out = rows.recv() => match out {
                Some(Out::Snapshot(own)) if snapshot_due => {
                    snapshot_due = false;
                    link.send_own(own);
                }
                Some(Out::Line(line)) => {
                    link.send(&line);
                }
                Some(Out::Lines(lines)) => {
                    for line in lines {
                        link.send(&line);
                    }
                }
                Some(Out::Snapshot(_)) => {}
                None => return End::Stopped,
            },
            () = cancel.cancelled() => return End::Stopped,
        }
    }
}

fn link_name(link: &Link) -> String {
    link.hub().unwrap_or("a hub without an id").to_string()
}
