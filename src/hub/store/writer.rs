//! The writing half of the store: this hub's records into etcd.
//!
//! The state sends the writer the stamped row of every change to a record
//! this hub is the origin of, with the connection that holds it, and word of
//! each connection that leaves. The writer keeps the latest change per
//! record (a record changed ten times while a write is under way is written
//! once more, not ten times), and writes them in batches: one transaction of
//! at most [`BATCH_RECORDS`] records and about [`BATCH_BYTES`], one at a
//! time, which paces the hub to what etcd takes (etcd refuses writes once
//! thousands wait to be applied).
//!
//! Each record in a batch is its own nested transaction, so that one cannot
//! fail another: a put claims the record's `host:port` (the claim is free,
//! or already the record's) and writes the record, both on a lease of the
//! connection that holds it. It does so only over a change of the record
//! that the hub has applied from its watch, or over its own last write. A
//! later change (the client registered the record again through another
//! hub while this one was cut off) is applied first, and decides whether
//! the put still holds. A record whose port another record holds is
//! tried again until that record has had the hub's timeout to go (a dead
//! client's lease expires), and only then refused, freed, and its writer
//! told. A delete removes the record and its claim only while they are
//! still on our lease (a client that moved to another hub took them along),
//! and a claim is only ever deleted by the record it names.
//!
//! A connection that leaves has its leases revoked, which deletes its
//! records at once, but only once the records it held that moved to another
//! connection are written there: a revocation never takes a live record
//! along. A lease found lost, or a record of ours deleted from the store,
//! makes the hub read the records' keys: what another hub wrote there since
//! (the client moved there) is applied, and the rest is written again, at a
//! new version.
//!
//! While etcd cannot be reached, changes wait (one per record, so at most
//! the size of the registry; a record that comes and goes meanwhile leaves
//! nothing to write) and the hub goes on serving from its own copy.

use super::Health;
use super::layout::Layout;
use super::leases::{self, KEYS_PER_LEASE, Leases};
use super::watch::stored_record;
use crate::hub::outbox::Out;
use crate::hub::state::{Effect, Reasserted, Shared};
use crate::protocol::metadata::Metadata;
use crate::protocol::stamp::Stamp;
use crate::protocol::wire::{self, Ext, Row};
use crate::registry::Owner;
use bytes::Bytes;
use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The writer's tables, keyed by record ids from clients and by leases:
/// hashed with foldhash and its per-process seed, as the registry's ids
/// (SipHash took a few per cent of a writing hub's CPU per record).
type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type IdSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// The most records written in one transaction (etcd takes 128 operations
/// per transaction by default).
const BATCH_RECORDS: usize = 100;

/// About the most bytes of one transaction: a put's row goes in it twice
/// (once per branch of its claim's test), and etcd takes requests of 1.5 MiB
/// by default.
const BATCH_BYTES: usize = 1024 * 1024;

/// The largest record the hub can keep in a store with etcd's default
/// request limit (1.5 MiB), in bytes of its row: see [`BATCH_BYTES`].
pub const MAX_STORE_RECORD: usize = 512 * 1024;

/// How long a stopping hub goes on writing what is queued.
const FLUSH_AT_STOP: Duration = Duration::from_secs(1);

/// The longest wait before a failed write is tried again.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// How often a put whose port is taken is tried again.
const TAKEN_RETRY: Duration = Duration::from_millis(500);

/// How soon a put that found its record changed in the store is tried
/// again (the watch brings the change meanwhile); [`TAKEN_RETRY`] while the
/// watch is down.
const CHANGED_RETRY: Duration = Duration::from_millis(100);

/// How often a store that keeps failing is reported.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// The connection the hub's own record belongs to.
const ITSELF: Owner = Owner(0);

/// What is to be done to one of our records in the store.
#[derive(Debug, Clone)]
enum Op {
    /// Put its row on a lease of `owner`, claiming `claim` (`HOST:PORT`).
    Put {
        owner: Owner,
        row: Bytes,
        stamp: Stamp,
        claim: Option<String>,
        /// Written again after the store dropped it: the version it had
        /// before. The put lands only where the store has no row for it; a
        /// row found there that is newer than this version is taken instead.
        rewrite_of: Option<Stamp>,
    },
    /// Delete it, the claim it made with it, if any, and, when it is one of
    /// `ours`, only while it is on our lease.
    Delete { ours: bool },
}

/// One of our records as it stands in the store (or may: a write whose
/// outcome is unknown counts as done).
#[derive(Debug, Clone)]
struct Placed {
    lease: i64,
    claim: Option<String>,
    /// A claim it held before a write whose outcome is unknown moved it: it
    /// may hold it still, and releases it with its next write.
    stale: Option<String>,
    /// Likewise, the lease it was on before such a write.
    stale_lease: Option<i64>,
    /// The store's revision of our last write of it known to have landed
    /// (0 when none is).
    revision: i64,
}

impl Placed {
    fn keys(&self) -> usize {
        1 + usize::from(self.claim.is_some())
    }

    /// The claims it may hold other than `now`.
    fn others<'a>(&'a self, now: Option<&'a String>) -> impl Iterator<Item = &'a String> {
        [self.claim.as_ref(), self.stale.as_ref()]
            .into_iter()
            .flatten()
            .filter(move |claim| Some(*claim) != now)
    }
}

/// Which lease a put goes on: one we have, or the `n`th granted for the batch.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Lease(i64),
    Granted(usize),
}

impl Slot {
    /// The lease it names, once the batch's leases are `granted`.
    fn lease(self, granted: &[(i64, i64)]) -> Option<i64> {
        match self {
            Slot::Lease(lease) => Some(lease),
            Slot::Granted(n) => granted.get(n).map(|(lease, _)| *lease),
        }
    }
}

/// One record's part of a batch.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    op: Op,
    slot: Option<Slot>,
    /// Where it stands now, as far as we know.
    placed: Option<Placed>,
    /// A put overwrites the record only if the store last changed it at or
    /// before this revision: a change this hub has applied, or its own
    /// write. A later change (another hub's client took the record over)
    /// is applied first, and then decides whether the put still holds.
    seen: i64,
}

/// One transaction's worth of writes, and the leases to grant and revoke
/// around it.
#[derive(Debug, Default, Clone)]
struct Batch {
    grants: Vec<Owner>,
    /// Revoked before the transaction: their connections left, and what
    /// moved off them is written.
    revokes: Vec<i64>,
    items: Vec<Item>,
}

