//! The hub's figures for Prometheus, in two kinds.
//!
//! Counters are kept where the events happen, by the code that decides them:
//! records stored, frees by reason, refused writes by reason, connections
//! accepted and dropped for silence, bytes written to connections. Levels
//! (records by role, open connections, peer links up, the feed's backlog) are
//! read from the shared state when they are scraped, by a [`Collector`]: the
//! registry already indexes records by role, so counting them costs one pass
//! over the roles under the lock, and a level that is read cannot drift from
//! the state the way a gauge kept in step at every change could (and a role
//! that is gone leaves no series behind).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Write;

/// Why a record was freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FreeReason {
    /// A `free` row from a writer allowed to change it.
    Explicit,
    /// The connection that held it closed.
    Disconnect,
    /// The connection that held it, or the hub it came from, fell silent.
    Timeout,
    /// An admin key freed a record that another writer held.
    Admin,
    /// Another hub freed it (its own client's free or disconnect, carried over
    /// a peer link), or no longer has it.
    Peer,
    /// The store refused it after the hub took it: its host and port are
    /// another record's, claimed through another hub.
    Refused,
}

impl FreeReason {
    const ALL: [FreeReason; 6] = [
        FreeReason::Explicit,
        FreeReason::Disconnect,
        FreeReason::Timeout,
        FreeReason::Admin,
        FreeReason::Peer,
        FreeReason::Refused,
    ];

    const fn as_str(self) -> &'static str {
        match self {
            FreeReason::Explicit => "explicit",
            FreeReason::Disconnect => "disconnect",
            FreeReason::Timeout => "timeout",
            FreeReason::Admin => "admin",
            FreeReason::Peer => "peer",
            FreeReason::Refused => "refused",
        }
    }
}

/// Why a write (a register, a free, an authentication) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RejectReason {
    /// A plain write on a hub that takes only signed ones.
    Unsigned,
    /// A key the hub does not authorize (any more), or a bad public key.
    Unauthorized,
    /// A signature that does not verify, a replayed or misplaced signed row.
    BadSignature,
    /// The record is owned by another writer.
    NotOwner,
    /// The hub's own record, or a `seaport` record without a hub key.
    Reserved,
    /// Larger than the hub's limit.
    TooLarge,
    /// Its host and port are another record's in the store.
    PortTaken,
}

impl RejectReason {
    const ALL: [RejectReason; 7] = [
        RejectReason::Unsigned,
        RejectReason::Unauthorized,
        RejectReason::BadSignature,
        RejectReason::NotOwner,
        RejectReason::Reserved,
        RejectReason::TooLarge,
        RejectReason::PortTaken,
    ];

    const fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unsigned => "unsigned",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::NotOwner => "not_owner",
            RejectReason::Reserved => "reserved",
            RejectReason::TooLarge => "too_large",
            RejectReason::PortTaken => "port_taken",
        }
    }
}

impl EncodeLabelValue for FreeReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for RejectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FreeLabels {
    reason: FreeReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectLabels {
    reason: RejectReason,
}

/// The hub's counters. Each is an atomic behind an `Arc`: cheap to bump
/// under the state's lock, and shared with the registry that encodes them.
#[derive(Debug)]
pub(crate) struct HubMetrics {
    registers: Counter,
    frees: Family<FreeLabels, Counter>,
    /// The counters of `frees`, by [`FreeReason::ALL`]'s order: bumped
    /// without the family's lock and lookup.
    frees_by_reason: Vec<Counter>,
    rejected: Family<RejectLabels, Counter>,
    accepted: Counter,
    heartbeat_expiries: Counter,
    sent_bytes: Counter,
    /// Set once the hub keeps its records in a store: then `store` is shown.
    has_store: std::sync::atomic::AtomicBool,
    store: StoreMetrics,
}

/// How the hub's store is doing (see `store`).
#[derive(Debug, Default, Clone)]
pub(crate) struct StoreMetrics {
    /// 1 while the store takes the hub's writes and its watch runs.
    pub(crate) up: Gauge,
    /// Records whose latest change waits to be written.
    pub(crate) waiting: Gauge,
    /// Record writes (puts and deletes) the store took.
    pub(crate) written: Counter,
    /// Transactions the store failed, to be tried again.
    pub(crate) failures: Counter,
    /// Leases the hub keeps alive.
    pub(crate) leases: Gauge,
}

impl Default for HubMetrics {
    fn default() -> Self {
        // Every reason is shown from the start, at 0, so that a rate over a
        // reason seen for the first time starts from a known value.
        let frees: Family<FreeLabels, Counter> = Family::default();
        let frees_by_reason = FreeReason::ALL
            .iter()
            .map(|&reason| frees.get_or_create(&FreeLabels { reason }).clone())
            .collect();
        let metrics = HubMetrics {
            registers: Counter::default(),
            frees,
            frees_by_reason,
            rejected: Family::default(),
            accepted: Counter::default(),
            heartbeat_expiries: Counter::default(),
            sent_bytes: Counter::default(),
            has_store: std::sync::atomic::AtomicBool::new(false),
            store: StoreMetrics::default(),
        };
        for reason in RejectReason::ALL {
            drop(metrics.rejected.get_or_create(&RejectLabels { reason }));
        }
        metrics
    }
}

impl HubMetrics {
    /// A record was stored new or changed (what clients see as a register).
    pub(crate) fn registered(&self) {
        self.registers.inc();
    }

