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
//! connection that holds it; a record whose port another record holds is
//! refused, freed, and its writer told. A delete removes the record and its
//! claim only while they are still on our lease (a client that moved to
//! another hub took them along).
//!
//! While etcd cannot be reached, changes wait (one per record, so at most
//! the size of the registry) and the hub goes on serving from its own copy;
//! when a lease is found lost, every record of ours is written again, at a
//! new version, on new leases.

use super::Health;
use super::layout::Layout;
use super::leases::{self, KEYS_PER_LEASE, Leases};
use crate::hub::outbox::Out;
use crate::hub::state::Shared;
use crate::protocol::stamp::Stamp;
use crate::protocol::wire::Row;
use crate::registry::Owner;
use bytes::Bytes;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The most records written in one transaction (etcd takes 128 operations
/// per transaction by default).
const BATCH_RECORDS: usize = 100;

/// About the most bytes of rows written in one transaction (etcd takes
/// requests of 1.5 MiB by default).
const BATCH_BYTES: usize = 1024 * 1024;

/// How long a stopping hub goes on writing what is queued.
const FLUSH_AT_STOP: Duration = Duration::from_secs(1);

/// The longest wait before a failed write is tried again.
const MAX_RETRY: Duration = Duration::from_secs(2);

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
    },
    /// Delete it.
    Delete,
}

/// One of our records as it stands in the store.
#[derive(Debug, Clone)]
struct Placed {
    lease: i64,
    claim: Option<String>,
}

impl Placed {
    fn keys(&self) -> usize {
        1 + usize::from(self.claim.is_some())
    }
}

/// Which lease a put goes on: one we have, or the `n`th granted for the batch.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Lease(i64),
    Granted(usize),
}

/// One record's part of a batch.
#[derive(Debug)]
struct Item {
    id: String,
    op: Op,
    slot: Option<Slot>,
    /// Where it stands now, as far as we know.
    placed: Option<Placed>,
}

/// One transaction's worth of writes, and the leases to grant and revoke
/// around it.
#[derive(Debug, Default)]
struct Batch {
    grants: Vec<Owner>,
    items: Vec<Item>,
    revokes: Vec<i64>,
}

/// What became of a record's write.
#[derive(Debug)]
enum Outcome {
    Done,
    /// Its port is another record's (this one's id).
    Taken(String),
}

/// What became of a batch.
#[derive(Debug)]
struct Executed {
    batch: Batch,
    /// The leases granted, in order of `batch.grants` (fewer when it failed).
    granted: Vec<i64>,
    /// One per item; empty when the transaction failed.
    outcomes: Vec<Outcome>,
    error: Option<etcd_client::Error>,
}

/// The writer's state.
struct Writer {
    client: Client,
    layout: Layout,
    shared: Arc<Shared>,
    me: Arc<str>,
    ttl: i64,
    /// The latest change of each record not yet written.
    pending: HashMap<String, Op>,
    /// Records with pending changes, oldest change first.
    order: VecDeque<String>,
    /// Our records in the store.
    placed: HashMap<String, Placed>,
    leases: Leases,
    /// Leases of connections that left, to revoke.
    revokes: Vec<i64>,
    lost_tx: mpsc::UnboundedSender<i64>,
    /// Since when etcd has failed our writes.
    failing_since: Option<Instant>,
    retry: Duration,
    /// Each record goes in a transaction of its own, to find one that etcd
    /// refuses whole (until this many have gone).
    solo: usize,
    health: Arc<Health>,
}