/// What became of a record's write.
#[derive(Debug)]
enum Outcome {
    Done,
    /// Its port is another record's (this one's id).
    Taken(String),
    /// The record changed in the store after what this hub has applied.
    Changed,
    /// A record written again found this row in the store.
    Found(KeyValue),
}

/// What became of a batch.
#[derive(Debug)]
struct Executed {
    /// The store's revision after the transaction (0 when it failed).
    revision: i64,
    /// The leases granted, in order of `batch.grants` (fewer when it failed).
    granted: Vec<(i64, i64)>,
    /// One per item; empty when the transaction failed.
    outcomes: Vec<Outcome>,
    /// Whether the transaction was sent (on failure, it may have landed).
    sent: bool,
    error: Option<etcd_client::Error>,
}

impl Executed {
    /// A batch whose task ended without an answer (it panicked): its writes
    /// may have landed or not, as after an answer that did not come back.
    fn unknown(why: &tokio::task::JoinError) -> Executed {
        Executed {
            revision: 0,
            granted: Vec::new(),
            outcomes: Vec::new(),
            sent: true,
            error: Some(etcd_client::Error::Internal(format!(
                "the write to the store ended without an answer: {why}"
            ))),
        }
    }
}

/// The batch under way: the writer keeps it, so that whatever becomes of
/// its task, no write in it is lost.
struct Running {
    task: JoinHandle<Executed>,
    batch: Arc<Batch>,
}

/// A connection's leases waiting to be revoked.
#[derive(Debug)]
struct Revoke {
    lease: i64,
    /// Records that were on it and moved to another connection: the lease
    /// goes once they are written there.
    moving: IdSet<String>,
}

/// A put whose port another record holds, waiting to be tried again.
#[derive(Debug)]
struct TakenPut {
    op: Op,
    next: Instant,
}

/// The writer's state.
struct Writer {
    client: Client,
    layout: Layout,
    shared: Arc<Shared>,
    me: Arc<str>,
    ttl: i64,
    /// How long a put may find its port taken before it is refused: a
    /// lease's TTL (the hubs of a store share a timeout) and a second, in
    /// which a dead holder's lease expires.
    patience: Duration,
    /// The latest change of each record not yet written.
    pending: IdMap<String, Op>,
    /// Records with pending changes, oldest change first.
    order: VecDeque<String>,
    /// Records in the batch under way.
    in_flight: IdSet<String>,
    /// Puts whose port is taken, waiting to be tried again.
    taken: IdMap<String, TakenPut>,
    /// Since when each record's put has found its port taken.
    taken_since: IdMap<String, Instant>,
    /// Our records in the store.
    placed: IdMap<String, Placed>,
    /// The revision of our last write of each record that moves off a
    /// revoked lease, until it is written on its new one.
    moving_written: IdMap<String, i64>,
    /// The store's epoch (see `Health::epoch`) that placed revisions are of.
    epoch: u64,
    /// The records on each lease.
    on_lease: IdMap<i64, IdSet<String>>,
    leases: Leases,
    /// Leases of connections that left, to revoke.
    revokes: Vec<Revoke>,
    /// Connections that left while a batch was under way: a lease granted
    /// for them in it is revoked at once.
    gone: IdSet<Owner>,
    lost_tx: mpsc::UnboundedSender<i64>,
    /// Records of ours the store dropped, to read again.
    dropped: IdSet<String>,
    /// Records of ours written again after the store dropped them, until
    /// that version is written or superseded.
    rewritten: IdMap<String, Reasserted>,
    reread_tx: mpsc::UnboundedSender<Reread>,
    /// The store's connection in the state.
    store: Owner,
    /// Since when etcd has failed our writes, and when that was last said.
    failing_since: Option<Instant>,
    reported_at: Option<Instant>,
    retry: Duration,
    /// Each record goes in a transaction of its own, to find one that etcd
    /// refuses whole (until this many have gone).
    solo: usize,
    health: Arc<Health>,
}

/// How the writer reaches the store.
pub(super) struct Target {
    /// The etcd client.
    pub(super) client: Client,
    /// The keys.
    pub(super) layout: Layout,
    /// The TTL of the leases, in seconds.
    pub(super) ttl: i64,
    /// The hub's timeout.
    pub(super) timeout: Duration,
    /// The store's connection in the state.
    pub(super) store: Owner,
}

/// What the store has under the keys of records of ours it dropped.
struct Reread {
    ids: Vec<String>,
    found: Result<Vec<KeyValue>, etcd_client::Error>,
}

