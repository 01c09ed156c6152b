//! Who may write: each connection's authentication state, deciding for every row
//! whether it is applied, answered, refused or ignored. Reads are never gated.

use crate::protocol::auth::{SessionKey, verify_challenge};
use crate::protocol::keys::{Authorized, Fingerprint, parse_public};
use crate::protocol::wire::Row;

/// What to do with a row.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// A write to apply.
    Apply(Row),
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

    /// Decides what `row` may do under the current authorized list.
    pub(crate) fn check(&mut self, row: Row, authorized: &Authorized) -> Verdict {
        match row {
            Row::Register { ref id, .. } | Row::Free { ref id, .. } if !authorized.is_open() => {
                Verdict::Refuse(Refusal {
                    what: kind(&row),
                    id: Some(id.clone()),
                    reason: "not signed: this hub takes writes only from authorized keys".into(),
                    fingerprint: None,
                })
            }
            Row::Register { .. } | Row::Free { .. } => Verdict::Apply(row),
            // A hub's liveness decides when its records go: with keys, only a
            // signed beat counts (peer links sign everything they send).
            Row::Beat { .. } if !authorized.is_open() => Verdict::Ignore,
            // Liveness of hubs and the end of a dump carry no record.
            Row::Beat { .. } | Row::Synced => Verdict::Apply(row),
            Row::Auth { public, signature } => self.authenticate(&public, &signature, authorized),
            Row::Signed { seq, text, mac } => self.open_signed(seq, &text, &mac, authorized),
            _ => Verdict::Ignore,
        }
    }

    fn authenticate(&mut self, public: &str, signature: &str, authorized: &Authorized) -> Verdict {
        let refuse = |reason: String, fingerprint: Option<Fingerprint>| {
            Verdict::Refuse(Refusal {
                what: "auth",
                id: None,
                reason,
                fingerprint,
            })
        };
        let key = match parse_public(public) {
            Ok(key) => key,
            Err(e) => return refuse(format!("bad public key: {e}"), None),
        };
        let fingerprint = Fingerprint::of(&key);
        if !authorized.is_open() && !authorized.allows(&fingerprint) {
            return refuse("key not authorized".into(), Some(fingerprint));
        }
        if !verify_challenge(&key, &self.challenge, signature) {
            return refuse("bad signature of the challenge".into(), Some(fingerprint));
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

    fn open_signed(&mut self, seq: u64, text: &str, mac: &str, authorized: &Authorized) -> Verdict {
        let inner = Row::decode(text.as_bytes()).ok();
        let (what, id) = match &inner {
            Some(Row::Register { id, .. }) => ("register", Some(id.clone())),
            Some(Row::Free { id, .. }) => ("free", Some(id.clone())),
            _ => ("signed", None),
        };
        let refuse = |reason: &str, fingerprint: Option<Fingerprint>| {
            Verdict::Refuse(Refusal {
                what,
                id: id.clone(),
                reason: reason.to_string(),
                fingerprint,
            })
        };
        let Some(session) = &mut self.session else {
            return refuse(
                "signed row on a connection that has not authenticated",
                None,
            );
        };
        let fingerprint = Some(session.fingerprint.clone());
        if !session.key.verify(seq, text, mac) {
            return refuse(
                "bad signature (tampered, or signed for another connection)",
                fingerprint,
            );
        }
        if seq <= session.last_seq {
            return refuse("replayed (sequence number already used)", fingerprint);
        }
        session.last_seq = seq;
        if !authorized.is_open() && !authorized.allows(&session.fingerprint) {
            return refuse("key no longer authorized", fingerprint);
        }
        match inner {
            Some(row @ (Row::Register { .. } | Row::Free { .. } | Row::Beat { .. })) => {
                Verdict::Apply(row)
            }
            _ => refuse(
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

    fn authenticated(pair: &Keypair, authorized: &Authorized) -> (Guard, SessionKey) {
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
        let authorized = Authorized::new([pair.public().clone()]);
        let beat = r#"["beat","HUB",1,200]"#;
        let mut plain = Guard::new("C".into());
        assert_eq!(
            plain.check(Row::decode(beat.as_bytes()).unwrap(), &authorized),
            Verdict::Ignore
        );
        let (mut guard, key) = authenticated(&pair, &authorized);
        assert!(matches!(
            guard.check(signed(&key, 1, beat), &authorized),
            Verdict::Apply(Row::Beat { .. })
        ));
    }

    #[test]
    fn an_open_hub_applies_plain_writes() {
        let mut guard = Guard::new("C".into());
        let row = Row::decode(REG.as_bytes()).unwrap();
        assert_eq!(
            guard.check(row.clone(), &Authorized::default()),
            Verdict::Apply(row)
        );
    }

    #[test]
    fn a_secured_hub_takes_only_signed_writes_from_listed_keys() {
        let pair = crate::protocol::keys::test_pair("alice");
        let stranger = crate::protocol::keys::test_pair("bob");
        let authorized = Authorized::new([pair.public().clone()]);
        let mut plain = Guard::new("C".into());
        let Verdict::Refuse(r) = plain.check(Row::decode(REG.as_bytes()).unwrap(), &authorized)
        else {
            panic!("unsigned write accepted");
        };
        assert_eq!((r.what, r.id.as_deref()), ("register", Some("A")));

        let (mut guard, key) = authenticated(&pair, &authorized);
        assert!(matches!(
            guard.check(signed(&key, 1, REG), &authorized),
            Verdict::Apply(_)
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
        let Verdict::Refuse(r) = guard.check(
            signed(&key, 9, REG),
            &Authorized::new([stranger.public().clone()]),
        ) else {
            panic!("rotated-out key accepted");
        };
        assert!(r.reason.contains("no longer authorized"));
    }

    #[test]
    fn a_signature_of_another_challenge_is_refused() {
        let pair = crate::protocol::keys::test_pair("alice");
        let authorized = Authorized::new([pair.public().clone()]);
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
