//! The hub: a TCP server that stores records and relays them between connections,
//! speaking the seaport 2.x protocol.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use seaport::hub::{Hub, HubConfig};
//! let hub = Hub::bind("127.0.0.1:0", HubConfig::default()).await?;
//! println!("hub on {}", hub.local_addr());
//! hub.shutdown().await;
//! # Ok(()) }
//! ```

mod changes;
mod connection;
mod feed;
mod give_back;
mod guard;
mod key_files;
mod metrics;
mod outbox;
mod peer;
mod state;
mod store;
mod subscribers;

pub use connection::peer_host;
pub use give_back::allocating_with_jemalloc;
pub use guard::Policy;
pub use key_files::{HubKeys, KeyFiles};
pub use store::{DEFAULT_PREFIX, MAX_STORE_RECORD, StoreConfig, StoreTls, StoreUser};
pub use subscribers::{Change, ENTRY_OVERHEAD, Listing, Received, Subscription};

use crate::protocol::framing::DEFAULT_MAX_LINE;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::{Authorized, Keypair};
use crate::registry::StoredRow;
use crate::registry::pattern::Pattern;
use crate::registry::record::Record;
use crate::transport::accept::listen_async;
use state::Shared;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a hub behaves.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Interval between heartbeats sent on each connection (default 15 s).
    pub heartbeat: Duration,
    /// Silence after which a connection counts as dead (default 3 × heartbeat).
    pub timeout: Duration,
    /// Longest accepted line in bytes (default 1 MiB); a longer one closes the connection.
    pub max_line: usize,
    /// Largest record, in bytes of its register row (default 64 KiB); a larger
    /// one is refused. Well under `max_line`, so that no row the hub sends
    /// (a record with its owner and version) is too long for its clients.
    pub max_record: usize,
    /// Bytes of forwarded rows the hub keeps, once for all its connections
    /// (default 64 MiB): a connection further behind loses its place, and is
    /// sent the latest state of the records that changed instead.
    pub max_queue_bytes: usize,
    /// Keys allowed to register, update and free; empty means everyone may.
    pub authorized: Authorized,
    /// Keys that may also free any record (operators').
    pub admin: Authorized,
    /// Keys of hubs: on a secured hub only they may write `seaport` records.
    pub hub_keys: Authorized,
    /// Whether an open hub lets only a record's owner change it (`--owned`).
    pub owned: bool,
    /// The hub's own keypair, with which it authenticates to the hubs it peers with.
    pub keypair: Option<Keypair>,
    /// The etcd cluster that keeps the records of every hub in front of it,
    /// instead of links between hubs (see [`StoreConfig`]).
    pub store: Option<StoreConfig>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig::with_heartbeat(Duration::from_secs(15))
    }
}

impl HubConfig {
    /// The keys and the ownership rule, as the hub goes by them.
    fn policy(&self) -> guard::Policy {
        guard::Policy {
            authorized: self.authorized.clone(),
            admin: self.admin.clone(),
            hubs: self.hub_keys.clone(),
            owned: self.owned,
        }
    }

    /// Defaults with the given heartbeat and a timeout of three heartbeats.
    pub fn with_heartbeat(heartbeat: Duration) -> Self {
        HubConfig {
            heartbeat,
            timeout: heartbeat * 3,
            max_line: DEFAULT_MAX_LINE,
            max_record: DEFAULT_MAX_RECORD,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            authorized: Authorized::default(),
            admin: Authorized::default(),
            hub_keys: Authorized::default(),
            owned: false,
            keypair: None,
            store: None,
        }
    }
}

/// A running hub. Dropping it leaves the hub running in the background until the
/// runtime stops; call [`Hub::shutdown`] to stop it.
#[derive(Debug)]
pub struct Hub {
    addr: SocketAddr,
    config: Arc<HubConfig>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Cancelled first when the hub stops: it takes no new connection.
    accepting: CancellationToken,
    tasks: TaskTracker,
}