/// Runs the writer until `stop`, then writes what waits for a moment.
pub(super) async fn run(
    target: Target,
    shared: Arc<Shared>,
    mut rows: mpsc::UnboundedReceiver<Out>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let (lost_tx, mut lost) = mpsc::unbounded_channel();
    let (reread_tx, mut reread) = mpsc::unbounded_channel();
    let me = shared.me();
    let mut writer = Writer {
        client: target.client,
        layout: target.layout,
        shared,
        me,
        ttl: target.ttl,
        patience: Duration::from_secs(u64::try_from(target.ttl).unwrap_or(2)).max(target.timeout)
            + Duration::from_secs(1),
        pending: IdMap::default(),
        order: VecDeque::new(),
        in_flight: IdSet::default(),
        taken: IdMap::default(),
        taken_since: IdMap::default(),
        placed: IdMap::default(),
        moving_written: IdMap::default(),
        epoch: 0,
        on_lease: IdMap::default(),
        leases: Leases::default(),
        revokes: Vec::new(),
        gone: IdSet::default(),
        lost_tx,
        dropped: IdSet::default(),
        rewritten: IdMap::default(),
        reread_tx,
        store: target.store,
        failing_since: None,
        reported_at: None,
        retry: Duration::from_millis(50),
        solo: 0,
        health,
    };
    let mut running: Option<Running> = None;
    let mut wait_until: Option<Instant> = None;
    let mut stopping_at: Option<Instant> = None;
    let mut rows_open = true;
    loop {
        writer.retry_taken();
        writer.show();
        if wait_until.is_some_and(|at| at <= Instant::now()) {
            wait_until = None;
        }
        if running.is_none()
            && wait_until.is_none()
            && let Some(batch) = writer.plan()
        {
            let batch = Arc::new(batch);
            let task = tokio::spawn(execute(
                writer.client.clone(),
                writer.layout.clone(),
                writer.ttl,
                batch.clone(),
            ));
            running = Some(Running { task, batch });
        }
        if let Some(at) = stopping_at
            && (running.is_none() && writer.idle() || at.elapsed() >= FLUSH_AT_STOP)
        {
            if !writer.idle() {
                tracing::warn!(
                    waiting = writer.pending.len(),
                    "stopping with writes to the store not done"
                );
            }
            break;
        }
        let next_taken = writer.taken.values().map(|t| t.next).min();
        tokio::select! {
            out = rows.recv(), if rows_open => match out {
                Some(out) => {
                    writer.take(out);
                    while let Ok(out) = rows.try_recv() {
                        writer.take(out);
                    }
                    writer.read_dropped();
                }
                None => {
                    rows_open = false;
                    stopping_at = stopping_at.or_else(|| Some(Instant::now()));
                }
            },
            Some(id) = lost.recv() => writer.lost(id),
            Some(found) = reread.recv() => writer.reread(found),
            done = finish(&mut running) => {
                let Some(Running { batch, .. }) = running.take() else {
                    continue;
                };
                let executed = done.unwrap_or_else(|e| {
                    tracing::error!("a write to the store ended without an answer: {e}");
                    Executed::unknown(&e)
                });
                if let Err(wait) = writer.settle(Arc::unwrap_or_clone(batch), executed) {
                    wait_until = Some(Instant::now() + wait);
                }
            }
            () = sleep_until(wait_until), if wait_until.is_some() && running.is_none() => {}
            () = sleep_until(next_taken), if next_taken.is_some() => {}
            () = stop.cancelled(), if stopping_at.is_none() => {
                stopping_at = Some(Instant::now());
            }
            () = tokio::time::sleep(FLUSH_AT_STOP), if stopping_at.is_some() => {}
        }
    }
    writer.leases.clear();
}

