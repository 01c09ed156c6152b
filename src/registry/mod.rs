//! The registry: every known record, indexed for the questions hubs and clients ask.
//!
//! Pure state, no I/O. Each record remembers the connection it arrived over (its
//! owner) so that a closed connection frees exactly its records. A record is kept
//! as its encoded register row, which a hub forwards and dumps as it is, plus the
//! few fields the indexes and queries need (role, version, host, port); the
//! metadata is decoded from the row only when a record is asked for. That keeps a
//! record to a few hundred bytes. Indexes by role, by owner and by host/port make
//! queries, disconnects and port allocation independent of the registry's size.
//!
//! The submodules are what a record is made of and how it is found: [`record`]
//! (one record), [`pattern`] (`name@range` queries), [`npm_semver`] (npm's version
//! and range rules) and [`ports`] (choosing a port that is really free).

pub mod npm_semver;
pub(crate) mod numbered;
pub mod pattern;
pub mod ports;
pub mod record;
mod slab;

use crate::protocol::metadata::{Metadata, meta_of_row};
use crate::protocol::owner::Holder;
use crate::protocol::stamp::Stamp;
use crate::protocol::wire::{self, Ext, Meta};
use crate::registry::npm_semver::Version;
use crate::registry::pattern::Pattern;
use crate::registry::record::Record;
use bytes::Bytes;
use numbered::Numbered;
use slab::Slab;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

/// Hash maps keyed by ids and names that come from the network: foldhash is
/// several times faster than the standard SipHash on short strings, and its
/// per-process random seed keeps keys from being chosen to collide.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A hash table that gives back the memory a burst left it, once it is
/// mostly empty: one rule for every table of the registry and the hub.
pub(crate) trait ShrinkSparse {
    /// Shrinks the table when it holds under a quarter of its room (and its
    /// room is more than a few entries).
    fn shrink_sparse(&mut self);
}

fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 64 && len < capacity / 4
}

impl<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher> ShrinkSparse for HashMap<K, V, S> {
    fn shrink_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to_fit();
        }
    }
}

impl<T> ShrinkSparse for Vec<T> {
    fn shrink_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to_fit();
        }
    }
}

impl<K: std::hash::Hash + Eq, S: std::hash::BuildHasher> ShrinkSparse for HashSet<K, S> {
    fn shrink_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to_fit();
        }
    }
}

/// How many records a part of a listing ([`Registry::stored_between`]) may
/// look at for each one it may take.
pub const VISITS_PER_RECORD: usize = 8;

/// Who a record came from: a hub's connection number, or a client's own records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u64);

/// What a register did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new record; forward it.
    Added,
    /// A known id with different metadata; forward it.
    Updated,
    /// A known id with equal metadata: nothing changed, do not forward (this is what
    /// stops rows circling between hubs that peer both ways).
    Unchanged,
    /// Not stored: the record takes this many bytes, more than the registry's
    /// limit (see [`Registry::limit_records`]).
    TooLarge(usize),
}

#[derive(Debug)]
struct Entry {
    /// The record's id, shared with the id table and the hub's indexes.
    id: Arc<str>,
    /// `["register", id, meta, {"owner": …}]\n`, the row as clients get it,
    /// encoded once. The record's own row, without the owner, is its first
    /// `body` bytes followed by `]\n`.
    client: Bytes,
    /// Length of the record's own row without its closing `]\n`.
    body: usize,
    /// Shared with the role index.
    role: Option<Arc<str>>,
    /// Its place in its role's members and in its owner's.
    in_role: usize,
    in_owner: usize,
    /// Shared with the port index.
    host: Option<Arc<str>>,
    port: Option<u16>,
    /// Shared with every record of the same version text.
    version: Option<SharedVersion>,
    owner: Owner,
    /// Insertion order, so listings come out in the order records arrived.
    seq: u64,
    /// The version of this record between hubs, if it has one.
    stamp: Option<Stamp>,
    /// Who owns the record, where that is known.
    holder: Option<Holder>,
    /// When this version of the record was stored (an equal copy keeps it).
    stored_at: SystemTime,
    /// Where it last changed in the hub's feed, once the hub noted it.
    changed: Option<Changed>,
}

/// Where a record last changed, and since when it has existed without a
/// break, as positions in the feed of rows a hub forwards (kept by the
/// registry for a record it holds, and by the hub's changes index for one
/// that went).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Changed {
    /// Position of its latest row.
    pub(crate) at: u64,
    /// Position from which it existed (its first register after it last
    /// went).
    pub(crate) since: u64,
}

impl Entry {
    /// The record's own row without its closing `]\n`.
    fn body(&self) -> &[u8] {
        &self.client[..self.body]
    }

    /// The record's own row, without the owner.
    fn own_row(&self) -> Bytes {
        if self.client.len() == self.body + 2 {
            return self.client.clone();
        }
        let mut row = Vec::with_capacity(self.body + 2);
        row.extend_from_slice(self.body());
        row.extend_from_slice(b"]\n");
        Bytes::from(row)
    }

    /// The row as it travels between hubs: with the stamp and the owner.
    fn stamped_row(&self) -> Bytes {
        let ext = Ext {
            stamp: self.stamp.clone(),
            owner: self.holder.clone(),
            ..Ext::default()
        };
        wire::body_with_ext(self.body(), &ext).unwrap_or_else(|| self.own_row())
    }

    /// [`Entry::stamped_row`] saying that the record was at version `was`
    /// before its hub wrote it again.
    fn stamped_row_was(&self, was: &Stamp) -> Bytes {
        let ext = Ext {
            stamp: self.stamp.clone(),
            was: Some(Box::new(was.clone())),
            owner: self.holder.clone(),
            ..Ext::default()
        };
        wire::body_with_ext(self.body(), &ext).unwrap_or_else(|| self.own_row())
    }

    /// The record, decoded from its row (as it was stored: without the checks
    /// the protocol makes of rows that arrive).
    fn record(&self) -> Record {
        Record::new(&*self.id, meta_of_row(&self.client)).with_holder(self.holder.clone())
    }

