//! Who may write: each connection's authentication state, deciding for every row
//! whether it is applied, answered, refused or ignored. Reads are never gated.
//! Which record a writer may change is the shared state's decision (it knows
//! the records); this says who the writer is.

use super::metrics::RejectReason;
use crate::protocol::auth::{SessionKey, verify_challenge};
use crate::protocol::keys::{Authorized, Fingerprint, parse_public};
use crate::protocol::wire::Row;

/// The keys a hub goes by, and whether an open hub keeps records to their
/// owners; replaced whole when reloaded.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keys allowed to write; empty (with no admin or hub keys) means everyone
    /// may, as with a Node hub.
    pub authorized: Authorized,
    /// Keys that may also free any record: operators'.
    pub admin: Authorized,
    /// Keys of hubs: on a secured hub, only they may write `seaport` records.
    pub hubs: Authorized,
    /// Whether an open hub lets only a record's owner change it.
    pub owned: bool,
}

impl Policy {
    /// Whether only listed keys may write.
    pub fn secured(&self) -> bool {
        !self.authorized.is_open()
    }

    /// Whether only a record's owner may change it.
    pub fn enforces_owners(&self) -> bool {
        self.secured() || self.owned
    }

    /// Whether a key may authenticate, and so write.
    pub fn admits(&self, key: &Fingerprint) -> bool {
        !self.secured()
            || self.authorized.allows(key)
            || self.admin.allows(key)
            || self.hubs.allows(key)
    }

    /// Who a connection authenticated with `key` writes as.
    pub(crate) fn writer(&self, key: &Fingerprint) -> Writer {
        Writer {
            key: Some(key.clone()),
            admin: self.admin.allows(key),
            hub: self.hubs.allows(key),
        }
    }
}

/// Who wrote a row, as far as the connection proved it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Writer {
    /// The key the connection authenticated with.
    pub key: Option<Fingerprint>,
    /// That key is an admin key.
    pub admin: bool,
    /// That key is a hub's.
    pub hub: bool,
}

/// A key as the hub's log names it: its fingerprint, or `none`.
pub(crate) fn key_name(key: Option<&Fingerprint>) -> String {
    key.map_or_else(|| "none".to_string(), ToString::to_string)
}

/// What to do with a row.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// A write (or a hub's beat or `synced`) to apply, from this writer.
    Apply(Row, Writer),
    /// A row to send back to this connection (the `session` row).
    Reply(Row),
    /// A refusal: answer with a `reject` row and log it.
    Refuse(Refusal),
    /// Nothing to do.
    Ignore,
}

/// A refused row or key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refusal {
    pub what: &'static str,
    pub id: Option<String>,
    pub reason: String,
    pub fingerprint: Option<Fingerprint>,
    /// Its kind, for the metrics.
    pub cause: RejectReason,
}

impl Refusal {
    /// The `reject` row that tells the client.
    pub(crate) fn row(&self) -> Row {
        Row::Reject {
            what: self.what.to_string(),
            id: self.id.clone(),
            reason: self.reason.clone(),
            fingerprint: self.fingerprint.as_ref().map(|f| f.to_string()),
        }
    }
}

#[derive(Debug)]
struct Session {
    key: SessionKey,
    fingerprint: Fingerprint,
    last_seq: u64,
}

/// One connection's authentication state.
#[derive(Debug)]
pub(crate) struct Guard {
    challenge: String,
    session: Option<Session>,
}

impl Guard {
    /// A guard for a connection that was sent `challenge`.
    pub(crate) fn new(challenge: String) -> Self {
        Guard {
            challenge,
            session: None,
        }
    }

    /// Decides what `row` may do under the policy in force.
    pub(crate) fn check(&mut self, row: Row, policy: &Policy) -> Verdict {
        match row {
            Row::Register { ref id, .. } | Row::Plain { ref id, .. } | Row::Free { ref id, .. }
                if policy.secured() =>
            {
                Verdict::Refuse(Refusal {
                    what: kind(&row),
                    id: Some(id.clone()),
                    reason: "not signed: this hub takes writes only from authorized keys".into(),
                    fingerprint: None,
                    cause: RejectReason::Unsigned,
                })
            }
            Row::Register { .. } | Row::Plain { .. } | Row::Free { .. } => {
                Verdict::Apply(row, Writer::default())
            }
            // A hub's liveness decides when its records go: with keys, only a
            // signed beat counts (peer links sign everything they send).
            Row::Beat { .. } if policy.secured() => Verdict::Ignore,
            // Liveness of hubs and the end of a dump carry no record.
            Row::Beat { .. } | Row::Synced => Verdict::Apply(row, Writer::default()),
            Row::Auth { public, signature } => self.authenticate(&public, &signature, policy),
            Row::Signed { seq, text, mac } => self.open_signed(seq, &text, &mac, policy),
            _ => Verdict::Ignore,
        }
    }