/// Runs the writer until `stop`, then writes what waits for a moment.
pub(super) async fn run(
    client: Client,
    layout: Layout,
    shared: Arc<Shared>,
    ttl: i64,
    mut rows: mpsc::UnboundedReceiver<Out>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let (lost_tx, mut lost) = mpsc::unbounded_channel();
    let me = shared.me();
    let mut writer = Writer {
        client,
        layout,
        shared,
        me,
        ttl,
        pending: HashMap::new(),
        order: VecDeque::new(),
        placed: HashMap::new(),
        leases: Leases::default(),
        revokes: Vec::new(),
        lost_tx,
        failing_since: None,
        retry: Duration::from_millis(50),
        solo: 0,
        health,
    };
    let mut running: Option<JoinHandle<Executed>> = None;
    let mut wait_until: Option<Instant> = None;
    let mut stopping_at: Option<Instant> = None;
    loop {
        writer.show();
        if running.is_none()
            && wait_until.is_none_or(|at| at <= Instant::now())
            && let Some(batch) = writer.plan()
        {
            wait_until = None;
            running = Some(tokio::spawn(execute(
                writer.client.clone(),
                writer.layout.clone(),
                writer.ttl,
                batch,
            )));
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
        tokio::select! {
            out = rows.recv() => match out {
                Some(out) => {
                    writer.take(out);
                    while let Ok(out) = rows.try_recv() {
                        writer.take(out);
                    }
                }
                None => stopping_at = stopping_at.or_else(|| Some(Instant::now())),
            },
            Some(id) = lost.recv() => writer.lost(id),
            done = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                match done {
                    Ok(executed) => {
                        if let Err(wait) = writer.settle(executed) {
                            wait_until = Some(Instant::now() + wait);
                        }
                    }
                    Err(e) => tracing::error!("a write to the store failed: {e}"),
                }
            }
            () = sleep_until(wait_until), if wait_until.is_some() && running.is_none() => {}
            () = stop.cancelled(), if stopping_at.is_none() => {
                stopping_at = Some(Instant::now());
            }
            () = tokio::time::sleep(FLUSH_AT_STOP), if stopping_at.is_some() => {}
        }
    }
    writer.leases.clear();
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
        metrics
            .waiting
            .set(i64::try_from(self.pending.len()).unwrap_or(i64::MAX));
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
            Out::Snapshot(_) | Out::Dump { .. } => {}
        }
    }

    /// A row about a record: ours to put, or any record's free to delete.
    fn take_row(&mut self, owner: Option<Owner>, line: Bytes) {
        match Row::decode(&line) {
            Ok(Row::Register { id, meta, ext, .. }) => {
                let Some(stamp) = ext.stamp else { return };
                if stamp.origin != self.me {
                    return;
                }
                let claim = claim_of(&meta);
                let owner = owner
                    .or_else(|| {
                        self.placed
                            .get(&id)
                            .and_then(|p| self.leases.owner(p.lease))
                    })
                    .unwrap_or(ITSELF);
                let row = Bytes::copy_from_slice(trim_newline(&line));
                self.queue(
                    id,
                    Op::Put {
                        owner,
                        row,
                        stamp,
                        claim,
                    },
                );
            }
            Ok(Row::Free { id, .. }) => self.queue(id, Op::Delete),
            Ok(_) => {}
            Err(e) => tracing::error!("the store was handed a row it cannot read: {e}"),
        }
    }

    fn queue(&mut self, id: String, op: Op) {
        if self.pending.insert(id.clone(), op).is_none() {
            self.order.push_back(id);
        }
    }

    /// Connection `owner` left: its records' frees came first. Its leases
    /// are revoked, which deletes what is still on them at once, so the
    /// deletes of those records need not be sent one by one.
    fn left(&mut self, owner: Owner) {
        let revoked: HashSet<i64> = self.leases.remove_owner(owner).into_iter().collect();
        if revoked.is_empty() {
            return;
        }
        let placed = &mut self.placed;
        self.pending.retain(|id, op| {
            let on_revoked = matches!(op, Op::Delete)
                && placed.get(id).is_some_and(|p| revoked.contains(&p.lease));
            if on_revoked {
                placed.remove(id);
            }
            !on_revoked
        });
        self.revokes.extend(revoked);
    }

    /// Lease `id` is gone from etcd (it expired while etcd was away): every
    /// record of ours is written again, at a new version, on new leases.
    fn lost(&mut self, id: i64) {
        if !self.leases.knows(id) {
            return;
        }
        tracing::warn!(
            lease = id,
            "a lease of this hub expired in the store; writing every record of this hub again"
        );
        self.leases.clear();
        self.placed.clear();
        let n = self.shared.reassert_ours();
        tracing::info!(records = n, "records of this hub to write again");
    }

    /// The next batch, if anything waits.
    fn plan(&mut self) -> Option<Batch> {
        let mut batch = Batch {
            revokes: std::mem::take(&mut self.revokes),
            ..Batch::default()
        };
        let limit = if self.solo > 0 { 1 } else { BATCH_RECORDS };
        let mut touched: HashSet<String> = HashSet::new();
        let mut bytes = 0;
        // Keys planned on each lease, and on each lease to grant.
        let mut planned: HashMap<i64, usize> = HashMap::new();
        let mut granting: HashMap<Owner, (usize, usize)> = HashMap::new();
        while let Some(id) = self.order.pop_front() {
            let Some(op) = self.pending.get(&id) else {
                continue;
            };
            let placed = self.placed.get(&id).cloned();
            let mut keys = vec![self.layout.record(&id)];
            if let Op::Put {
                claim: Some(claim), ..
            } = op
            {
                keys.push(self.layout.claim(claim));
            }
            if let Some(Placed {
                claim: Some(old), ..
            }) = &placed
            {
                keys.push(self.layout.claim(old));
            }
            let size = match op {
                Op::Put { row, .. } => row.len(),
                Op::Delete => 0,
            };
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
                Op::Delete => None,
            };
            batch.items.push(Item {
                id,
                op,
                slot,
                placed,
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
        planned: &mut HashMap<i64, usize>,
        granting: &mut HashMap<Owner, (usize, usize)>,
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
    fn settle(&mut self, executed: Executed) -> Result<(), Duration> {
        let Executed {
            batch,
            granted,
            outcomes,
            error,
        } = executed;
        for (owner, lease) in batch.grants.iter().zip(&granted) {
            let keeper = tokio::spawn(leases::keep(
                self.client.clone(),
                *lease,
                keep_alive_period(self.ttl),
                self.lost_tx.clone(),
            ));
            self.leases.add(*owner, *lease, keeper.abort_handle());
        }
        if let Some(error) = error {
            self.health.metrics.failures.inc();
            self.health.writing(false);
            return Err(self.failed(batch, &error));
        }
        self.health.writing(true);
        let written = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Done))
            .count();
        self.health.metrics.written.inc_by(written as u64);
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                after_ms = since.elapsed().as_millis() as u64,
                waiting = self.pending.len(),
                "the store takes writes again"
            );
        }
        self.retry = Duration::from_millis(50);
        self.solo = self.solo.saturating_sub(batch.items.len());
        for (item, outcome) in batch.items.into_iter().zip(outcomes) {
            let lease = match item.slot {
                Some(Slot::Lease(lease)) => Some(lease),
                Some(Slot::Granted(n)) => granted.get(n).copied(),
                None => None,
            };
            match (item.op, outcome, lease) {
                (Op::Put { claim, .. }, Outcome::Done, Some(lease)) => {
                    let now = Placed { lease, claim };
                    self.leases.count(lease, now.keys() as isize);
                    if let Some(before) = self.placed.insert(item.id, now) {
                        self.leases.count(before.lease, -(before.keys() as isize));
                    }
                }
                (Op::Put { stamp, claim, .. }, Outcome::Taken(holder), _) => {
                    let claim = claim.unwrap_or_default();
                    let reason =
                        format!("port {claim} is taken: record {holder} holds it in the store");
                    tracing::warn!(id = %item.id, "{reason}");
                    self.shared.refused_by_store(&item.id, &stamp, &reason);
                }
                (Op::Delete, _, _) => {
                    if let Some(before) = self.placed.remove(&item.id) {
                        self.leases.count(before.lease, -(before.keys() as isize));
                    }
                }
                (Op::Put { .. }, Outcome::Done, None) => {}
            }
        }
        Ok(())
    }

    /// A batch failed: its writes wait again, unless a newer change of the
    /// record came meanwhile. A batch etcd refuses as such (too large) is
    /// split up, and a single record it refuses is dropped, and refused.
    fn failed(&mut self, batch: Batch, error: &etcd_client::Error) -> Duration {
        let refused_whole = matches!(
            error,
            etcd_client::Error::GRpcStatus(status)
                if status.code() == tonic::Code::InvalidArgument
        );
        if refused_whole && batch.items.len() == 1 {
            for item in batch.items {
                tracing::error!(id = %item.id, "the store refuses the record: {error}");
                if let Op::Put { stamp, .. } = &item.op {
                    let reason = format!("the store refuses it: {error}");
                    self.shared.refused_by_store(&item.id, stamp, &reason);
                }
            }
            self.revokes.extend(batch.revokes);
            return Duration::ZERO;
        }
        if refused_whole {
            self.solo = batch.items.len();
        } else if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
            tracing::warn!(
                waiting = self.pending.len() + batch.items.len(),
                "cannot write to the store ({error}); writes wait, and this hub serves what it holds"
            );
        }
        for item in batch.items.into_iter().rev() {
            if !self.pending.contains_key(&item.id) {
                self.pending.insert(item.id.clone(), item.op);
                self.order.push_front(item.id);
            }
        }
        self.revokes.extend(batch.revokes);
        let wait = self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        wait
    }
}

