//! The hub's shared state: the registry and the set of live connections.
//!
//! Every decision is taken here under one lock, which is never held across an
//! `.await`: a row comes in, the registry decides, and the resulting lines go out
//! through the [`Feed`], once for every connection, or to one connection's own
//! queue. A std `Mutex` fits because each critical section is short and
//! synchronous; an actor task would add a hop per row for no gain. Lines are
//! encoded once and shared (`Bytes`), never re-encoded per connection.
//!
//! Between hubs, every record and every free carries a [`Stamp`] (see
//! [`crate::protocol::stamp`]): a row from another hub is applied, and forwarded, only when
//! it is newer than what this hub holds, so each change crosses each link at most
//! once. This hub is the origin of what its own clients write and decides alone
//! when those records go; records of another origin go when that hub frees them,
//! when its dump no longer has them, or when it has not been heard from (its
//! relayed `beat` rows) for a timeout. Peers that send no stamps (the Node hub)
//! get the rules of the Node package: the record is ours, held by the link.

use super::changes::Changes;
use super::feed::{Entry, Feed, To};
use super::give_back::{GiveBack, give_back};
use super::guard::{Policy, Writer, key_name};
use super::metrics::{FreeReason, HubMetrics, Levels, RejectReason};
use super::outbox::{Out, Outbox, Source};
use super::subscribers::{Change, Listing, Subscribers, Subscription};
use crate::protocol::metadata::Metadata;
use crate::protocol::owner::Holder;
use crate::protocol::stamp::{Clock, Stamp, Tombstones};
use crate::protocol::wire::{self, Ext, Meta, Row};
use crate::registry::pattern::Pattern;
use crate::registry::record::Record;
use crate::registry::{Owner, Registered, Registry, ShrinkSparse, StoredRow};
use bytes::Bytes;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Where a connection's rows go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// An accepted connection's socket.
    Socket(Arc<Outbox>),
    /// One of our peer links, which passes rows on to its client; also how the
    /// tests read what a connection was sent.
    Channel(mpsc::UnboundedSender<Out>),
}

/// One thing a row from a connection asks of the hub.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Apply a `register`, `free`, `beat` or `synced` row (others are ignored),
    /// written by this writer.
    Apply(Row, Writer),
    /// Send this line back to the connection.
    Reply(Bytes),
}

/// A live connection as the shared state sees it.
#[derive(Debug)]
struct Conn {
    sink: Sink,
    addr: String,
    /// The hub this connection is the link of: for an accepted connection, the
    /// hub of the first `beat` it sent (a link beats for its own hub first);
    /// for one of our own links, the id the other hub gave in its `helo` (none
    /// for a Node hub).
    hub: Option<Arc<str>>,
    /// One of our own links to another hub.
    outgoing: bool,
    /// One of this hub's own links, to a peer or to the store: it may speak
    /// as a hub whatever the keys (see `Inner::speaks_as_hub`).
    ours: bool,
    /// When it was made (for one of our links, when it last connected): a
    /// link made since a hub's records were dropped brings all it holds.
    since: Instant,
    /// One of our own links that has no connection now: rows for it are
    /// dropped, since it sends everything again when it reconnects.
    paused: bool,
    /// Ids of the records it sent before its first `synced` (stamped ones, and
    /// any from our own links): what its hub holds.
    dumped: Option<HashSet<String>>,
    /// For an accepted link, the clock value of its first beat: its records
    /// are as of then, and one of its hub's records newer than that came after
    /// the dump, by another way.
    dump_head: Option<u64>,
    /// For one of our own links, the records its dump must confirm: those we
    /// held for that hub when the connection started.
    to_confirm: Option<HashSet<String>>,
}

/// The connection number of the hub itself: the owner of its own `seaport`
/// record. Connections are numbered from 1.
const ITSELF: Owner = Owner(0);

/// About the most bytes of rows a part of a listing (see
/// [`Shared::list_part`]) takes under one lock.
pub(crate) const LIST_PART_BYTES: usize = 256 * 1024;

/// The most records a part of a listing takes under one lock.
pub(crate) const LIST_PART_RECORDS: usize = 1000;

/// A write as the state judges it: who wrote it, under which policy.
struct Write<'a> {
    by: Writer,
    policy: &'a Policy,
}

/// Why a write is refused: the reason the writer is told, and its kind for
/// the metrics.
#[derive(Debug)]
struct Refused {
    cause: RejectReason,
    reason: String,
}

impl Refused {
    fn new(cause: RejectReason, reason: impl Into<String>) -> Self {
        Refused {
            cause,
            reason: reason.into(),
        }
    }

    /// A stamped row from a connection that may not speak as a hub.
    fn not_a_hub() -> Self {
        Refused::new(
            RejectReason::Unauthorized,
            "stamped rows are a hub's: only a hub key (--hub-key) may send them",
        )
    }
}

/// How the hub announces itself once it peers with another hub.
#[derive(Debug, Clone)]
struct Announcement {
    /// The address to announce: the listening address when it is a specific
    /// one, otherwise the address the first peer sees us at (as a Node hub
    /// does); `None` until then.
    host: Option<String>,
    /// The listening port.
    port: u16,
}

/// When another hub was last heard from.
#[derive(Debug)]
struct LastHeard {
    /// Clock value of its latest beat.
    v: u64,
    at: Instant,
    /// How long it may stay silent before its records are dropped.
    patience: Duration,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    conns: HashMap<Owner, Conn, foldhash::fast::RandomState>,
    /// Connections that are links to other hubs: our outgoing peer links, and
    /// incoming connections that announced a hub (a `seaport` record) or sent
    /// stamped rows.
    peers: HashSet<Owner, foldhash::fast::RandomState>,
    /// This hub's id: the origin of its clients' records.
    me: Arc<str>,
    clock: Clock,
    tombstones: Tombstones,
    /// Other hubs whose records we hold, by origin.
    origins: HashMap<Arc<str>, LastHeard>,
    /// Hubs whose records were dropped because they fell silent, and when:
    /// if one is heard again soon after, the link it is heard on is made
    /// again, so that its records come back (see `Inner::beat`).
    silenced: HashMap<Arc<str>, Instant>,
    /// Default patience for a hub that has not told its beat period.
    timeout: Duration,
    /// How often this hub sends heartbeats (told to clients in `helo`).
    heartbeat: Duration,
    /// Set once the hub peers: it then holds its own `seaport` record.
    announcement: Option<Announcement>,
    /// The fingerprint of the hub's own key, which owns its `seaport` record.
    own_key: Option<Arc<str>>,
    /// The largest record the hub takes, in bytes of its register row.
    max_record: usize,
    /// The rows forwarded to every connection, read by their writers.
    feed: Arc<Feed>,
    /// Rows forwarded while the lock is held: they join the feed, in one go,
    /// when it is released (see [`Locked`]).
    forwarded: Vec<Entry>,
    /// Where in the feed each record last changed.
    changes: Changes,
    /// Connections whose rows go through a channel (our own peer links, and
    /// the tests' connections) rather than the feed.
    channels: HashSet<Owner, foldhash::fast::RandomState>,
    /// When the hub last had a peer link, if ever: until the peers' patience
    /// with it has run out, they may hold copies of its records.
    peered_at: Option<Instant>,
    /// When to give freed memory back to the system.
    give_back: GiveBack,
    /// Observers of the records outside the protocol (see `subscribers`).
    subscribers: RefCell<Subscribers>,
    /// The hub's counters.
    metrics: Arc<HubMetrics>,
    /// The connection of the store the hub keeps its records in, if any
    /// (see `store`): then the store, not beats, says which hubs live.
    store: Option<Owner>,
    /// Records of ours written again after the store dropped them: the stamp
    /// given then, and the version their client registered, which is the
    /// one that counts against another hub's client's (while the record
    /// holds that stamp).
    written_again: HashMap<String, WrittenAgain, foldhash::fast::RandomState>,
}

/// A record of ours written again (see `Inner::written_again`).
#[derive(Debug)]
struct WrittenAgain {
    stamp: Stamp,
    registered: Stamp,
}

/// The locked state. Releasing it adds the rows forwarded meanwhile to the
/// feed and wakes the writers, so the rows of one locked section go out in one
/// write per connection.
struct Locked<'a>(Option<MutexGuard<'a, Inner>>);

impl std::ops::Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.0
            .as_deref()
            .unwrap_or_else(|| unreachable!("locked until dropped"))
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.0
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("locked until dropped"))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.0.take() else {
            return;
        };
        let inner = &mut *guard;
        inner.changes.take_removed(&mut inner.registry);
        let forwarded = &mut inner.forwarded;
        if forwarded.is_empty() {
            return;
        }
        // Under the lock, so that the feed's order is the order of decisions.
        // The list keeps its room for the next batch, unless a burst made it
        // large.
        inner.feed.extend(forwarded.drain(..));
        forwarded.shrink_to(FORWARDED_KEPT);
        if guard.changes.due() {
            guard.forget_freed();
        }
        let feed = guard.feed.clone();
        drop(guard);
        feed.publish();
    }
}

/// A record of ours written again at a new version (see
/// [`Shared::reassert_ours`]).
#[derive(Debug, Clone)]
pub(crate) struct Reasserted {
    /// The record.
    pub(crate) id: String,
    /// The version its client registered.
    pub(crate) before: Stamp,
    /// Its version now.
    pub(crate) now: Stamp,
}

/// The state every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// The last connection number given out.
    last_id: AtomicU64,
    /// The keys in force and the ownership rule; swapped whole on reload, read
    /// once per batch of rows.
    policy: RwLock<Arc<Policy>>,
    /// Set when the hub stops: its connections then close without telling the
    /// others that their records are freed (they are not: they live on
    /// elsewhere, and the clients need the `seaport` records to move).
    stopping: std::sync::atomic::AtomicBool,
    /// The hub's counters, also reachable without the lock.
    metrics: Arc<HubMetrics>,
}

/// Rows forwarded under one lock that the list of them keeps room for
/// between batches.
const FORWARDED_KEPT: usize = 256;

/// How long a free is remembered, at least.
const TOMBSTONE_MIN: Duration = Duration::from_secs(60);

/// The most silent hubs remembered at once (see `Inner::silenced`): beats of
/// made-up hubs cost no more than this.
const MAX_SILENCED: usize = 1024;

impl Shared {
    /// Shared state of hub `me`, with an initial policy, sending
    /// heartbeats every `heartbeat`; `timeout` is how long a silent peer hub's
    /// records are kept.
    pub(crate) fn new(me: &str, policy: Policy, heartbeat: Duration, timeout: Duration) -> Self {
        let feed = Arc::new(Feed::new(super::DEFAULT_MAX_QUEUE_BYTES));
        let metrics = Arc::new(HubMetrics::default());
        Shared {
            inner: Mutex::new(Inner {
                registry: Registry::default(),
                conns: HashMap::default(),
                peers: HashSet::default(),
                me: Arc::from(me),
                clock: Clock::default(),
                tombstones: Tombstones::default(),
                written_again: HashMap::default(),
                origins: HashMap::new(),
                silenced: HashMap::new(),
                timeout,
                heartbeat,
                announcement: None,
                own_key: None,
                max_record: usize::MAX,
                feed,
                forwarded: Vec::new(),
                changes: Changes::default(),
                channels: HashSet::default(),
                peered_at: None,
                give_back: GiveBack::default(),
                subscribers: RefCell::new(Subscribers::default()),
                metrics: metrics.clone(),
                store: None,
            }),
            last_id: AtomicU64::new(0),
            policy: RwLock::new(Arc::new(policy)),
            stopping: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }
    }