    /// A copy of the record that shares its row: cheap to take.
    fn stored_row(&self) -> StoredRow {
        StoredRow {
            id: self.id.clone(),
            row: self.client.clone(),
            holder: self.holder.clone(),
            stored_at: self.stored_at,
            arrival: self.seq,
        }
    }
}

/// A record as the registry holds it, taken without decoding it: its row is
/// shared with the registry, not copied. Whoever guards the registry takes
/// these under its lock and decodes them ([`StoredRow::record`]) after.
#[derive(Debug, Clone)]
pub struct StoredRow {
    id: Arc<str>,
    /// `["register", id, meta, {"owner": …}]\n`, the row as clients get it.
    row: Bytes,
    holder: Option<Holder>,
    stored_at: SystemTime,
    /// The record's arrival number (kept when it is updated).
    arrival: u64,
}

impl StoredRow {
    /// The record's arrival number: its place in arrival order, which an
    /// update keeps (see [`Registry::stored_between`]).
    pub fn arrival(&self) -> u64 {
        self.arrival
    }

    /// The record's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The record's id, shared with the registry.
    pub(crate) fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// The record's register row as clients get it (with its owner, if
    /// known), newline included.
    pub fn row(&self) -> &Bytes {
        &self.row
    }

    /// When the hub stored this version of the record.
    pub fn stored_at(&self) -> SystemTime {
        self.stored_at
    }

    /// The record, its owner included, decoded from the row.
    pub fn record(&self) -> Record {
        Record::new(&*self.id, meta_of_row(&self.row)).with_holder(self.holder.clone())
    }
}

/// A parsed version, shared by the records whose version text is the same:
/// parsed once, and eight bytes in each record. Found in the registry's table
/// by its text.
#[derive(Debug, Clone)]
struct SharedVersion(Arc<(Box<str>, Version)>);

impl SharedVersion {
    fn version(&self) -> &Version {
        &self.0.1
    }
}

impl std::borrow::Borrow<str> for SharedVersion {
    fn borrow(&self) -> &str {
        &self.0.0
    }
}

impl std::hash::Hash for SharedVersion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.0.hash(state);
    }
}

impl PartialEq for SharedVersion {
    fn eq(&self, other: &Self) -> bool {
        self.0.0 == other.0.0
    }
}

impl Eq for SharedVersion {}

/// Where a record's entry sits in the registry's slab: what the indexes
/// hold instead of its id, so that a record's id is hashed once per change
/// and growing a table moves handles, not entries.
type Handle = usize;

/// The records of one role or of one owner, in no order. Each entry knows
/// its place in both lists, so adding one is a push and removing one a swap
/// with the last: no hashing, and no table to grow by rehashing it.
type Members = Vec<Handle>;

/// Takes the handle at `place` out of the members of `key` in `lists`,
/// dropping a list left empty; returns the handle moved into that place,
/// whose entry must be told.
fn leave<K, Q>(lists: &mut FastMap<K, Members>, key: &Q, place: usize) -> Option<Handle>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let members = lists.get_mut(key)?;
    if place >= members.len() {
        return None;
    }
    members.swap_remove(place);
    let moved = members.get(place).copied();
    if members.is_empty() {
        lists.remove(key);
    }
    moved
}

/// Adds `at` to `members`; returns its place.
fn join(members: &mut Members, at: Handle) -> usize {
    members.push(at);
    members.len() - 1
}

/// What an entry keeps of the indexes it was added to: its role and host,
/// shared with them, and its places in its role's and its owner's members.
struct Indexed {
    role: Option<Arc<str>>,
    host: Option<Arc<str>>,
    in_role: usize,
    in_owner: usize,
}

/// Slabs smaller than this are never compacted.
const MIN_COMPACT: usize = 1024;

/// All records, with indexes by role, owner and host/port.
#[derive(Debug, Default)]
pub struct Registry {
    /// The records' entries; a freed place is taken again.
    slab: Slab<Entry>,
    /// Records by id; the id is the entry's, one shared allocation.
    ids: FastMap<Arc<str>, Handle>,
    by_role: FastMap<Arc<str>, Members>,
    by_owner: FastMap<Owner, Members>,
    ports: FastMap<Arc<str>, FastMap<u16, u32>>,
    /// The versions the records have, each parsed once.
    versions: FastSet<SharedVersion>,
    /// Records in arrival order, by `seq`.
    order: Numbered<Handle>,
    next_seq: u64,
    /// The largest record stored, in bytes of its register row.
    max_record: Option<usize>,
    /// Where the records removed since the last [`Registry::drain_removed`]
    /// last changed, for the hub's changes index.
    removed: FastMap<Arc<str>, Changed>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Refuses, from now on, records whose register row is longer than
    /// `max_record` bytes.
    pub fn limit_records(&mut self, max_record: usize) {
        self.max_record = Some(max_record);
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Stores a register row that arrived from `owner`.
    ///
    /// An equal record keeps its owner: a copy relayed back by a peer must not take a
    /// record away from the connection it really belongs to.
    pub fn register(&mut self, id: &str, meta: Meta, owner: Owner) -> Registered {
        let record = Record::new(id, meta);
        let row = wire::encode_register(id, record.meta(), &Ext::default());
        if self.holds_equal(id, &row, || Cow::Borrowed(record.meta())) {
            return Registered::Unchanged;
        }
        let fields = Metadata::Decoded(record.into_meta());
        self.insert(id, &fields, &row, owner, None, None)
    }

    /// Stores a record at a given version, from connection `owner`, owned by
    /// `holder` where that is known, whatever was there. A plain row is
    /// kept as it arrived; decoded metadata is encoded, with the id set.
    ///
    /// Returns `Unchanged` when only the stamp or the connection changed: the
    /// record as clients see it, its owner included, is the same.
    pub fn store(
        &mut self,
        id: &str,
        meta: impl Into<Metadata>,
        owner: Owner,
        stamp: Option<Stamp>,
        holder: Option<Holder>,
    ) -> Registered {
        let fields = match meta.into() {
            Metadata::Decoded(meta) => Metadata::Decoded(Record::new(id, meta).into_meta()),
            plain => plain,
        };
        let encoded;
        let row = match &fields {
            Metadata::Plain(plain) => plain.row(),
            Metadata::Decoded(meta) => {
                encoded = wire::encode_register(id, meta, &Ext::default());
                &encoded
            }
        };
        if let Some(max) = self.max_record
            && row.len() > max
        {
            return Registered::TooLarge(row.len());
        }
        if self.holds_equal(id, row, || fields.to_meta()) && self.holder(id) == holder.as_ref() {
            if let Some(entry) = self.entry_mut(id) {
                entry.stamp = stamp;
            }
            self.set_owner(id, owner);
            return Registered::Unchanged;
        }
        self.insert(id, &fields, row, owner, stamp, holder)
    }

    /// Whether `id` holds a record whose own row is `row`: the same text,
    /// or, for the rare update, the same keys and values (`meta`) in another
    /// order.
    fn holds_equal<'a>(&self, id: &str, row: &[u8], meta: impl FnOnce() -> Cow<'a, Meta>) -> bool {
        match self.entry(id) {
            Some(entry) if entry.body() == row.strip_suffix(b"]\n").unwrap_or(row) => true,
            Some(entry) => entry.record().meta() == &*meta(),
            None => false,
        }
    }

