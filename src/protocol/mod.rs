//! The wire protocol, without sockets: rows and their encoding, lines under a
//! length limit, record versions between hubs, the signed mode's cryptography,
//! key files and hub addresses.

pub mod auth;
pub mod framing;
pub mod hub_addr;
pub mod keys;
pub mod metadata;
pub mod owner;
pub mod stamp;
pub mod wire;
