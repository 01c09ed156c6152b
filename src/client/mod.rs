//! The client library: register services with hubs, query and wait for them, watch
//! events; reconnect and fail over between hubs, re-sending its own records.
//!
//! ```no_run
//! # async fn demo() -> Result<(), seaport::client::ClientError> {
//! use seaport::client::Client;
//! use serde_json::json;
//!
//! let ports = Client::connect(["localhost:9090"])?;
//! let web = ports.register("web@1.2.3", json!({"zone": "eu-1"})).await?;
//! println!("serve on port {}", web.port().unwrap_or_default());
//!
//! let found = ports.get("web@1.2.x").await?; // waits until one is registered
//! println!("{} at {}:{:?}", found[0].name(), found[0].host().unwrap_or("?"), found[0].port());
//! # Ok(()) }
//! ```

pub mod dump;
mod session;

use crate::protocol::hub_addr::{HubAddr, HubAddrError};
use crate::protocol::keys::{Authorized, Keypair};
use crate::protocol::wire::{self, Meta};
use crate::registry::npm_semver::SemverError;
use crate::registry::pattern::Pattern;
use crate::registry::ports::{PortError, PortRange, pick_port};
use crate::registry::record::{Record, split_role};
use crate::registry::{Owner, Registry};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Owner of the client's own records in its local registry.
const OWN: Owner = Owner(0);
/// Owner of records learned from the hub.
const REMOTE: Owner = Owner(1);

/// How a client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Interval between heartbeats (default 15 s).
    pub heartbeat: Duration,
    /// Silence after which the hub counts as dead (default 3 × heartbeat). Records
    /// learned from a lost hub are dropped if no hub answers within this time.
    pub timeout: Duration,
    /// Delay between connection attempts (default 1 s).
    pub reconnect_delay: Duration,
    /// Longest accepted line in bytes.
    pub max_line: usize,
    /// Ports to choose from when a registration names none (default 10000–65535).
    pub range: PortRange,
    /// A keypair to authenticate with, for hubs that take writes only from
    /// authorized keys.
    pub keypair: Option<Arc<Keypair>>,
    /// Keys of hubs: when there are any, a hub must prove it holds one before
    /// the client takes anything it says or sends it anything, and only
    /// `seaport` records written with one are failover targets.
    pub hub_keys: Authorized,
    /// Also fail over to hubs learned from `seaport` records (default true);
    /// `false` keeps the client to the hubs it was given.
    pub discover: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let heartbeat = Duration::from_secs(15);
        ClientConfig {
            heartbeat,
            timeout: heartbeat * 3,
            reconnect_delay: Duration::from_secs(1),
            max_line: crate::protocol::framing::DEFAULT_MAX_LINE,
            range: PortRange::default(),
            keypair: None,
            hub_keys: Authorized::default(),
            discover: true,
        }
    }
}

/// What the client saw happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A record appeared or changed (including the client's own).
    Register(Record),
    /// A record went away.
    Free(Record),
    /// Connected to a hub.
    Connect(HubAddr),
    /// Lost the hub connection; reconnecting.
    Disconnect(HubAddr),
    /// The hub finished sending what it knew.
    Synced,
    /// The hub refused a write or our key; a refused own record is dropped.
    Rejected {
        /// `register`, `free`, `signed` or `auth`.
        what: String,
        /// The record concerned, if any.
        id: Option<String>,
        /// The hub's reason.
        reason: String,
    },
}