    /// Whether `id` holds a record equal to `meta`.
    pub fn holds(&self, id: &str, meta: &Meta) -> bool {
        let record = Record::new(id, meta.clone());
        let row = wire::encode_register(id, record.meta(), &Ext::default());
        self.holds_equal(id, &row, || Cow::Borrowed(record.meta()))
    }

    /// Whether `id` holds a record equal to `meta`, read in place or decoded.
    pub fn holds_metadata(&self, id: &str, meta: &Metadata) -> bool {
        match meta {
            Metadata::Decoded(meta) => self.holds(id, meta),
            Metadata::Plain(plain) => self.holds_equal(id, plain.row(), || meta.to_meta()),
        }
    }

    /// Adds record `id`, whose own row is `row` and whose indexed keys
    /// `fields` holds. The row is copied only when the owner is appended
    /// to it, as it is for almost every record.
    fn insert(
        &mut self,
        id: &str,
        fields: &Metadata,
        row: &Bytes,
        owner: Owner,
        stamp: Option<Stamp>,
        holder: Option<Holder>,
    ) -> Registered {
        let old = self.remove(id).map(|old| (old.seq, old.changed));
        let id: Arc<str> = Arc::from(id);
        let at = self.slab.reserve();
        let version = fields.version().and_then(|v| self.shared_version(v));
        let Indexed {
            role,
            host,
            in_role,
            in_owner,
        } = self.index(fields, at, owner);
        let (seq, changed, outcome) = match old {
            Some((seq, changed)) => (seq, changed, Registered::Updated),
            None => {
                self.next_seq += 1;
                (self.next_seq, None, Registered::Added)
            }
        };
        self.order.insert(seq, at);
        self.ids.insert(id.clone(), at);
        let entry = Entry {
            id,
            body: row.len().saturating_sub(2),
            client: match &holder {
                Some(holder) => wire::with_ext(
                    row,
                    &Ext {
                        owner: Some(holder.clone()),
                        ..Ext::default()
                    },
                ),
                None => row.clone(),
            },
            role,
            in_role,
            in_owner,
            host,
            port: fields.port(),
            version,
            owner,
            seq,
            stamp,
            holder,
            stored_at: SystemTime::now(),
            changed,
        };
        self.slab.fill(at, entry);
        outcome
    }

    /// The entry of record `id`.
    fn entry(&self, id: &str) -> Option<&Entry> {
        self.at(*self.ids.get(id)?)
    }

    fn entry_mut(&mut self, id: &str) -> Option<&mut Entry> {
        let at = *self.ids.get(id)?;
        self.slab.get_mut(at)
    }

    /// The entry at `at`.
    fn at(&self, at: Handle) -> Option<&Entry> {
        self.slab.get(at)
    }

    /// Every entry, in no order.
    fn all(&self) -> impl Iterator<Item = &Entry> {
        self.slab.iter()
    }

    /// Removes a record; returns it if it was known.
    pub fn free(&mut self, id: &str) -> Option<Record> {
        let record = self.get(id)?;
        let entry = self.remove(id)?;
        self.retire(entry);
        Some(record)
    }

    /// Removes a record without decoding it; returns whether it was known.
    pub fn discard(&mut self, id: &str) -> bool {
        self.remove(id).map(|entry| self.retire(entry)).is_some()
    }

    /// Keeps where a removed record last changed, until the hub's changes
    /// index takes it.
    fn retire(&mut self, entry: Entry) {
        if let Some(changed) = entry.changed {
            self.removed.insert(entry.id, changed);
        }
    }

    /// Where held record `id` last changed (`None` inside: not noted yet),
    /// to read and set; with its id, shared.
    pub(crate) fn changed_mut(&mut self, id: &str) -> Option<(&Arc<str>, &mut Option<Changed>)> {
        let entry = self.entry_mut(id)?;
        Some((&entry.id, &mut entry.changed))
    }

    /// Where record `id`, removed since the last [`Registry::drain_removed`],
    /// last changed while it was held.
    pub(crate) fn take_removed(&mut self, id: &str) -> Option<Changed> {
        if self.removed.is_empty() {
            return None;
        }
        self.removed.remove(id)
    }

    /// Where the records removed since the last call, and not taken by
    /// [`Registry::take_removed`], last changed.
    pub(crate) fn drain_removed(&mut self) -> Vec<(Arc<str>, Changed)> {
        if self.removed.is_empty() {
            return Vec::new();
        }
        self.removed.drain().collect()
    }

    /// Removes every record owned by `owner` (its connection ended), in arrival order.
    pub fn free_owner(&mut self, owner: Owner) -> Vec<Record> {
        let ids: Vec<String> = self.owned_by(owner).into_iter().map(String::from).collect();
        ids.iter().filter_map(|id| self.free(id)).collect()
    }

    /// One record by id.
    pub fn get(&self, id: &str) -> Option<Record> {
        self.entry(id).map(Entry::record)
    }

    /// The host of a record, without decoding it.
    pub fn host(&self, id: &str) -> Option<&str> {
        self.entry(id).and_then(|e| e.host.as_deref())
    }