    fn authenticate(&mut self, public: &str, signature: &str, policy: &Policy) -> Verdict {
        let refuse_as = |cause: RejectReason, reason: String, fingerprint: Option<Fingerprint>| {
            Verdict::Refuse(Refusal {
                what: "auth",
                id: None,
                reason,
                fingerprint,
                cause,
            })
        };
        let refuse = |reason: String, fingerprint: Option<Fingerprint>| {
            refuse_as(RejectReason::Unauthorized, reason, fingerprint)
        };
        let key = match parse_public(public) {
            Ok(key) => key,
            Err(e) => return refuse(format!("bad public key: {e}"), None),
        };
        let fingerprint = Fingerprint::of(&key);
        if !policy.admits(&fingerprint) {
            return refuse("key not authorized".into(), Some(fingerprint));
        }
        if !verify_challenge(&key, &self.challenge, signature) {
            return refuse_as(
                RejectReason::BadSignature,
                "bad signature of the challenge".into(),
                Some(fingerprint),
            );
        }
        let session = SessionKey::generate();
        match session.seal(&key) {
            Ok(sealed) => {
                self.session = Some(Session {
                    key: session,
                    fingerprint: fingerprint.clone(),
                    last_seq: 0,
                });
                Verdict::Reply(Row::Session {
                    sealed,
                    fingerprint: fingerprint.to_string(),
                })
            }
            Err(e) => refuse(e.to_string(), Some(fingerprint)),
        }
    }

    fn open_signed(&mut self, seq: u64, text: &str, mac: &str, policy: &Policy) -> Verdict {
        let inner = Row::decode_keeping(text.as_bytes()).ok();
        let (what, id) = match &inner {
            Some(Row::Register { id, .. } | Row::Plain { id, .. }) => {
                ("register", Some(id.clone()))
            }
            Some(Row::Free { id, .. }) => ("free", Some(id.clone())),
            _ => ("signed", None),
        };
        let refuse = |cause: RejectReason, reason: &str, fingerprint: Option<Fingerprint>| {
            Verdict::Refuse(Refusal {
                what,
                id: id.clone(),
                reason: reason.to_string(),
                fingerprint,
                cause,
            })
        };
        let Some(session) = &mut self.session else {
            return refuse(
                RejectReason::BadSignature,
                "signed row on a connection that has not authenticated",
                None,
            );
        };
        let fingerprint = Some(session.fingerprint.clone());
        if !session.key.verify(seq, text, mac) {
            return refuse(
                RejectReason::BadSignature,
                "bad signature (tampered, or signed for another connection)",
                fingerprint,
            );
        }
        if seq <= session.last_seq {
            return refuse(
                RejectReason::BadSignature,
                "replayed (sequence number already used)",
                fingerprint,
            );
        }
        session.last_seq = seq;
        if !policy.admits(&session.fingerprint) {
            return refuse(
                RejectReason::Unauthorized,
                "key no longer authorized",
                fingerprint,
            );
        }
        match inner {
            Some(
                row @ (Row::Register { .. }
                | Row::Plain { .. }
                | Row::Free { .. }
                | Row::Beat { .. }),
            ) => Verdict::Apply(row, policy.writer(&session.fingerprint)),
            _ => refuse(
                RejectReason::BadSignature,
                "a signed row must hold a register, free or beat row",
                fingerprint,
            ),
        }
    }
}