/// Errors from the client API.
#[derive(Debug, Error)]
pub enum ClientError {
    /// A hub address does not parse.
    #[error(transparent)]
    Addr(#[from] HubAddrError),
    /// No hub address was given.
    #[error("no hub address given")]
    NoHubs,
    /// A pattern or version range does not parse.
    #[error(transparent)]
    Pattern(#[from] SemverError),
    /// No port could be chosen.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The registration is invalid.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// A service to register; see [`Client::register_with`].
#[derive(Debug, Clone, Default)]
pub struct Registration {
    role: String,
    meta: Meta,
    port: Option<u16>,
    range: Option<PortRange>,
    id: Option<String>,
    host: Option<String>,
}

impl Registration {
    /// A registration of `role`, written `name` or `name@version`.
    pub fn new(role: impl Into<String>) -> Self {
        Registration {
            role: role.into(),
            ..Registration::default()
        }
    }

    /// User metadata (a JSON object; anything else is ignored).
    pub fn meta(mut self, meta: Value) -> Self {
        if let Value::Object(map) = meta {
            self.meta = map;
        }
        self
    }

    /// A fixed port instead of a chosen one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The range to choose a port from (overrides the client's).
    pub fn range(mut self, range: PortRange) -> Self {
        self.range = Some(range);
        self
    }

    /// A fixed record id instead of a random one.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// A fixed host instead of the address the hub sees.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
}

/// What the API asks the session task to send.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A write of an own record. Until our records have gone out to a new hub
    /// it is dropped: they go out as they are then.
    Own(Bytes),
    /// A write of a record that is not ours: kept until our records have gone
    /// out, then sent.
    Write(Bytes),
    /// A `ping` with this token.
    Ping(String),
}

/// Connection status, published by the session task.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Status {
    /// Our address as the current (or last) hub sees it.
    host: Option<String>,
    /// Whether the current connection has delivered its initial dump.
    synced: bool,
}

/// State shared between the API and the session task.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    changed: Notify,
    rejections: Notify,
    status: watch::Sender<Status>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The token of the last `pong` from the hub.
    pong: watch::Sender<String>,
    config: ClientConfig,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    registry: Registry,
    /// Own records whose host was filled from the hub's `helo`, to be corrected if a
    /// later hub sees us under another address.
    auto_host: HashSet<String>,
    /// Learned records not yet confirmed by the hub connected since they were learned.
    stale: HashSet<String>,
    /// Own records the hub refused, with its reason.
    rejected: HashMap<String, String>,
    /// The secret of each own record, sent with every write of it: the proof,
    /// to a hub that keeps records to their owners, that the record is ours.
    claims: HashMap<String, String>,
    /// When each own record was last put back after someone else changed or
    /// freed it, and those waiting to be put back (once a second at most).
    restored: HashMap<String, tokio::time::Instant>,
    restore_due: HashSet<String>,
    /// Ports handed out by [`Client::choose_port`] and not yet given back: a
    /// service may not have registered its port yet, and no other may get it.
    leased_ports: HashSet<u16>,
    /// Hubs given by the caller.
    hubs: Vec<HubAddr>,
}

impl State {
    /// A port in `range` that no record on `host` uses, nobody holds a lease
    /// on, and that can be bound here.
    fn free_port(&self, host: &str, range: PortRange) -> Result<u16, PortError> {
        pick_port(&self.registry, host, range, |port| {
            self.leased_ports.contains(&port)
        })
    }

    /// The register row of a record as this client sends it: with the
    /// record's claim when it is our own.
    fn own_row(&self, id: &str) -> Option<Bytes> {
        let row = self.registry.row(id)?;
        Some(match self.claims.get(id) {
            Some(claim) => wire::with_ext(
                &row,
                &wire::Ext {
                    claim: Some(claim.as_str().into()),
                    ..wire::Ext::default()
                },
            ),
            None => row,
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        // No subscribers is fine.
        let _ = self.events.send(event);
    }
}

/// A port chosen by [`Client::choose_port`], kept from every other choice of
/// the same client until dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    shared: Arc<Shared>,
}

impl PortLease {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.shared.lock().leased_ports.remove(&self.port);
    }
}

/// A connection to one or more hubs. Cheap to clone; the connection closes when the
/// last clone is dropped or [`Client::close`] is called, and the hub then frees the
/// client's records.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _stop: Arc<DropGuard>,
    stop: CancellationToken,
}