    /// The stamp of a record.
    pub fn stamp(&self, id: &str) -> Option<&Stamp> {
        self.entry(id).and_then(|e| e.stamp.as_ref())
    }

    /// Who owns a record, where that is known.
    pub fn holder(&self, id: &str) -> Option<&Holder> {
        self.entry(id).and_then(|e| e.holder.as_ref())
    }

    /// Whether a record's stamp has the given origin.
    pub fn has_origin(&self, origin: &str) -> bool {
        self.all()
            .any(|e| e.stamp.as_ref().is_some_and(|s| &*s.origin == origin))
    }

    /// Ids of the records whose stamp has the given origin, in arrival order.
    pub fn from_origin(&self, origin: &str) -> Vec<String> {
        let mut ids: Vec<(&str, u64)> = self
            .all()
            .filter(|e| e.stamp.as_ref().is_some_and(|s| &*s.origin == origin))
            .map(|e| (&*e.id, e.seq))
            .collect();
        ids.sort_by_key(|(_, seq)| *seq);
        ids.into_iter().map(|(id, _)| id.to_string()).collect()
    }

    /// The owner of a record.
    pub fn owner(&self, id: &str) -> Option<Owner> {
        self.entry(id).map(|e| e.owner)
    }

    /// Ids owned by `owner`, in arrival order.
    pub fn owned_by(&self, owner: Owner) -> Vec<&str> {
        let mut ids: Vec<(&str, u64)> = self
            .by_owner
            .get(&owner)
            .into_iter()
            .flatten()
            .filter_map(|&at| self.at(at).map(|e| (&*e.id, e.seq)))
            .collect();
        ids.sort_by_key(|(_, seq)| *seq);
        ids.into_iter().map(|(id, _)| id).collect()
    }

    /// Removes the records owned by `owner` whose stamp has the given
    /// origin (a connection's records of this hub, when it ends); returns
    /// their ids and stamps, in arrival order. Each record is looked up once
    /// for its origin and once to remove it, where freeing them one by one
    /// by id takes several look-ups, and the owner's set goes whole.
    pub fn take_owned(&mut self, owner: Owner, origin: &str) -> Vec<(Arc<str>, Stamp)> {
        let Some(handles) = self.by_owner.remove(&owner) else {
            return Vec::new();
        };
        let mut kept = Members::new();
        let mut taken = Vec::with_capacity(handles.len());
        for at in handles {
            let ours = self.at(at).and_then(|entry| {
                entry
                    .stamp
                    .as_ref()
                    .filter(|stamp| &*stamp.origin == origin)
                    .map(|stamp| (entry.seq, stamp.clone()))
            });
            match ours {
                Some((seq, stamp)) => taken.push((seq, at, stamp)),
                None => {
                    let place = join(&mut kept, at);
                    if let Some(entry) = self.slab.get_mut(at) {
                        entry.in_owner = place;
                    }
                }
            }
        }
        if !kept.is_empty() {
            self.by_owner.insert(owner, kept);
        }
        taken.sort_unstable_by_key(|(seq, ..)| *seq);
        taken
            .into_iter()
            .filter_map(|(_, at, stamp)| {
                let entry = self.slab.remove(at)?;
                self.ids.remove(&entry.id);
                self.unindex(&entry);
                let id = entry.id.clone();
                self.retire(entry);
                Some((id, stamp))
            })
            .collect()
    }

    /// Gives a record to another owner; returns whether it exists.
    pub fn set_owner(&mut self, id: &str, owner: Owner) -> bool {
        let Some(&at) = self.ids.get(id) else {
            return false;
        };
        let Some(entry) = self.slab.get_mut(at) else {
            return false;
        };
        let old = std::mem::replace(&mut entry.owner, owner);
        if old != owner {
            let place = entry.in_owner;
            entry.in_owner = join(self.by_owner.entry(owner).or_default(), at);
            self.leave_owner(old, place);
        }
        true
    }

    /// Records matching `pattern`, in arrival order. Uses the role index when the
    /// pattern names a role.
    pub fn query(&self, pattern: &Pattern) -> Vec<Record> {
        let mut hits: Vec<&Entry> = match pattern.role() {
            Some(role) => self
                .by_role
                .get(role)
                .into_iter()
                .flatten()
                .filter_map(|&at| self.at(at))
                .collect(),
            None => self.all().collect(),
        };
        hits.retain(|e| {
            pattern.matches_fields(
                e.role.as_deref(),
                e.version.as_ref().map(SharedVersion::version),
            )
        });
        hits.sort_by_key(|e| e.seq);
        hits.into_iter()
            .map(Entry::record)
            .filter(|record| pattern.matches_meta(record))
            .collect()
    }

    /// When record `id` was stored, in the version held now.
    pub fn stored_at(&self, id: &str) -> Option<SystemTime> {
        self.entry(id).map(|e| e.stored_at)
    }

    /// Every role name and how many records it has (records without a role
    /// are not counted).
    pub fn roles(&self) -> impl Iterator<Item = (&str, usize)> {
        self.by_role.iter().map(|(role, ids)| (&**role, ids.len()))
    }

    /// Record `id` as it is held, taken without decoding it.
    pub fn stored_row(&self, id: &str) -> Option<StoredRow> {
        self.entry(id).map(Entry::stored_row)
    }

    /// The encoded register row of one record, as clients get it: with the
    /// owner, if known.
    pub fn row(&self, id: &str) -> Option<Bytes> {
        self.entry(id).map(|entry| entry.client.clone())
    }

    /// Appends the encoded register row of record `id`, as clients get it, to
    /// `out`; false when there is no such record.
    pub fn copy_row(&self, id: &str, out: &mut Vec<u8>) -> bool {
        self.entry(id)
            .map(|entry| out.extend_from_slice(&entry.client))
            .is_some()
    }

    /// The register row of one record with its stamp, as it travels between hubs.
    pub fn stamped_row(&self, id: &str) -> Option<Bytes> {
        self.entry(id).map(Entry::stamped_row)
    }

