//! The signed mode's cryptography, as pure functions both sides use.
//!
//! A hub sends each connection a random challenge. A client proves it holds a
//! private key by signing the challenge (RSASSA-PSS, SHA-256). The hub answers with
//! a fresh 32-byte session key encrypted to that public key (RSA-OAEP, SHA-256), so
//! only the key holder can read it. Every write then travels as the exact JSON text
//! of the row with a sequence number and an HMAC-SHA256 under the session key: a
//! tampered row fails the MAC, a row replayed on another connection or hub fails it
//! too (another session key), and a row replayed on the same connection fails the
//! sequence check. One RSA operation per connection, one HMAC per row.

use crate::protocol::keys::Keypair;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use rsa::PublicKey;
use sha2::Sha256;

/// Domain separation for challenge signatures.
const AUTH_CONTEXT: &[u8] = b"seaport auth v1\n";
/// Domain separation for a hub's proof of its key, so that a client's
/// signature can never pass for a hub's, nor the other way round.
const HUB_CONTEXT: &[u8] = b"seaport hub v1\n";
/// Domain separation for row MACs.
const ROW_CONTEXT: &[u8] = b"seaport row v1\n";

/// A step of the signed mode that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The session key could not be encrypted to the client's key.
    #[error("cannot encrypt the session key: {0}")]
    Seal(String),
    /// The sealed session key is not base64.
    #[error("session key is not base64")]
    NotBase64,
    /// The sealed session key is not for this key.
    #[error("cannot decrypt the session key (not for this key)")]
    NotOurs,
    /// The session key does not have 32 bytes.
    #[error("session key has the wrong length")]
    WrongLength,
    /// The challenge could not be signed.
    #[error("cannot sign the challenge: {0}")]
    Sign(String),
}

/// A per-connection secret shared by a hub and an authenticated client.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A fresh random key.
    pub fn generate() -> SessionKey {
        SessionKey(rand::random())
    }

    /// Encrypts the key to `public` for the `session` row (base64).
    pub fn seal(&self, public: &PublicKey) -> Result<String, AuthError> {
        public
            .oaep_encrypt::<Sha256>(&self.0)
            .map(|sealed| STANDARD.encode(sealed))
            .map_err(|e| AuthError::Seal(e.to_string()))
    }

    /// Decrypts a key sealed to `pair`.
    pub fn open(pair: &Keypair, sealed: &str) -> Result<SessionKey, AuthError> {
        let bytes = STANDARD.decode(sealed).map_err(|_| AuthError::NotBase64)?;
        let plain = pair
            .private()
            .oaep_decrypt::<Sha256>(&bytes)
            .map_err(|_| AuthError::NotOurs)?;
        let key: [u8; 32] = plain.try_into().map_err(|_| AuthError::WrongLength)?;
        Ok(SessionKey(key))
    }

    /// The MAC of row `text` sent with sequence number `seq` (base64).
    pub fn mac(&self, seq: u64, text: &str) -> String {
        STANDARD.encode(self.hmac(seq, text).finalize().into_bytes())
    }

    /// Whether `mac` is the MAC of `text` at `seq` (constant-time comparison).
    pub fn verify(&self, seq: u64, text: &str, mac: &str) -> bool {
        match STANDARD.decode(mac) {
            Ok(mac) => self.hmac(seq, text).verify_slice(&mac).is_ok(),
            Err(_) => false,
        }
    }

    fn hmac(&self, seq: u64, text: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so a 32-byte key is always accepted.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts 32-byte keys"));
        mac.update(ROW_CONTEXT);
        mac.update(seq.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(text.as_bytes());
        mac
    }

    /// Wraps an encoded row (with or without its newline) as
    /// `["signed", SEQ, TEXT, MAC]\n`.
    pub fn sign_row(&self, seq: u64, row: &[u8]) -> Bytes {
        let text = String::from_utf8_lossy(row.strip_suffix(b"\n").unwrap_or(row));
        let mac = self.mac(seq, &text);
        let mut line = serde_json::to_vec(&("signed", seq, text.as_ref(), mac)).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// A random challenge for a new connection (base64 of 32 bytes).
pub fn new_challenge() -> String {
    STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Signs a hub's challenge (base64 signature).
pub fn sign_challenge(pair: &Keypair, challenge: &str) -> Result<String, AuthError> {
    sign(pair, AUTH_CONTEXT, challenge)
}

/// Whether `signature` proves that the holder of `public`'s private key signed
/// `challenge`.
pub fn verify_challenge(public: &PublicKey, challenge: &str, signature: &str) -> bool {
    verify(public, AUTH_CONTEXT, challenge, signature)
}

/// A hub's proof that it holds its key: its signature of a client's nonce.
pub fn sign_hub_proof(pair: &Keypair, nonce: &str) -> Result<String, AuthError> {
    sign(pair, HUB_CONTEXT, nonce)
}

/// Whether `signature` is the holder of `public` proving itself a hub for
/// `nonce`.
pub fn verify_hub_proof(public: &PublicKey, nonce: &str, signature: &str) -> bool {
    verify(public, HUB_CONTEXT, nonce, signature)
}

fn sign(pair: &Keypair, context: &[u8], text: &str) -> Result<String, AuthError> {
    let mut message = context.to_vec();
    message.extend_from_slice(text.as_bytes());
    pair.private()
        .pss_sign::<Sha256>(&message)
        .map(|sig| STANDARD.encode(sig))
        .map_err(|e| AuthError::Sign(e.to_string()))
}

fn verify(public: &PublicKey, context: &[u8], text: &str, signature: &str) -> bool {
    let Ok(sig) = STANDARD.decode(signature) else {
        return false;
    };
    let mut message = context.to_vec();
    message.extend_from_slice(text.as_bytes());
    public.pss_verify::<Sha256>(&message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::Row;

    #[test]
    fn the_whole_handshake_and_a_signed_row() {
        let pair = crate::protocol::keys::test_pair("alice");
        let other = crate::protocol::keys::test_pair("bob");
        let challenge = new_challenge();
        let sig = sign_challenge(&pair, &challenge).unwrap();
        assert!(verify_challenge(pair.public(), &challenge, &sig));
        assert!(
            !verify_challenge(other.public(), &challenge, &sig),
            "wrong key"
        );
        assert!(
            !verify_challenge(pair.public(), &new_challenge(), &sig),
            "other challenge"
        );

        let key = SessionKey::generate();
        let sealed = key.seal(pair.public()).unwrap();
        assert_eq!(SessionKey::open(&pair, &sealed).unwrap(), key);
        assert!(SessionKey::open(&other, &sealed).is_err());

        let line = key.sign_row(7, b"[\"free\",\"ID\"]\n");
        let Ok(Row::Signed { seq, text, mac }) = Row::decode(&line) else {
            panic!("a signed row decodes");
        };
        assert_eq!((seq, text.as_str()), (7, "[\"free\",\"ID\"]"));
        assert!(key.verify(7, &text, &mac));
        assert!(!key.verify(8, &text, &mac), "another sequence number");
        assert!(!key.verify(7, "[\"free\",\"XX\"]", &mac), "tampered");
        assert!(
            !SessionKey::generate().verify(7, &text, &mac),
            "another session"
        );
        assert!(!key.verify(7, &text, "not base64!"));
    }
}