fn kind(row: &Row) -> &'static str {
    match row {
        Row::Free { .. } => "free",
        _ => "register",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::auth::sign_challenge;
    use crate::protocol::keys::Keypair;

    /// The policy of a hub that authorizes `keys`.
    fn policy<const N: usize>(keys: [rsa::PublicKey; N]) -> Policy {
        Policy {
            authorized: Authorized::new(keys),
            ..Policy::default()
        }
    }

    fn authenticated(pair: &Keypair, authorized: &Policy) -> (Guard, SessionKey) {
        let mut guard = Guard::new("CHALLENGE".into());
        let sig = sign_challenge(pair, "CHALLENGE").unwrap();
        let Verdict::Reply(Row::Session {
            sealed,
            fingerprint,
        }) = guard.check(
            Row::Auth {
                public: pair.public_pem(),
                signature: sig,
            },
            authorized,
        )
        else {
            panic!("authorized key refused");
        };
        assert_eq!(fingerprint, pair.fingerprint().to_string());
        (guard, SessionKey::open(pair, &sealed).unwrap())
    }

    fn signed(key: &SessionKey, seq: u64, row: &str) -> Row {
        Row::decode(&key.sign_row(seq, row.as_bytes())).unwrap()
    }

    const REG: &str = r#"["register","A",{"role":"web","port":80}]"#;

    #[test]
    fn a_secured_hub_counts_only_signed_beats() {
        let pair = crate::protocol::keys::test_pair("alice");
        let authorized = policy([pair.public().clone()]);
        let beat = r#"["beat","HUB",1,200]"#;
        let mut plain = Guard::new("C".into());
        assert_eq!(
            plain.check(Row::decode(beat.as_bytes()).unwrap(), &authorized),
            Verdict::Ignore
        );
        let (mut guard, key) = authenticated(&pair, &authorized);
        assert!(matches!(
            guard.check(signed(&key, 1, beat), &authorized),
            Verdict::Apply(Row::Beat { .. }, _)
        ));
    }

    #[test]
    fn an_open_hub_applies_plain_writes() {
        let mut guard = Guard::new("C".into());
        let row = Row::decode(REG.as_bytes()).unwrap();
        assert_eq!(
            guard.check(row.clone(), &Policy::default()),
            Verdict::Apply(row, Writer::default())
        );
    }

    #[test]
    fn a_secured_hub_takes_only_signed_writes_from_listed_keys() {
        let pair = crate::protocol::keys::test_pair("alice");
        let stranger = crate::protocol::keys::test_pair("bob");
        let authorized = policy([pair.public().clone()]);
        let mut plain = Guard::new("C".into());
        let Verdict::Refuse(r) = plain.check(Row::decode(REG.as_bytes()).unwrap(), &authorized)
        else {
            panic!("unsigned write accepted");
        };
        assert_eq!((r.what, r.id.as_deref()), ("register", Some("A")));

        let (mut guard, key) = authenticated(&pair, &authorized);
        assert!(matches!(
            guard.check(signed(&key, 1, REG), &authorized),
            Verdict::Apply(..)
        ));
        // Replay on the same connection.
        let Verdict::Refuse(r) = guard.check(signed(&key, 1, REG), &authorized) else {
            panic!("replay accepted");
        };
        assert!(r.reason.contains("replayed"));
        // Tampered text.
        let Row::Signed { mac, .. } = signed(&key, 2, REG) else {
            unreachable!()
        };
        let tampered = Row::Signed {
            seq: 2,
            text: REG.replace("80", "81"),
            mac,
        };
        let Verdict::Refuse(r) = guard.check(tampered, &authorized) else {
            panic!("tampered row accepted");
        };
        assert!(r.reason.contains("bad signature"));
        // The same signed row on another authenticated connection.
        let (mut other, _) = authenticated(&pair, &authorized);
        assert!(matches!(
            other.check(signed(&key, 5, REG), &authorized),
            Verdict::Refuse(_)
        ));
        // On a connection that never authenticated.
        assert!(matches!(
            Guard::new("C".into()).check(signed(&key, 6, REG), &authorized),
            Verdict::Refuse(_)
        ));
        // A key that is not listed.
        let mut g = Guard::new("C".into());
        let sig = sign_challenge(&stranger, "C").unwrap();
        let Verdict::Refuse(r) = g.check(
            Row::Auth {
                public: stranger.public_pem(),
                signature: sig,
            },
            &authorized,
        ) else {
            panic!("stranger accepted");
        };
        assert_eq!(r.fingerprint.as_ref(), Some(stranger.fingerprint()));
        // A key removed from the list can no longer write.
        let Verdict::Refuse(r) =
            guard.check(signed(&key, 9, REG), &policy([stranger.public().clone()]))
        else {
            panic!("rotated-out key accepted");
        };
        assert!(r.reason.contains("no longer authorized"));
    }

    #[test]
    fn a_signature_of_another_challenge_is_refused() {
        let pair = crate::protocol::keys::test_pair("alice");
        let authorized = policy([pair.public().clone()]);
        let mut guard = Guard::new("MINE".into());
        let sig = sign_challenge(&pair, "SOMEONE ELSES").unwrap();
        let verdict = guard.check(
            Row::Auth {
                public: pair.public_pem(),
                signature: sig,
            },
            &authorized,
        );
        assert!(matches!(
            verdict,
            Verdict::Refuse(Refusal { what: "auth", .. })
        ));
    }
}