    /// [`Registry::stamped_row`] saying that the record was at version `was`
    /// before its hub wrote it again (see `Ext::was`).
    pub fn stamped_row_was(&self, id: &str, was: &Stamp) -> Option<Bytes> {
        self.entry(id).map(|entry| entry.stamped_row_was(was))
    }

    /// Every register row with its stamp, in arrival order: a dump for a peer hub.
    pub fn stamped_rows(&self) -> Vec<Bytes> {
        self.in_order().map(Entry::stamped_row).collect()
    }

    /// Like [`Registry::stamped_rows`], without the records `owner` holds.
    pub fn stamped_rows_except(&self, owner: Owner) -> Vec<Bytes> {
        self.in_order()
            .filter(|e| e.owner != owner)
            .map(Entry::stamped_row)
            .collect()
    }

    /// Whether record `id` is held and arrived before mark `mark` (see
    /// [`Registry::arrival_mark`]). A record updated since keeps its arrival.
    pub fn arrived_before(&self, id: &str, mark: u64) -> bool {
        self.entry(id).is_some_and(|entry| entry.seq < mark)
    }

    /// Where the records that arrive from now on start in arrival order: the
    /// end of a dump taken in parts (see [`Registry::rows_between`]); every
    /// record held now arrived before it.
    pub fn arrival_mark(&self) -> u64 {
        self.next_seq + 1
    }

    /// Part of a dump taken in parts: the rows (`stamped` or as clients get
    /// them) of the records that arrived after the one at `after` and before
    /// mark `until`, in arrival order, up to about `max_bytes`; and the arrival
    /// number of the last one, to go on from (`None`: the dump is complete).
    /// Records that arrive meanwhile are left out; ones that change are dumped as
    /// they are when their turn comes.
    pub fn rows_between(
        &self,
        after: u64,
        until: u64,
        stamped: bool,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Option<u64> {
        let end = out.len() + max_bytes;
        for (seq, &at) in self.order.range(after.saturating_add(1)..until) {
            let Some(entry) = self.at(at) else {
                continue;
            };
            if stamped {
                out.extend_from_slice(&entry.stamped_row());
            } else {
                out.extend_from_slice(&entry.client);
            }
            if out.len() >= end {
                return Some(seq);
            }
        }
        None
    }

    /// Part of a listing taken in parts, as [`Registry::rows_between`]: the
    /// records matching `pattern`'s role and range (not its `key=value`
    /// conditions, which need the record decoded) that arrived after the one
    /// at `after` and before mark `until`, in arrival order, appended to
    /// `out` undecoded, until about `max_bytes` of rows or `max_records`
    /// records are taken; and the arrival number to go on after (`None`: the
    /// listing is complete).
    ///
    /// A part costs about `max_records` records' work whatever matches: a
    /// role with no more records than that is taken at once through the
    /// role index; otherwise at most [`VISITS_PER_RECORD`] times
    /// `max_records` records are looked at, and a part may come back empty
    /// before the listing is complete.
    pub fn stored_between(
        &self,
        pattern: &Pattern,
        after: u64,
        until: u64,
        max_bytes: usize,
        max_records: usize,
        out: &mut Vec<StoredRow>,
    ) -> Option<u64> {
        let wanted = |e: &Entry| {
            pattern.matches_fields(
                e.role.as_deref(),
                e.version.as_ref().map(SharedVersion::version),
            )
        };
        if let Some(role) = pattern.role() {
            let handles = self.by_role.get(role);
            if handles.map_or(0, Vec::len) <= max_records {
                let mut hits: Vec<&Entry> = handles
                    .into_iter()
                    .flatten()
                    .filter_map(|&at| self.at(at))
                    .filter(|e| e.seq > after && e.seq < until && wanted(e))
                    .collect();
                hits.sort_by_key(|e| e.seq);
                out.extend(hits.into_iter().map(Entry::stored_row));
                return None;
            }
        }
        let max_visits = max_records.saturating_mul(VISITS_PER_RECORD);
        let (mut bytes, mut taken, mut visited) = (0, 0, 0);
        for (seq, &at) in self.order.range(after.saturating_add(1)..until) {
            if bytes >= max_bytes || taken >= max_records || visited >= max_visits {
                return Some(seq - 1);
            }
            visited += 1;
            if let Some(entry) = self.at(at)
                && wanted(entry)
            {
                bytes += entry.client.len();
                taken += 1;
                out.push(entry.stored_row());
            }
        }
        None
    }

    /// Entries in arrival order.
    fn in_order(&self) -> impl Iterator<Item = &Entry> {
        self.order.values().filter_map(|&at| self.at(at))
    }

    /// Gives back the memory of tables left mostly empty (after a burst of
    /// records that are gone).
    pub fn shrink(&mut self) {
        if self.slab.places() >= MIN_COMPACT && sparse(self.ids.len(), self.slab.places()) {
            self.compact();
        }
        self.ids.shrink_sparse();
        self.order.shrink();
        self.removed.shrink_sparse();
        self.by_role.shrink_sparse();
        self.by_owner.shrink_sparse();
        self.ports.shrink_sparse();
        self.versions.shrink_sparse();
        for handles in self.by_role.values_mut() {
            handles.shrink_sparse();
        }
        for handles in self.by_owner.values_mut() {
            handles.shrink_sparse();
        }
    }

    /// Moves every entry to the front of the slab, and the handles the
    /// indexes hold with it: the memory of places freed by a burst of
    /// records that are gone comes back.
    fn compact(&mut self) {
        let moved = self.slab.compact();
        let new = |at: &Handle| moved.get(*at).copied().flatten().unwrap_or(usize::MAX);
        for at in self.ids.values_mut() {
            *at = new(at);
        }
        for at in self.order.values_mut() {
            *at = new(at);
        }
        for handles in self.by_role.values_mut().chain(self.by_owner.values_mut()) {
            *handles = handles.iter().map(new).collect();
        }
    }

    /// Whether a record on `host` already uses `port`.
    pub fn port_taken(&self, host: &str, port: u16) -> bool {
        self.ports
            .get(host)
            .is_some_and(|ports| ports.contains_key(&port))
    }

    /// The parsed `text`, shared with the records of that version; `None`
    /// when it is not a version.
    fn shared_version(&mut self, text: &str) -> Option<SharedVersion> {
        if let Some(shared) = self.versions.get(text) {
            return Some(shared.clone());
        }
        let shared = SharedVersion(Arc::new((Box::from(text), text.parse().ok()?)));
        self.versions.insert(shared.clone());
        Some(shared)
    }

    /// Adds a record to the indexes; returns what its entry keeps of them.
    fn index(&mut self, fields: &Metadata, at: Handle, owner: Owner) -> Indexed {
        let mut in_role = 0;
        let role = fields.role().map(|role| {
            let key = intern(&self.by_role, role);
            in_role = join(self.by_role.entry(key.clone()).or_default(), at);
            key
        });
        let host = fields.host().map(|host| intern(&self.ports, host));
        if let (Some(host), Some(port)) = (&host, fields.port()) {
            *self
                .ports
                .entry(host.clone())
                .or_default()
                .entry(port)
                .or_default() += 1;
        }
        let in_owner = join(self.by_owner.entry(owner).or_default(), at);
        Indexed {
            role,
            host,
            in_role,
            in_owner,
        }
    }

    /// Removes a record and its index entries; returns its entry.
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let at = self.ids.remove(id)?;
        let entry = self.slab.remove(at)?;
        self.leave_owner(entry.owner, entry.in_owner);
        self.unindex(&entry);
        Some(entry)
    }