    /// This hub's id: the origin of its clients' records.
    pub(crate) fn me(&self) -> Arc<str> {
        self.lock().me.clone()
    }

    /// A new connection number.
    pub(crate) fn next_id(&self) -> Owner {
        Owner(self.last_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Refuses, from now on, records larger than `max_record` bytes.
    pub(crate) fn limit_records(&self, max_record: usize) {
        let mut inner = self.lock();
        inner.max_record = max_record;
        inner.registry.limit_records(max_record);
    }

    /// Lets readers fall at most `max_bytes` of forwarded rows behind before
    /// they are caught up from the registry instead.
    pub(crate) fn limit_queue(&self, max_bytes: usize) {
        self.lock().feed.limit(max_bytes);
    }

    /// The hub's own key, with which it announces itself.
    pub(crate) fn set_own_key(&self, fingerprint: &str) {
        self.lock().own_key = Some(Arc::from(fingerprint));
    }

    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the policy; connections stay open.
    pub(crate) fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock would be a bug in this module; the data
        // is still consistent row by row, so keep serving rather than cascade.
        Locked(Some(
            self.inner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        ))
    }

    /// Adds a connection: queues `helo`, every record and `synced`, then makes it a
    /// receiver of forwarded rows. Done under the lock so that no forwarded row can
    /// overtake the dump.
    pub(crate) fn join(&self, id: Owner, addr: &str, challenge: &str, sink: Sink) {
        let mut inner = self.lock();
        let greeting = vec![
            Row::Helo {
                addr: addr.to_string(),
                hub: Some(inner.me.to_string()),
                heartbeat_ms: Some(millis(inner.heartbeat)),
            }
            .encode(),
            Row::Challenge(challenge.to_string()).encode(),
        ];
        match &sink {
            Sink::Channel(_) => {
                inner.channels.insert(id);
            }
            // It reads the rows forwarded from now on.
            Sink::Socket(outbox) => outbox.start_at(inner.next_position()),
        }
        let conn = Conn::new(sink, addr);
        inner.push(&conn, Out::Lines(greeting));
        let until = inner.registry.arrival_mark();
        inner.push(
            &conn,
            Out::Dump {
                stamped: false,
                until,
            },
        );
        inner.push(&conn, Out::Line(Row::Synced.encode()));
        inner.conns.insert(id, conn);
    }

    /// The feed of forwarded rows, which connections read.
    pub(crate) fn feed(&self) -> Arc<Feed> {
        self.lock().feed.clone()
    }

    /// Adds our outgoing link to another hub; the forwarded rows go through
    /// `tx`. No `helo` or `challenge`: we are the client on that link.
    pub(crate) fn join_peer(&self, id: Owner, name: &str, tx: mpsc::UnboundedSender<Out>) {
        let mut inner = self.lock();
        inner.peers.insert(id);
        inner.channels.insert(id);
        let mut conn = Conn::new(Sink::Channel(tx), name);
        conn.outgoing = true;
        conn.ours = true;
        conn.paused = true;
        conn.dumped = None;
        inner.conns.insert(id, conn);
    }

    /// Adds the store's connection (see `store`): a hub's link that sends
    /// stamped rows, the records of every other hub over the store, and takes
    /// the rows of this hub's own records, each with the connection that
    /// holds it ([`Out::Owned`]), and word of connections that leave
    /// ([`Out::Left`]).
    pub(crate) fn join_store(&self, id: Owner, tx: mpsc::UnboundedSender<Out>) {
        let mut inner = self.lock();
        inner.peers.insert(id);
        inner.channels.insert(id);
        inner.store = Some(id);
        let mut conn = Conn::new(Sink::Channel(tx), "store");
        conn.dumped = None;
        conn.ours = true;
        // What the hub holds already goes first.
        let me = inner.me.clone();
        for rid in inner.registry.from_origin(&me) {
            if let Some(line) = inner.row_for_peers(&rid) {
                let owner = inner.registry.owner(&rid);
                inner.push(&conn, Out::Owned { owner, line });
            }
        }
        inner.conns.insert(id, conn);
    }

    /// Gives those of `ids` this hub is still the origin of a new version,
    /// sent to the peers (the store): the store lost them. Which, with
    /// the versions they had and have.
    pub(crate) fn reassert_ours(&self, ids: &[String]) -> Vec<Reasserted> {
        let mut inner = self.lock();
        let mut reasserted = Vec::new();
        for id in ids {
            if !inner.is_ours(id) {
                continue;
            }
            let Some(before) = inner.registered_version(id) else {
                continue;
            };
            inner.reassert(id);
            if let Some(now) = inner.registry.stamp(id).cloned() {
                reasserted.push(Reasserted {
                    id: id.clone(),
                    before,
                    now,
                });
            }
        }
        reasserted
    }

    /// The store holds `row`, another hub's version of our record, written
    /// after the store dropped ours and newer than what our client last
    /// registered: it is the record now, although the version `ours` that
    /// this hub gave the record to write it again is newer still. Nothing
    /// changes if the hub holds another version by now. Whether it took it.
    pub(crate) fn yield_to_store(&self, store: Owner, ours: &Stamp, row: Row) -> bool {
        let (id, meta, ext) = match row {
            Row::Register { id, meta, ext } => (id, Metadata::from(meta), ext),
            Row::Plain { id, row, ext } => (id, Metadata::Plain(row), ext),
            _ => return false,
        };
        let Some(stamp) = ext.stamp else {
            return false;
        };
        let mut inner = self.lock();
        // The hub's own record is never another hub's.
        if *id == *inner.me || inner.registry.stamp(&id) != Some(ours) || !Clock::plausible(stamp.v)
        {
            return false;
        }
        inner.clock.observe(stamp.v);
        inner.take_version(store, &id, meta, stamp, ext.owner)
    }

    /// Whether the hub holds version `stamp` of record `id`, its latest.
    pub(crate) fn holds_version(&self, id: &str, stamp: &Stamp) -> bool {
        self.lock().registry.stamp(id) == Some(stamp)
    }

    /// The store refused version `stamp` of our record `id`: the record is
    /// freed everywhere, and its writer told why, as a refused register.
    pub(crate) fn refused_by_store(&self, id: &str, stamp: &Stamp, reason: &str) {
        let mut inner = self.lock();
        if inner.registry.stamp(id) != Some(stamp) {
            return;
        }
        let owner = inner.registry.owner(id);
        inner.free_at_held(None, id, FreeReason::Refused);
        let refused = Refused::new(RejectReason::PortTaken, reason);
        let by = Writer::default();
        if let Some(owner) = owner {
            inner.refuse(owner, "register", id, &refused, &by);
        }
    }

    /// The registry's arrival mark now: records that arrive from here on
    /// come after it.
    pub(crate) fn arrival_mark(&self) -> u64 {
        self.lock().registry.arrival_mark()
    }

    /// Our link `id` is connected to hub `hub` (its id from `helo`; `None` for
    /// a Node hub): what it sends before its `synced` is all that hub holds
    /// of what arrived here before mark `held_before` (taken before the
    /// connection was made).
    pub(crate) fn link_up(&self, id: Owner, hub: Option<&str>, held_before: u64) {
        let mut inner = self.lock();
        let to_confirm: HashSet<String> = match hub {
            // Its list is as of when it accepted us: a record of its that
            // reached us since (through a third hub) is not on it.
            Some(hub) => inner
                .registry
                .from_origin(hub)
                .into_iter()
                .filter(|rid| inner.registry.arrived_before(rid, held_before))
                .collect(),
            None => inner
                .registry
                .owned_by(id)
                .into_iter()
                .map(String::from)
                .collect(),
        };
        if let Some(conn) = inner.conns.get_mut(&id) {
            conn.hub = hub.map(Arc::from);
            conn.paused = false;
            conn.dumped = Some(HashSet::new());
            conn.to_confirm = Some(to_confirm);
            conn.since = Instant::now();
        }
    }

    /// Our link `id` lost its connection: nothing is queued for it until it
    /// reconnects and sends a snapshot.
    pub(crate) fn link_down(&self, id: Owner) {
        if let Some(conn) = self.lock().conns.get_mut(&id) {
            conn.paused = true;
        }
    }

    /// Queues for our link `id` a beat of this hub, which tells the other hub
    /// whose link this is, then every record we hold, stamped: the link's own
    /// records on a new connection. Under the lock, so that what the link was
    /// sent before it is covered and what follows is newer.
    ///
    /// A Node hub is not sent back the records it gave us: it would take them
    /// for records of ours, and free them, its clients' included, everywhere
    /// when this connection ends.
    pub(crate) fn snapshot_to(&self, id: Owner) {
        let mut inner = self.lock();
        let beat = Row::Beat {
            origin: inner.me.to_string(),
            v: inner.clock.tick(),
            period_ms: millis(inner.heartbeat),
        }
        .encode();
        let Some(conn) = inner.conns.get(&id) else {
            return;
        };
        let mut rows = vec![beat];
        if conn.hub.is_none() {
            rows.extend(inner.registry.stamped_rows_except(id));
        } else {
            rows.extend(inner.registry.stamped_rows());
        }
        inner.push(conn, Out::Snapshot(rows));
    }

    /// Our link `id` has had no connection for a timeout: the records it holds
    /// for a hub without versions (a Node hub) go, as a Node client forgets
    /// them. Hubs with versions decide about their records themselves.
    pub(crate) fn link_lost(&self, id: Owner) {
        self.lock()
            .free_ours_held_by(id, Some(id), FreeReason::Peer);
    }

    /// The hub peers with others: from now on it holds its own `seaport` record,
    /// under its id, on `port`, at `host` or, without one, at the address the
    /// first peer sees it at. Its clients see it, as with a Node hub, and so do
    /// the peers' clients, who can fail over to it.
    pub(crate) fn announce(&self, host: Option<String>, port: u16) {
        let mut inner = self.lock();
        if inner.announcement.is_none() {
            inner.announcement = Some(Announcement { host, port });
            inner.announce_self();
        }
    }

    /// A peer said it sees this hub at `addr`: the host to announce, if the
    /// listening address did not give one.
    pub(crate) fn seen_at(&self, addr: &str) {
        let mut inner = self.lock();
        if let Some(announcement) = &mut inner.announcement
            && announcement.host.is_none()
        {
            announcement.host = Some(addr.to_string());
            inner.announce_self();
        }
    }

    /// Removes a connection and frees the records this hub is the origin of that
    /// came over it, telling the others. Records of other hubs stay: their own
    /// hub decides when they go.
    pub(crate) fn leave(&self, id: Owner, reason: FreeReason) -> usize {
        let mut inner = self.lock();
        inner.conns.remove(&id);
        inner.peers.remove(&id);
        inner.channels.remove(&id);
        if self.stopping.load(Ordering::SeqCst) {
            // The records go with the process; freeing them one by one would
            // only make a large hub slow to stop.
            return 0;
        }
        let freed = inner.free_ours_held_by(id, None, reason);
        if let Some(store) = inner.store
            && let Some(conn) = inner.conns.get(&store)
        {
            inner.push(conn, Out::Left(id));
        }
        freed
    }

    /// Applies what one connection's rows ask, under one lock, so that their
    /// effects go out together (one write per connection for the whole batch).
    pub(crate) fn apply(&self, from: Owner, effects: impl IntoIterator<Item = Effect>) {
        let policy = self.policy();
        let mut inner = self.lock();
        for effect in effects {
            match effect {
                Effect::Apply(Row::Register { id, meta, ext }, by) => {
                    inner.register(
                        from,
                        &id,
                        meta.into(),
                        ext,
                        &Write {
                            by,
                            policy: &policy,
                        },
                    );
                }
                Effect::Apply(Row::Plain { id, row, ext }, by) => {
                    inner.register(
                        from,
                        &id,
                        Metadata::Plain(row),
                        ext,
                        &Write {
                            by,
                            policy: &policy,
                        },
                    );
                }
                Effect::Apply(Row::Free { id, ext }, by) => {
                    inner.free(
                        from,
                        &id,
                        ext,
                        &Write {
                            by,
                            policy: &policy,
                        },
                    );
                }
                Effect::Apply(
                    Row::Beat {
                        origin,
                        v,
                        period_ms,
                    },
                    by,
                ) => inner.beat(
                    from,
                    &origin,
                    v,
                    Duration::from_millis(period_ms),
                    &Write {
                        by,
                        policy: &policy,
                    },
                ),
                Effect::Apply(Row::Synced, _) => inner.synced(from),
                Effect::Apply(..) => {}
                Effect::Reply(line) => inner.send(from, line),
            }
        }
    }

    /// Every period: beats to the peers, and the records of hubs not heard from
    /// for their timeout dropped.
    pub(crate) fn tick(&self, period: Duration) {
        let mut inner = self.lock();
        let now = Instant::now();
        let line = Row::Beat {
            origin: inner.me.to_string(),
            v: inner.clock.tick(),
            period_ms: millis(period),
        }
        .encode();
        inner.broadcast_peers(None, line);
        // Over a store, a hub's records live as long as its leases there:
        // a silent hub is forgotten once etcd has dropped them all.
        let judged = inner.store.is_none();
        let quiet: Vec<Arc<str>> = inner
            .origins
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.at) >= h.patience)
            .map(|(origin, _)| origin.clone())
            .collect();
        let mut silent = Vec::new();
        for origin in quiet {
            if judged || !inner.registry.has_origin(&origin) {
                silent.push(origin);
            } else if let Some(heard) = inner.origins.get_mut(&origin) {
                // Looked at again after another timeout, not at every tick.
                heard.at = now;
            }
        }
        let keep = inner.tombstone_keep();
        inner
            .silenced
            .retain(|_, at| now.saturating_duration_since(*at) < keep);
        for origin in silent {
            inner.origins.remove(&origin);
            let ids = inner.registry.from_origin(&origin);
            if !ids.is_empty() {
                tracing::info!(hub = %origin, records = ids.len(), "hub not heard from; dropping its records");
                if inner.silenced.len() < MAX_SILENCED {
                    inner.silenced.insert(origin.clone(), now);
                }
            }
            for rid in &ids {
                if inner.registry.discard(rid) {
                    inner.metrics.freed(FreeReason::Timeout, 1);
                }
                inner.broadcast_clients(rid, wire::encode_free(rid, &Ext::default()));
            }
        }
        if !inner.peers.is_empty() {
            inner.peered_at = Some(now);
        }
        // A free a reader behind the feed may still be caught up with keeps
        // its stamp: a peer is told of it as a stamped free (`catch_up`).
        let inner = &mut *inner;
        let changes = &inner.changes;
        inner
            .tombstones
            .prune(now, keep, |id| changes.keeps_free_of(id));
    }

    /// Drops from the feed what every reader has passed, and gives back the
    /// memory of what is gone: a burst leaves nothing behind once it is read.
    pub(crate) fn tidy(&self) {
        let mut inner = self.lock();
        // Readers that lost their place are caught up from the registry, not
        // the feed: a stalled one holds nothing here.
        let start = inner.feed.start();
        let passed = inner
            .conns
            .values()
            .filter_map(|conn| match &conn.sink {
                Sink::Socket(outbox) => Some(outbox.cursor()).filter(|&at| at >= start),
                Sink::Channel(_) => None,
            })
            .min()
            .unwrap_or_else(|| inner.next_position());
        inner.feed.trim_below(passed);
        // After a burst of frees, what is left of it goes as soon as no
        // reader needs it, not at the next thousands.
        let changes = &inner.changes;
        if changes.freed() > 0 && changes.freed() * 4 >= changes.len() {
            inner.forget_freed();
        }
        inner.shrink();
        inner.subscribers.get_mut().prune();
        // Records written again that changed or went since.
        let Inner {
            written_again,
            registry,
            ..
        } = &mut *inner;
        written_again.retain(|id, again| registry.stamp(id) == Some(&again.stamp));
        let (connections, records) = (inner.conns.len(), inner.registry.len());
        if inner.give_back.due(connections, records) {
            drop(inner);
            give_back();
        }
    }

    /// Records matching `pattern`.
    pub(crate) fn query(&self, pattern: &Pattern) -> Vec<Record> {
        self.lock().registry.query(pattern)
    }

    /// The hub is stopping: see `stopping`. Its own record is freed
    /// everywhere, so that clients stop trying it at once; the records of its
    /// clients stay until they re-register elsewhere or the peers give up on
    /// this hub.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut inner = self.lock();
        // Subscriptions end with the hub.
        inner.subscribers.get_mut().close();
        let me = inner.me.clone();
        inner.free_at_held(None, &me, FreeReason::Explicit);
    }

    /// Number of live connections.
    pub(crate) fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// The hub's counters.
    pub(crate) fn metrics(&self) -> &Arc<HubMetrics> {
        &self.metrics
    }

    /// A listing of the records there are now, to take a part at a time
    /// with [`Shared::list_part`].
    pub(crate) fn listing(&self) -> Listing {
        Listing::until(self.lock().registry.arrival_mark())
    }

    /// A listing of every record now and, from then on, every change, queued
    /// up to `budget` bytes (see [`Change::weight`]). Under one lock, so that
    /// no change is missed.
    pub(crate) fn subscribe(&self, budget: usize) -> (Listing, Subscription) {
        let inner = self.lock();
        let listing = Listing::until(inner.registry.arrival_mark());
        let subscription = inner.subscribers.borrow_mut().add(budget, &listing);
        (listing, subscription)
    }

    /// A new listing of every record, for a subscriber that lost its place;
    /// its changes queue again from now on. Under one lock, as
    /// [`Shared::subscribe`].
    pub(crate) fn resync(&self, subscription: &Subscription) -> Listing {
        let inner = self.lock();
        let listing = Listing::until(inner.registry.arrival_mark());
        inner.subscribers.borrow().found(subscription, &listing);
        listing
    }

    /// The next part of `subscription`'s listing (from [`Shared::subscribe`]
    /// or [`Shared::resync`]), as [`Shared::list_part`] with every record.
    /// Under the same lock, the subscription learns where its listing is, so
    /// that changes to the records of this part queue from then on, and
    /// changes to those still to be listed do not.
    pub(crate) fn list_subscribed(
        &self,
        subscription: &Subscription,
        listing: &mut Listing,
    ) -> Vec<StoredRow> {
        if listing.done {
            return Vec::new();
        }
        let inner = self.lock();
        let part = take_part(&inner.registry, listing, &Pattern::all());
        inner.subscribers.borrow().listed(subscription, listing);
        part
    }

    /// The next part of `listing`: the records matching `pattern`'s role and
    /// range, undecoded, at most [`LIST_PART_BYTES`] of rows or
    /// [`LIST_PART_RECORDS`] records (see [`Registry::stored_between`]); none
    /// once it is done, and maybe none before. The lock is held only to copy
    /// them (their rows are shared): the caller decodes them after.
    pub(crate) fn list_part(&self, listing: &mut Listing, pattern: &Pattern) -> Vec<StoredRow> {
        if listing.done {
            return Vec::new();
        }
        take_part(&self.lock().registry, listing, pattern)
    }

    /// The hub's levels now, for the metrics.
    pub(crate) fn levels(&self) -> Levels {
        let inner = self.lock();
        let mut roles: Vec<(String, usize)> = inner
            .registry
            .roles()
            .map(|(role, count)| (role.to_string(), count))
            .collect();
        let with_role: usize = roles.iter().map(|(_, count)| count).sum();
        let open = |id: &Owner| inner.conns.get(id).is_some_and(|conn| !conn.paused);
        let roleless = inner.registry.len().saturating_sub(with_role);
        let connections = inner.conns.keys().filter(|id| open(id)).count();
        let peer_links = inner.peers.iter().filter(|id| open(id)).count();
        let queued_bytes = inner.feed.bytes();
        drop(inner);
        // Any client may name roles: the series are the roles with the most
        // records, the rest counted together.
        let mut other_roles = 0;
        if roles.len() > MAX_ROLE_SERIES {
            roles.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            other_roles = roles.drain(MAX_ROLE_SERIES..).map(|(_, count)| count).sum();
        }
        roles.sort();
        Levels {
            roles,
            roleless,
            other_roles,
            connections,
            peer_links,
            queued_bytes,
        }
    }
}

