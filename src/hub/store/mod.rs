//! A hub over a store: an etcd cluster keeps the records of every hub that
//! fronts it, and the hubs are stateless in front of it.
//!
//! The store joins the hub's shared state as one more hub's link (it sends
//! stamped rows, as peers do), in two halves:
//!
//! - the [`writer`] takes the rows of the records this hub is the origin of
//!   (its clients') and writes them to etcd, each on a lease of the
//!   connection that holds it ([`leases`]), claiming its `host:port` in the
//!   same transaction; it batches, paces and, while etcd is away, queues;
//! - the [`watch`] reads every hub's records from etcd, then watches them,
//!   and feeds the puts and deletes of other hubs' records to the state as
//!   register and free rows.
//!
//! A record lives as long as its lease: the hub keeps the leases of its live
//! connections alive, revokes a connection's leases when it leaves, and the
//! leases of a hub that dies expire after the hub's timeout.

mod access;
mod layout;
mod leases;
mod watch;
mod writer;

pub use access::{StoreTls, StoreUser};
pub use writer::MAX_STORE_RECORD;

use super::HubConfig;
use super::metrics::StoreMetrics;
use super::state::Shared;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The key prefix of a store when none is given.
pub const DEFAULT_PREFIX: &str = "/seaport/";

/// Where a hub keeps its records: an etcd cluster, under a key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The etcd members' client addresses, `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The prefix of every key the hubs write (ends in `/`).
    pub prefix: String,
    /// The etcd user the hub signs in as, for a cluster with authentication.
    pub user: Option<StoreUser>,
    /// TLS to the members, for a cluster that serves clients over TLS.
    pub tls: Option<StoreTls>,
}

impl StoreConfig {
    /// The same store under another key prefix (a `/` is added at its end
    /// when it lacks one).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, String> {
        if prefix.is_empty() {
            return Err("the store's key prefix is empty".into());
        }
        self.prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        Ok(self)
    }
}

impl FromStr for StoreConfig {
    type Err = String;

    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    fn from_str(url: &str) -> Result<Self, String> {
        let Some(members) = url.strip_prefix("etcd://") else {
            return Err(format!(
                "store {url:?}: expected etcd://HOST:PORT[,HOST:PORT...]"
            ));
        };
        let endpoints: Vec<String> = members
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .map(String::from)
            .collect();
        for endpoint in &endpoints {
            let port = endpoint
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
                return Err(format!(
                    "store {url:?}: {endpoint:?} is not HOST:PORT (etcd://HOST:PORT[,HOST:PORT...])"
                ));
            }
        }
        Ok(StoreConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            user: None,
            tls: None,
        })
    }
}

/// The lease TTL for a hub's timeout: whole seconds, rounded up, at least
/// two (etcd's own floor is about that).
fn lease_ttl(timeout: Duration) -> i64 {
    let secs = timeout.as_millis().div_ceil(1000);
    i64::try_from(secs).unwrap_or(i64::MAX).max(2)
}

/// Longest wait for one request to etcd; a write that takes longer is tried
/// again (etcd commits in milliseconds; a write caught in a change of
/// leader waits for seconds, and goes faster when sent again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the store works for the hub: both halves say, and
/// `seaport_store_up` shows 1 only while both do.
#[derive(Debug)]
struct Health {
    metrics: StoreMetrics,
    writing: AtomicBool,
    watching: AtomicBool,
    /// The store's revision up to which the watch has applied what it read
    /// to the state: the writer overwrites no record changed after it.
    applied: AtomicI64,
    /// Counts the times the watch found the store replaced (behind what it
    /// had read, or another cluster).
    epoch: AtomicU64,
}

impl Health {
    fn new(metrics: StoreMetrics) -> Self {
        Health {
            metrics,
            writing: AtomicBool::new(true),
            watching: AtomicBool::new(false),
            applied: AtomicI64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// The watch has applied what it read up to `revision`.
    fn applied_up_to(&self, revision: i64) {
        self.applied.fetch_max(revision, Ordering::Release);
    }

    /// The revision up to which the state has what the watch read.
    fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The store was listed afresh (it may count from lower down).
    fn applied_from(&self, revision: i64) {
        self.applied.store(revision, Ordering::Release);
    }

    /// The store was replaced: nothing is applied of it yet, and revisions
    /// of the one before say nothing of it.
    fn replaced(&self) {
        self.applied.store(0, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The times the store was found replaced.
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn writing(&self, ok: bool) {
        self.writing.store(ok, Ordering::Relaxed);
        self.show();
    }

    fn watching(&self, ok: bool) {
        self.watching.store(ok, Ordering::Relaxed);
        self.show();
    }

    /// Whether the watch is up.
    fn is_watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    fn show(&self) {
        let up = self.writing.load(Ordering::Relaxed) && self.watching.load(Ordering::Relaxed);
        self.metrics.up.set(i64::from(up));
    }
}

/// Connects to the store and runs both halves until `stop`; the writer
/// writes what is queued when `stop` comes, for a moment, before it ends.
pub(crate) fn start(
    store: StoreConfig,
    shared: Arc<Shared>,
    hub: &HubConfig,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let id = shared.next_id();
    let (tx, rows) = tokio::sync::mpsc::unbounded_channel();
    shared.join_store(id, tx);
    let layout = layout::Layout::new(&store.prefix);
    let ttl = lease_ttl(hub.timeout);
    let timeout = hub.timeout;
    let watch_stop = stop.child_token();
    let tracker = tasks.clone();
    let health = Arc::new(Health::new(shared.metrics().store()));
    tasks.spawn(async move {
        let client = match access::connect(&store).await {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(
                    "cannot use the store at {}: {}",
                    store.endpoints.join(","),
                    access::describe(&e)
                );
                return;
            }
        };
        if let Some(user) = store.user.clone() {
            tracker.spawn(access::sign_in(client.clone(), user, stop.clone()));
        }
        tracing::info!(
            "keeping records in etcd at {} under {}",
            store.endpoints.join(","),
            store.prefix
        );
        tracker.spawn(watch::run(
            client.clone(),
            layout.clone(),
            shared.clone(),
            id,
            health.clone(),
            watch_stop,
        ));
        let target = writer::Target {
            client,
            layout,
            ttl,
            timeout,
            store: id,
        };
        writer::run(target, shared, rows, health, stop).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_an_etcd_url_with_one_or_more_members() {
        let store: StoreConfig = "etcd://127.0.0.1:2379,10.0.0.2:2379"
            .parse()
            .expect("parse");
        assert_eq!(store.endpoints, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(store.prefix, "/seaport/");
        let store = store.with_prefix("/team-a").expect("prefix");
        assert_eq!(store.prefix, "/team-a/");
        for bad in [
            "127.0.0.1:2379",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://:2379",
        ] {
            let err = bad.parse::<StoreConfig>().expect_err(bad);
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_lease_lasts_the_hubs_timeout_in_whole_seconds() {
        assert_eq!(lease_ttl(Duration::from_secs(45)), 45);
        assert_eq!(lease_ttl(Duration::from_millis(4500)), 5);
        assert_eq!(lease_ttl(Duration::from_millis(300)), 2);
    }
}