    /// Takes the record at `place` out of `owner`'s members.
    fn leave_owner(&mut self, owner: Owner, place: usize) {
        let moved = leave(&mut self.by_owner, &owner, place);
        if let Some(entry) = moved.and_then(|at| self.slab.get_mut(at)) {
            entry.in_owner = place;
        }
    }

    /// Removes a removed record's entries in the indexes but its owner's.
    fn unindex(&mut self, entry: &Entry) {
        self.order.remove(entry.seq);
        // The table's copy and this record's: the last record of its version.
        if let Some(version) = &entry.version
            && Arc::strong_count(&version.0) == 2
        {
            self.versions.remove::<str>(&version.0.0);
        }
        if let Some(role) = &entry.role
            && let Some(moved) = leave(&mut self.by_role, &**role, entry.in_role)
                .and_then(|at| self.slab.get_mut(at))
        {
            moved.in_role = entry.in_role;
        }
        if let (Some(host), Some(port)) = (&entry.host, entry.port)
            && let Some(ports) = self.ports.get_mut(&**host)
        {
            if let Some(count) = ports.get_mut(&port) {
                *count -= 1;
                if *count == 0 {
                    ports.remove(&port);
                }
            }
            if ports.is_empty() {
                self.ports.remove(&**host);
            }
        }
    }
}