/// The batch under way's end, or never without one.
async fn finish(running: &mut Option<Running>) -> Result<Executed, tokio::task::JoinError> {
    match running {
        Some(running) => (&mut running.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Writer {
    /// Shows what waits and the leases in the metrics.
    fn show(&self) {
        let metrics = &self.health.metrics;
        let waiting = self.pending.len() + self.taken.len();
        metrics
            .waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        metrics
            .leases
            .set(i64::try_from(self.leases.len()).unwrap_or(i64::MAX));
    }

    /// Whether nothing waits to be written.
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.revokes.is_empty()
    }

    /// Takes one thing the state sent.
    fn take(&mut self, out: Out) {
        match out {
            Out::Owned { owner, line } => self.take_row(owner, line),
            Out::Line(line) => self.take_row(None, line),
            Out::Lines(lines) => {
                for line in lines {
                    self.take_row(None, line);
                }
            }
            Out::Left(owner) => self.left(owner),
            Out::Dropped(id) => {
                self.dropped.insert(id);
            }
            Out::Snapshot(_) | Out::Dump { .. } | Out::Reconnect => {}
        }
    }

    /// A row about a record: ours to put, or a free to delete. Read in place
    /// where it can be, as the hub reads rows.
    fn take_row(&mut self, owner: Option<Owner>, line: Bytes) {
        match Row::decode_keeping(&line) {
            Ok(Row::Register { id, meta, ext }) => {
                self.take_put(owner, id, &Metadata::Decoded(meta), ext, &line);
            }
            Ok(Row::Plain { id, row, ext }) => {
                self.take_put(owner, id, &Metadata::Plain(row), ext, &line);
            }
            Ok(Row::Free { id, ext }) => {
                self.rewritten.remove(&id);
                let ours = ext.stamp.is_some_and(|stamp| stamp.origin == self.me);
                if ours && !self.placed.contains_key(&id) && !self.in_flight.contains(&id) {
                    // Never written: nothing to delete, nor to put.
                    self.moving_written.remove(&id);
                    if self.pending.remove(&id).is_some() {
                        self.order.retain(|queued| *queued != id);
                    }
                    self.taken.remove(&id);
                    self.taken_since.remove(&id);
                    return;
                }
                self.queue(id, Op::Delete { ours });
            }
            Ok(_) => {}
            Err(e) => tracing::error!("the store was handed a row it cannot read: {e}"),
        }
    }

    /// A register row, `line`: put when the record is ours.
    fn take_put(
        &mut self,
        owner: Option<Owner>,
        id: String,
        meta: &Metadata,
        ext: Ext,
        line: &Bytes,
    ) {
        let Some(stamp) = ext.stamp else { return };
        if stamp.origin != self.me {
            return;
        }
        let claim = claim_of(meta);
        let owner = owner
            .or_else(|| {
                self.placed
                    .get(&id)
                    .and_then(|p| self.leases.owner(p.lease))
            })
            .unwrap_or(ITSELF);
        let row = line.slice(..wire::trim_newline(line).len());
        let rewrite_of = match self.rewritten.get(&id) {
            Some(rewrite) if rewrite.now == stamp => Some(rewrite.before.clone()),
            // A newer version supersedes it; an older one, still on its
            // way here, does not.
            Some(rewrite) if rewrite.now < stamp => {
                self.rewritten.remove(&id);
                None
            }
            Some(_) | None => None,
        };
        self.queue(
            id,
            Op::Put {
                owner,
                row,
                stamp,
                claim,
                rewrite_of,
            },
        );
    }

    fn queue(&mut self, id: String, op: Op) {
        // A new version on the same port goes on waiting from when the
        // port was first found taken.
        let same_port = match (&op, self.taken.get(&id).map(|t| &t.op)) {
            (Op::Put { claim, .. }, Some(Op::Put { claim: before, .. })) => claim == before,
            _ => false,
        };
        self.taken.remove(&id);
        if !same_port {
            self.taken_since.remove(&id);
        }
        if self.pending.insert(id.clone(), op).is_none() {
            self.order.push_back(id);
        }
    }

    /// Puts whose port was taken, due to be tried again, wait again.
    fn retry_taken(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .taken
            .iter()
            .filter(|(_, t)| t.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(taken) = self.taken.remove(&id)
                && !self.pending.contains_key(&id)
            {
                self.pending.insert(id.clone(), taken.op);
                self.order.push_back(id);
            }
        }
    }

    /// Connection `owner` left: its records' frees came first. Its leases
    /// are revoked, which deletes what is still on them at once, so the
    /// deletes of those records need not be sent one by one; records that
    /// were on them and moved to another connection are written there
    /// first.
    fn left(&mut self, owner: Owner) {
        self.gone.insert(owner);
        self.revoke_leases_of(owner);
    }

    /// Queues the revocation of every lease `owner` has, each once the
    /// records on it that moved to another connection are written there.
    fn revoke_leases_of(&mut self, owner: Owner) {
        for lease in self.leases.remove_owner(owner) {
            let ids = self.on_lease.remove(&lease).unwrap_or_default();
            let mut moving = IdSet::default();
            for id in ids {
                let written = self.placed.remove(&id).map_or(0, |p| p.revision);
                let moves = match self.pending.get(&id) {
                    Some(Op::Delete { .. }) => {
                        self.pending.remove(&id);
                        false
                    }
                    Some(Op::Put { .. }) => true,
                    None => self.in_flight.contains(&id) || self.taken.contains_key(&id),
                };
                if moves {
                    self.moving_written.insert(id.clone(), written);
                    moving.insert(id);
                }
            }
            self.revokes.push(Revoke { lease, moving });
        }
    }

    /// Lease `id` is gone from etcd (it expired while etcd was away, or was
    /// revoked by someone else): the records that were on it are written
    /// again, at a new version, on new leases.
    fn lost(&mut self, id: i64) {
        if !self.leases.knows(id) {
            return;
        }
        self.leases.forget(id);
        let ids: Vec<String> = self
            .on_lease
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for rid in &ids {
            self.placed.remove(rid);
            // It is gone from etcd with the lease.
            if matches!(self.pending.get(rid), Some(Op::Delete { .. })) {
                self.pending.remove(rid);
            }
        }
        tracing::warn!(
            lease = id,
            records = ids.len(),
            "a lease of this hub is gone from the store; reading its records before writing them again"
        );
        self.dropped.extend(ids);
        self.read_dropped();
    }

    /// Reads what the store has under the records of ours it dropped: each
    /// is written again only once what another hub wrote there since (its
    /// client registered it there) is applied. Otherwise this hub's old
    /// version would get a new stamp, newer than the other hub's, and take
    /// the record back from a client that has moved.
    fn read_dropped(&mut self) {
        if self.dropped.is_empty() {
            return;
        }
        let ids: Vec<String> = std::mem::take(&mut self.dropped).into_iter().collect();
        tokio::spawn(read_again(
            self.client.clone(),
            self.layout.clone(),
            ids,
            self.reread_tx.clone(),
        ));
    }

    /// What the store has under records of ours it dropped: another hub's
    /// records are applied, and what is still ours is written again.
    fn reread(&mut self, Reread { ids, found }: Reread) {
        match found {
            Ok(kvs) => {
                // What the watch has applied already, the state has: an
                // older copy of it would only be corrected back.
                let applied = self.health.applied();
                let effects: Vec<Effect> = kvs
                    .iter()
                    .filter(|kv| kv.mod_revision() > applied)
                    .filter_map(|kv| stored_record(&self.layout, kv))
                    .filter(|(_, _, stamp)| stamp.origin != self.me)
                    .map(|(_, row, _)| Effect::Apply(row, crate::hub::guard::Writer::default()))
                    .collect();
                if !effects.is_empty() {
                    tracing::info!(
                        records = effects.len(),
                        "records of this hub that the store dropped were registered through another hub since"
                    );
                    self.shared.apply(self.store, effects);
                }
            }
            Err(e) => tracing::warn!(
                "cannot read the records the store dropped; writing them again: {}",
                super::access::describe(&e)
            ),
        }
        let reasserted = self.shared.reassert_ours(&ids);
        if !reasserted.is_empty() {
            tracing::info!(
                records = reasserted.len(),
                "writing records the store dropped again"
            );
        }
        for rewrite in reasserted {
            self.rewritten.insert(rewrite.id.clone(), rewrite);
        }
    }

    /// Where record `id` stands now; nothing when its lease is revoked
    /// already (its connection left while it was written).
    fn place(&mut self, id: &str, placed: Placed) {
        self.moving_written.remove(id);
        if !self.leases.knows(placed.lease) {
            self.unplace(id);
            return;
        }
        self.leases.count(placed.lease, placed.keys() as isize);
        self.on_lease
            .entry(placed.lease)
            .or_default()
            .insert(id.to_string());
        if let Some(before) = self.placed.insert(id.to_string(), placed) {
            self.unplace_from(id, &before);
        }
    }

    /// Record `id` is no longer in the store.
    fn unplace(&mut self, id: &str) {
        if let Some(before) = self.placed.remove(id) {
            self.unplace_from(id, &before);
        }
    }

    fn unplace_from(&mut self, id: &str, before: &Placed) {
        self.leases.count(before.lease, -(before.keys() as isize));
        let now_on = self.placed.get(id).map(|p| p.lease);
        if now_on != Some(before.lease)
            && let Some(ids) = self.on_lease.get_mut(&before.lease)
        {
            ids.remove(id);
        }
    }

    /// The revisions of our writes are of a store that was replaced (the
    /// watch found it behind them): they no longer say anything.
    fn renew_epoch(&mut self) {
        let epoch = self.health.epoch();
        if epoch != self.epoch {
            self.epoch = epoch;
            for placed in self.placed.values_mut() {
                placed.revision = 0;
            }
            self.moving_written.values_mut().for_each(|r| *r = 0);
        }
    }

    /// The next batch, if anything waits.
    fn plan(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        // Revocations whose moved records are written go first.
        let (pending, taken) = (&self.pending, &self.taken);
        self.revokes.retain(|revoke| {
            let ready = revoke
                .moving
                .iter()
                .all(|id| !pending.contains_key(id) && !taken.contains_key(id));
            if ready {
                batch.revokes.push(revoke.lease);
            }
            !ready
        });
        let limit = if self.solo > 0 { 1 } else { BATCH_RECORDS };
        let mut touched: IdSet<String> = IdSet::default();
        let mut bytes = 0;
        // Keys planned on each lease, and on each lease to grant.
        let mut planned: IdMap<i64, usize> = IdMap::default();
        let mut granting: IdMap<Owner, (usize, usize)> = IdMap::default();
        // Read before the versions the hub holds are checked: the state has
        // every change up to it.
        let applied = self.health.applied();
        self.renew_epoch();
        while let Some(id) = self.order.pop_front() {
            let Some(op) = self.pending.get(&id) else {
                continue;
            };
            // A version the hub no longer holds (freed, changed, or moved to
            // another hub since) is not written; a record of ours that was
            // never written is not deleted.
            let stale = match op {
                Op::Put { stamp, .. } => !self.shared.holds_version(&id, stamp),
                Op::Delete { ours } => *ours && !self.placed.contains_key(&id),
            };
            if stale {
                if let Some(Op::Put { stamp, .. }) = self.pending.remove(&id) {
                    self.forget_rewrite(&id, &stamp);
                }
                self.taken_since.remove(&id);
                self.moving_written.remove(&id);
                continue;
            }
            let placed = self.placed.get(&id).cloned();
            let mut keys = vec![self.layout.record(&id)];
            let new_claim = match op {
                Op::Put { claim, .. } => claim.as_ref(),
                Op::Delete { .. } => None,
            };
            if let Some(claim) = new_claim {
                keys.push(self.layout.claim(claim));
            }
            if let Some(placed) = &placed {
                keys.extend(placed.others(new_claim).map(|old| self.layout.claim(old)));
            }
            let size = match op {
                Op::Put { row, .. } => 2 * row.len(),
                Op::Delete { .. } => 0,
            } + keys.iter().map(|key| 2 * key.len() + 64).sum::<usize>();
            let full = batch.items.len() >= limit
                || (!batch.items.is_empty() && bytes + size > BATCH_BYTES);
            if full || keys.iter().any(|key| touched.contains(key)) {
                self.order.push_front(id);
                break;
            }
            let Some(op) = self.pending.remove(&id) else {
                continue;
            };
            touched.extend(keys);
            bytes += size;
            let slot = match &op {
                Op::Put { owner, claim, .. } => {
                    let needs = 1 + usize::from(claim.is_some());
                    // A record already on a lease of its owner stays there.
                    let stays = placed
                        .as_ref()
                        .map(|p| p.lease)
                        .filter(|&lease| self.leases.owner(lease) == Some(*owner));
                    Some(match stays {
                        Some(lease) => Slot::Lease(lease),
                        None => {
                            self.slot_for(*owner, needs, &mut planned, &mut granting, &mut batch)
                        }
                    })
                }
                Op::Delete { .. } => None,
            };
            self.in_flight.insert(id.clone());
            let written = match &placed {
                Some(placed) => placed.revision,
                None => self.moving_written.get(&id).copied().unwrap_or(0),
            };
            let seen = applied.max(written);
            batch.items.push(Item {
                id,
                op,
                slot,
                placed,
                seen,
            });
        }
        if batch.items.is_empty() && batch.revokes.is_empty() {
            return None;
        }
        Some(batch)
    }

    /// A lease of `owner` with room for `needs` keys: one it has, or one to
    /// grant with the batch.
    fn slot_for(
        &self,
        owner: Owner,
        needs: usize,
        planned: &mut IdMap<i64, usize>,
        granting: &mut IdMap<Owner, (usize, usize)>,
        batch: &mut Batch,
    ) -> Slot {
        if let Some((n, used)) = granting.get_mut(&owner) {
            if *used + needs <= KEYS_PER_LEASE {
                *used += needs;
                return Slot::Granted(*n);
            }
        } else if let Some(lease) = self.leases.with_room(owner, needs) {
            let used = planned.entry(lease).or_default();
            if *used + needs <= self.leases.room(lease) {
                *used += needs;
                return Slot::Lease(lease);
            }
        }
        batch.grants.push(owner);
        let n = batch.grants.len() - 1;
        granting.insert(owner, (n, needs));
        Slot::Granted(n)
    }

    /// Takes in what became of a batch; on failure, puts its writes back
    /// (behind any newer change) and says how long to wait.
    fn settle(&mut self, batch: Batch, executed: Executed) -> Result<(), Duration> {
        let Executed {
            revision,
            granted,
            outcomes,
            sent,
            error,
        } = executed;
        self.in_flight.clear();
        for (owner, (lease, ttl)) in batch.grants.iter().zip(&granted) {
            let keeper = tokio::spawn(leases::keep(
                self.client.clone(),
                *lease,
                keep_alive_period(*ttl),
                self.lost_tx.clone(),
            ));
            self.leases.add(*owner, *lease, keeper.abort_handle());
        }
        let slot_lease = |slot: Option<Slot>| slot.and_then(|slot| slot.lease(&granted));
        if let Some(error) = error {
            self.health.metrics.failures.inc();
            self.health.writing(false);
            // A write that reached etcd may have landed even so: its
            // record counts as placed, so that a later delete takes it and
            // its claim away.
            let landed = sent && may_have_landed(&error);
            for item in batch.items.iter().filter(|_| landed) {
                if let (Op::Put { claim, .. }, Some(lease)) = (&item.op, slot_lease(item.slot)) {
                    // If it did not land, the claim it had is still its.
                    let stale = item
                        .placed
                        .as_ref()
                        .and_then(|p| p.others(claim.as_ref()).next().cloned());
                    let stale_lease = item
                        .placed
                        .as_ref()
                        .map(|p| p.lease)
                        .filter(|&before| before != lease);
                    let claim = claim.clone();
                    let revision = item.placed.as_ref().map_or(0, |p| p.revision);
                    let placed = Placed {
                        lease,
                        claim,
                        stale,
                        stale_lease,
                        revision,
                    };
                    self.place(&item.id, placed);
                }
            }
            // After the failed writes wait again, so that a revocation
            // waits for the records among them that moved.
            let wait = self.failed(batch, &error);
            self.revoke_gone();
            return Err(wait);
        }
        self.health.writing(true);
        if let Some(since) = self.failing_since.take() {
            self.reported_at = None;
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                waiting = self.pending.len(),
                "the store takes writes again"
            );
        }
        self.retry = Duration::from_millis(50);
        self.solo = self.solo.saturating_sub(batch.items.len());
        let written = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Done))
            .count();
        self.health.metrics.written.inc_by(written as u64);
        for (item, outcome) in batch.items.into_iter().zip(outcomes) {
            let lease = slot_lease(item.slot);
            match (item.op, outcome) {
                (Op::Put { claim, stamp, .. }, Outcome::Done) => {
                    self.taken_since.remove(&item.id);
                    self.forget_rewrite(&item.id, &stamp);
                    if let Some(lease) = lease {
                        let placed = Placed {
                            lease,
                            claim,
                            stale: None,
                            stale_lease: None,
                            revision,
                        };
                        self.place(&item.id, placed);
                    }
                }
                (op @ Op::Put { .. }, Outcome::Taken(holder)) => {
                    self.port_taken(item.id, op, &holder)
                }
                (op @ Op::Put { .. }, Outcome::Changed) => self.changed(item.id, op),
                (op @ Op::Put { .. }, Outcome::Found(kv)) => self.found(item.id, op, &kv),
                (Op::Delete { .. }, _) => self.unplace(&item.id),
            }
        }
        self.revoke_gone();
        Ok(())
    }

    /// Leases granted for connections that left meanwhile go at once.
    fn revoke_gone(&mut self) {
        for owner in std::mem::take(&mut self.gone) {
            self.revoke_leases_of(owner);
        }
    }

    /// A put found its port held by record `holder`: tried again a little
    /// later, until that record has had the time to go if its client is
    /// dead; then refused.
    fn port_taken(&mut self, id: String, op: Op, holder: &str) {
        let now = Instant::now();
        let since = *self.taken_since.entry(id.clone()).or_insert(now);
        let Op::Put { stamp, claim, .. } = &op else {
            return;
        };
        if now.saturating_duration_since(since) < self.patience {
            if since == now {
                tracing::info!(%id, %holder, "port {} is held in the store; trying again", claim.as_deref().unwrap_or("?"));
            }
            let next = now + TAKEN_RETRY;
            self.taken.insert(id, TakenPut { op, next });
            return;
        }
        self.taken_since.remove(&id);
        let claim = claim.as_deref().unwrap_or_default();
        let reason = format!("port {claim} is taken: record {holder} holds it in the store");
        tracing::warn!(%id, "{reason}");
        self.shared.refused_by_store(&id, stamp, &reason);
    }

    /// A put found the record changed in the store since what the hub has
    /// applied: it waits for the watch, after which it is written, if the
    /// hub still holds its version, or dropped.
    fn changed(&mut self, id: String, op: Op) {
        tracing::debug!(%id, "the record changed in the store; waiting for the watch");
        // The time its port was taken counts from its next try.
        self.taken_since.remove(&id);
        // Without a watch, nothing will come to decide it soon.
        let wait = if self.health.is_watching() {
            CHANGED_RETRY
        } else {
            TAKEN_RETRY
        };
        let next = Instant::now() + wait;
        self.taken.insert(id, TakenPut { op, next });
    }

    /// A record written again found a row in the store: written after the
    /// store dropped ours. Another hub's version stays, and this hub takes
    /// it, when its client registered it after the version the record had
    /// (a row itself written again counts from that registration, not from
    /// its fresh stamp); anything else is written over.
    fn found(&mut self, id: String, op: Op, kv: &KeyValue) {
        let Op::Put {
            owner,
            row,
            stamp,
            claim,
            rewrite_of: Some(before),
        } = op
        else {
            return;
        };
        self.taken_since.remove(&id);
        self.forget_rewrite(&id, &stamp);
        if let Some((_, theirs, version)) = stored_record(&self.layout, kv)
            && version.origin != self.me
            && registered_version(&theirs).is_some_and(|registered| *registered > before)
            && self.shared.yield_to_store(self.store, &stamp, theirs)
        {
            tracing::info!(%id, origin = %version.origin, "a record of this hub that the store dropped was registered through another hub since; that version stays");
            return;
        }
        if self.pending.contains_key(&id) || !self.shared.holds_version(&id, &stamp) {
            return;
        }
        let op = Op::Put {
            owner,
            row,
            stamp,
            claim,
            rewrite_of: None,
        };
        self.queue(id, op);
    }

    /// Version `stamp` of record `id` is written, or no longer to be: if it
    /// was the record's version written again, that is over.
    fn forget_rewrite(&mut self, id: &str, stamp: &Stamp) {
        if self.rewritten.get(id).is_some_and(|r| r.now == *stamp) {
            self.rewritten.remove(id);
        }
    }

    /// A batch failed: its writes wait again, unless a newer change of the
    /// record came meanwhile. A batch etcd refuses as such (too large) is
    /// split up, and a single record it refuses is dropped, and refused.
    fn failed(&mut self, batch: Batch, error: &etcd_client::Error) -> Duration {
        let refused_whole = refused_as_such(error);
        if refused_whole && batch.items.len() == 1 {
            for item in batch.items {
                tracing::error!(id = %item.id, "the store refuses the write of this record: {error}");
                if let Op::Put { stamp, .. } = &item.op {
                    let reason = format!("the store refuses it: {error}");
                    self.shared.refused_by_store(&item.id, stamp, &reason);
                }
            }
            return Duration::ZERO;
        }
        let waiting = self.pending.len() + batch.items.len();
        if refused_whole {
            self.solo = batch.items.len();
        } else if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            self.reported_at = Some(Instant::now());
            tracing::warn!(
                waiting,
                "cannot write to the store ({}); writes wait, and this hub serves what it holds",
                super::access::describe(error)
            );
        } else if self
            .reported_at
            .is_none_or(|at| at.elapsed() >= REPORT_EVERY)
        {
            self.reported_at = Some(Instant::now());
            tracing::warn!(
                waiting,
                "still cannot write to the store: {}",
                super::access::describe(error)
            );
        }
        for item in batch.items.into_iter().rev() {
            if !self.pending.contains_key(&item.id) {
                self.pending.insert(item.id.clone(), item.op);
                self.order.push_front(item.id);
            }
        }
        // The revocations went first: one that failed expires with its TTL.
        let wait = self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        wait
    }
}