/// Roles shown as their own `seaport_records` series, at most.
pub(crate) const MAX_ROLE_SERIES: usize = 500;

/// The next part of `listing` from `registry`, advancing it (see
/// [`Shared::list_part`]).
fn take_part(registry: &Registry, listing: &mut Listing, pattern: &Pattern) -> Vec<StoredRow> {
    let mut part = Vec::new();
    let next = registry.stored_between(
        pattern,
        listing.after,
        listing.until,
        LIST_PART_BYTES,
        LIST_PART_RECORDS,
        &mut part,
    );
    match next {
        Some(after) => listing.after = after,
        None => listing.done = true,
    }
    part
}

/// A duration in whole milliseconds, as rows carry it.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    fn new(sink: Sink, addr: &str) -> Self {
        Conn {
            sink,
            addr: addr.to_string(),
            hub: None,
            outgoing: false,
            ours: false,
            since: Instant::now(),
            paused: false,
            dumped: Some(HashSet::new()),
            dump_head: None,
            to_confirm: None,
        }
    }
}

impl Inner {
    /// Stores a register row from connection `from`, forwarding it if it is news.
    /// A record without a host gets the connection's address.
    fn register(&mut self, from: Owner, id: &str, mut meta: Metadata, ext: Ext, write: &Write<'_>) {
        let stamp = ext.stamp.clone();
        if stamp.is_some() && !self.speaks_as_hub(from, write) {
            self.refuse(from, "register", id, &Refused::not_a_hub(), &write.by);
            return;
        }
        let Some(conn) = self.conns.get_mut(&from) else {
            return;
        };
        if let Some(dumped) = &mut conn.dumped
            && (stamp.is_some() || conn.outgoing)
        {
            dumped.insert(id.to_string());
        }
        if stamp.is_none() && conn.outgoing && conn.hub.is_some() {
            // A hub with versions sends rows without them only in the dump it
            // sends before it knows this is a hub's link; it sends them all
            // again, stamped, once it does.
            return;
        }
        if meta.host().is_none() {
            let mut map = meta.into_meta();
            map.insert("host".into(), Value::String(conn.addr.clone()));
            meta = Metadata::Decoded(map);
        }
        if stamp.is_some() {
            self.versioned_peer(from);
        } else if !write.policy.secured() && meta.role() == Some("seaport") {
            // A Node hub's `server.peer()` announces itself so (it cannot
            // write to a secured hub at all).
            self.make_peer(from);
        }
        match stamp {
            Some(stamp) => self.register_versioned(from, id, meta, stamp, &ext),
            None if self.peers.contains(&from) => self.register_unversioned(from, id, meta),
            None => self.register_direct(from, id, meta, ext.claim.as_deref(), write),
        }
    }

