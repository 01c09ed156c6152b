//! seaport: a service registry, port-assignment hub and process supervisor,
//! wire-compatible with the npm package `seaport` 2.x.
//!
//! # Layout
//! Each layer uses only the layers above it in this list.
//! - [`protocol`]: the wire protocol without sockets: rows ([`protocol::wire`]),
//!   lines under a limit ([`protocol::framing`]), record versions between hubs
//!   ([`protocol::stamp`]), the signed mode ([`protocol::auth`]), key files
//!   ([`protocol::keys`]) and hub addresses ([`protocol::hub_addr`]).
//! - [`registry`]: records, `name@range` patterns with npm's semver rules, the
//!   indexed set of records, and port choice (pure state, no I/O).
//! - [`transport`]: connections over TCP: why one ended, refused rows, how long
//!   a silent peer is waited for, how long an HTTP connection has moved no
//!   byte ([`transport::idle`]), and the [`transport::link`] that clients and
//!   peer links use to talk to a hub (connect, authenticate, rows both ways).
//! - [`hub`]: the TCP hub: connections, the shared registry, peer links, and
//!   the etcd store that hubs fronting one cluster share (`hub::store`).
//! - [`client`]: the client library: register, query, wait, watch; failover.
//! - [`process`]: one service's processes, kept together below a keeper and in
//!   a cgroup where there are cgroups (so that nothing escapes a stop), readiness,
//!   output, restart policy, and the instance that registers it while ready.
//! - [`router`]: the HTTP router: requests by Host to the live records of a
//!   `role@range`, over [`client`] (beside [`process`]: neither uses the other).
//! - [`supervise`]: the supervisor of a services directory, its control socket
//!   and systemd notifications.
//! - [`admin`]: the admin HTTP endpoint over [`hub`] and [`supervise`]:
//!   Prometheus metrics, a JSON API, server-sent events and a dashboard.
//! - [`cli`]: the `seaport` command line; `main` only calls [`cli::run`].
//! - [`human`]: durations as people write and read them (used by every layer
//!   that reads settings or writes logs).
//! - [`console`]: our stdout and stderr, written by threads of their own so
//!   that a stalled reader never blocks the runtime (used by [`process`] for
//!   services' output and by [`cli`] for logs).

pub mod admin;
pub mod cli;
pub mod client;
pub mod console;
pub mod hub;
pub mod human;
pub mod process;
pub mod protocol;
pub mod registry;
pub mod router;
pub mod supervise;
pub mod transport;

pub use client::{Client, ClientConfig, Event, Registration};
pub use hub::{Hub, HubConfig};
pub use protocol::hub_addr::HubAddr;
pub use registry::pattern::Pattern;
pub use registry::record::Record;

/// The README's examples compile and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