impl Client {
    /// Connects to hubs given as `host:port` or bare ports, with default settings.
    /// Returns at once; the connection is made in the background.
    pub fn connect<I, S>(hubs: I) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::connect_with(hubs, ClientConfig::default())
    }

    /// Connects with the given settings. Must be called within a tokio runtime.
    pub fn connect_with<I, S>(hubs: I, config: ClientConfig) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::connect_with_events(hubs, config).map(|(client, _)| client)
    }

    /// Connects, and returns with the client a receiver of every [`Event`] from the
    /// very start (nothing can happen between connecting and subscribing).
    pub fn connect_with_events<I, S>(
        hubs: I,
        config: ClientConfig,
    ) -> Result<(Client, broadcast::Receiver<Event>), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let hubs = hubs
            .into_iter()
            .map(|h| h.as_ref().parse::<HubAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        Client::connect_to(hubs, config)
    }

    /// Connects to hubs given as parsed addresses, returning with the client a
    /// receiver of every [`Event`] from the very start.
    pub fn connect_to(
        hubs: Vec<HubAddr>,
        config: ClientConfig,
    ) -> Result<(Client, broadcast::Receiver<Event>), ClientError> {
        if hubs.is_empty() {
            return Err(ClientError::NoHubs);
        }
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                hubs,
                ..State::default()
            }),
            events: broadcast::channel(4096).0,
            changed: Notify::new(),
            rejections: Notify::new(),
            status: watch::Sender::new(Status::default()),
            outbox,
            pong: watch::Sender::new(String::new()),
            config,
        });
        let events = shared.events.subscribe();
        let stop = CancellationToken::new();
        let client = Client {
            shared: shared.clone(),
            _stop: Arc::new(stop.clone().drop_guard()),
            stop: stop.clone(),
        };
        tokio::spawn(session::run(shared, outbox_rx, stop));
        Ok((client, events))
    }

    /// Registers `role` (`name` or `name@version`) with user metadata, on a free port.
    /// Waits until a hub has told the client its address and what it holds.
    pub async fn register(&self, role: &str, meta: Value) -> Result<Record, ClientError> {
        self.register_with(Registration::new(role).meta(meta)).await
    }

    /// Registers a service described by a [`Registration`]. Waits for the hub to
    /// tell our address (unless a host is given) and, when a port must be chosen,
    /// for its records.
    pub async fn register_with(&self, mut reg: Registration) -> Result<Record, ClientError> {
        if reg.host.is_none() {
            self.wait_host().await?;
        }
        if reg.port.is_none() {
            // Choosing a port needs the hub's records, to avoid ports taken on this host.
            self.wait_synced().await?;
            let range = reg.range.unwrap_or(self.shared.config.range);
            let host = reg.host.clone().or_else(|| self.host()).unwrap_or_default();
            reg.port = Some(self.shared.lock().free_port(&host, range)?);
        }
        self.register_now(reg)
    }

    /// Registers at once, without waiting for any hub: the record is sent when a
    /// hub is connected, with our address as that hub sees it unless a host is
    /// given. The port must be given.
    pub fn register_now(&self, reg: Registration) -> Result<Record, ClientError> {
        let (name, version) = split_role(&reg.role);
        if name.is_empty() {
            return Err(ClientError::Invalid(format!(
                "role {:?} has no name",
                reg.role
            )));
        }
        let port = reg
            .port
            .ok_or_else(|| ClientError::Invalid("register_now needs a port".into()))?;
        let auto_host = reg.host.is_none();
        let id = reg
            .id
            .clone()
            .unwrap_or_else(crate::registry::record::new_id);
        let mut meta = reg.meta;
        meta.insert("role".into(), name.into());
        if let Some(version) = version {
            meta.insert("version".into(), version.into());
        }
        meta.insert("port".into(), port.into());
        meta.insert("id".into(), id.clone().into());
        // The host is read under the lock, as a hub's `helo` changes it
        // (see `session::learn_host`), so that a registration never misses
        // the change.
        let mut state = self.shared.lock();
        if let Some(host) = reg.host.or_else(|| self.host()) {
            meta.insert("host".into(), host.into());
        }
        state.rejected.remove(&id);
        state.registry.register(&id, meta, OWN);
        state
            .claims
            .entry(id.clone())
            .or_insert_with(crate::protocol::owner::new_claim);
        if auto_host {
            state.auto_host.insert(id.clone());
        } else {
            state.auto_host.remove(&id);
        }
        let record = state.registry.get(&id);
        let row = state.own_row(&id);
        let record = record.ok_or(ClientError::Closed)?;
        // Queued under the lock: writes of one id from two threads reach the
        // hub in the order they changed the state.
        if record.host().is_some()
            && let Some(row) = row
        {
            let _ = self.shared.outbox.send(Outgoing::Own(row));
        }
        drop(state);
        self.shared.emit(Event::Register(record.clone()));
        self.shared.changed.notify_waiters();
        Ok(record)
    }

    /// Chooses a free port in `range`: waits up to `wait` for the hub's records so
    /// that ports registered on this host are avoided; without a hub by then, only
    /// checks that the port can be bound here. The port is leased: this client
    /// hands it to nobody else until the lease is dropped.
    pub async fn choose_port(
        &self,
        range: PortRange,
        wait: Duration,
    ) -> Result<PortLease, ClientError> {
        let synced = tokio::time::timeout(wait, self.wait_synced()).await;
        if !matches!(synced, Ok(Ok(()))) {
            tracing::warn!("no hub answered within {wait:?}; choosing a port without its records");
        }
        self.lease_port(range)
    }

    /// Chooses and leases a free port in `range` at once, with the records
    /// this client has now.
    pub fn lease_port(&self, range: PortRange) -> Result<PortLease, ClientError> {
        let host = self.host().unwrap_or_default();
        let mut state = self.shared.lock();
        let port = state.free_port(&host, range)?;
        state.leased_ports.insert(port);
        Ok(PortLease {
            port,
            shared: self.shared.clone(),
        })
    }

    /// Whether `id` is one of this client's own records.
    pub fn is_own(&self, id: &str) -> bool {
        self.shared.lock().registry.owner(id) == Some(OWN)
    }

    /// Every record learned from the hub (not the client's own).
    pub fn learned(&self) -> Vec<Record> {
        let state = self.shared.lock();
        state
            .registry
            .owned_by(REMOTE)
            .into_iter()
            .filter_map(|id| state.registry.get(id))
            .collect()
    }

    /// Frees a record by id; returns it if it was known.
    pub fn free(&self, id: &str) -> Option<Record> {
        let mut state = self.shared.lock();
        let own = state.registry.owner(id) == Some(OWN);
        let ext = wire::Ext {
            claim: state.claims.remove(id).map(String::into_boxed_str),
            ..wire::Ext::default()
        };
        let record = state.registry.free(id)?;
        state.auto_host.remove(id);
        state.restore_due.remove(id);
        let row = wire::encode_free(id, &ext);
        let _ = self.shared.outbox.send(if own {
            Outgoing::Own(row)
        } else {
            Outgoing::Write(row)
        });
        drop(state);
        self.shared.emit(Event::Free(record.clone()));
        Some(record)
    }

    /// Updates a record's metadata and broadcasts it: each key of `meta` replaces that
    /// key (a JSON `null` removes it); the id cannot change. Returns the new record.
    pub fn set(&self, id: &str, meta: Value) -> Option<Record> {
        let Value::Object(changes) = meta else {
            return None;
        };
        let mut state = self.shared.lock();
        let owner = state.registry.owner(id)?;
        let mut merged = state.registry.get(id)?.meta().clone();
        for (key, value) in changes {
            if key == "id" {
                continue;
            }
            if value.is_null() {
                merged.shift_remove(&key);
            } else {
                merged.insert(key, value);
            }
        }
        if owner == OWN && merged.contains_key("host") {
            state.auto_host.remove(id);
        }
        state.registry.register(id, merged, owner);
        let record = state.registry.get(id);
        let row = state.own_row(id);
        if let Some(row) = row {
            let _ = self.shared.outbox.send(if owner == OWN {
                Outgoing::Own(row)
            } else {
                Outgoing::Write(row)
            });
        }
        drop(state);
        if let Some(record) = &record {
            self.shared.emit(Event::Register(record.clone()));
            self.shared.changed.notify_waiters();
        }
        record
    }

    /// Records matching `pattern` (`name` or `name@range`; empty for all), the
    /// client's own included.
    pub fn query(&self, pattern: &str) -> Result<Vec<Record>, ClientError> {
        Ok(self.query_pattern(&Pattern::parse(pattern)?))
    }

    /// Records matching a parsed [`Pattern`].
    pub fn query_pattern(&self, pattern: &Pattern) -> Vec<Record> {
        self.shared.lock().registry.query(pattern)
    }

    /// Like [`Client::query`], but waits until at least one record matches.
    pub async fn get(&self, pattern: &str) -> Result<Vec<Record>, ClientError> {
        let pattern = Pattern::parse(pattern)?;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let found = self.query_pattern(&pattern);
            if !found.is_empty() {
                return Ok(found);
            }
            tokio::select! {
                () = changed => {}
                () = self.stop.cancelled() => return Err(ClientError::Closed),
            }
        }
    }

    /// A stream of [`Event`]s from now on. A receiver that falls more than 4096
    /// events behind skips the oldest ones (and is told so by the channel).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Our address as the hub sees it, once known.
    pub fn host(&self) -> Option<String> {
        self.shared.status.borrow().host.clone()
    }

    /// True while a hub connection has delivered its initial dump: what is
    /// registered now reaches a hub at once.
    pub fn is_synced(&self) -> bool {
        self.shared.status.borrow().synced
    }

    /// Waits until the current hub connection has delivered its initial dump.
    pub async fn wait_synced(&self) -> Result<(), ClientError> {
        self.wait_status(|s| s.synced).await
    }

    /// Waits until a hub has told us our address.
    async fn wait_host(&self) -> Result<String, ClientError> {
        self.wait_status(|s| s.host.is_some()).await?;
        self.host().ok_or(ClientError::Closed)
    }

    async fn wait_status(&self, ready: impl Fn(&Status) -> bool) -> Result<(), ClientError> {
        let mut status = self.shared.status.subscribe();
        tokio::select! {
            r = status.wait_for(|s| ready(s)) => r.map(|_| ()).map_err(|_| ClientError::Closed),
            () = self.stop.cancelled() => Err(ClientError::Closed),
        }
    }

    /// Why the hub refused the own record `id`, if it did.
    pub fn rejection(&self, id: &str) -> Option<String> {
        self.shared.lock().rejected.get(id).cloned()
    }

    /// Waits until the hub refuses the own record `id`, and returns its reason.
    pub async fn rejected(&self, id: &str) -> String {
        loop {
            let notified = self.shared.rejections.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.rejection(id) {
                return reason;
            }
            notified.await;
        }
    }

    /// Waits until the hub has handled everything this client sent before
    /// (a `ping` answered by a `pong`), up to `wait`. Node hubs do not answer:
    /// `false` then, and when no hub is connected.
    pub async fn confirm(&self, wait: Duration) -> bool {
        let token = crate::registry::record::new_id();
        let mut pong = self.shared.pong.subscribe();
        let _ = self.shared.outbox.send(Outgoing::Ping(token.clone()));
        matches!(
            tokio::time::timeout(wait, pong.wait_for(|t| *t == token)).await,
            Ok(Ok(_))
        )
    }

    /// Closes the connection; the hub frees this client's records.
    pub fn close(&self) {
        self.stop.cancel();
    }
}
