//! seaport: a service registry, port-assignment hub and process supervisor,
//! wire-compatible with the npm package `seaport` 2.x.
//!
//! # Layout
//! - [`wire`]: the line protocol's rows, decoded and encoded (pure).
//! - [`framing`]: splitting a byte stream into lines under a length limit.
//! - [`npm_semver`]: npm's version and range rules, which seaport patterns use.
//! - [`record`]: one service record.
//! - [`pattern`]: `name@range` queries.
//! - [`registry`]: every known record with its indexes (pure state).
//! - [`stamp`]: versions of records between hubs (clock, stamps, tombstones).
//! - [`ports`]: choosing a port that is really free.
//! - [`hub_addr`]: `host:port` and bare-port hub addresses.
//! - [`keys`]: RSA keypairs and authorized keys, as files hold them.
//! - [`auth`]: the signed mode's challenge, session key and row MACs.
//! - [`hub`]: the TCP hub.
//! - [`client`]: the client library.
//! - [`human`]: durations as people write and read them.
//! - [`restart`]: restart policy and backoff (pure).
//! - [`child`]: child processes in their own group, dying with their owner.
//! - [`ready`]: readiness probes.
//! - [`output`]: child output passed through with a prefix.
//! - [`instance`]: one supervised service instance, from start to record to restart.
//! - [`supervise`]: the supervisor of a services directory, its control socket
//!   and systemd notifications.
//! - [`cli`]: the `seaport` command line.

pub mod auth;
pub mod child;
pub mod cli;
pub mod client;
pub mod framing;
pub mod hub;
pub mod hub_addr;
pub mod human;
pub mod instance;
pub mod keys;
pub mod npm_semver;
pub mod output;
pub mod pattern;
pub mod ports;
pub mod ready;
pub mod record;
pub mod registry;
pub mod restart;
pub mod stamp;
pub mod supervise;
pub mod wire;

pub use client::{Client, ClientConfig, Event, Registration};
pub use hub::{Hub, HubConfig};
pub use hub_addr::HubAddr;
pub use pattern::Pattern;
pub use record::Record;

/// The README's examples compile and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