    /// Frees a record on request and tells every other connection.
    fn free(&mut self, from: Owner, id: &str, ext: Ext, write: &Write<'_>) {
        let stamp = ext.stamp;
        if stamp.is_some() && !self.speaks_as_hub(from, write) {
            self.refuse(from, "free", id, &Refused::not_a_hub(), &write.by);
            return;
        }
        if stamp.is_none()
            && self
                .conns
                .get(&from)
                .is_some_and(|conn| conn.outgoing && conn.hub.is_some())
        {
            return;
        }
        if stamp.is_some() {
            self.versioned_peer(from);
        }
        match stamp {
            Some(stamp) => self.free_versioned(from, id, stamp),
            None if self.peers.contains(&from) => {
                // A peer without versions cannot free what a client of ours holds
                // here: it is sent the record instead.
                if self
                    .registry
                    .owner(id)
                    .is_some_and(|o| !self.peers.contains(&o))
                {
                    self.correct(from, id);
                } else {
                    self.free_at_held(Some(from), id, FreeReason::Peer);
                }
            }
            None => {
                if self.registry.owner(id).is_none() {
                    return;
                }
                // An admin key's free of what it could not free without
                // being one: an operator's free, not the owner's.
                let as_operator = write.by.admin && {
                    let plain = Write {
                        by: Writer {
                            admin: false,
                            ..write.by.clone()
                        },
                        policy: write.policy,
                    };
                    self.may_change(from, id, None, ext.claim.as_deref(), &plain)
                        .is_err()
                };
                let reason = if as_operator {
                    FreeReason::Admin
                } else {
                    FreeReason::Explicit
                };
                match self.may_change(from, id, None, ext.claim.as_deref(), write) {
                    Ok(_) => self.free_at_held(Some(from), id, reason),
                    Err(refusal) => self.refuse(from, "free", id, &refusal, &write.by),
                }
            }
        }
    }

    /// Whether connection `from`, writing as `write` says, may speak as
    /// another hub: send stamped rows, which carry their own versions and
    /// owners and so pass by the owners' rule, and beats, which keep a hub's
    /// records alive or, with `synced`, free them. This hub's own links (to
    /// its peers, to the store) may. On a hub with keys, an accepted
    /// connection may only with a hub key (`--hub-key`): any other key would
    /// otherwise take or free every record. An open hub takes everyone's
    /// word, as the Node package does; with `--owned` too, since without keys
    /// nothing tells a hub from a client.
    fn speaks_as_hub(&self, from: Owner, write: &Write<'_>) -> bool {
        !write.policy.secured()
            || write.by.hub
            || self.conns.get(&from).is_some_and(|conn| conn.ours)
    }

    /// Whether connection `from`, proving what `write` and `claim` prove, may
    /// register `meta` under `id` (or, without `meta`, free it); if so, who
    /// owns the record afterwards.
    ///
    /// Every writer may create a record, except the hub's own, and on a
    /// secured hub a `seaport` record takes a hub key. An open hub lets anyone
    /// change any record, as the Node package does, unless it enforces owners
    /// (`--owned`, or keys): then only the owner may, proving the key or the
    /// claim it wrote the record with, or, for a client that proved nothing,
    /// being its connection or, with an equal copy, a connection from the
    /// record's own host (a Node client registering again after a reconnect
    /// the hub has not noticed). An admin key may free any record.
    fn may_change(
        &self,
        from: Owner,
        id: &str,
        meta: Option<&Metadata>,
        claim: Option<&str>,
        write: &Write<'_>,
    ) -> Result<Holder, Refused> {
        let wants = match (&write.by.key, claim) {
            (Some(key), _) => Holder::Key(Arc::from(key.as_str())),
            (None, Some(secret)) => Holder::of_claim(secret),
            (None, None) => Holder::Connection,
        };
        if *id == *self.me {
            return Err(Refused::new(
                RejectReason::Reserved,
                "it is the hub's own record",
            ));
        }
        if write.policy.secured()
            && !write.by.hub
            && meta.is_some_and(|m| m.role() == Some("seaport"))
        {
            return Err(Refused::new(
                RejectReason::Reserved,
                "a seaport record must be written with a hub key",
            ));
        }
        if self.registry.owner(id).is_none() || !write.policy.enforces_owners() {
            return Ok(wants);
        }
        if meta.is_none() && write.by.admin {
            return Ok(wants);
        }
        let held = self
            .registry
            .holder(id)
            .cloned()
            .unwrap_or(Holder::Connection);
        let allowed = match &held {
            Holder::Key(key) => write.by.key.as_ref().is_some_and(|k| k.as_str() == &**key),
            // A record written before the hub took keys goes to whichever
            // authorized key writes it next.
            _ if write.policy.secured() => true,
            Holder::Claim(_) => claim.is_some_and(|c| Holder::of_claim(c) == held),
            Holder::Connection => {
                self.registry.owner(id) == Some(from)
                    || meta.is_some_and(|meta| {
                        self.registry.holds_metadata(id, meta)
                            && self.conns.get(&from).map(|c| c.addr.as_str())
                                == self.registry.host(id)
                    })
            }
        };
        if allowed {
            Ok(wants)
        } else {
            let reason = match held {
                Holder::Key(key) => format!("owned by key {key}"),
                Holder::Claim(_) => "owned by another client".into(),
                Holder::Connection => "owned by another connection".into(),
            };
            Err(Refused::new(RejectReason::NotOwner, reason))
        }
    }

    /// The address of connection `from`, for the log (`?` once it is gone).
    fn addr_of(&self, from: Owner) -> &str {
        self.conns.get(&from).map_or("?", |c| c.addr.as_str())
    }

    /// Tells connection `from` that its write of `id` was refused, and why,
    /// and logs it with the writer's key.
    fn refuse(&self, from: Owner, what: &str, id: &str, refused: &Refused, by: &Writer) {
        self.metrics.rejected(refused.cause);
        let reason = &refused.reason;
        let key = key_name(by.key.as_ref());
        let peer = self.addr_of(from);
        tracing::warn!(%peer, %key, "refused {what} {id}: {reason}");
        let row = Row::Reject {
            what: what.to_string(),
            id: Some(id.to_string()),
            reason: reason.to_string(),
            fingerprint: by.key.as_ref().map(ToString::to_string),
        };
        self.send(from, row.encode());
    }

