//! Where the hub keeps what in the store: the key of each record and of each
//! claimed port, under the store's prefix (see docs/protocol.md, "Storage
//! layout").
//!
//! - `PREFIX records/ID`: the record's row as hubs exchange it (stamped, with
//!   its owner), on the lease of the connection that holds it;
//! - `PREFIX ports/HOST:PORT`: the id of the record that has the port, on the
//!   same lease.

/// The store's keys, under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    records: String,
    ports: String,
}

impl Layout {
    /// The keys under `prefix` (which ends in `/`).
    pub(super) fn new(prefix: &str) -> Self {
        Layout {
            records: format!("{prefix}records/"),
            ports: format!("{prefix}ports/"),
        }
    }

    /// The prefix of every record's key.
    pub(super) fn records(&self) -> &str {
        &self.records
    }

    /// The key of record `id`.
    pub(super) fn record(&self, id: &str) -> String {
        format!("{}{id}", self.records)
    }

    /// The key of the claim on `host:port`.
    pub(super) fn claim(&self, host_port: &str) -> String {
        format!("{}{host_port}", self.ports)
    }

    /// The record id of a record's key.
    pub(super) fn id_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let id = key.strip_prefix(self.records.as_bytes())?;
        std::str::from_utf8(id).ok().filter(|id| !id.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_claims_live_apart_under_the_prefix() {
        let layout = Layout::new("/seaport/");
        assert_eq!(layout.record("A1"), "/seaport/records/A1");
        assert_eq!(
            layout.claim("10.0.0.1:8080"),
            "/seaport/ports/10.0.0.1:8080"
        );
        assert_eq!(layout.id_of(b"/seaport/records/A1"), Some("A1"));
        assert_eq!(layout.id_of(b"/seaport/ports/10.0.0.1:8080"), None);
        assert_eq!(layout.id_of(b"/seaport/records/"), None);
    }
}
