//! Integration tests: one binary, one module per capability.

mod admin;
mod admin_limits;
pub(crate) mod auth;
mod bad_input;
mod cli;
mod client;
pub(crate) mod cluster;
mod containment;
#[path = "../support/debian.rs"]
mod debian;
#[path = "../support/etcd.rs"]
mod etcd;
mod etcd_support;
mod examples;
mod harness;
mod health;
mod hub_protocol;
mod interop;
pub(crate) mod launcher;
mod layers;
mod ownership;
mod packaging;
pub(crate) mod ports;
mod rolling;
mod router;
mod semver_npm;
mod store;
mod store_access;
mod store_faults;
pub(crate) mod supervisor;
mod upstream;
