//! The reading half of the store: every other hub's records, from etcd into
//! this hub.
//!
//! It lists the records under the prefix at one revision, then watches from
//! the next, and turns each put into the record's stamped register row and
//! each delete into a stamped free, applied to the state as a peer's rows
//! are (a row older than what the hub holds changes nothing). When the watch
//! breaks it resumes from the last revision seen; when etcd no longer has
//! that revision (compacted), it lists again, and what the new list lacks is
//! freed. So it does when the watch, made again, finds the store behind the
//! last revision seen, or another cluster: etcd was restored from a backup,
//! or replaced, and would not send the changes until its revisions caught
//! up. Our own records' puts are skipped (we wrote them); their deletes
//! are passed on, so that a record of ours that etcd dropped (its lease
//! expired while etcd was away) is written again if its client still holds
//! it.

use super::Health;
use super::layout::Layout;
use crate::hub::guard::Writer;
use crate::hub::state::{Effect, Shared};
use crate::protocol::stamp::Stamp;
use crate::protocol::wire::{Ext, Row};
use crate::registry::Owner;
use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records listed in one request.
const PAGE: i64 = 500;

/// Rows applied under one lock, at most.
const APPLY_BATCH: usize = 256;

/// The first wait before a broken watch is tried again; it doubles while
/// the watch cannot be made.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// The longest wait before the watch is tried again.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// What the watch knows of the store.
struct Reader {
    client: Client,
    layout: Layout,
    shared: Arc<Shared>,
    /// The store's connection in the state.
    id: Owner,
    me: Arc<str>,
    /// The version of every record in the store, ours included (hashed
    /// with foldhash, as the registry's ids: every hub reads every record).
    known: HashMap<String, Stamp, foldhash::fast::RandomState>,
    effects: Vec<Effect>,
    /// The etcd cluster the watch was last made on.
    cluster: Option<u64>,
    /// The revision read up to; once applied, the writer learns it.
    seen: i64,
    health: Arc<Health>,
}

