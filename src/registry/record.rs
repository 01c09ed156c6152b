//! A service record: an id and its metadata object, as the protocol carries it.

use crate::protocol::owner::Holder;
use crate::protocol::wire::{self, Meta, field};
use crate::registry::npm_semver::Version;
use serde::Serialize;
use serde_json::Value;

/// One registered service: `{role, version, host, port, id, ...metadata}`.
///
/// The metadata is kept exactly as it arrived (key order included), so user keys
/// survive any number of round trips untouched. Serialises as the metadata object.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Record {
    #[serde(skip)]
    id: String,
    meta: Meta,
    /// Who owns it, where a hub said.
    #[serde(skip)]
    holder: Option<Holder>,
}

/// Two records are equal when their ids and metadata are (as the protocol
/// compares records); who owns them does not count.
impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.meta == other.meta
    }
}

impl Record {
    /// A record with the given id and metadata; `meta.id` is set to `id`.
    pub fn new(id: impl Into<String>, mut meta: Meta) -> Self {
        let id = id.into();
        if wire::text(&meta, "id") != Some(id.as_str()) {
            meta.insert("id".into(), Value::String(id.clone()));
        }
        Record {
            id,
            meta,
            holder: None,
        }
    }

    /// The record with its owner.
    pub fn with_holder(mut self, holder: Option<Holder>) -> Self {
        self.holder = holder;
        self
    }

    /// Who owns the record, where a hub said.
    pub fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }

    /// The record id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The service name (`web` in `web@1.2.3`).
    pub fn role(&self) -> Option<&str> {
        wire::text(&self.meta, "role")
    }

    /// The service version (`1.2.3` in `web@1.2.3`), if it has one.
    pub fn version(&self) -> Option<&str> {
        wire::text(&self.meta, "version")
    }

    /// The host the service runs on, as the hub saw it.
    pub fn host(&self) -> Option<&str> {
        wire::text(&self.meta, "host")
    }

    /// The service port.
    pub fn port(&self) -> Option<u16> {
        wire::port(&self.meta)
    }

    /// `role@version`, or just `role` when there is no version.
    pub fn name(&self) -> String {
        let role = self.role().unwrap_or("");
        match self.version() {
            Some(v) => format!("{role}@{v}"),
            None => role.to_string(),
        }
    }

    /// All metadata, protocol keys included.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        field(&self.meta, key)
    }

    /// Gives up the metadata object.
    pub fn into_meta(self) -> Meta {
        self.meta
    }

    /// Sets the host when the record has none; returns whether it changed.
    pub fn fill_host(&mut self, host: &str) -> bool {
        match field(&self.meta, "host") {
            Some(Value::String(_)) => false,
            _ => {
                self.meta.insert("host".into(), Value::String(host.into()));
                true
            }
        }
    }
}

/// Splits `name@version` into its parts, as the Node package does: the name
/// before the first `@`, the version up to the next one (`web@1.2.3@x` is
/// `web` at `1.2.3`, and `web@1.x@x` queries `web@1.x`).
pub fn split_role(role: &str) -> (&str, Option<&str>) {
    let mut parts = role.split('@');
    let name = parts.next().unwrap_or_default();
    (name, parts.next())
}

/// Checks a role to launch a service as: `name` or `name@version`, the
/// version as npm's semver reads it, and one `@` at most (the Node package
/// would cut the rest off).
pub fn check_role(role: &str) -> Result<(), String> {
    let expected = "expected name or name@version, e.g. \"web@1.2.3\"";
    match split_role(role) {
        ("", _) => Err(format!("{role:?} has no name ({expected})")),
        _ if role.matches('@').count() > 1 => {
            Err(format!("{role:?} has more than one @ ({expected})"))
        }
        (_, Some(version)) => version
            .parse::<Version>()
            .map(drop)
            .map_err(|e| format!("{role:?} is not name or name@version: {e} ({expected})")),
        (_, None) => Ok(()),
    }
}

/// A random record id: 32 upper-case hex digits (128 bits), like the Node package's.
pub fn new_id() -> String {
    format!("{:032X}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::meta_of;
    use serde_json::json;

    #[test]
    fn accessors_read_protocol_keys() {
        let r = Record::new(
            "A1",
            meta_of(
                json!({"role":"web","version":"1.2.3","host":"10.0.0.1","port":8080,"x":{"y":1}}),
            ),
        );
        assert_eq!(r.id(), "A1");
        assert_eq!(r.role(), Some("web"));
        assert_eq!(r.version(), Some("1.2.3"));
        assert_eq!(r.host(), Some("10.0.0.1"));
        assert_eq!(r.port(), Some(8080));
        assert_eq!(r.name(), "web@1.2.3");
        assert_eq!(r.get("id"), Some(&json!("A1")));
        assert_eq!(
            serde_json::to_string(&r).ok().as_deref(),
            Some(
                r#"{"role":"web","version":"1.2.3","host":"10.0.0.1","port":8080,"x":{"y":1},"id":"A1"}"#
            )
        );
    }

    #[test]
    fn the_wire_id_wins_over_a_different_meta_id() {
        let r = Record::new("A1", meta_of(json!({"id":"other"})));
        assert_eq!(r.get("id"), Some(&json!("A1")));
    }

    #[test]
    fn fill_host_keeps_an_existing_host() {
        let mut r = Record::new("A", meta_of(json!({"host":"h"})));
        assert!(!r.fill_host("x"));
        assert_eq!(r.host(), Some("h"));
        let mut r = Record::new("A", Meta::new());
        assert!(r.fill_host("x"));
        assert_eq!(r.host(), Some("x"));
    }

    #[test]
    fn splits_roles_like_node() {
        assert_eq!(split_role("web@1.2.3"), ("web", Some("1.2.3")));
        assert_eq!(split_role("web"), ("web", None));
        assert_eq!(split_role("web@"), ("web", Some("")));
        assert_eq!(split_role("web@1.2.3@x"), ("web", Some("1.2.3")));
    }

    #[test]
    fn a_role_to_launch_has_a_name_and_at_most_a_valid_version() {
        assert_eq!(check_role("web"), Ok(()));
        assert_eq!(check_role("web@1.2.3-beta.1"), Ok(()));
        for (bad, says) in [
            ("@1.0.0", "has no name"),
            ("", "has no name"),
            ("web@", "invalid version"),
            ("web@notsemver", "invalid version"),
            ("web@1.x", "invalid version"),
            ("web@1.0.0@x", "more than one @"),
        ] {
            let err = check_role(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