    /// Stores the hub's own `seaport` record at a fresh version and tells
    /// everyone, once its host is known.
    fn announce_self(&mut self) {
        let Some(Announcement {
            host: Some(host),
            port,
        }) = self.announcement.clone()
        else {
            return;
        };
        let mut meta = Meta::new();
        meta.insert("role".into(), Value::String("seaport".into()));
        meta.insert(
            "version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        );
        meta.insert("host".into(), Value::String(host));
        meta.insert("port".into(), Value::from(port));
        let stamp = self.fresh();
        let me = self.me.clone();
        let holder = self.own_key.clone().map(Holder::Key);
        // A few dozen bytes: always within the limit.
        let _ = self.store(ITSELF, &me, meta.into(), stamp, holder);
    }

    /// A `beat` of hub `origin`: it is alive. Relayed to the other peers when new.
    ///
    /// A link's own hub beats first on a new connection, ahead of its records
    /// (see `snapshot_to`): that first beat says which hub the link is.
    fn beat(&mut self, from: Owner, origin: &str, v: u64, period: Duration, write: &Write<'_>) {
        if !self.speaks_as_hub(from, write) {
            let peer = self.addr_of(from);
            let key = key_name(write.by.key.as_ref());
            tracing::warn!(%peer, %key, "ignored a beat of hub {origin}: only a hub key (--hub-key) speaks for a hub");
            return;
        }
        self.versioned_peer(from);
        if *origin == *self.me || !Clock::plausible(v) {
            return;
        }
        if let Some(conn) = self.conns.get_mut(&from)
            && conn.hub.is_none()
            && conn.dumped.is_some()
        {
            conn.hub = Some(Arc::from(origin));
            conn.dump_head = Some(v);
        }
        self.clock.observe(v);
        if self.origins.get(origin).is_some_and(|heard| heard.v >= v) {
            return;
        }
        if let Some(dropped) = self.silenced.remove(origin) {
            self.resync(from, origin, dropped);
        }
        let heard = LastHeard {
            v,
            at: Instant::now(),
            patience: crate::transport::patience(self.timeout, Some(period)),
        };
        self.origins.insert(Arc::from(origin), heard);
        let line = Row::Beat {
            origin: origin.to_string(),
            v,
            period_ms: millis(period),
        }
        .encode();
        self.broadcast_peers(Some(from), line);
    }

    /// Hub `origin`, whose records this hub dropped (at `dropped`) when it
    /// fell silent, is heard again over link `from`. The hubs on the way may still hold its
    /// records at the versions this hub had (they did not hear the silence,
    /// or not for as long), and then nothing sends them again: the link is
    /// made again, and both sides send each other every record they hold.
    fn resync(&mut self, from: Owner, origin: &str, dropped: Instant) {
        let Some(conn) = self.conns.get(&from) else {
            return;
        };
        // A link made since (that hub's own link, after a cut) sends
        // everything it holds anyway.
        if conn.since > dropped {
            return;
        }
        tracing::info!(hub = %origin, peer = %conn.addr, "hub heard again after its records were dropped; connecting to the peer again for them");
        match &conn.sink {
            Sink::Socket(outbox) => outbox.close(),
            Sink::Channel(tx) => {
                let _ = tx.send(Out::Reconnect);
            }
        }
    }

    /// A connection finished sending its initial records. If it is another
    /// hub's link, that hub has just told us every record it is the origin of:
    /// ours of that origin that it did not send are gone.
    fn synced(&mut self, from: Owner) {
        let Some(conn) = self.conns.get_mut(&from) else {
            return;
        };
        let Some(dumped) = conn.dumped.take() else {
            return;
        };
        let held: Vec<String> = match (&conn.hub, conn.dump_head, conn.outgoing) {
            (_, _, true) => conn.to_confirm.take().into_iter().flatten().collect(),
            (Some(hub), Some(head), false) => self
                .registry
                .from_origin(hub)
                .into_iter()
                .filter(|rid| self.registry.stamp(rid).is_some_and(|s| s.v <= head))
                .collect(),
            _ => return,
        };
        let gone: Vec<String> = held
            .into_iter()
            .filter(|rid| !dumped.contains(rid))
            .collect();
        for rid in gone {
            self.free_at_held(Some(from), &rid, FreeReason::Peer);
        }
    }

    /// Connection `from` sent a stamped row or a beat: it is a link of a hub
    /// that keeps versions. The first time, it gets every record again, stamped:
    /// the dump it got when it connected had no stamps.
    fn versioned_peer(&mut self, from: Owner) {
        if self.make_peer(from) {
            let until = self.registry.arrival_mark();
            if let Some(conn) = self.conns.get(&from) {
                self.push(
                    conn,
                    Out::Dump {
                        stamped: true,
                        until,
                    },
                );
            }
        }
    }

    /// Connection `id` is another hub's link from now on: it gets the stamped
    /// form of forwarded rows, and the rows for hubs only. Whether it is new.
    fn make_peer(&mut self, id: Owner) -> bool {
        if !self.peers.insert(id) {
            return false;
        }
        if let Some(Conn {
            sink: Sink::Socket(outbox),
            ..
        }) = self.conns.get(&id)
        {
            outbox.become_peer(self.next_position());
        }
        true
    }

    /// How long frees are remembered: longer than any peer keeps the records
    /// of a hub it no longer hears from.
    fn tombstone_keep(&self) -> Duration {
        TOMBSTONE_MIN.max(self.timeout * 4)
    }

    /// Forgets the freed records that no reader needs to be told of.
    fn forget_freed(&mut self) {
        let start = self.feed.start();
        let lost: Vec<u64> = self
            .conns
            .values()
            .filter_map(|conn| match &conn.sink {
                Sink::Socket(outbox) => Some(outbox.cursor()).filter(|&at| at < start),
                Sink::Channel(_) => None,
            })
            .collect();
        let changes = &mut self.changes;
        let before = changes.freed();
        changes.forget_freed(start, &lost, self.registry.len());
        tracing::debug!(
            forgotten = before - changes.freed(),
            kept = changes.freed(),
            readers_behind = lost.len(),
            "forgot freed records nobody needs"
        );
    }

    /// Gives back the memory of tables a burst left mostly empty.
    fn shrink(&mut self) {
        self.conns.shrink_sparse();
        self.peers.shrink_sparse();
        self.registry.shrink();
        self.changes.shrink();
    }

    /// The feed position of the next forwarded row.
    fn next_position(&self) -> u64 {
        self.feed.head() + self.forwarded.len() as u64
    }

    fn fresh(&mut self) -> Stamp {
        Stamp {
            v: self.clock.tick(),
            origin: self.me.clone(),
        }
    }

    /// Frees the records of this origin that connection `owner` holds, telling
    /// everyone but `except`; how many.
    fn free_ours_held_by(
        &mut self,
        owner: Owner,
        except: Option<Owner>,
        reason: FreeReason,
    ) -> usize {
        let ours = self.registry.take_owned(owner, &self.me);
        let freed = ours.len();
        self.metrics.freed(reason, freed);
        for (rid, stamp) in ours {
            self.remember_free(except, &rid, stamp);
        }
        freed
    }

    /// Whether this hub is the origin of record `id`.
    fn is_ours(&self, id: &str) -> bool {
        self.registry.stamp(id).is_some_and(|s| s.origin == self.me)
    }

    /// A record written by a client of ours: a new version of ours. A client
    /// re-sending what it holds changes nothing; taking over a record we held
    /// for another hub (the client moved here) makes it ours.
    fn register_direct(
        &mut self,
        from: Owner,
        id: &str,
        meta: Metadata,
        claim: Option<&str>,
        write: &Write<'_>,
    ) {
        let holder = match self.may_change(from, id, Some(&meta), claim, write) {
            Ok(holder) => holder,
            Err(refused) => return self.refuse(from, "register", id, &refused, &write.by),
        };
        if self.registry.owner(id) == Some(from)
            && self.is_ours(id)
            && self.registry.holds_metadata(id, &meta)
            && self.registry.holder(id) == Some(&holder)
        {
            return;
        }
        let stamp = self.fresh();
        if let Err(len) = self.store(from, id, meta, stamp, Some(holder)) {
            let reason = format!(
                "the record takes {len} bytes, more than this hub's limit of {} bytes",
                self.max_record
            );
            let refused = Refused::new(RejectReason::TooLarge, reason);
            self.refuse(from, "register", id, &refused, &write.by);
        }
    }

    /// A record from a peer that keeps versions: applied when newer than what we
    /// hold; an older one is answered with ours.
    fn register_versioned(
        &mut self,
        from: Owner,
        id: &str,
        meta: Metadata,
        stamp: Stamp,
        ext: &Ext,
    ) {
        let holder = ext.owner.clone();
        if !Clock::plausible(stamp.v) {
            tracing::warn!(id, "dropped a register stamped more than a day ahead");
            return;
        }
        self.clock.observe(stamp.v);
        if *id == *self.me && stamp.origin != self.me {
            // Another origin writing the hub's own record: ours wins.
            self.reassert(id);
            return;
        }
        if stamp.origin == self.me {
            // We are the origin: what we hold is the truth, and what we do not
            // hold is gone.
            let ours = self.registry.stamp(id).cloned();
            if ours.as_ref() != Some(&stamp) {
                if ours.as_ref().is_some_and(|ours| stamp > *ours) {
                    // A peer holds a version of ours newer than ours (a clock
                    // that went back): ours goes out again, newer still.
                    self.reassert(id);
                } else if ours.is_some() {
                    self.correct(from, id);
                } else {
                    let freed = self.tombstones.get(id).cloned().unwrap_or(stamp);
                    self.send(from, wire::encode_free(id, &Ext::stamped(Some(freed))));
                }
            }
            return;
        }
        if let Some(was) = &ext.was
            && self.is_ours(id)
            && self.registry.stamp(id).is_some_and(|held| stamp > *held)
            && self.registered_version(id).is_some_and(|ours| ours > **was)
        {
            // Another hub wrote its old version of the record again (the
            // store had dropped it), but our client registered the record
            // after that version: ours stays, newer still.
            self.reassert(id);
            return;
        }
        if self.store == Some(from)
            && self.is_ours(id)
            && let Some(again) = self.rewritten(id)
            && stamp < again.stamp
            && ext
                .registered()
                .is_some_and(|theirs| *theirs > again.registered)
        {
            // We wrote our record again at a new stamp (the store had
            // dropped it), but another hub's client registered it after
            // ours did, at a version older than our new stamp: theirs is
            // the record, as the store has it.
            self.take_version(from, id, meta, stamp, holder);
            return;
        }
        if let Some(held) = self.held(id)
            && stamp <= held
        {
            // An older copy, or a copy of what we freed (the sender missed the
            // free): it is sent what we know. An equal copy of what we hold is
            // a row that came round another way.
            if stamp < held || self.registry.stamp(id).is_none() {
                self.correct(from, id);
            }
            return;
        }
        self.take_version(from, id, meta, stamp, holder);
    }

    /// Stores version `stamp` of another hub's record `id`, from `from`;
    /// whether it fit.
    fn take_version(
        &mut self,
        from: Owner,
        id: &str,
        meta: Metadata,
        stamp: Stamp,
        holder: Option<Holder>,
    ) -> bool {
        self.expect_origin(&stamp.origin);
        match self.store(from, id, meta, stamp, holder) {
            Ok(()) => true,
            Err(len) => {
                self.too_large_from_peer(id, len);
                false
            }
        }
    }

    /// The version of record `id` its client registered: the stamp it holds,
    /// unless the hub has written it again since.
    fn registered_version(&self, id: &str) -> Option<Stamp> {
        let held = self.registry.stamp(id)?;
        Some(
            self.rewritten(id)
                .map_or_else(|| held.clone(), |again| again.registered.clone()),
        )
    }

    /// Record `id` as the hub wrote it again, while it holds the stamp it
    /// was given then (a later change or a free makes it another version).
    fn rewritten(&self, id: &str) -> Option<&WrittenAgain> {
        let again = self.written_again.get(id)?;
        (self.registry.stamp(id) == Some(&again.stamp)).then_some(again)
    }

    /// An origin seen for the first time has a timeout to be heard from.
    fn expect_origin(&mut self, origin: &Arc<str>) {
        let patience = self.timeout;
        self.origins
            .entry(origin.clone())
            .or_insert_with(|| LastHeard {
                v: 0,
                at: Instant::now(),
                patience,
            });
    }

    /// A record from a peer without versions (a Node hub), under the Node
    /// package's rules: an equal record is not news (which stops rows circling),
    /// and a client of ours keeps its record.
    fn register_unversioned(&mut self, from: Owner, id: &str, meta: Metadata) {
        if let Some(owner) = self.registry.owner(id) {
            if self.registry.holds_metadata(id, &meta) {
                return;
            }
            if owner != from && !self.peers.contains(&owner) {
                self.correct(from, id);
                return;
            }
        }
        let stamp = self.fresh();
        if let Err(len) = self.store(from, id, meta, stamp, Some(Holder::Connection)) {
            self.too_large_from_peer(id, len);
        }
    }

    /// Stores a record at `stamp`, owned by `from`, and forwards it: to everyone
    /// when clients see a change, to the peers when only the version moved.
    ///
    /// A record larger than the hub's limit is not stored: its size is the
    /// error, for the caller to refuse or drop it.
    fn store(
        &mut self,
        from: Owner,
        id: &str,
        meta: Metadata,
        stamp: Stamp,
        holder: Option<Holder>,
    ) -> Result<(), usize> {
        tracing::trace!(hub = %self.me, id, from = from.0, v = stamp.v, origin = %stamp.origin, "store");
        let outcome = self.registry.store(id, meta, from, Some(stamp), holder);
        if let Registered::TooLarge(len) = outcome {
            return Err(len);
        }
        if matches!(outcome, Registered::Added | Registered::Updated) {
            self.metrics.registered();
        }
        self.tombstones.remove(id);
        let Some(row) = self.registry.row(id) else {
            return Ok(());
        };
        // Rows for peers are made only when a peer other than the sender is
        // there to read them: a link that comes later gets every record in
        // its snapshot. (A hub over etcd has the store as its one peer, and
        // the store is where its watched rows come from.)
        let stamped = if self.peers.iter().all(|peer| *peer == from) {
            None
        } else {
            self.registry.stamped_row(id)
        };
        match (outcome, stamped) {
            (Registered::Unchanged, Some(stamped)) => {
                self.broadcast_peers_record(Some(from), id, stamped);
            }
            (Registered::Unchanged, None) => {}
            (_, stamped) => {
                let stamped = stamped.unwrap_or_else(|| row.clone());
                self.broadcast(Some(from), id, row, stamped);
            }
        }
        Ok(())
    }

    /// A peer's record too large for this hub: it is left out here, with a
    /// warning (the peers of a mesh should share one limit).
    fn too_large_from_peer(&self, id: &str, len: usize) {
        tracing::warn!(
            id,
            "dropped a peer's record of {len} bytes: larger than this hub's limit of {} bytes",
            self.max_record
        );
    }

    /// A free from a peer that keeps versions, naming the version it frees:
    /// applied to that version or an older one, remembered, and forwarded.
    ///
    /// Only this hub frees the records it is the origin of: a free of one that
    /// comes from elsewhere is answered with a new version of it.
    fn free_versioned(&mut self, from: Owner, id: &str, stamp: Stamp) {
        if !Clock::plausible(stamp.v) {
            tracing::warn!(id, "dropped a free stamped more than a day ahead");
            return;
        }
        self.clock.observe(stamp.v);
        if self.is_ours(id) {
            // The store's writer reads the record's key first: another
            // hub's client may have registered it since (it moved there).
            if self.store == Some(from) {
                self.store_dropped(id);
            } else {
                self.reassert(id);
            }
            return;
        }
        if let Some(current) = self.registry.stamp(id) {
            if stamp < *current {
                self.correct(from, id);
                return;
            }
            if self.registry.discard(id) {
                self.metrics.freed(FreeReason::Peer, 1);
            }
        } else if self.tombstones.get(id).is_some_and(|t| *t >= stamp) {
            return;
        }
        self.remember_free(Some(from), id, stamp);
    }

    /// The store dropped record `id` of ours: its writer is told, and
    /// reads what the store has under it before the record is reasserted.
    fn store_dropped(&self, id: &str) {
        if let Some(store) = self.store
            && let Some(conn) = self.conns.get(&store)
        {
            self.push(conn, Out::Dropped(id.to_string()));
        }
    }

    /// Gives a record of ours a new version and sends it to every peer: our
    /// client holds it, whatever a peer believed.
    fn reassert(&mut self, id: &str) {
        if let Some(record) = self.registry.get(id)
            && let Some(owner) = self.registry.owner(id)
            && let Some(registered) = self.registered_version(id)
        {
            let fresh = self.fresh();
            // A new stamp, not a new registration by its client.
            let again = WrittenAgain {
                stamp: fresh.clone(),
                registered,
            };
            self.written_again.insert(id.to_string(), again);
            self.tombstones.remove(id);
            let holder = record.holder().cloned();
            self.registry
                .store(id, record.into_meta(), owner, Some(fresh), holder);
            if let Some(row) = self.row_for_peers(id) {
                self.broadcast_peers_record(None, id, row);
            }
        }
    }

    /// The stamped row of record `id` as it goes to the peers. Over a store,
    /// one the hub wrote again says which version its client registered.
    fn row_for_peers(&self, id: &str) -> Option<Bytes> {
        if self.store.is_some()
            && let Some(again) = self.rewritten(id)
        {
            return self.registry.stamped_row_was(id, &again.registered);
        }
        self.registry.stamped_row(id)
    }

    /// Frees the version of `id` we hold, remembers it, and tells everyone but
    /// `from`.
    fn free_at_held(&mut self, from: Option<Owner>, id: &str, reason: FreeReason) {
        let stamp = self.registry.stamp(id).cloned();
        if !self.registry.discard(id) {
            return;
        }
        self.metrics.freed(reason, 1);
        let stamp = stamp.unwrap_or_else(|| self.fresh());
        self.remember_free(from, id, stamp);
    }

    /// Remembers that `id` is freed at `stamp` and tells everyone but `from`.
    /// A hub that has had no peer for as long as frees are remembered needs
    /// no memory of them: no other hub holds a copy that could come back.
    fn remember_free(&mut self, from: Option<Owner>, id: &str, stamp: Stamp) {
        tracing::trace!(hub = %self.me, id, from = from.map(|o| o.0), v = stamp.v, origin = %stamp.origin, "free");
        let plain = wire::encode_free(id, &Ext::default());
        let stamped = if self.peers.is_empty() {
            plain.clone()
        } else {
            wire::encode_free(id, &Ext::stamped(Some(stamp.clone())))
        };
        let now = Instant::now();
        if !self.peers.is_empty() {
            self.peered_at = Some(now);
        }
        if self
            .peered_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.tombstone_keep())
        {
            self.tombstones.insert(id, stamp, now);
        }
        self.broadcast(from, id, plain, stamped);
    }