/// Lists and watches until `stop`.
pub(super) async fn run(
    client: Client,
    layout: Layout,
    shared: Arc<Shared>,
    id: Owner,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let me = shared.me();
    let mut reader = Reader {
        client,
        layout,
        shared,
        id,
        me,
        known: HashMap::default(),
        effects: Vec::new(),
        cluster: None,
        seen: 0,
        health: health.clone(),
    };
    let mut revision: Option<i64> = None;
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    loop {
        let result = tokio::select! {
            result = reader.follow(&mut revision, &mut failing, &health, &mut retry) => result,
            () = stop.cancelled() => return,
        };
        health.watching(false);
        match result {
            Err(e) if !failing => {
                tracing::warn!(
                    "cannot watch the store ({}); this hub serves what it holds",
                    super::access::describe(&e)
                );
                failing = true;
            }
            Err(e) => tracing::debug!("cannot watch the store: {}", super::access::describe(&e)),
            // `follow` reset the delay when the watch was made.
            Ok(()) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

impl Reader {
    /// Lists the records unless `revision` says where to resume, then
    /// watches until the watch ends.
    async fn follow(
        &mut self,
        revision: &mut Option<i64>,
        failing: &mut bool,
        health: &Health,
        retry: &mut Duration,
    ) -> Result<(), etcd_client::Error> {
        let from = match *revision {
            Some(seen) => seen,
            None => {
                let listed = self.list().await?;
                *revision = Some(listed);
                listed
            }
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1)
            .with_progress_notify();
        let mut stream = self
            .client
            .watch(self.layout.records(), Some(options))
            .await?;
        tracing::debug!(from, "watching the store");
        let mut next = stream.message().await?;
        while let Some(response) = next {
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::info!(
                        revision = from,
                        "the store no longer has the changes since this hub's last; listing again"
                    );
                    *revision = None;
                } else {
                    if !std::mem::replace(failing, true) {
                        tracing::warn!(
                            "the store ended the watch: {}; this hub serves what it holds",
                            response.cancel_reason()
                        );
                    }
                    // etcd cancels a watch whose sign-in token has expired
                    // (or was never given), in its answer, where the
                    // client's own refresh does not look: sign in again.
                    if let Err(e) = self.client.refresh_token().await {
                        tracing::debug!("cannot sign in to the store again: {e}");
                    }
                }
                self.flush();
                return Ok(());
            }
            if response.created()
                && let Some(header) = response.header()
                && self.moved_back(header, from).await?
            {
                self.health.replaced();
                *revision = None;
                *retry = FIRST_RETRY;
                self.flush();
                return Ok(());
            }
            if std::mem::take(failing) {
                tracing::info!("watching the store again");
            }
            health.watching(true);
            // A watch that was made waits little when it breaks.
            *retry = FIRST_RETRY;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        self.put(kv);
                    }
                    EventType::Delete => self.delete(kv.key()),
                }
                *revision = Some(kv.mod_revision().max(revision.unwrap_or(0)));
            }
            // Only a progress notification (no events, not the answer to
            // the watch's creation, which comes before the backlog) says
            // the watch has read up to its header's revision.
            if let Some(header) = response.header()
                && !response.created()
                && response.events().is_empty()
            {
                *revision = Some(header.revision().max(revision.unwrap_or(0)));
            }
            self.seen = revision.unwrap_or(0);
            // Nothing read waits to be applied: the writer may know at once
            // (a busy watch of the hub's own writes brings no rows to apply).
            if self.effects.is_empty() {
                self.health.applied_up_to(self.seen);
            }
            if self.effects.len() >= APPLY_BATCH {
                self.flush();
            }
            // What has come already is applied with this, under one lock and
            // in one write to each connection; then the hub waits for more.
            // Asked once without waiting: a zero timeout would wait for the
            // timer's next tick, up to a millisecond on every response.
            let mut message = std::pin::pin!(stream.message());
            let ready = message
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
            let more = match ready {
                Poll::Ready(more) => more,
                Poll::Pending => {
                    self.flush();
                    message.await
                }
            };
            next = more.inspect_err(|_| self.flush())?;
        }
        self.flush();
        Ok(())
    }

    /// Whether the store the watch was made on, at `header`, is not the one
    /// this hub had read up to revision `seen`: behind it (restored from a
    /// backup, or started afresh), or another cluster. A member that is
    /// only behind its leader is asked for a read the leader confirms (the
    /// default), whose revision is then at least `seen`.
    async fn moved_back(
        &mut self,
        header: &etcd_client::ResponseHeader,
        seen: i64,
    ) -> Result<bool, etcd_client::Error> {
        // An etcd gRPC proxy answers a watch it joins to one under way with
        // no cluster id: unknown, not another.
        let cluster = header.cluster_id();
        let before = if cluster == 0 {
            self.cluster
        } else {
            self.cluster.replace(cluster)
        };
        let other = cluster != 0 && before.is_some_and(|before| before != cluster);
        let mut revision = header.revision();
        if !other && revision < seen {
            let options = GetOptions::new().with_count_only();
            let confirmed = self
                .client
                .get(self.layout.records(), Some(options))
                .await?;
            revision = confirmed.header().map_or(revision, |h| h.revision());
        }
        let behind = revision < seen;
        if other || behind {
            tracing::warn!(
                seen,
                revision,
                other_cluster = other,
                "the store is not the one this hub read (restored or replaced?); listing again"
            );
        }
        Ok(other || behind)
    }

    /// Lists every record, applies what changed since what we knew, and
    /// returns the revision of the list.
    async fn list(&mut self) -> Result<i64, etcd_client::Error> {
        // What it applies as it goes is of the list's revision, known at the
        // end: until then the writer goes by what it knew before.
        self.seen = 0;
        let prefix = self.layout.records().to_string();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.clone().into_bytes();
        let mut at: Option<i64> = None;
        let mut listed: HashMap<String, Stamp> = HashMap::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(at) = at {
                options = options.with_revision(at);
            }
            let page = self.client.get(from.clone(), Some(options)).await?;
            let revision = page.header().map_or(0, |h| h.revision());
            at.get_or_insert(revision);
            for kv in page.kvs() {
                if let Some((id, stamp)) = self.put(kv) {
                    listed.insert(id, stamp);
                }
            }
            self.flush();
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        // What we knew of that the list lacks is gone.
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !listed.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.delete(self.layout.record(&id).as_bytes());
        }
        self.flush();
        self.seen = at.unwrap_or(0);
        self.health.applied_from(self.seen);
        tracing::info!(records = listed.len(), "listed the store's records");
        Ok(at.unwrap_or(0))
    }

    /// A record's key was put: another hub's record is applied. Returns its
    /// id and version.
    fn put(&mut self, kv: &KeyValue) -> Option<(String, Stamp)> {
        let (id, row, stamp) = stored_record(&self.layout, kv)?;
        self.known.insert(id.clone(), stamp.clone());
        if stamp.origin != self.me {
            self.effects.push(Effect::Apply(row, Writer::default()));
        }
        Some((id, stamp))
    }

    /// A record's key was deleted: freed at the version it had.
    fn delete(&mut self, key: &[u8]) {
        let Some(id) = self.layout.id_of(key) else {
            return;
        };
        let Some(stamp) = self.known.remove(id) else {
            return;
        };
        self.effects.push(Effect::Apply(
            Row::Free {
                id: id.to_string(),
                ext: Ext::stamped(Some(stamp)),
            },
            Writer::default(),
        ));
        if self.effects.len() >= APPLY_BATCH {
            self.flush();
        }
    }

    /// Applies what was read, keeping room for a batch of what comes next,
    /// and tells the writer how far the state has the store.
    fn flush(&mut self) {
        while !self.effects.is_empty() {
            let part = self.effects.len().min(APPLY_BATCH);
            self.shared.apply(self.id, self.effects.drain(..part));
        }
        self.effects.shrink_to(APPLY_BATCH);
        self.health.applied_up_to(self.seen);
    }
}

/// The record under a record's key: its id, its row (read in place where
/// it can be: every hub applies every record) and its version. A row that
/// is not a stamped `register` of the record its key names is skipped, and
/// said so.
pub(super) fn stored_record(layout: &Layout, kv: &KeyValue) -> Option<(String, Row, Stamp)> {
    let id = layout.id_of(kv.key())?.to_string();
    let row = match Row::decode_keeping(kv.value()) {
        Ok(row @ (Row::Register { .. } | Row::Plain { .. })) => row,
        Ok(_) | Err(_) => {
            tracing::warn!(%id, "skipped a record in the store that is not a register row");
            return None;
        }
    };
    let (Row::Register { id: of, ext, .. } | Row::Plain { id: of, ext, .. }) = &row else {
        return None;
    };
    // Its delete would free the record of the key, not this one.
    if *of != id {
        tracing::warn!(%id, row_of = %of, "skipped a record in the store whose row is another record's");
        return None;
    }
    let Some(stamp) = ext.stamp.clone() else {
        tracing::warn!(%id, "skipped a record in the store without a version");
        return None;
    };
    Some((id, row, stamp))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_of_a_prefix_ends_just_past_it() {
        assert_eq!(
            prefix_end(b"/seaport/records/"),
            b"/seaport/records0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