impl Hub {
    /// Binds a listener and starts serving on the current tokio runtime.
    pub async fn bind(addr: impl ToSocketAddrs, config: HubConfig) -> io::Result<Hub> {
        let mut last = None;
        for addr in tokio::net::lookup_host(addr).await? {
            match listen_async(addr) {
                Ok(listener) => return Ok(Hub::serve(listener, config)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::ErrorKind::AddrNotAvailable.into()))
    }

    /// Starts serving on a listener the caller bound.
    pub fn serve(listener: TcpListener, config: HubConfig) -> Hub {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        give_back::keep_buffers_apart();
        let instance = crate::registry::record::new_id();
        let shared = Arc::new(Shared::new(
            &instance,
            config.policy(),
            config.heartbeat,
            config.timeout,
        ));
        if let Some(pair) = &config.keypair {
            shared.set_own_key(pair.fingerprint().as_str());
        }
        shared.limit_records(config.max_record);
        shared.limit_queue(config.max_queue_bytes);
        let config = Arc::new(config);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(beat_loop(shared.clone(), config.heartbeat, stop.clone()));
        if let Some(store) = config.store.clone() {
            // Hubs over a store find each other, and clients find them,
            // by their `seaport` records.
            shared.announce(announced_host(addr.ip(), &store), addr.port());
            store::start(store, shared.clone(), &config, stop.clone(), &tasks);
        }
        let accepting = stop.child_token();
        tasks.spawn(accept_loop(
            listener,
            config.clone(),
            shared.clone(),
            stop.clone(),
            accepting.clone(),
            tasks.clone(),
        ));
        Hub {
            addr,
            config,
            shared,
            stop,
            accepting,
            tasks,
        }
    }

    /// The address the hub listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records matching `pattern`, in arrival order.
    pub fn query(&self, pattern: &Pattern) -> Vec<Record> {
        self.shared.query(pattern)
    }

    /// Peers with the hub at `target`: records flow both ways, and this hub is
    /// announced there as `seaport@VERSION` on its port. The link reconnects on its
    /// own and authenticates with the hub's keypair when it has one.
    /// A hub over a store does not peer: the store links the hubs (the call
    /// is refused with an error in the log).
    pub fn peer(&self, target: HubAddr) {
        if self.config.store.is_some() {
            tracing::error!(peer = %target, "not peering: this hub keeps its records in a store, which links the hubs");
            return;
        }
        let ip = self.addr.ip();
        let host = (!ip.is_unspecified()).then(|| ip.to_canonical().to_string());
        self.shared.announce(host, self.addr.port());
        self.tasks.spawn(peer::link(
            target,
            self.shared.next_id(),
            self.shared.clone(),
            self.config.clone(),
            self.stop.clone(),
        ));
    }

    /// Replaces the keys in force: authorized, admin and hub keys. Open
    /// connections stay open; each write is judged by the keys in force when it
    /// arrives.
    pub fn set_keys(&self, keys: HubKeys) {
        let mut policy = (*self.shared.policy()).clone();
        policy.authorized = keys.authorized;
        policy.admin = keys.admin;
        policy.hubs = keys.hubs;
        self.shared.set_policy(policy);
    }

    /// Whether only authorized keys may write.
    pub fn secured(&self) -> bool {
        self.shared.policy().secured()
    }

    /// Whether only a record's owner may change it (keys, or `--owned`).
    pub fn enforces_owners(&self) -> bool {
        self.shared.policy().enforces_owners()
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.shared.connections()
    }

    /// A read-only handle on this hub, for observers such as the admin
    /// endpoint.
    pub fn view(&self) -> HubView {
        HubView {
            shared: self.shared.clone(),
        }
    }

    /// Stops accepting, closes every connection and waits for their tasks to end.
    pub async fn shutdown(self) {
        self.stop_serving().await;
    }

    /// Like [`Hub::shutdown`], for a process about to exit: the registry's memory
    /// is left to the operating system instead of being freed record by record,
    /// which takes seconds with millions of records.
    pub async fn shutdown_for_exit(self) {
        let shared = self.shared.clone();
        self.stop_serving().await;
        std::mem::forget(shared);
    }

    async fn stop_serving(self) {
        // A client that connects now is refused, and tries another hub,
        // rather than being closed a moment later.
        self.accepting.cancel();
        self.shared.stop();
        // The farewell to the peers is queued; give it, and what the clients
        // are sending now, a moment to be relayed.
        tokio::time::sleep(FAREWELL).await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A read-only handle on a running hub: its records, their changes and its
/// figures. Cheap to clone. It keeps the hub's state, not the hub, alive: once
/// the hub stops, subscriptions end.
#[derive(Debug, Clone)]
pub struct HubView {
    shared: Arc<Shared>,
}

impl HubView {
    /// A listing of the records there are now, in arrival order, to take a
    /// part at a time with [`HubView::list`] or [`HubView::list_matching`]:
    /// the hub's lock is held for one part at a time, and only to copy the
    /// part's rows, never to decode them.
    pub fn listing(&self) -> Listing {
        self.shared.listing()
    }

    /// A listing of every record now (take it with
    /// [`HubView::list_subscribed`]), then the changes from then on. The
    /// changes wait for the subscriber in a queue of at most one change per
    /// record, its latest (so changes to different records may come in
    /// another order than the hub made them), and of at most `budget` bytes
    /// (each change weighs its row and a fixed overhead: see
    /// [`Change::weight`]); one whose queue would weigh more loses its place
    /// (see [`Received::Lost`]) and lists the records afresh with
    /// [`HubView::resync`]. The hub never waits for a subscriber, and a
    /// stalled one holds no more than its budget.
    pub fn subscribe(&self, budget: usize) -> (Listing, Subscription) {
        self.shared.subscribe(budget)
    }

    /// The next part of `listing`, each record as it is now and undecoded
    /// (see [`StoredRow::record`]): about 256 KiB of rows or 1,000 records
    /// at most. It may be empty before the listing is done
    /// ([`Listing::is_done`]), and is empty after.
    pub fn list(&self, listing: &mut Listing) -> Vec<StoredRow> {
        self.shared.list_part(listing, &Pattern::all())
    }

    /// Like [`HubView::list`], only the records that match `pattern`'s role
    /// and range; its `key=value` conditions are left to the caller, who
    /// decodes the records ([`Pattern::matches_meta`]).
    pub fn list_matching(&self, listing: &mut Listing, pattern: &Pattern) -> Vec<StoredRow> {
        self.shared.list_part(listing, pattern)
    }

    /// The next part of `subscription`'s listing, as [`HubView::list`]. A
    /// subscription's listing must be taken with this, never with
    /// [`HubView::list`]: changes to the records it has yet to reach are not
    /// queued (the listing shows them as they are when their part is taken),
    /// and this is how the hub learns which records those are.
    pub fn list_subscribed(
        &self,
        subscription: &Subscription,
        listing: &mut Listing,
    ) -> Vec<StoredRow> {
        self.shared.list_subscribed(subscription, listing)
    }

    /// A new listing of every record, for a subscription that lost its
    /// place; its changes queue again from then on.
    pub fn resync(&self, subscription: &Subscription) -> Listing {
        self.shared.resync(subscription)
    }

    /// Adds the hub's metrics to `registry`: its counters, and its levels
    /// read at each scrape (see the README for the names).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.shared.metrics().register_in(registry);
        registry.register_collector(Box::new(metrics::LevelsCollector(self.shared.clone())));
    }
}

/// The address a hub over `store` announces itself at: the one it listens
/// on, or, listening on every interface, the one it reaches the store from,
/// which is how other machines reach it; when that is a loopback address (an
/// etcd member or proxy on the same machine), the one it reaches other
/// networks from, if it has a route to them. Found without sending anything.
fn announced_host(listening: IpAddr, store: &StoreConfig) -> Option<String> {
    if !listening.is_unspecified() {
        return Some(listening.to_canonical().to_string());
    }
    let endpoint = store.endpoints.first()?;
    let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(endpoint.as_str())
        .ok()?
        .next()?;
    let towards_store = source_towards(target)?;
    if !towards_store.is_loopback() {
        return Some(towards_store.to_string());
    }
    // An address of TEST-NET-1, never sent to: only the route is looked up.
    let elsewhere = source_towards(SocketAddr::from(([192, 0, 2, 1], 9)))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    Some(elsewhere.unwrap_or(towards_store).to_string())
}

/// The local address the system would send from to `target`.
fn source_towards(target: SocketAddr) -> Option<IpAddr> {
    let local = if target.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let socket = std::net::UdpSocket::bind(local).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_canonical())
}

/// The default byte budget of the forwarded rows the hub keeps for slow
/// readers, once for all its connections.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// The default largest record, in bytes of its register row.
pub const DEFAULT_MAX_RECORD: usize = 64 * 1024;

/// Room a row needs beyond its record: the owner and version a hub adds
/// (about 150 bytes).
pub const ROW_OVERHEAD: usize = 256;

/// How long a stopping hub goes on relaying before it closes its connections:
/// its farewell (the free of its own record) reaches its peers, and so do the
/// rows its clients sent as it was told to stop. A registration in flight
/// then reaches the other hubs at once, instead of when its client has failed
/// over (a 2.0.9 client waits a second before each hub it tries, and tries
/// the hub it was given first, so that takes two seconds or more).
const FAREWELL: Duration = Duration::from_millis(250);

/// A hub's listening address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The address tried last.
    pub addr: SocketAddr,
    /// Why it failed.
    pub source: io::Error,
}

