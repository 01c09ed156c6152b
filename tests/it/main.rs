//! Integration tests: one binary, one module per capability.

mod bad_input;
mod cli;
mod client;
mod harness;
mod hub_protocol;
mod interop;
mod semver_npm;
