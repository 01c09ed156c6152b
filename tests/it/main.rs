//! Integration tests: one binary, one module per capability.

mod auth;
mod bad_input;
mod cli;
mod client;
mod cluster;
mod containment;
mod harness;
mod hub_protocol;
mod interop;
mod launcher;
mod layers;
mod packaging;
mod semver_npm;
mod supervisor;
mod upstream;
