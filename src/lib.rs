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
//! - [`ports`]: choosing a port that is really free.
//! - [`hub_addr`]: `host:port` and bare-port hub addresses.
//! - [`hub`]: the TCP hub.
//! - [`client`]: the client library.
//! - [`cli`]: the `seaport` command line.

pub mod cli;
pub mod client;
pub mod framing;
pub mod hub;
pub mod hub_addr;
pub mod npm_semver;
pub mod pattern;
pub mod ports;
pub mod record;
pub mod registry;
pub mod wire;

pub use client::{Client, ClientConfig, Event, Registration};
pub use hub::{Hub, HubConfig};
pub use hub_addr::HubAddr;
pub use pattern::Pattern;
pub use record::Record;