    /// `count` records were freed for `reason`.
    pub(crate) fn freed(&self, reason: FreeReason, count: usize) {
        if count > 0 {
            if let Some(counter) = self.frees_by_reason.get(reason as usize) {
                counter.inc_by(count as u64);
            }
        }
    }

    /// A write was refused for `reason`.
    pub(crate) fn rejected(&self, reason: RejectReason) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// A connection was accepted.
    pub(crate) fn accepted(&self) {
        self.accepted.inc();
    }

    /// A connection was dropped because it fell silent.
    pub(crate) fn heartbeat_expired(&self) {
        self.heartbeat_expiries.inc();
    }

    /// The counter of bytes written to connections, for their writers.
    pub(crate) fn sent_bytes(&self) -> Counter {
        self.sent_bytes.clone()
    }

    /// The store's figures, for the store to keep; they are shown from now on.
    pub(crate) fn store(&self) -> StoreMetrics {
        self.has_store
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.store.clone()
    }

    /// Adds the counters to `registry` (its prefix goes before each name).
    pub(crate) fn register_in(&self, registry: &mut Registry) {
        if self.has_store.load(std::sync::atomic::Ordering::Relaxed) {
            let store = registry.sub_registry_with_prefix("store");
            store.register(
                "up",
                "1 while the store (etcd) takes this hub's writes and its watch runs",
                self.store.up.clone(),
            );
            store.register(
                "writes_waiting",
                "Records whose latest change waits to be written to the store",
                self.store.waiting.clone(),
            );
            store.register(
                "writes",
                "Record writes (puts and deletes) the store took",
                self.store.written.clone(),
            );
            store.register(
                "write_failures",
                "Transactions the store failed, to be tried again",
                self.store.failures.clone(),
            );
            store.register(
                "leases",
                "Leases this hub keeps alive in the store",
                self.store.leases.clone(),
            );
        }
        registry.register(
            "registers",
            "Records stored new or changed (register events)",
            self.registers.clone(),
        );
        registry.register(
            "frees",
            "Records freed, by reason: explicit, disconnect, timeout, admin, peer, refused",
            self.frees.clone(),
        );
        registry.register(
            "rejected_writes",
            "Writes refused, by reason",
            self.rejected.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted",
            self.accepted.clone(),
        );
        registry.register(
            "heartbeat_expiries",
            "Connections dropped because they fell silent for their timeout",
            self.heartbeat_expiries.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes written to connections: rows, dumps and heartbeats",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
    }
}

/// The hub's levels at one moment, read under the state's lock.
#[derive(Debug, Default)]
pub(crate) struct Levels {
    /// Records by role name, sorted by role.
    pub(crate) roles: Vec<(String, usize)>,
    /// Records without a role.
    pub(crate) roleless: usize,
    /// Records of the roles beyond the most populous ones shown by name.
    pub(crate) other_roles: usize,
    /// Open connections, peer links included.
    pub(crate) connections: usize,
    /// Links to other hubs that are connected now, both ways.
    pub(crate) peer_links: usize,
    /// Bytes of forwarded rows kept for connections that have not read them.
    pub(crate) queued_bytes: usize,
}

/// Encodes the levels at scrape time.
#[derive(Debug)]
pub(crate) struct LevelsCollector(pub(crate) std::sync::Arc<super::state::Shared>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

impl Collector for LevelsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let levels = self.0.levels();
        let gauge = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        {
            let mut family = encoder.encode_descriptor(
                "records",
                "Records held, by role name (\"\" for records without one)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            // Records with an empty role and those with none share the ""
            // series: one series per label set.
            let mut roleless = levels.roleless;
            for (role, count) in &levels.roles {
                if role.is_empty() {
                    roleless += count;
                } else {
                    let labels = RoleLabels { role: role.clone() };
                    gauge(*count).encode(family.encode_family(&labels)?)?;
                }
            }
            if roleless > 0 {
                let labels = RoleLabels {
                    role: String::new(),
                };
                gauge(roleless).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, value) in [
            (
                "records_in_other_roles",
                "Records of the roles not shown in seaport_records (only the 500 roles with the most records are)",
                levels.other_roles,
            ),
            (
                "connections",
                "Open connections, peer links included",
                levels.connections,
            ),
            (
                "peer_links_up",
                "Links to other hubs connected now, both ways",
                levels.peer_links,
            ),
        ] {
            let metric = gauge(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let queued = gauge(levels.queued_bytes);
        queued.encode(encoder.encode_descriptor(
            "queued",
            "Bytes of the rows the hub keeps for connections to read (its shared outgoing buffer, trimmed as they read)",
            Some(&Unit::Bytes),
            queued.metric_type(),
        )?)?;
        Ok(())
    }
}