/// Whether etcd refused a request as such (too large, too many operations),
/// as opposed to failing it for now.
fn refused_as_such(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    match status.code() {
        // Also how etcd says that this hub has not signed in (yet), or with
        // a wrong password: that passes once it signs in.
        tonic::Code::InvalidArgument => !["user name is empty", "authentication failed"]
            .iter()
            .any(|sign_in| status.message().contains(sign_in)),
        // Also how etcd says "too many requests", which passes.
        tonic::Code::ResourceExhausted => status.message().contains("larger than max"),
        _ => false,
    }
}

/// Whether a request that failed so may have been applied all the same
/// (it reached etcd, and its answer did not come back). Only refusals that
/// etcd makes before it proposes a request say that it was not: a wrong
/// request, too many requests waiting, no leader, or no connection at all.
/// etcd also answers "unavailable" to a request it proposed when its member
/// stops, its leader changes or the request times out, and the request may
/// be applied after. Counting a write that did not land as placed costs
/// nothing, because every delete and release checks what it removes; the
/// other way round would leave a record, or a port's claim, in the store
/// with nobody to remove it.
fn may_have_landed(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted => false,
            tonic::Code::Unavailable => !status.message().contains("no leader"),
            _ => true,
        },
        etcd_client::Error::TransportError(_) => false,
        _ => true,
    }
}

