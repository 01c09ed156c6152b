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
use super::guard::Writer;
use super::metrics::FreeReason;
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
        // With hub keys, a link too makes sure its peer is a hub.
        hub_keys: config.hub_keys.clone(),
        max_unsent: config.max_queue_bytes,
    };
    // Not bounded: the link only moves rows from our hub to the other one, and
    // cutting it off would leave the hubs unlinked.
    let (tx, mut rows) = mpsc::unbounded_channel();
    let cancel = stop.child_token();
    shared.join_peer(id, &target.to_string(), tx);
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
        // What we hold before the other hub can have accepted us: its list of
        // records is as of its accept, so only these are checked against it.
        let held_before = shared.arrival_mark();
        let connected = tokio::select! {
            link = Link::connect(&target, &link_config) => link,
            () = cancel.cancelled() => break,
        };
        match connected {
            Ok(link) => {
                let started = Instant::now();
                let (end, greeted) = run(link, id, held_before, &shared, &mut rows, &cancel).await;
                shared.link_down(id);
                if matches!(end, End::Stopped) {
                    break;
                }
                if greeted {
                    tracing::warn!(peer = %target, "peer link down ({end}); reconnecting");
                    // What the link carried is kept for a timeout from now.
                    lost_at = Some(Instant::now());
                } else {
                    tracing::debug!(peer = %target, "peer closed before its helo: {end}");
                    lost_at.get_or_insert_with(Instant::now);
                }
                // A connection that lasted goes again at once; one that ended
                // at once (a proxy before a dead hub, a hub that cannot take
                // us) waits, so as not to spin.
                if greeted && started.elapsed() >= RECONNECT_DELAY {
                    retry = FIRST_RETRY;
                    continue;
                }
            }
            Err(e) => {
                tracing::debug!(peer = %target, "cannot connect: {e}");
                lost_at.get_or_insert_with(Instant::now);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = cancel.cancelled() => break,
        }
        retry = (retry * 2).min(RECONNECT_DELAY);
    }
    shared.leave(id, FreeReason::Peer);
}

/// One connection of the link: rows both ways until it ends. Also says
/// whether the other hub greeted it (sent `helo`).
async fn run(
    mut link: Link,
    id: Owner,
    held_before: u64,
    shared: &Shared,
    rows: &mut mpsc::UnboundedReceiver<Out>,
    cancel: &CancellationToken,
) -> (End, bool) {
    // Whatever was queued before this connection is covered by the snapshot.
    while rows.try_recv().is_ok() {}
    let mut greeted = false;
    let mut snapshot_due = false;
    loop {
        tokio::select! {
            heard = link.next() => {
                let mut effects = Vec::new();
                let mut next = Some(heard);
                while let Some(heard) = next.take() {
                    match heard {
                        Ok(Heard::Row(row)) => effects.push(Effect::Apply(row, Writer::default())),
                        Ok(Heard::Helo { addr, hub }) => {
                            if !greeted {
                                tracing::info!(peer = %link_name(&link), "peer link up");
                            }
                            greeted = true;
                            shared.link_up(id, hub.as_deref(), held_before);
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
                            return (end, greeted);
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
                Some(Out::Reconnect) => {
                    let why = "to have the other hub's records afresh";
                    return (End::Failed(std::io::Error::other(why)), greeted);
                }
                Some(
                    Out::Snapshot(_)
                    | Out::Dump { .. }
                    | Out::Owned { .. }
                    | Out::Left(_)
                    | Out::Dropped(_),
                ) => {}
                None => return (End::Stopped, greeted),
            },
            () = cancel.cancelled() => return (End::Stopped, greeted),
        }
    }
}

fn link_name(link: &Link) -> String {
    link.name().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::guard::Policy;
    use crate::registry::pattern::Pattern;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    /// What a Node hub says to a new connection: `helo`, one record, `synced`.
    const NODE_HUB: &[u8] = b"[\"helo\",\"::ffff:127.0.0.1\"]\n\
        [\"register\",\"R\",{\"role\":\"web\",\"port\":1,\"host\":\"10.0.0.9\",\"id\":\"R\"}]\n\
        [\"synced\"]\n";

    /// A link from a hub of our own to a scripted hub at `port`.
    fn link_to(port: u16, timeout: Duration) -> (Arc<Shared>, CancellationToken) {
        let mut config = HubConfig::with_heartbeat(Duration::from_millis(100));
        config.timeout = timeout;
        let shared = Arc::new(Shared::new(
            "US",
            Policy::default(),
            config.heartbeat,
            config.timeout,
        ));
        let stop = CancellationToken::new();
        tokio::spawn(link(
            HubAddr::new("127.0.0.1", port),
            shared.next_id(),
            shared.clone(),
            Arc::new(config),
            stop.clone(),
        ));
        (shared, stop)
    }

    /// Accepts the link, plays a Node hub, and returns what the link sent up
    /// to its `synced`.
    async fn node_hub_session(listener: &TcpListener) -> (BufReader<TcpStream>, Vec<String>) {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut hub = BufReader::new(stream);
        hub.get_mut().write_all(NODE_HUB).await.expect("write");
        let mut sent = Vec::new();
        loop {
            let mut line = String::new();
            if hub.read_line(&mut line).await.expect("read") == 0 {
                break;
            }
            let synced = line.starts_with("[\"synced\"");
            sent.push(line);
            if synced {
                break;
            }
        }
        (hub, sent)
    }

    fn holds_r(shared: &Shared) -> bool {
        shared
            .query(&Pattern::all())
            .iter()
            .any(|record| record.id() == "R")
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_hub_is_never_sent_its_own_records_and_they_outlive_each_loss_by_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (shared, stop) = link_to(port, Duration::from_millis(300));
        let (first, _) = node_hub_session(&listener).await;
        while !holds_r(&shared) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A blip: the link comes back, and what it sends holds nothing of R.
        drop(first);
        let (second, sent) = node_hub_session(&listener).await;
        assert!(
            !sent.iter().any(|line| line.contains("\"R\"")),
            "the Node hub's record went back to it: {sent:?}"
        );
        // Long after, it is lost again, for good: R stays for the timeout
        // from this loss, not from the first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(holds_r(&shared));
        drop(listener);
        drop(second);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(holds_r(&shared), "dropped before the timeout");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!holds_r(&shared), "kept after the timeout");
        stop.cancel();
    }
}
