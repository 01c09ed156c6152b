//! Who owns a record: what its writer proved, so that only the owner may change
//! it where the hub enforces ownership (section 8.4 of docs/protocol.md).
//!
//! A writer proves itself with an authorized key (signed mode) or, on an open
//! hub, with a secret of its own for the record (a *claim*), which it sends with
//! every write of that record; hubs keep only the claim's SHA-256, so the owner
//! can be shown and checked, and carried between hubs, without revealing it. A
//! writer that proves nothing (a Node client) owns the record through the
//! connection it wrote it over.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// The owner of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    /// The holder of an authorized key, by fingerprint (`SHA256:…`).
    Key(Arc<str>),
    /// The holder of a claim's secret, by the secret's hash (`SHA256:…`).
    Claim(Arc<str>),
    /// The connection that wrote it, which proved nothing else.
    Connection,
}

impl Holder {
    /// The owner of a claim, from its secret.
    pub fn of_claim(secret: &str) -> Holder {
        Holder::Claim(Arc::from(claim_hash(secret)))
    }

    /// As it travels in rows: `key:SHA256:…`, `claim:SHA256:…` or
    /// `connection`; written where it goes, without a string of its own.
    pub fn to_wire(&self) -> OnTheWire<'_> {
        OnTheWire(self)
    }

    /// Reads the form of [`Holder::to_wire`]; anything else is `None`.
    pub fn from_wire(text: &str) -> Option<Holder> {
        if text == "connection" {
            return Some(Holder::Connection);
        }
        match text.split_once(':') {
            Some(("key", fingerprint)) if !fingerprint.is_empty() => {
                Some(Holder::Key(Arc::from(fingerprint)))
            }
            Some(("claim", hash)) if !hash.is_empty() => Some(Holder::Claim(Arc::from(hash))),
            _ => None,
        }
    }
}

/// A [`Holder`] as it travels in rows (see [`Holder::to_wire`]).
#[derive(Debug, Clone, Copy)]
pub struct OnTheWire<'a>(&'a Holder);

impl fmt::Display for OnTheWire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Holder::Key(fingerprint) => write!(f, "key:{fingerprint}"),
            Holder::Claim(hash) => write!(f, "claim:{hash}"),
            Holder::Connection => f.write_str("connection"),
        }
    }
}

impl serde::Serialize for OnTheWire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Holder {
    /// How `seaport show` names the owner: the key, or what kind of client.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Key(fingerprint) => write!(f, "key {fingerprint}"),
            Holder::Claim(_) => f.write_str("client"),
            Holder::Connection => f.write_str("connection"),
        }
    }
}

/// The hash hubs keep of a claim's secret: `SHA256:` and unpadded base64, as key
/// fingerprints are written.
pub fn claim_hash(secret: &str) -> String {
    format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(Sha256::digest(secret.as_bytes()))
    )
}

/// A new claim secret: 32 random bytes, base64.
pub fn new_claim() -> String {
    STANDARD_NO_PAD.encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_travel_as_text_and_claims_are_hashed() {
        let secret = new_claim();
        let claim = Holder::of_claim(&secret);
        assert!(!claim.to_wire().to_string().contains(&secret));
        for holder in [
            Holder::Key(Arc::from("SHA256:abc")),
            claim,
            Holder::Connection,
        ] {
            assert_eq!(
                Holder::from_wire(&holder.to_wire().to_string()),
                Some(holder)
            );
        }
        assert_eq!(Holder::from_wire("key:"), None);
        assert_eq!(Holder::from_wire("someone"), None);
        assert_eq!(
            Holder::of_claim(&secret),
            Holder::Claim(Arc::from(claim_hash(&secret)))
        );
    }

    #[test]
    fn a_holder_in_a_row_is_a_json_string_whatever_its_text() {
        let holder = Holder::Key(Arc::from("SHA256:a\"b\\c\n"));
        let json = serde_json::to_string(&holder.to_wire()).unwrap();
        assert_eq!(json, r#""key:SHA256:a\"b\\c\n""#);
        let text: String = serde_json::from_str(&json).unwrap();
        assert_eq!(Holder::from_wire(&text), Some(holder));
        let connection = serde_json::to_string(&Holder::Connection.to_wire()).unwrap();
        assert_eq!(connection, r#""connection""#);
    }
}