/// How often a lease of `ttl` seconds is renewed: three times per TTL.
fn keep_alive_period(ttl: i64) -> Duration {
    Duration::from_millis(u64::try_from(ttl.max(1)).unwrap_or(2) * 1000 / 3)
}

/// The version a stored row's client registered ([`Ext::registered`]).
fn registered_version(row: &Row) -> Option<&Stamp> {
    let (Row::Register { ext, .. } | Row::Plain { ext, .. }) = row else {
        return None;
    };
    ext.registered()
}

/// `HOST:PORT` of a record that has both, to claim; none for a hub's own
/// record (a hub restarted on its port is a new record there at once).
fn claim_of(meta: &Metadata) -> Option<String> {
    if meta.role() == Some("seaport") {
        return None;
    }
    let host = meta.host()?;
    let port = meta.port()?;
    Some(format!("{host}:{port}"))
}

/// Records read again in one transaction: as many of the largest the store
/// takes as fit in 3 MiB, within the etcd client's 4 MiB for an answer.
const REREAD_RECORDS: usize = 3 * 1024 * 1024 / MAX_STORE_RECORD;

/// Reads the keys of records `ids`, [`REREAD_RECORDS`] per transaction, and
/// hands what each found to the writer.
async fn read_again(
    mut client: Client,
    layout: Layout,
    ids: Vec<String>,
    to: mpsc::UnboundedSender<Reread>,
) {
    for chunk in ids.chunks(REREAD_RECORDS.max(1)) {
        let reads: Vec<TxnOp> = chunk
            .iter()
            .map(|id| TxnOp::get(layout.record(id), None))
            .collect();
        let found = client
            .txn(Txn::new().and_then(reads))
            .await
            .map(|response| {
                let mut kvs = Vec::new();
                for read in response.op_responses() {
                    if let TxnOpResponse::Get(get) = read {
                        kvs.extend(get.kvs().iter().cloned());
                    }
                }
                kvs
            });
        let ids = chunk.to_vec();
        if to.send(Reread { ids, found }).is_err() {
            return;
        }
    }
}