/// Binds `host:port`, or, without a host, every interface: dual-stack IPv6 where
/// the machine has it, IPv4 otherwise; with the longest accept queue
/// ([`listen_async`]).
pub async fn listen_on(host: Option<IpAddr>, port: u16) -> Result<TcpListener, ListenError> {
    let addrs: Vec<SocketAddr> = match host {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ],
    };
    let mut last = None;
    for addr in addrs {
        match listen_async(addr) {
            Ok(listener) => return Ok(listener),
            Err(source) => last = Some(ListenError { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ListenError {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        source: io::ErrorKind::AddrNotAvailable.into(),
    }))
}

/// Beats to the peers every heartbeat, and drops the records of silent hubs;
/// tidies the feed every [`TIDY_PERIOD`].
async fn beat_loop(shared: Arc<Shared>, period: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tidy = tokio::time::interval(TIDY_PERIOD);
    tidy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => shared.tick(period),
            _ = tidy.tick() => shared.tidy(),
            () = stop.cancelled() => return,
        }
    }
}

/// How often the feed drops what every reader has read.
const TIDY_PERIOD: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    config: Arc<HubConfig>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    accepting: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = accepting.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                shared.metrics().accepted();
                tasks.spawn(connection::serve(
                    stream,
                    shared.next_id(),
                    shared.clone(),
                    config.clone(),
                    stop.child_token(),
                ));
            }
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: wait
                // a moment instead of spinning, then keep serving.
                tracing::warn!("accept failed: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = accepting.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    /// Reads until the hub closes the connection; how long that took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        started.elapsed()
    }

    /// A hub with the heartbeat and timeout of 2.0.9's `free_cases.js`.
    async fn short_heartbeat_hub() -> Hub {
        let config = HubConfig {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(60),
            ..HubConfig::default()
        };
        Hub::bind("127.0.0.1:0", config).await.expect("bind")
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_dropped_after_three_node_heartbeats() {
        let hub = short_heartbeat_hub().await;
        let mut silent = TcpStream::connect(hub.local_addr()).await.expect("connect");
        let waited = closed_after(&mut silent).await;
        assert!(
            waited >= Duration::from_secs(45) && waited < Duration::from_secs(46),
            "{waited:?}"
        );
        hub.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_ends_a_line_is_dropped_too() {
        let hub = short_heartbeat_hub().await;
        let mut slow = TcpStream::connect(hub.local_addr()).await.expect("connect");
        // Part of a line, then nothing: it counts as news once, not forever.
        slow.write_all(b"[\"heartbeat\"").await.expect("write");
        let waited = tokio::time::timeout(Duration::from_secs(300), closed_after(&mut slow))
            .await
            .expect("the hub drops a connection that never ends its line");
        assert!(
            waited >= Duration::from_secs(45) && waited < Duration::from_secs(91),
            "{waited:?}"
        );
        hub.shutdown().await;
    }

    #[test]
    fn a_busy_hub_judges_a_peer_by_what_arrived_in_time() {
        use std::io::Write;
        // A hub too busy to run (its one thread blocked) while a heartbeat
        // arrives in time, and past the deadline when it runs again: the
        // heartbeat counts. (Were the deadline and the read raced, about
        // half of these rounds would time the peer out.)
        for _ in 0..8 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let config = HubConfig {
                heartbeat: Duration::from_millis(100),
                timeout: Duration::from_millis(300),
                ..HubConfig::default()
            };
            let hub = rt.block_on(Hub::bind("127.0.0.1:0", config)).expect("bind");
            let mut peer = std::net::TcpStream::connect(hub.local_addr()).expect("connect");
            peer.write_all(b"[\"heartbeat\",100]\n").expect("write");
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
            let mut later = peer.try_clone().expect("clone");
            let beat = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                later.write_all(b"[\"heartbeat\",100]\n").expect("write");
            });
            // The hub's thread is blocked well past the deadline.
            std::thread::sleep(Duration::from_millis(600));
            beat.join().expect("beat");
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
            assert_eq!(hub.connections(), 1, "a peer that beat in time was dropped");
            rt.block_on(hub.shutdown());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_says_its_heartbeat_gets_three_of_them() {
        let hub = short_heartbeat_hub().await;
        let mut client = TcpStream::connect(hub.local_addr()).await.expect("connect");
        client
            .write_all(b"[\"heartbeat\",1000]\n")
            .await
            .expect("write");
        let waited = closed_after(&mut client).await;
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
            "{waited:?}"
        );
        hub.shutdown().await;
    }
}