    /// The newest version of `id` we know of: the record's, or its free's.
    fn held(&self, id: &str) -> Option<Stamp> {
        match (self.registry.stamp(id), self.tombstones.get(id)) {
            (Some(s), _) | (None, Some(s)) => Some(s.clone()),
            (None, None) => None,
        }
    }

    /// Forwards a row about `record` to every connection but `except`:
    /// `plain` for clients, `stamped` for peer hubs.
    fn broadcast(&mut self, except: Option<Owner>, record: &str, plain: Bytes, stamped: Bytes) {
        self.forward(
            Some(record),
            Entry {
                to: To::All,
                except,
                plain,
                stamped,
            },
        );
    }

    /// Forwards the row of `record` to every peer link but `except`.
    fn broadcast_peers_record(&mut self, except: Option<Owner>, record: &str, line: Bytes) {
        self.forward(
            Some(record),
            Entry {
                to: To::Peers,
                except,
                plain: line.clone(),
                stamped: line,
            },
        );
    }

    /// Forwards `line` to every peer link but `except`.
    fn broadcast_peers(&mut self, except: Option<Owner>, line: Bytes) {
        self.forward(
            None,
            Entry {
                to: To::Peers,
                except,
                plain: line.clone(),
                stamped: line,
            },
        );
    }

    /// Forwards the row of `record` to every connection that is not a peer link.
    fn broadcast_clients(&mut self, record: &str, line: Bytes) {
        self.forward(
            Some(record),
            Entry {
                to: To::Clients,
                except: None,
                plain: line.clone(),
                stamped: line,
            },
        );
    }

    /// Adds a forwarded row to the feed (when the lock is released), noting
    /// where `record` last changed; the connections that do not read the feed
    /// get it now.
    fn forward(&mut self, record: Option<&str>, entry: Entry) {
        for id in &self.channels {
            if let (Some(line), Some(conn)) =
                (entry.line(*id, self.peers.contains(id)), self.conns.get(id))
            {
                let out = if self.store == Some(*id) {
                    Out::Owned {
                        owner: record.and_then(|r| self.registry.owner(r)),
                        line: line.clone(),
                    }
                } else {
                    Out::Line(line.clone())
                };
                self.push(conn, out);
            }
        }
        if let Some(record) = record
            && entry.to != To::Peers
        {
            self.tell_subscribers(record);
        }
        if let Some(record) = record {
            let at = self.next_position();
            self.changes.note(&mut self.registry, record, at);
        }
        self.forwarded.push(entry);
    }

    /// Tells the subscribers what clients are told of `record`: its state
    /// now, as its row (decoded by each subscriber, not under the lock).
    /// Nothing is made when no subscriber has its place.
    fn tell_subscribers(&self, record: &str) {
        let mut subscribers = self.subscribers.borrow_mut();
        if !subscribers.any_listening() {
            return;
        }
        let change = match self.registry.stored_row(record) {
            Some(row) => Change::Registered(row),
            None => Change::Freed {
                id: Arc::from(record),
            },
        };
        subscribers.send(change);
    }

    /// Sends connection `to` our version of record `id` (or of its free), to
    /// correct its view.
    fn correct(&self, to: Owner, id: &str) {
        let Some(line) = self.stamped_state(id) else {
            return;
        };
        match self.conns.get(&to) {
            // The store is told whose record it is.
            Some(conn) if self.store == Some(to) => {
                let owner = self.registry.owner(id);
                self.push(conn, Out::Owned { owner, line });
            }
            _ => self.send(to, line),
        }
    }

    /// What we know of record `id` as hubs tell each other: its stamped row,
    /// or its stamped free while we remember it.
    fn stamped_state(&self, id: &str) -> Option<Bytes> {
        self.row_for_peers(id).or_else(|| {
            self.tombstones
                .get(id)
                .map(|stamp| wire::encode_free(id, &Ext::stamped(Some(stamp.clone()))))
        })
    }

    fn send(&self, to: Owner, line: Bytes) {
        if let Some(conn) = self.conns.get(&to) {
            self.push(conn, Out::Line(line));
        }
    }

    /// Queues an entry for one connection alone, after the rows forwarded so far.
    fn push(&self, conn: &Conn, out: Out) {
        match &conn.sink {
            Sink::Socket(outbox) => outbox.push(self.next_position(), out),
            Sink::Channel(_) if conn.paused => {}
            Sink::Channel(tx) => {
                let _ = tx.send(out);
            }
        }
    }
}