/// Revokes the leases of connections that left, grants the batch's leases
/// and writes its records in one transaction.
async fn execute(mut client: Client, layout: Layout, ttl: i64, batch: Arc<Batch>) -> Executed {
    for lease in &batch.revokes {
        // A lease etcd no longer has is as good as revoked; otherwise it
        // expires after its TTL.
        if let Err(e) = client.lease_revoke(*lease).await {
            tracing::warn!(
                lease,
                "cannot revoke a lease; its records go when it expires: {e}"
            );
        }
    }
    // All at once: a batch of a hundred new connections waits for one
    // round of grants, not a hundred. A lease granted after one that
    // failed is left to expire, unused.
    let grants: Vec<_> = batch
        .grants
        .iter()
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.lease_grant(ttl, None).await })
        })
        .collect();
    let mut granted = Vec::with_capacity(grants.len());
    for grant in grants {
        let grant = grant.await.unwrap_or_else(|e| {
            Err(etcd_client::Error::Internal(format!(
                "a lease grant failed: {e}"
            )))
        });
        match grant {
            Ok(lease) => granted.push((lease.id(), lease.ttl())),
            Err(error) => {
                return Executed {
                    revision: 0,
                    granted,
                    outcomes: Vec::new(),
                    sent: false,
                    error: Some(error),
                };
            }
        }
    }
    let mut outcomes = Vec::new();
    let mut revision = 0;
    if !batch.items.is_empty() {
        let ops: Vec<TxnOp> = batch
            .items
            .iter()
            .map(|item| TxnOp::txn(record_txn(&layout, item, &granted)))
            .collect();
        match client.txn(Txn::new().and_then(ops)).await {
            Ok(response) => {
                revision = response.header().map_or(0, |h| h.revision());
                outcomes = response
                    .op_responses()
                    .iter()
                    .zip(&batch.items)
                    .map(|(response, item)| outcome(response, item))
                    .collect();
            }
            Err(error) => {
                return Executed {
                    revision: 0,
                    granted,
                    outcomes,
                    sent: true,
                    error: Some(error),
                };
            }
        }
    }
    Executed {
        revision,
        granted,
        outcomes,
        sent: true,
        error: None,
    }
}

/// Deletes claim `claim` if record `id` holds it.
fn release(layout: &Layout, claim: &str, id: &str) -> TxnOp {
    let key = layout.claim(claim);
    TxnOp::txn(
        Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, id)])
            .and_then([TxnOp::delete(key, None)]),
    )
}

/// Deletes claim `claim` if record `id` holds it on one of the leases
/// `placed` names: a claim that moved with its record to another hub is on
/// that hub's lease, and stays.
fn release_held(layout: &Layout, claim: &str, id: &str, placed: &Placed) -> TxnOp {
    let key = layout.claim(claim);
    let held_on = |lease: i64| {
        Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, id),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::delete(key.clone(), None)])
    };
    let txn = held_on(placed.lease);
    TxnOp::txn(match placed.stale_lease {
        Some(before) => txn.or_else([TxnOp::txn(held_on(before))]),
        None => txn,
    })
}

