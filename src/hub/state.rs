//! The hub's shared state: the registry and the set of live connections.
//!
//! Every decision is taken here under one lock, which is never held across an
//! `.await`: a row comes in, the registry decides, and the resulting lines go out
//! through each connection's bounded queue. A std `Mutex` fits because each critical
//! section is short and synchronous; an actor task would add a hop per row for no
//! gain. Lines are encoded once and shared (`Bytes`), never re-encoded per connection.

use crate::keys::Authorized;
use crate::pattern::Pattern;
use crate::record::Record;
use crate::registry::{Owner, Registered, Registry};
use crate::wire::{self, Meta, Row};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a connection's writer sends.
#[derive(Debug)]
pub(crate) enum Out {
    /// One encoded line.
    Line(Bytes),
    /// Many lines at once (the initial dump), counted as one queue slot.
    Lines(Vec<Bytes>),
}

/// A live connection as the shared state sees it.
#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Out>,
    cancel: CancellationToken,
    addr: String,
}

#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    conns: HashMap<Owner, Conn>,
    /// Connections that are links to other hubs: our outgoing peer links, and
    /// incoming connections that announced a hub (a `seaport` record).
    peers: HashSet<Owner>,
}

/// The state every connection task shares.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// The last connection number given out.
    last_id: AtomicU64,
    /// Keys allowed to write; swapped whole on reload, read per write.
    authorized: RwLock<Arc<Authorized>>,
    /// Set when the hub stops: its connections then close without telling the
    /// others that their records are freed (they are not: they live on
    /// elsewhere, and the clients need the `seaport` records to move).
    stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Shared state with an initial authorized list.
    pub(crate) fn new(authorized: Authorized) -> Self {
        Shared {
            inner: Mutex::default(),
            last_id: AtomicU64::new(0),
            authorized: RwLock::new(Arc::new(authorized)),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A new connection number.
    pub(crate) fn next_id(&self) -> Owner {
        Owner(self.last_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Ids of the records a connection owns.
    pub(crate) fn owned_by(&self, id: Owner) -> Vec<String> {
        let inner = self.lock();
        inner
            .registry
            .owned_by(id)
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// The authorized list in force.
    pub(crate) fn authorized(&self) -> Arc<Authorized> {
        self.authorized
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the authorized list; connections stay open.
    pub(crate) fn set_authorized(&self, authorized: Authorized) {
        *self.authorized.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(authorized);
    }

    /// Queues a line for one connection.
    pub(crate) fn send_to(&self, id: Owner, line: Bytes) {
        let inner = self.lock();
        if let Some(conn) = inner.conns.get(&id) {
            inner.push(conn, line);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in this module; the data
        // is still consistent row by row, so keep serving rather than cascade.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection: queues `helo`, every record and `synced`, then makes it a
    /// receiver of forwarded rows. Done under the lock so that no forwarded row can
    /// overtake the dump.
    pub(crate) fn join(
        &self,
        id: Owner,
        addr: &str,
        challenge: &str,
        tx: mpsc::Sender<Out>,
        cancel: CancellationToken,
    ) {
        let mut inner = self.lock();
        let mut dump = vec![
            Row::Helo(addr.to_string()).encode(),
            Row::Challenge(challenge.to_string()).encode(),
        ];
        dump.extend(inner.registry.rows());
        dump.push(Row::Synced.encode());
        // The queue is new and empty, so this send cannot fail for lack of room.
        let _ = tx.try_send(Out::Lines(dump));
        inner.conns.insert(
            id,
            Conn {
                tx,
                cancel,
                addr: addr.to_string(),
            },
        );
    }

    /// Adds our outgoing link to another hub: it gets every record and then the
    /// forwarded rows, like any connection, but no `helo` or `challenge` (we are
    /// the client on that link).
    pub(crate) fn join_peer(
        &self,
        id: Owner,
        name: &str,
        tx: mpsc::Sender<Out>,
        cancel: CancellationToken,
    ) {
        let mut inner = self.lock();
        let dump = inner.registry.rows();
        let _ = tx.try_send(Out::Lines(dump));
        inner.peers.insert(id);
        inner.conns.insert(
            id,
            Conn {
                tx,
                cancel,
                addr: name.to_string(),
            },
        );
    }

    /// Removes a connection and frees every record that came over it, telling the
    /// others.
    pub(crate) fn leave(&self, id: Owner) -> usize {
        let mut inner = self.lock();
        inner.conns.remove(&id);
        inner.peers.remove(&id);
        let freed = inner.registry.free_owner(id);
        if !self.stopping.load(Ordering::SeqCst) {
            for record in &freed {
                inner.broadcast(None, wire::encode_free(record.id()));
            }
        }
        freed.len()
    }

    /// Stores a register row from connection `from` and forwards it if it changed
    /// anything. A record without a host gets the connection's address.
    ///
    /// Between hubs, the hub a client is connected to is authoritative for that
    /// client's records: a copy arriving over a peer link never overrides a record
    /// a client registered here directly (the peer is sent ours instead), and a
    /// client registering here a record held through a peer link takes it over.
    pub(crate) fn register(&self, from: Owner, id: &str, mut meta: Meta) -> Registered {
        let mut inner = self.lock();
        if !meta.get("host").is_some_and(Value::is_string)
            && let Some(conn) = inner.conns.get(&from)
        {
            meta.insert("host".into(), Value::String(conn.addr.clone()));
        }
        if meta.get("role").and_then(Value::as_str) == Some("seaport") {
            inner.peers.insert(from);
        }
        let from_peer = inner.peers.contains(&from);
        let owner = inner.registry.owner(id);
        if let Some(owner) = owner
            && from_peer
            && owner != from
            && !inner.peers.contains(&owner)
        {
            inner.correct(from, id);
            return Registered::Unchanged;
        }
        let outcome = inner.registry.register(id, meta, from);
        match &outcome {
            Registered::Unchanged => {
                if let Some(owner) = owner
                    && !from_peer
                    && inner.peers.contains(&owner)
                {
                    inner.registry.set_owner(id, from);
                }
            }
            _ => {
                if let Some(row) = inner.registry.row(id) {
                    inner.broadcast(Some(from), row);
                }
            }
        }
        outcome
    }

    /// Frees a record on request and tells every other connection. A peer link
    /// cannot free a record a client registered here directly: the peer is sent
    /// the record instead.
    pub(crate) fn free(&self, from: Owner, id: &str) -> Option<Record> {
        let mut inner = self.lock();
        let owner = inner.registry.owner(id)?;
        if owner != from && inner.peers.contains(&from) && !inner.peers.contains(&owner) {
            inner.correct(from, id);
            return None;
        }
        let record = inner.registry.free(id)?;
        inner.broadcast(Some(from), wire::encode_free(id));
        Some(record)
    }

    /// Records matching `pattern`.
    pub(crate) fn query(&self, pattern: &Pattern) -> Vec<Record> {
        self.lock().registry.query(pattern)
    }

    /// The hub is stopping: see `stopping`.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Number of live connections.
    pub(crate) fn connections(&self) -> usize {
        self.lock().conns.len()
    }
}

impl Inner {
    /// Queues `line` for every connection but `except`. A connection whose queue is
    /// full is not reading: it is cut off rather than buffered without end.
    fn broadcast(&self, except: Option<Owner>, line: Bytes) {
        for (id, conn) in &self.conns {
            if Some(*id) != except {
                self.push(conn, line.clone());
            }
        }
    }

    /// Sends connection `to` our version of record `id`, to correct its view.
    fn correct(&self, to: Owner, id: &str) {
        if let (Some(conn), Some(row)) = (self.conns.get(&to), self.registry.row(id)) {
            self.push(conn, row);
        }
    }

    /// Queues a line for one connection, cutting it off when its queue is full.
    fn push(&self, conn: &Conn, line: Bytes) {
        if let Err(mpsc::error::TrySendError::Full(_)) = conn.tx.try_send(Out::Line(line))
            && !conn.cancel.is_cancelled()
        {
            tracing::warn!(
                peer = %conn.addr,
                "closing connection: outgoing queue full ({} rows), the peer is not reading",
                conn.tx.max_capacity()
            );
            conn.cancel.cancel();
        }
    }
}