/// How often a lease of `ttl` seconds is renewed: three times per TTL.
fn keep_alive_period(ttl: i64) -> Duration {
    Duration::from_millis(u64::try_from(ttl).unwrap_or(2) * 1000 / 3)
}

/// `HOST:PORT` of a record that has both.
fn claim_of(meta: &crate::protocol::wire::Meta) -> Option<String> {
    let host = meta.get("host").and_then(Value::as_str)?;
    let port = meta.get("port").and_then(Value::as_u64)?;
    Some(format!("{host}:{port}"))
}

fn trim_newline(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// Grants the batch's leases, writes its records in one transaction, then
/// revokes the leases of connections that left.
async fn execute(mut client: Client, layout: Layout, ttl: i64, batch: Batch) -> Executed {
    let mut granted = Vec::with_capacity(batch.grants.len());
    for _ in &batch.grants {
        match client.lease_grant(ttl, None).await {
            Ok(lease) => granted.push(lease.id()),
            Err(error) => {
                return Executed {
                    batch,
                    granted,
                    outcomes: Vec::new(),
                    error: Some(error),
                };
            }
        }
    }
    let mut outcomes = Vec::new();
    if !batch.items.is_empty() {
        let ops: Vec<TxnOp> = batch
            .items
            .iter()
            .map(|item| TxnOp::txn(record_txn(&layout, item, &granted)))
            .collect();
        match client.txn(Txn::new().and_then(ops)).await {
            Ok(response) => {
                outcomes = response
                    .op_responses()
                    .iter()
                    .zip(&batch.items)
                    .map(|(response, item)| outcome(response, item))
                    .collect();
            }
            Err(error) => {
                return Executed {
                    batch,
                    granted,
                    outcomes,
                    error: Some(error),
                };
            }
        }
    }
    for lease in &batch.revokes {
        // A lease etcd no longer has is as good as revoked.
        if let Err(e) = client.lease_revoke(*lease).await {
            tracing::debug!(lease, "cannot revoke a lease: {e}");
        }
    }
    Executed {
        batch,
        granted,
        outcomes,
        error: None,
    }
}

/// One record's transaction within a batch.
fn record_txn(layout: &Layout, item: &Item, granted: &[i64]) -> Txn {
    let key = layout.record(&item.id);
    let old_claim = item.placed.as_ref().and_then(|p| p.claim.as_ref());
    match &item.op {
        Op::Put { row, claim, .. } => {
            let lease = match item.slot {
                Some(Slot::Lease(lease)) => lease,
                Some(Slot::Granted(n)) => granted.get(n).copied().unwrap_or_default(),
                None => 0,
            };
            let on_lease = || Some(PutOptions::new().with_lease(lease));
            let mut writes = vec![TxnOp::put(key.clone(), row.to_vec(), on_lease())];
            if let Some(old) = old_claim.filter(|old| Some(*old) != claim.as_ref()) {
                writes.push(TxnOp::delete(layout.claim(old), None));
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
        Op::Delete => {
            let mut deletes = vec![TxnOp::delete(key.clone(), None)];
            match &item.placed {
                Some(placed) => {
                    if let Some(claim) = &placed.claim {
                        deletes.push(TxnOp::delete(layout.claim(claim), None));
                    }
                    // Only while it is on our lease: a client that moved to
                    // another hub took it along.
                    Txn::new()
                        .when([Compare::lease(key, CompareOp::Equal, placed.lease)])
                        .and_then(deletes)
                }
                // Another hub's record (an operator's free), or one whose
                // put we never saw through.
                None => Txn::new().and_then(deletes),
            }
        }
    }
}

/// What became of one record's transaction.
fn outcome(response: &TxnOpResponse, item: &Item) -> Outcome {
    let TxnOpResponse::Txn(txn) = response else {
        return Outcome::Done;
    };
    let Op::Put { claim: Some(_), .. } = &item.op else {
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