/// One record's transaction within a batch.
fn record_txn(layout: &Layout, item: &Item, granted: &[(i64, i64)]) -> Txn {
    let key = layout.record(&item.id);
    match &item.op {
        Op::Put {
            row,
            claim,
            rewrite_of,
            ..
        } => {
            let put = put_txn(layout, key.clone(), item, row, claim.as_ref(), granted);
            if rewrite_of.is_some() {
                // Where the store has no row for it only; else, which.
                let absent = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
                return Txn::new()
                    .when([absent])
                    .and_then([TxnOp::txn(put)])
                    .or_else([TxnOp::get(key, None)]);
            }
            // Over a change this hub has applied, or its own write, only.
            let unchanged = Compare::mod_revision(key, CompareOp::Less, item.seen + 1);
            Txn::new().when([unchanged]).and_then([TxnOp::txn(put)])
        }
        Op::Delete { .. } => match &item.placed {
            Some(placed) => {
                let mut deletes = vec![TxnOp::delete(key.clone(), None)];
                deletes.extend(
                    placed
                        .others(None)
                        .map(|claim| release(layout, claim, &item.id)),
                );
                // Only while it is on our lease: a client that moved to
                // another hub took it along. After a write whose outcome is
                // unknown, it is on the one or the other.
                let on = |lease: i64| Compare::lease(key.clone(), CompareOp::Equal, lease);
                // Its key gone (deleted by another hub or by hand), or moved:
                // a claim still on our lease is ours to release.
                let leftovers: Vec<TxnOp> = placed
                    .others(None)
                    .map(|claim| release_held(layout, claim, &item.id, placed))
                    .collect();
                let txn = Txn::new()
                    .when([on(placed.lease)])
                    .and_then(deletes.clone());
                match placed.stale_lease {
                    Some(before) => txn.or_else([TxnOp::txn(
                        Txn::new()
                            .when([on(before)])
                            .and_then(deletes)
                            .or_else(leftovers),
                    )]),
                    None => txn.or_else(leftovers),
                }
            }
            // Another hub's record (an operator's free): its hub writes it
            // again if its client still holds it.
            None => Txn::new().and_then([TxnOp::delete(key, None)]),
        },
    }
}

/// The put of `item`'s row on its lease, claiming its port (free, or its
/// own already) and releasing a port it moved from; or, when the port is
/// another record's, the claim, to say whose.
fn put_txn(
    layout: &Layout,
    key: String,
    item: &Item,
    row: &Bytes,
    claim: Option<&String>,
    granted: &[(i64, i64)],
) -> Txn {
    let lease = item.slot.and_then(|slot| slot.lease(granted)).unwrap_or(0);
    let on_lease = || Some(PutOptions::new().with_lease(lease));
    let mut writes = vec![TxnOp::put(key.clone(), row.to_vec(), on_lease())];
    if let Some(placed) = &item.placed {
        writes.extend(
            placed
                .others(claim)
                .map(|old| release(layout, old, &item.id)),
        );
    }
    let Some(claim) = claim else {
        return Txn::new().and_then(writes);
    };
    let claim_key = layout.claim(claim);
    writes.push(TxnOp::put(claim_key.clone(), item.id.clone(), on_lease()));
    // Ours already, or free: then the writes; otherwise, who has it.
    let if_free = Txn::new()
        .when([Compare::create_revision(
            claim_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(writes.clone())
        .or_else([TxnOp::get(claim_key.clone(), None)]);
    Txn::new()
        .when([Compare::value(claim_key, CompareOp::Equal, item.id.clone())])
        .and_then(writes)
        .or_else([TxnOp::txn(if_free)])
}

/// What became of one record's transaction.
fn outcome(response: &TxnOpResponse, item: &Item) -> Outcome {
    let TxnOpResponse::Txn(unchanged) = response else {
        return Outcome::Done;
    };
    let Op::Put { claim, .. } = &item.op else {
        return Outcome::Done;
    };
    if !unchanged.succeeded() {
        return match unchanged.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map_or(Outcome::Changed, |kv| Outcome::Found(kv.clone())),
            _ => Outcome::Changed,
        };
    }
    let put = unchanged.op_responses();
    let (Some(_), Some(TxnOpResponse::Txn(txn))) = (claim, put.first()) else {
        return Outcome::Done;
    };
    if txn.succeeded() {
        return Outcome::Done;
    }
    let inner = txn.op_responses();
    let Some(TxnOpResponse::Txn(if_free)) = inner.first() else {
        return Outcome::Done;
    };
    if if_free.succeeded() {
        return Outcome::Done;
    }
    let holder = match if_free.op_responses().first() {
        Some(TxnOpResponse::Get(get)) => get
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_default(),
        _ => String::new(),
    };
    Outcome::Taken(holder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn a_write_etcd_may_have_proposed_counts_as_landed() {
        // etcd's answers to a request it proposed and then could not see
        // through (rpctypes: ErrGRPCStopped, ErrGRPCLeaderChanged,
        // ErrGRPCTimeout), and a deadline of ours.
        for message in [
            "etcdserver: server stopped",
            "etcdserver: leader changed",
            "etcdserver: request timed out",
            "transport error",
        ] {
            let error = status(tonic::Code::Unavailable, message);
            assert!(may_have_landed(&error), "{message}");
        }
        assert!(may_have_landed(&status(
            tonic::Code::Cancelled,
            "Timeout expired"
        )));
        assert!(may_have_landed(&etcd_client::Error::Internal(
            "the write to the store ended without an answer".into()
        )));
    }

    #[test]
    fn a_write_etcd_refused_before_proposing_it_did_not_land() {
        for error in [
            status(tonic::Code::Unavailable, "etcdserver: no leader"),
            status(
                tonic::Code::ResourceExhausted,
                "etcdserver: too many requests",
            ),
            status(
                tonic::Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
        ] {
            assert!(!may_have_landed(&error), "{error}");
        }
    }

    #[test]
    fn only_a_request_etcd_cannot_take_is_refused_as_such() {
        assert!(refused_as_such(&status(
            tonic::Code::ResourceExhausted,
            "grpc: received message larger than max (1700000 vs. 1572864)"
        )));
        assert!(refused_as_such(&status(
            tonic::Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )));
        for error in [
            status(
                tonic::Code::ResourceExhausted,
                "etcdserver: too many requests",
            ),
            status(
                tonic::Code::InvalidArgument,
                "etcdserver: user name is empty",
            ),
            status(
                tonic::Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            status(tonic::Code::Unavailable, "etcdserver: server stopped"),
        ] {
            assert!(!refused_as_such(&error), "{error}");
        }
    }
}