/// How writers take dumps and catch-ups from the state, a part at a time.
impl Source for Shared {
    fn dump(
        &self,
        after: u64,
        until: u64,
        stamped: bool,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Option<u64> {
        self.lock()
            .registry
            .rows_between(after, until, stamped, budget, out)
    }

    fn catch_up(
        &self,
        id: Owner,
        from: u64,
        until: u64,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Option<u64> {
        let inner = self.lock();
        let peer = inner.peers.contains(&id);
        let changes = &inner.changes;
        let end = out.len() + budget;
        for (n, (at, rid)) in changes.between(from, until).enumerate() {
            if n == PART_RECORDS || out.len() >= end {
                return Some(at);
            }
            if !peer {
                if !inner.registry.copy_row(rid, out) {
                    out.extend_from_slice(&wire::encode_free(rid, &Ext::default()));
                }
                continue;
            }
            if let Some(row) = inner.stamped_state(rid) {
                out.extend_from_slice(&row);
            }
        }
        None
    }
}

/// Most records of a catch-up looked at under one lock.
const PART_RECORDS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::meta_of;
    use serde_json::json;

    /// A hub's shared state with connections whose queues the test reads.
    struct Bench {
        shared: Shared,
        queues: HashMap<Owner, mpsc::UnboundedReceiver<Out>>,
    }

    impl Bench {
        fn new(me: &str) -> Self {
            Bench {
                shared: Shared::new(
                    me,
                    Policy::default(),
                    Duration::from_millis(300),
                    Duration::from_secs(1),
                ),
                queues: HashMap::new(),
            }
        }

        fn client(&mut self) -> Owner {
            let id = self.shared.next_id();
            let (tx, rx) = mpsc::unbounded_channel();
            self.shared
                .join(id, "10.0.0.1", "challenge", Sink::Channel(tx));
            self.queues.insert(id, rx);
            self.drain(id);
            id
        }

        /// The store's connection.
        fn store(&mut self) -> Owner {
            let id = self.shared.next_id();
            let (tx, rx) = mpsc::unbounded_channel();
            self.shared.join_store(id, tx);
            self.queues.insert(id, rx);
            id
        }

        /// A connection of hub `name`'s link: its beat (its dump is as of
        /// clock 1000), then its announcement (version 1).
        fn peer(&mut self, name: &str) -> Owner {
            let id = self.client();
            self.beat(id, name, 1000, Duration::from_millis(300));
            self.register(id, name, hub_record(), Some(stamp(1, name)));
            id
        }

        fn register(&self, from: Owner, id: &str, meta: Meta, stamp: Option<Stamp>) {
            let row = Row::Register {
                id: id.into(),
                meta,
                ext: Ext::stamped(stamp),
            };
            self.shared
                .apply(from, vec![Effect::Apply(row, Writer::default())]);
        }

        fn free(&self, from: Owner, id: &str, stamp: Option<Stamp>) {
            let row = Row::Free {
                id: id.into(),
                ext: Ext::stamped(stamp),
            };
            self.shared
                .apply(from, vec![Effect::Apply(row, Writer::default())]);
        }

        fn beat(&self, from: Owner, origin: &str, v: u64, period: Duration) {
            let row = Row::Beat {
                origin: origin.into(),
                v,
                period_ms: millis(period),
            };
            self.shared
                .apply(from, vec![Effect::Apply(row, Writer::default())]);
        }

        /// Every row queued for `id` since the last call.
        fn drain(&mut self, id: Owner) -> Vec<Row> {
            let mut rows = Vec::new();
            if let Some(rx) = self.queues.get_mut(&id) {
                while let Ok(out) = rx.try_recv() {
                    let lines = match out {
                        Out::Line(line) | Out::Owned { line, .. } => vec![line],
                        Out::Lines(lines) | Out::Snapshot(lines) => lines,
                        Out::Left(_) | Out::Dropped(_) | Out::Reconnect => Vec::new(),
                        // Taken from the registry as a writer would.
                        Out::Dump { stamped, until } => {
                            let mut dump = Vec::new();
                            self.shared.dump(0, until, stamped, &mut dump, usize::MAX);
                            dump.split_inclusive(|&b| b == b'\n')
                                .map(Bytes::copy_from_slice)
                                .collect()
                        }
                    };
                    rows.extend(lines.iter().filter_map(|l| Row::decode(l).ok()));
                }
            }
            rows
        }

        fn ids(&self) -> Vec<String> {
            self.shared
                .query(&Pattern::all())
                .iter()
                .map(|r| r.id().to_string())
                .collect()
        }
    }

    fn web() -> Meta {
        meta_of(json!({"role":"web","version":"1.0.0","port":80}))
    }

    fn hub_record() -> Meta {
        meta_of(json!({"role":"seaport","version":"2.1.0","port":9090}))
    }

    fn stamp(v: u64, origin: &str) -> Stamp {
        Stamp {
            v,
            origin: Arc::from(origin),
        }
    }

    #[test]
    fn a_closed_client_is_freed_with_a_stamp_for_peers_and_plainly_for_clients() {
        let mut hub = Bench::new("A");
        let client = hub.client();
        let watcher = hub.client();
        let peer = hub.client();
        hub.register(peer, "B", web(), Some(stamp(1, "B")));
        hub.drain(peer);
        hub.register(client, "x", web(), None);
        let Some(Row::Register {
            ext: Ext { stamp: Some(s), .. },
            ..
        }) = hub.drain(peer).pop()
        else {
            panic!("the peer gets the record with a stamp");
        };
        assert_eq!(&*s.origin, "A");
        hub.drain(watcher);
        assert_eq!(hub.shared.leave(client, FreeReason::Disconnect), 1);
        assert_eq!(hub.ids(), ["B"]);
        assert_eq!(
            hub.drain(watcher),
            [Row::Free {
                id: "x".into(),
                ext: Ext::default()
            }]
        );
        assert_eq!(
            hub.drain(peer),
            [Row::Free {
                id: "x".into(),
                ext: Ext::stamped(Some(s))
            }]
        );
    }

    #[test]
    fn rows_from_peers_apply_only_when_newer() {
        let mut hub = Bench::new("A");
        let b = hub.peer("B");
        let c = hub.peer("C");
        hub.drain(b);
        hub.drain(c);
        hub.register(b, "y", web(), Some(stamp(10, "B")));
        hub.drain(b);
        assert_eq!(hub.drain(c).len(), 1, "forwarded once");
        hub.register(c, "y", web(), Some(stamp(10, "B")));
        assert!(
            hub.drain(b).is_empty() && hub.drain(c).is_empty(),
            "a copy stops"
        );
        hub.register(c, "y", web(), Some(stamp(9, "B")));
        assert!(
            matches!(&hub.drain(c)[..], [Row::Register { ext: Ext { stamp: Some(s), .. }, .. }] if s.v == 10),
            "an older copy is answered with ours"
        );
        hub.free(b, "y", Some(stamp(10, "B")));
        assert_eq!(hub.ids(), ["B", "C"]);
        assert_eq!(hub.drain(c).len(), 1, "the free is forwarded");
        hub.register(c, "y", web(), Some(stamp(10, "B")));
        assert_eq!(
            hub.ids(),
            ["B", "C"],
            "the freed version does not come back"
        );
        hub.register(c, "y", web(), Some(stamp(11, "B")));
        assert_eq!(hub.ids(), ["B", "C", "y"], "a newer version does");
    }

    #[test]
    fn a_peer_that_missed_a_free_is_told_and_stamps_from_the_future_are_dropped() {
        let mut hub = Bench::new("A");
        let b = hub.peer("B");
        let c = hub.peer("C");
        hub.register(b, "y", web(), Some(stamp(10, "B")));
        hub.free(b, "y", Some(stamp(10, "B")));
        hub.drain(c);
        // c still holds y at the freed version and sends it: it is told.
        hub.register(c, "y", web(), Some(stamp(10, "B")));
        assert!(matches!(
            &hub.drain(c)[..],
            [Row::Free { ext: Ext { stamp: Some(s), .. }, .. }] if s.v == 10
        ));
        assert_eq!(hub.ids(), ["B", "C"]);
        // A stamp far in the future is not a version; it changes nothing.
        hub.register(c, "z", web(), Some(stamp(u64::MAX - 1, "C")));
        assert_eq!(hub.ids(), ["B", "C"]);
        hub.beat(c, "C", u64::MAX, Duration::from_millis(u64::MAX));
        assert!(
            hub.shared.lock().fresh().v < u64::MAX / 2,
            "the clock did not follow"
        );
    }

    #[test]
    fn a_newer_copy_of_our_own_record_is_answered_with_a_newer_still() {
        let mut hub = Bench::new("A");
        let client = hub.client();
        let peer = hub.peer("B");
        hub.register(client, "x", web(), None);
        hub.drain(peer);
        let ours = hub.shared.lock().registry.stamp("x").cloned();
        let Some(ours) = ours else {
            panic!("x has a stamp");
        };
        let ahead = Stamp {
            v: ours.v + 1000,
            origin: ours.origin.clone(),
        };
        hub.register(peer, "x", web(), Some(ahead.clone()));
        assert!(matches!(
            &hub.drain(peer)[..],
            [Row::Register { ext: Ext { stamp: Some(s), .. }, .. }] if *s > ahead
        ));
    }

    #[test]
    fn our_link_checks_only_what_was_held_before_it_connected_against_the_peers_list() {
        let mut hub = Bench::new("B");
        let relay = hub.peer("C");
        let link = hub.shared.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        hub.shared.join_peer(link, "A", tx);
        hub.queues.insert(link, rx);
        // Through C, before our link to A connects: two records of A's.
        hub.register(relay, "kept", web(), Some(stamp(5, "A")));
        hub.register(relay, "gone", web(), Some(stamp(4, "A")));
        let held_before = hub.shared.arrival_mark();
        // A takes a record after it accepted us; it reaches us through C
        // before A's helo.
        hub.register(relay, "late", web(), Some(stamp(6, "A")));
        hub.shared.link_up(link, Some("A"), held_before);
        // A's list, as of its accept: "gone" is gone, "late" not yet on it.
        hub.register(link, "kept", web(), Some(stamp(5, "A")));
        hub.shared
            .apply(link, vec![Effect::Apply(Row::Synced, Writer::default())]);
        let mut ids = hub.ids();
        ids.sort();
        assert_eq!(ids, ["C", "kept", "late"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_caught_up_after_the_tombstones_time_is_still_told_of_a_free() {
        let mut hub = Bench::new("A");
        let client = hub.client();
        let peer = hub.peer("B");
        hub.register(client, "x", web(), None);
        // The peer's place, from then on lost: x existed, then went.
        let place = hub.shared.lock().next_position();
        hub.shared.leave(client, FreeReason::Disconnect);
        let until = hub.shared.lock().next_position();
        // Past the tombstones' time (at least a minute).
        tokio::time::advance(Duration::from_secs(120)).await;
        hub.shared.tick(Duration::from_millis(100));
        let mut out = Vec::new();
        let done = hub
            .shared
            .catch_up(peer, place, until, &mut out, usize::MAX);
        assert_eq!(done, None);
        let rows: Vec<Row> = out
            .split_inclusive(|&b| b == b'\n')
            .filter_map(|line| Row::decode(line).ok())
            .collect();
        assert!(
            rows.iter().any(|row| matches!(
                row,
                Row::Free { id, ext: Ext { stamp: Some(_), .. } } if id == "x"
            )),
            "{rows:?}"
        );
    }

    #[test]
    fn only_the_origin_frees_its_records() {
        let mut hub = Bench::new("A");
        let client = hub.client();
        let peer = hub.client();
        hub.register(peer, "B", web(), Some(stamp(1, "B")));
        hub.register(client, "x", web(), None);
        hub.drain(peer);
        let held = hub.shared.lock().registry.stamp("x").cloned();
        hub.free(peer, "x", held.clone());
        assert_eq!(hub.ids(), ["B", "x"]);
        let newer = hub.shared.lock().registry.stamp("x").cloned();
        assert!(newer > held, "answered with a newer version");
        // A peer re-sending one of ours that we no longer hold is told it is gone.
        hub.shared.leave(client, FreeReason::Disconnect);
        hub.drain(peer);
        hub.register(peer, "x", web(), newer.clone());
        assert_eq!(hub.ids(), ["B"]);
        assert!(matches!(
            &hub.drain(peer)[..],
            [Row::Free {
                ext: Ext { stamp: Some(_), .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_client_moving_here_takes_its_record_over() {
        let mut hub = Bench::new("A");
        let peer = hub.client();
        let client = hub.client();
        hub.register(peer, "x", web(), Some(stamp(5, "B")));
        hub.drain(peer);
        let mut meta = web();
        meta.insert("host".into(), "10.0.0.1".into());
        hub.register(client, "x", meta, None);
        assert!(
            matches!(&hub.drain(peer)[..], [Row::Register { ext: Ext { stamp: Some(s), .. }, .. }] if &*s.origin == "A"),
            "the peer learns the record is ours now"
        );
        // The peer's link going away leaves it; the client going away frees it.
        hub.shared.leave(peer, FreeReason::Disconnect);
        assert_eq!(hub.ids(), ["x"]);
        hub.shared.leave(client, FreeReason::Disconnect);
        assert!(hub.ids().is_empty());
    }

    #[test]
    fn a_record_written_again_yields_only_while_it_is_that_version() {
        let mut hub = Bench::new("A");
        let store = hub.store();
        let client = hub.client();
        hub.register(client, "x", web(), None);
        let ids = ["x".to_string()];
        let [first] = &hub.shared.reassert_ours(&ids)[..] else {
            panic!("x is ours, and written again once");
        };
        assert!(first.now > first.before);
        let [again] = &hub.shared.reassert_ours(&ids)[..] else {
            panic!("x is ours, and written again once");
        };
        // What counts is still the version its client registered.
        assert_eq!(again.before, first.before);
        hub.drain(store);
        let mut elsewhere = web();
        elsewhere.insert("port".into(), 81.into());
        let theirs = |v: u64| Row::Register {
            id: "x".into(),
            meta: elsewhere.clone(),
            ext: Ext::stamped(Some(stamp(v, "B"))),
        };
        // Not the version the hub holds now: nothing changes.
        assert!(
            !hub.shared
                .yield_to_store(store, &first.now, theirs(first.before.v + 1))
        );
        let port = |hub: &Bench| hub.shared.query(&Pattern::all())[0].port();
        assert_eq!(port(&hub), Some(80));
        // The version it holds: the other hub's, although older, is taken,
        // and the clients are told.
        assert!(
            hub.shared
                .yield_to_store(store, &again.now, theirs(first.before.v + 1))
        );
        assert_eq!(port(&hub), Some(81));
        assert!(
            matches!(hub.drain(client).last(), Some(Row::Register { meta, .. }) if meta.get("port") == Some(&json!(81))),
            "the client is sent the record as it is now"
        );
        // The client going away leaves it: it is the store's record now.
        hub.shared.leave(client, FreeReason::Disconnect);
        assert_eq!(hub.ids(), ["x"]);
    }

    #[test]
    fn a_record_written_again_takes_a_later_registration_from_the_store_at_an_older_stamp() {
        let mut hub = Bench::new("A");
        let store = hub.store();
        let client = hub.client();
        hub.register(client, "x", web(), None);
        let registered = hub.shared.lock().registry.stamp("x").cloned().expect("x");
        // Another record seen at a later version moves the clock on, so
        // that x's new stamp is well after its registration.
        let other = Row::Register {
            id: "y".into(),
            meta: web(),
            ext: Ext::stamped(Some(stamp(registered.v + 100, "B"))),
        };
        hub.shared
            .apply(store, vec![Effect::Apply(other, Writer::default())]);
        let [again] = &hub.shared.reassert_ours(&["x".to_string()])[..] else {
            panic!("x is ours, and written again once");
        };
        hub.drain(store);
        let held = |hub: &Bench| hub.shared.lock().registry.stamp("x").cloned();
        let mut elsewhere = web();
        elsewhere.insert("port".into(), 81.into());
        let theirs = |v: u64, was: Option<u64>| Row::Register {
            id: "x".into(),
            meta: elsewhere.clone(),
            ext: Ext {
                was: was.map(|v| Box::new(stamp(v, "C"))),
                ..Ext::stamped(Some(stamp(v, "B")))
            },
        };
        // A copy written again of a registration before ours, at an older
        // stamp than ours: ours stays.
        let between = again.before.v + 1;
        assert!(between < again.now.v, "{again:?}");
        hub.shared.apply(
            store,
            vec![Effect::Apply(
                theirs(between, Some(again.before.v - 1)),
                Writer::default(),
            )],
        );
        assert_eq!(held(&hub), Some(again.now.clone()));
        // Hub B's client registered it after ours, though B's write is
        // stamped before ours was written again: B's is the record.
        hub.shared.apply(
            store,
            vec![Effect::Apply(theirs(between, None), Writer::default())],
        );
        assert_eq!(held(&hub), Some(stamp(between, "B")));
        let port = |hub: &Bench| {
            hub.shared
                .query(&Pattern::all())
                .iter()
                .find(|r| r.id() == "x")
                .and_then(|r| r.port())
        };
        assert_eq!(port(&hub), Some(81));
    }

    #[test]
    fn a_version_written_again_elsewhere_loses_to_a_later_registration_here() {
        let mut hub = Bench::new("B");
        let store = hub.store();
        let client = hub.client();
        hub.register(client, "x", web(), None);
        let ours = hub.shared.lock().registry.stamp("x").cloned().expect("x");
        hub.drain(store);
        let rewrite = |v: u64, was: u64| Row::Register {
            id: "x".into(),
            meta: web(),
            ext: Ext {
                was: Some(Box::new(stamp(was, "A"))),
                ..Ext::stamped(Some(stamp(v, "A")))
            },
        };
        let held = |hub: &Bench| hub.shared.lock().registry.stamp("x").cloned();
        // Hub A's client registered x before ours did: ours stays, at a
        // version newer than A's, and goes to the store.
        let newer = ours.v + 10;
        hub.shared.apply(
            store,
            vec![Effect::Apply(rewrite(newer, ours.v - 1), Writer::default())],
        );
        let now = held(&hub).expect("x");
        assert!(&*now.origin == "B" && now.v > newer, "{now:?}");
        // The store is told, and so are the other hubs through it, which
        // version our client registered.
        let to_store = hub.drain(store);
        assert!(
            matches!(&to_store[..], [Row::Register { ext: Ext { stamp: Some(s), was: Some(was), .. }, .. }] if *s == now && **was == ours),
            "{to_store:?}"
        );
        // A version written again elsewhere whose client registered after
        // ours is taken, as any newer version.
        let newest = now.v + 10;
        hub.shared.apply(
            store,
            vec![Effect::Apply(
                rewrite(newest, ours.v + 1),
                Writer::default(),
            )],
        );
        assert_eq!(held(&hub), Some(stamp(newest, "A")));
    }

    /// Applies a plain client's row under an owned, open hub's policy.
    fn owned_write(hub: &Bench, from: Owner, row: &str) {
        let policy = Policy {
            owned: true,
            ..Policy::default()
        };
        hub.shared.set_policy(policy);
        let row = Row::decode(row.as_bytes()).expect("a row");
        hub.shared
            .apply(from, vec![Effect::Apply(row, Writer::default())]);
    }

    fn rejects(hub: &mut Bench, id: Owner) -> Vec<String> {
        hub.drain(id)
            .into_iter()
            .filter_map(|row| match row {
                Row::Reject { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn on_an_owned_hub_only_the_owner_changes_a_record() {
        let mut hub = Bench::new("A");
        let owner = hub.client();
        let other = hub.client();
        let web =
            r#"["register","W",{"role":"web","port":80,"host":"10.0.0.1"},{"claim":"s3cret"}]"#;
        owned_write(&hub, owner, web);
        // Another claim, or none, changes nothing.
        owned_write(
            &hub,
            other,
            r#"["register","W",{"role":"web","port":81},{"claim":"guess"}]"#,
        );
        owned_write(&hub, other, r#"["free","W"]"#);
        assert_eq!(
            rejects(&mut hub, other),
            ["owned by another client", "owned by another client"]
        );
        // The claim takes it, from any connection.
        owned_write(
            &hub,
            other,
            r#"["register","W",{"role":"web","port":82},{"claim":"s3cret"}]"#,
        );
        assert!(rejects(&mut hub, other).is_empty());
        assert_eq!(hub.shared.lock().registry.owner("W"), Some(other));
        // Without a claim: the connection, or an equal copy from the record's
        // host.
        owned_write(
            &hub,
            owner,
            r#"["register","N",{"role":"n","port":1,"host":"10.0.0.1"}]"#,
        );
        owned_write(
            &hub,
            other,
            r#"["register","N",{"role":"n","port":2,"host":"10.0.0.1"}]"#,
        );
        assert_eq!(rejects(&mut hub, other), ["owned by another connection"]);
        owned_write(
            &hub,
            other,
            r#"["register","N",{"role":"n","port":1,"host":"10.0.0.1"}]"#,
        );
        assert!(rejects(&mut hub, other).is_empty());
        assert_eq!(hub.shared.lock().registry.owner("N"), Some(other));
        // Nobody writes the hub's own record.
        hub.shared.announce(Some("10.0.0.9".into()), 9090);
        owned_write(&hub, owner, r#"["free","A"]"#);
        assert_eq!(rejects(&mut hub, owner), ["it is the hub's own record"]);
    }

    #[test]
    fn an_admin_key_frees_what_it_does_not_own_but_changes_nothing() {
        let mut hub = Bench::new("A");
        let owner = hub.client();
        let admin = hub.client();
        owned_write(
            &hub,
            owner,
            r#"["register","W",{"role":"web","port":80},{"claim":"s"}]"#,
        );
        let writer = Writer {
            key: Some(
                crate::protocol::keys::test_pair("alice")
                    .fingerprint()
                    .clone(),
            ),
            admin: true,
            hub: false,
        };
        let change = Row::decode(br#"["register","W",{"role":"web","port":9}]"#).unwrap();
        hub.shared
            .apply(admin, vec![Effect::Apply(change, writer.clone())]);
        assert_eq!(rejects(&mut hub, admin), ["owned by another client"]);
        let free = Row::decode(br#"["free","W"]"#).unwrap();
        hub.shared.apply(admin, vec![Effect::Apply(free, writer)]);
        assert!(rejects(&mut hub, admin).is_empty());
        assert!(hub.ids().is_empty());
    }

    #[test]
    fn a_dump_confirms_only_what_it_could_know() {
        let mut hub = Bench::new("A");
        let c = hub.peer("C");
        // B's link: its first beat is its dump's head.
        let b = hub.client();
        hub.beat(b, "B", 100, Duration::from_millis(300));
        hub.register(b, "B", hub_record(), Some(stamp(90, "B")));
        // Meanwhile, by way of C: a record of B's newer than the dump, and an
        // older one the dump no longer has.
        hub.register(c, "new", web(), Some(stamp(150, "B")));
        hub.register(c, "gone", web(), Some(stamp(50, "B")));
        hub.shared
            .apply(b, vec![Effect::Apply(Row::Synced, Writer::default())]);
        assert_eq!(hub.ids(), ["C", "B", "new"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_hubs_records_are_dropped_and_a_dump_confirms_the_rest() {
        let mut hub = Bench::new("A");
        let peer = hub.client();
        let watcher = hub.client();
        hub.register(peer, "B", hub_record(), Some(stamp(1, "B")));
        hub.register(peer, "y", web(), Some(stamp(2, "B")));
        hub.shared
            .apply(peer, vec![Effect::Apply(Row::Synced, Writer::default())]);
        // A new link of B whose dump no longer has y.
        let again = hub.peer("B");
        hub.shared
            .apply(again, vec![Effect::Apply(Row::Synced, Writer::default())]);
        assert_eq!(hub.ids(), ["B"]);
        hub.drain(watcher);
        hub.drain(again);
        // B is silent past its patience: its records go, for our clients only.
        hub.beat(again, "B", 3, Duration::from_millis(1));
        // Not yet: the patience is the timeout (1 s), not three beats of 1 ms.
        tokio::time::advance(Duration::from_millis(900)).await;
        hub.shared.tick(Duration::from_millis(100));
        assert_eq!(hub.ids(), ["B"]);
        tokio::time::advance(Duration::from_millis(200)).await;
        hub.shared.tick(Duration::from_millis(100));
        assert!(hub.ids().is_empty());
        assert_eq!(
            hub.drain(watcher),
            [Row::Free {
                id: "B".into(),
                ext: Ext::default()
            }]
        );
        assert!(
            hub.drain(again)
                .iter()
                .all(|r| matches!(r, Row::Beat { .. })),
            "peers decide for themselves"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_store_a_hub_is_forgotten_once_its_records_are_gone() {
        let mut hub = Bench::new("A");
        let store = hub.shared.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        hub.shared.join_store(store, tx);
        hub.queues.insert(store, rx);
        hub.register(store, "b1", web(), Some(stamp(1, "B")));
        hub.register(store, "c1", web(), Some(stamp(1, "C")));
        let known = |hub: &Bench, origin: &str| hub.shared.lock().origins.contains_key(origin);
        assert!(known(&hub, "B") && known(&hub, "C"));
        // Long silent: over a store, silence alone drops nothing.
        tokio::time::advance(Duration::from_secs(5)).await;
        hub.shared.tick(Duration::from_millis(100));
        assert_eq!(hub.ids(), ["b1", "c1"]);
        // etcd drops B's record (its lease expired): B is forgotten, C is
        // not (each looked at again after another timeout).
        hub.free(store, "b1", Some(stamp(2, "B")));
        tokio::time::advance(Duration::from_secs(2)).await;
        hub.shared.tick(Duration::from_millis(100));
        assert!(!known(&hub, "B"), "a hub without records is forgotten");
        assert!(known(&hub, "C"), "a hub with records is remembered");
        assert_eq!(hub.ids(), ["c1"]);
    }
}