/// The map's own copy of `key` if it has one, so that equal names share one
/// allocation; otherwise a new one.
fn intern<V>(map: &FastMap<Arc<str>, V>, key: &str) -> Arc<str> {
    map.get_key_value(key)
        .map_or_else(|| Arc::from(key), |(k, _)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::meta_of;
    use serde_json::json;

    /// The ids of the records `pattern` matches, in the order a query gives them.
    fn query_ids(reg: &Registry, pattern: &str) -> Vec<String> {
        let pattern = Pattern::parse(pattern).unwrap_or_default();
        reg.query(&pattern)
            .iter()
            .map(|r| r.id().to_string())
            .collect()
    }

    fn web(version: &str, port: u16) -> Meta {
        meta_of(json!({"role":"web","version":version,"host":"h1","port":port}))
    }

    const A: Owner = Owner(1);
    const B: Owner = Owner(2);

    #[test]
    fn register_add_update_unchanged() {
        let mut reg = Registry::new();
        assert_eq!(reg.register("x", web("1.0.0", 10), A), Registered::Added);
        assert_eq!(
            reg.register("x", web("1.0.0", 10), B),
            Registered::Unchanged
        );
        assert_eq!(
            reg.owner("x"),
            Some(A),
            "an equal copy does not take ownership"
        );
        assert_eq!(reg.register("x", web("1.0.1", 10), A), Registered::Updated);
        assert_eq!(reg.len(), 1);
        assert_eq!(
            reg.get("x").as_ref().and_then(Record::version),
            Some("1.0.1")
        );
    }

    #[test]
    fn ownership_can_move() {
        let mut reg = Registry::new();
        reg.register("a", web("1.0.0", 10), A);
        reg.register("b", web("1.0.0", 11), A);
        assert!(reg.set_owner("a", B));
        assert!(!reg.set_owner("nope", B));
        assert_eq!(reg.owned_by(A), ["b"]);
        assert_eq!(reg.owned_by(B), ["a"]);
        assert_eq!(reg.free_owner(B).len(), 1);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn free_owner_frees_exactly_that_connections_records() {
        let mut reg = Registry::new();
        reg.register("a", web("1.0.0", 10), A);
        reg.register("b", web("1.0.0", 11), B);
        reg.register("c", web("1.0.0", 12), A);
        let freed: Vec<String> = reg
            .free_owner(A)
            .iter()
            .map(|r| r.id().to_string())
            .collect();
        assert_eq!(freed, ["a", "c"]);
        assert_eq!(reg.len(), 1);
        assert!(reg.free_owner(A).is_empty());
    }

    #[test]
    fn take_owned_removes_one_origins_records_of_an_owner_in_arrival_order() {
        let stamp = |v: u64, origin: &str| {
            Some(Stamp {
                v,
                origin: Arc::from(origin),
            })
        };
        let mut reg = Registry::new();
        reg.store("c", web("1.0.0", 12), A, stamp(1, "me"), None);
        reg.store("a", web("1.0.0", 10), A, stamp(2, "other"), None);
        reg.store("b", web("1.0.0", 11), A, stamp(3, "me"), None);
        reg.store("d", web("1.0.0", 13), B, stamp(4, "me"), None);
        // An update keeps its place in arrival order.
        reg.store("c", web("1.0.1", 12), A, stamp(5, "me"), None);
        let taken: Vec<(String, u64)> = reg
            .take_owned(A, "me")
            .into_iter()
            .map(|(id, stamp)| (id.to_string(), stamp.v))
            .collect();
        assert_eq!(taken, [("c".to_string(), 5), ("b".to_string(), 3)]);
        assert_eq!(reg.owned_by(A), ["a"], "another origin's record stays");
        assert_eq!(reg.owned_by(B), ["d"]);
        assert!(reg.get("b").is_none() && reg.get("c").is_none());
        assert!(!reg.port_taken("h1", 11) && !reg.port_taken("h1", 12));
        assert!(reg.port_taken("h1", 10));
        let web_ids: Vec<String> = reg
            .query(&"web".parse().expect("a pattern"))
            .iter()
            .map(|r| r.id().to_string())
            .collect();
        assert_eq!(web_ids, ["a", "d"]);
        assert!(reg.take_owned(A, "me").is_empty());
        // Ownership moved keeps the record's place.
        assert!(reg.set_owner("d", A));
        assert_eq!(reg.owned_by(A), ["a", "d"]);
        assert!(reg.owned_by(B).is_empty());
        assert_eq!(reg.take_owned(A, "me").len(), 1);
        assert_eq!(reg.owned_by(A), ["a"]);
    }

    #[test]
    fn a_slab_left_sparse_is_compacted_and_every_index_follows() {
        let mut reg = Registry::new();
        for n in 0..3000u16 {
            let owner = if n % 2 == 0 { A } else { B };
            reg.register(&format!("r{n}"), web("1.0.0", 1000 + n), owner);
        }
        // A burst that goes: all but every hundredth record.
        for n in (0..3000u16).filter(|n| n % 100 != 0) {
            reg.free(&format!("r{n}"));
        }
        reg.shrink();
        assert_eq!(
            reg.slab.places(),
            30,
            "the slab holds only the records left"
        );
        let left: Vec<String> = (0..3000).step_by(100).map(|n| format!("r{n}")).collect();
        assert_eq!(
            query_ids(&reg, "web"),
            left,
            "the role index, in arrival order"
        );
        assert_eq!(reg.owned_by(A).len(), 30);
        assert!(reg.owned_by(B).is_empty());
        assert!(reg.port_taken("h1", 1100) && !reg.port_taken("h1", 1101));
        let mut rows = Vec::new();
        assert_eq!(
            reg.rows_between(0, reg.arrival_mark(), false, usize::MAX, &mut rows),
            None
        );
        assert_eq!(rows.iter().filter(|&&b| b == b'\n').count(), 30);
        // It goes on: an update, a new record, a change of owner, and a
        // connection's end.
        assert_eq!(
            reg.register("r100", web("2.0.0", 1100), A),
            Registered::Updated
        );
        assert_eq!(reg.register("new", web("1.0.0", 9), B), Registered::Added);
        assert!(reg.set_owner("r200", B));
        assert_eq!(reg.owned_by(B), vec!["r200", "new"]);
        assert_eq!(query_ids(&reg, "web@2").as_slice(), ["r100"]);
        reg.free_owner(A);
        assert_eq!(query_ids(&reg, "web"), vec!["r200", "new"]);
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn role_and_owner_members_follow_every_kind_of_change() {
        // A model of who holds what, checked against the indexes after a
        // long mix of adds, updates that change the role, frees, changes of
        // owner and connections that end (each moves members around).
        let mut reg = Registry::new();
        let mut model: std::collections::BTreeMap<String, (String, Owner)> =
            std::collections::BTreeMap::new();
        let roles = ["web", "api", "db"];
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for step in 0..4000u64 {
            let id = format!("r{}", next(300));
            let owner = Owner(next(4));
            match next(10) {
                0..=5 => {
                    let role = roles[usize::try_from(next(3)).unwrap_or(0)];
                    let meta = meta_of(json!({"role": role, "host": "h", "port": 1 + step}));
                    reg.register(&id, meta, owner);
                    model.insert(id, (role.to_string(), owner));
                }
                6 | 7 => {
                    assert_eq!(reg.free(&id).is_some(), model.remove(&id).is_some());
                }
                8 => {
                    assert_eq!(reg.set_owner(&id, owner), model.contains_key(&id));
                    if let Some(held) = model.get_mut(&id) {
                        held.1 = owner;
                    }
                }
                _ => {
                    reg.free_owner(owner);
                    model.retain(|_, held| held.1 != owner);
                }
            }
        }
        for role in roles {
            let mut want: Vec<&String> = model
                .iter()
                .filter(|(_, h)| h.0 == role)
                .map(|(id, _)| id)
                .collect();
            let mut got = query_ids(&reg, role);
            want.sort();
            got.sort();
            assert_eq!(got.iter().collect::<Vec<_>>(), want, "role {role}");
        }
        for owner in (0..4).map(Owner) {
            let mut want: Vec<&str> = model
                .iter()
                .filter(|(_, h)| h.1 == owner)
                .map(|(id, _)| id.as_str())
                .collect();
            let mut got = reg.owned_by(owner);
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "owner {owner:?}");
        }
        assert_eq!(reg.len(), model.len());
    }

    #[test]
    fn a_version_is_parsed_once_for_its_records_and_forgotten_with_the_last() {
        let mut reg = Registry::new();
        reg.register("a", web("1.2.3", 10), A);
        reg.register("b", web("1.2.3", 11), A);
        reg.register("c", web("2.0.0", 12), A);
        reg.register("d", web("not a version", 13), A);
        assert_eq!(reg.versions.len(), 2);
        let shared = |id: &str| reg.entry(id).and_then(|e| e.version.clone());
        assert!(
            matches!((shared("a"), shared("b")), (Some(a), Some(b)) if Arc::ptr_eq(&a.0, &b.0))
        );
        assert_eq!(query_ids(&reg, "web@^1.0.0"), ["a", "b"]);
        assert_eq!(query_ids(&reg, "web@>1.5"), ["c"]);
        // An update to the same version keeps it; the last record of a
        // version takes it out of the table.
        reg.register("c", web("2.0.0", 14), A);
        assert_eq!(reg.versions.len(), 2);
        reg.free("a");
        assert_eq!(reg.versions.len(), 2);
        reg.free("b");
        reg.free("c");
        assert_eq!(reg.versions.len(), 0);
        reg.register("e", web("1.2.3", 15), A);
        assert_eq!(query_ids(&reg, "web@1.2.3"), ["e"]);
    }

    #[test]
    fn indexes_follow_updates_and_frees() {
        let mut reg = Registry::new();
        reg.register("a", web("1.0.0", 10), A);
        assert!(reg.port_taken("h1", 10));
        reg.register("a", web("1.0.0", 20), A);
        assert!(!reg.port_taken("h1", 10));
        assert!(reg.port_taken("h1", 20));
        assert!(!reg.port_taken("h2", 20));
        reg.register("a", meta_of(json!({"role":"db","host":"h1","port":20})), A);
        assert!(
            reg.query(&Pattern::parse("web").unwrap_or_default())
                .is_empty()
        );
        assert_eq!(
            reg.query(&Pattern::parse("db").unwrap_or_default()).len(),
            1
        );
        reg.free("a");
        assert!(!reg.port_taken("h1", 20));
        assert!(reg.is_empty());
        assert!(reg.query(&Pattern::all()).is_empty());
    }

    #[test]
    fn query_by_range_in_arrival_order() {
        let mut reg = Registry::new();
        reg.register("3", web("2.0.0", 3), A);
        reg.register("1", web("1.2.0", 1), A);
        reg.register("2", web("1.9.9", 2), A);
        reg.register("4", meta_of(json!({"role":"web"})), A);
        assert_eq!(query_ids(&reg, "web@1.x"), ["1", "2"]);
        assert_eq!(query_ids(&reg, "web"), ["3", "1", "2", "4"]);
        assert_eq!(query_ids(&reg, "web@>=2"), ["3"]);
        assert_eq!(query_ids(&reg, "db"), Vec::<String>::new());
    }

    #[test]
    fn equal_means_equal_keys_and_values_in_any_order() {
        let mut reg = Registry::new();
        reg.register(
            "x",
            meta_of(json!({"role":"web","port":1,"a":{"b":[1,2]}})),
            A,
        );
        assert_eq!(
            reg.register(
                "x",
                meta_of(json!({"a":{"b":[1,2]},"port":1,"role":"web"})),
                B
            ),
            Registered::Unchanged
        );
        assert_eq!(
            reg.register(
                "x",
                meta_of(json!({"role":"web","port":1,"a":{"b":[2,1]}})),
                B
            ),
            Registered::Updated
        );
        let record = reg
            .get("x")
            .unwrap_or_else(|| Record::new("?", Meta::new()));
        assert_eq!(record.get("a"), Some(&json!({"b":[2,1]})));
        assert_eq!(record.get("id"), Some(&json!("x")));
        assert_eq!(reg.host("x"), None);
    }

    #[test]
    fn rows_are_encoded_once_in_order() {
        let mut reg = Registry::new();
        reg.register("b", web("1.0.0", 2), A);
        reg.register("a", web("1.0.0", 1), A);
        let mut dump = Vec::new();
        let until = reg.arrival_mark();
        assert_eq!(
            reg.rows_between(0, until, false, usize::MAX, &mut dump),
            None
        );
        let rows: Vec<&[u8]> = dump.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].starts_with(b"[\"register\",\"b\","));
        assert_eq!(reg.row("a").as_deref(), Some(rows[1]));
    }

    #[test]
    fn an_update_keeps_the_records_arrival_number_and_a_new_record_comes_after() {
        let mut reg = Registry::new();
        reg.register("a", web("1.0.0", 1), A);
        reg.register("b", web("1.0.0", 2), A);
        let arrival = |reg: &Registry, id: &str| reg.stored_row(id).map(|r| r.arrival());
        let (a, b) = (arrival(&reg, "a"), arrival(&reg, "b"));
        assert!(a < b);
        let until = reg.arrival_mark();
        reg.register("a", web("2.0.0", 9), A);
        assert_eq!(arrival(&reg, "a"), a, "an update keeps its place");
        reg.register("c", web("1.0.0", 3), A);
        assert_eq!(
            arrival(&reg, "c"),
            Some(until),
            "a new record is at the mark"
        );
        reg.free("b");
        reg.register("b", web("1.0.0", 2), A);
        assert!(
            arrival(&reg, "b") > Some(until),
            "freed and back: a new place"
        );
    }

    #[test]
    fn stored_rows_come_in_bounded_parts_and_decode_as_the_records() {
        let mut reg = Registry::new();
        for n in 0..30u16 {
            let role = if n % 3 == 0 { "db" } else { "web" };
            let meta = meta_of(json!({"role":role,"version":format!("1.{n}.0"),"port":n}));
            reg.store(&format!("r{n}"), meta, A, None, Some(Holder::Connection));
        }
        let until = reg.arrival_mark();
        let web = Pattern::parse("web@>=1.10").unwrap_or_default();
        let (mut all, mut after, mut parts) = (Vec::new(), 0, 0);
        loop {
            let mut part = Vec::new();
            let next = reg.stored_between(&web, after, until, usize::MAX, 2, &mut part);
            assert!(part.len() <= 2);
            parts += 1;
            all.extend(part);
            match next {
                Some(at) => after = at,
                None => break,
            }
        }
        let ids: Vec<&str> = all.iter().map(StoredRow::id).collect();
        let want: Vec<String> = reg.query(&web).iter().map(|r| r.id().to_string()).collect();
        assert_eq!(ids, want);
        assert!(parts > 1);
        for stored in &all {
            assert_eq!(Some(stored.record()), reg.get(stored.id()));
            assert_eq!(stored.record().holder(), Some(&Holder::Connection));
        }
        // A small role is taken at once through its index.
        let mut part = Vec::new();
        let db = Pattern::parse("db").unwrap_or_default();
        assert_eq!(reg.stored_between(&db, 0, until, 1, 10, &mut part), None);
        assert_eq!(part.len(), 10);
        // A part stops at about its bytes.
        let mut part = Vec::new();
        let next = reg.stored_between(&Pattern::all(), 0, until, 1, 100, &mut part);
        assert_eq!((part.len(), next), (1, Some(1)));
    }
}
