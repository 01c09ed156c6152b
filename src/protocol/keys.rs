//! RSA keys: generating keypairs in the rsa-json layout the Node ecosystem uses,
//! loading keypairs and authorized public keys from the files people have
//! (rsa-json, `openssl genrsa`, `openssl rsa -RSAPublicKey_out`, PKCS#8, SPKI),
//! and naming keys by fingerprint.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rsa::pkcs1::{
    DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey, EncodeRsaPublicKey,
};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{PrivateKey, PublicKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Smallest RSA key accepted, in modulus bits, for every key: generated,
/// loaded, authorized, or presented by a client. Smaller keys can be factored
/// with resources within reach (NIST has not allowed them since 2013).
pub const MIN_BITS: usize = 2048;

/// A key file that cannot be used, with the file and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

fn key_error(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A public key's name: `SHA256:` and the unpadded base64 of the SHA-256 of its
/// PKCS#1 DER encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of `key`.
    pub fn of(key: &PublicKey) -> Fingerprint {
        let der = key
            .to_pkcs1_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default();
        Fingerprint(format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(&der))
        ))
    }

    /// As text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A private key with its public half.
#[derive(Clone)]
pub struct Keypair {
    private: PrivateKey,
    public: PublicKey,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        write!(f, "Keypair({})", self.fingerprint)
    }
}

impl Keypair {
    /// Generates a new keypair of `bits` bits (public exponent 65537).
    pub fn generate(bits: usize) -> Result<Keypair, String> {
        if bits < MIN_BITS {
            return Err(format!(
                "a {bits}-bit key is too small: seaport needs RSA keys of at least {MIN_BITS} bits"
            ));
        }
        let private = PrivateKey::new(&mut crypto_common::getrandom::SysRng, bits)
            .map_err(|e| format!("cannot generate a {bits}-bit key: {e}"))?;
        Ok(Keypair::from_private(private))
    }

    fn from_private(private: PrivateKey) -> Keypair {
        let public = private.to_public_key();
        let fingerprint = Fingerprint::of(&public);
        Keypair {
            private,
            public,
            fingerprint,
        }
    }

    /// Loads a keypair: an rsa-json file (`{"public": PEM, "private": PEM}`) or a PEM
    /// private key (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`).
    pub fn load(path: &Path) -> Result<Keypair, KeyError> {
        let text = read(path)?;
        let (private_pem, public_pem) = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => match map.get("private") {
                Some(Value::String(pem)) => (
                    pem.clone(),
                    map.get("public").and_then(Value::as_str).map(String::from),
                ),
                _ => {
                    return Err(key_error(
                        path,
                        "has no \"private\" key (expected {\"public\": PEM, \"private\": PEM})",
                    ));
                }
            },
            Ok(_) => return Err(key_error(path, "is JSON but not a keypair object")),
            Err(_) => (text, None),
        };
        let private = parse_private(&private_pem).map_err(|e| key_error(path, e))?;
        let pair = Keypair::from_private(private);
        // An rsa-json file also states the public key: it must be this key's.
        if let Some(public) = public_pem {
            let stated =
                parse_public(&public).map_err(|e| key_error(path, format!("public: {e}")))?;
            if Fingerprint::of(&stated) != pair.fingerprint {
                return Err(key_error(
                    path,
                    "the public key does not belong to the private key",
                ));
            }
        }
        warn_if_loose(path, true);
        Ok(pair)
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The private half.
    pub fn private(&self) -> &PrivateKey {
        &self.private
    }

    /// The public key's fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The public key as PKCS#1 PEM (`RSA PUBLIC KEY`).
    pub fn public_pem(&self) -> String {
        public_pem(&self.public)
    }

    /// `{"public": PEM, "private": PEM}` with PKCS#1 PEMs, as rsa-json writes them.
    pub fn to_json(&self) -> String {
        let private = self
            .private
            .to_pkcs1_pem(Default::default())
            .map(|p| p.to_string())
            .unwrap_or_default();
        let json = serde_json::json!({ "public": self.public_pem(), "private": private });
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }
}

/// A public key as PKCS#1 PEM.
pub fn public_pem(key: &PublicKey) -> String {
    key.to_pkcs1_pem(Default::default()).unwrap_or_default()
}

/// Parses a PEM public key: PKCS#1 (`RSA PUBLIC KEY`) or SPKI (`PUBLIC KEY`).
pub fn parse_public(pem: &str) -> Result<PublicKey, String> {
    let pem = pem.trim();
    big_enough(pem)?;
    if pem.contains("BEGIN RSA PUBLIC KEY") {
        PublicKey::from_pkcs1_pem(pem).map_err(|e| format!("bad RSA PUBLIC KEY: {e}"))
    } else if pem.contains("BEGIN PUBLIC KEY") {
        PublicKey::from_public_key_pem(pem).map_err(|e| format!("bad PUBLIC KEY: {e}"))
    } else {
        Err("not a PEM public key (expected RSA PUBLIC KEY or PUBLIC KEY)".into())
    }
}

fn parse_private(pem: &str) -> Result<PrivateKey, String> {
    let pem = pem.trim();
    big_enough(pem)?;
    if pem.contains("BEGIN RSA PRIVATE KEY") {
        PrivateKey::from_pkcs1_pem(pem).map_err(|e| format!("bad RSA PRIVATE KEY: {e}"))
    } else if pem.contains("BEGIN PRIVATE KEY") {
        PrivateKey::from_pkcs8_pem(pem).map_err(|e| format!("bad PRIVATE KEY: {e}"))
    } else if pem.contains("ENCRYPTED") {
        Err("encrypted private keys are not supported; decrypt it with openssl first".into())
    } else {
        Err("not a PEM private key (expected RSA PRIVATE KEY or PRIVATE KEY)".into())
    }
}

/// Refuses a key smaller than [`MIN_BITS`], naming its size, before the RSA
/// library refuses it as malformed (it takes nothing under 1024 bits).
fn big_enough(pem: &str) -> Result<(), String> {
    match modulus_bits(pem) {
        Some(bits) if bits < MIN_BITS => Err(format!(
            "a {bits}-bit key is too small: seaport needs RSA keys of at least {MIN_BITS} bits"
        )),
        _ => Ok(()),
    }
}

/// The size in bits of the modulus of the RSA key in `pem` (any of the four PEM
/// kinds), read from the key's structure alone; `None` if it does not parse.
fn modulus_bits(pem: &str) -> Option<usize> {
    use rsa::pkcs1::der::{Decode, Document};
    use rsa::pkcs1::{RsaPrivateKeyRef, RsaPublicKeyRef};
    use rsa::pkcs8::PrivateKeyInfoRef;
    use rsa::pkcs8::spki::SubjectPublicKeyInfoRef;
    let (label, doc) = Document::from_pem(pem).ok()?;
    let der = doc.as_bytes();
    let modulus = |pkcs1_private: &[u8]| -> Option<usize> {
        RsaPrivateKeyRef::from_der(pkcs1_private)
            .ok()
            .map(|key| bit_length(key.modulus.as_bytes()))
    };
    match label {
        "RSA PUBLIC KEY" => RsaPublicKeyRef::from_der(der)
            .ok()
            .map(|key| bit_length(key.modulus.as_bytes())),
        "PUBLIC KEY" => {
            let info = SubjectPublicKeyInfoRef::from_der(der).ok()?;
            let key = RsaPublicKeyRef::from_der(info.subject_public_key.as_bytes()?).ok()?;
            Some(bit_length(key.modulus.as_bytes()))
        }
        "RSA PRIVATE KEY" => modulus(der),
        "PRIVATE KEY" => modulus(
            PrivateKeyInfoRef::from_der(der)
                .ok()?
                .private_key
                .as_bytes(),
        ),
        _ => None,
    }
}

/// Bits of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> usize {
    let bytes = &bytes[bytes.iter().take_while(|b| **b == 0).count()..];
    match bytes.first() {
        Some(first) => bytes.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// What is wrong with who may use `path`, a key file or a directory of them:
/// another user who can write it can put a key of their own in; one who can
/// read a `private` key can sign as its holder. `None` when it is only the
/// owner's (or cannot be looked at: reading it will say why).
pub fn loose_permissions(path: &Path, private: bool) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "{} can be written by other users (mode {mode:03o}): they could put their own key in; chmod go-w",
            path.display()
        ));
    }
    if private && mode & 0o077 != 0 {
        return Some(format!(
            "{} holds a private key that other users can read (mode {mode:03o}); chmod 600",
            path.display()
        ));
    }
    None
}

/// Logs what [`loose_permissions`] finds.
fn warn_if_loose(path: &Path, private: bool) {
    if let Some(warning) = loose_permissions(path, private) {
        tracing::warn!("{warning}");
    }
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|e| key_error(path, format!("cannot read: {e}")))
}

/// What a key file given to `seaport listen` holds.
#[derive(Debug)]
pub enum KeyFile {
    /// Authorized public keys (a JSON array of PEMs, or public key files).
    Authorized(Vec<PublicKey>),
    /// The hub's own keypair.
    Keypair(Box<Keypair>),
}

/// Reads a file as `seaport listen` does: a JSON array is a list of authorized
/// public keys; a JSON object or PEM private key is the hub's own keypair; a PEM
/// public key is one authorized key.
pub fn load_key_file(path: &Path) -> Result<KeyFile, KeyError> {
    let text = read(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => {
            let mut keys = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let Value::String(pem) = item else {
                    return Err(key_error(path, format!("entry {i} is not a PEM string")));
                };
                keys.push(
                    parse_public(pem).map_err(|e| key_error(path, format!("entry {i}: {e}")))?,
                );
            }
            Ok(KeyFile::Authorized(keys))
        }
        Ok(Value::Object(_)) => Keypair::load(path).map(|k| KeyFile::Keypair(Box::new(k))),
        Ok(_) => Err(key_error(
            path,
            "is JSON but neither a list of keys nor a keypair",
        )),
        Err(_) if text.contains("PRIVATE KEY") => {
            Keypair::load(path).map(|k| KeyFile::Keypair(Box::new(k)))
        }
        Err(_) => parse_public(&text)
            .map(|k| KeyFile::Authorized(vec![k]))
            .map_err(|e| key_error(path, e)),
    }
}

/// The set of public keys allowed to write. Empty means everyone may.
#[derive(Debug, Clone, Default)]
pub struct Authorized {
    keys: BTreeMap<Fingerprint, PublicKey>,
}

impl Authorized {
    /// A set of keys.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Authorized {
            keys: keys.into_iter().map(|k| (Fingerprint::of(&k), k)).collect(),
        }
    }

    /// Loads authorized keys from files and directories: each file as
    /// [`load_key_file`] reads it (a keypair contributes its public key); each
    /// directory contributes its `*.json`, `*.pem` and `*.pub` files.
    pub fn load(sources: &[PathBuf]) -> Result<Authorized, KeyError> {
        let mut keys = Vec::new();
        for source in sources {
            warn_if_loose(source, false);
            let files = if source.is_dir() {
                let entries = std::fs::read_dir(source)
                    .map_err(|e| key_error(source, format!("cannot read directory: {e}")))?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("json" | "pem" | "pub")
                            )
                    })
                    .collect();
                files.sort();
                files
            } else {
                vec![source.clone()]
            };
            for file in files {
                if file != *source {
                    warn_if_loose(&file, false);
                }
                match load_key_file(&file)? {
                    KeyFile::Authorized(list) => keys.extend(list),
                    KeyFile::Keypair(pair) => keys.push(pair.public().clone()),
                }
            }
        }
        Ok(Authorized::new(keys))
    }

    /// Every key of both lists.
    pub fn union(mut self, other: Authorized) -> Authorized {
        self.keys.extend(other.keys);
        self
    }

    /// Whether no key is listed, which leaves the hub open to every writer.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the key with this fingerprint may write.
    pub fn allows(&self, fingerprint: &Fingerprint) -> bool {
        self.keys.contains_key(fingerprint)
    }

    /// Whether the key with this fingerprint, as text, is in the set.
    pub fn allows_text(&self, fingerprint: &str) -> bool {
        self.keys
            .contains_key(&Fingerprint(fingerprint.to_string()))
    }
}

/// A committed test keypair (`alice`, `bob` or `mallory`): loading one is
/// instant, generating a 2048-bit key is not.
#[cfg(test)]
pub(crate) fn test_pair(name: &str) -> Keypair {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(format!("{name}.json"));
    Keypair::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_others_may_change_or_read_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key.json");
        std::fs::write(&file, "{}").unwrap();
        let set = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(&file, 0o600);
        assert_eq!(loose_permissions(&file, true), None);
        set(&file, 0o644);
        assert_eq!(
            loose_permissions(&file, false),
            None,
            "public keys may be read"
        );
        let read = loose_permissions(&file, true).unwrap();
        assert!(read.contains("other users can read (mode 644)"), "{read}");
        set(&file, 0o666);
        let written = loose_permissions(&file, false).unwrap();
        assert!(
            written.contains("written by other users (mode 666)"),
            "{written}"
        );
        set(dir.path(), 0o777);
        assert!(loose_permissions(dir.path(), false).is_some());
        set(dir.path(), 0o755);
        assert_eq!(loose_permissions(dir.path(), false), None);
    }
    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};

    #[test]
    fn a_key_under_2048_bits_is_refused_with_its_size() {
        let small = PrivateKey::new(&mut crypto_common::getrandom::SysRng, 1024).unwrap();
        let public = small.to_public_key();
        let pems = [
            public.to_pkcs1_pem(Default::default()).unwrap(),
            public.to_public_key_pem(Default::default()).unwrap(),
            small.to_pkcs1_pem(Default::default()).unwrap().to_string(),
            small.to_pkcs8_pem(Default::default()).unwrap().to_string(),
        ];
        let expected = "a 1024-bit key is too small: seaport needs RSA keys of at least 2048 bits";
        assert_eq!(parse_public(&pems[0]).unwrap_err(), expected);
        assert_eq!(parse_public(&pems[1]).unwrap_err(), expected);
        assert_eq!(parse_private(&pems[2]).unwrap_err(), expected);
        assert_eq!(parse_private(&pems[3]).unwrap_err(), expected);
        assert!(
            Keypair::generate(1024)
                .unwrap_err()
                .contains("at least 2048 bits")
        );
        // A 2048-bit key, in each form, is measured as such.
        let pair = test_pair("alice");
        assert_eq!(modulus_bits(&pair.public_pem()), Some(2048));
        let spki = pair.public().to_public_key_pem(Default::default()).unwrap();
        assert_eq!(modulus_bits(&spki), Some(2048));
        assert_eq!(bit_length(&[0, 0x01, 0xff]), 9);
    }

    #[test]
    fn generated_keys_round_trip_through_rsa_json() {
        let pair = test_pair("bob");
        let json = pair.to_json();
        let value: Value = serde_json::from_str(&json).unwrap();
        assert!(
            value["public"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN RSA PUBLIC KEY-----")
        );
        assert!(
            value["private"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN RSA PRIVATE KEY-----")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        std::fs::write(&path, &json).unwrap();
        let loaded = Keypair::load(&path).unwrap();
        assert_eq!(loaded.fingerprint(), pair.fingerprint());
        assert!(pair.fingerprint().as_str().starts_with("SHA256:"));
        let Ok(KeyFile::Keypair(_)) = load_key_file(&path) else {
            panic!("a keypair file reads as a keypair");
        };
        let list = dir.path().join("list.json");
        std::fs::write(&list, serde_json::to_string(&[pair.public_pem()]).unwrap()).unwrap();
        let authorized = Authorized::load(&[list]).unwrap();
        assert!(authorized.allows(pair.fingerprint()));
        assert_eq!(
            Authorized::load(&[dir.path().to_path_buf()]).unwrap().len(),
            1
        );
    }

    #[test]
    fn bad_files_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"public\": \"x\"}").unwrap();
        let err = Keypair::load(&bad).unwrap_err();
        assert_eq!(err.path, bad.display().to_string());
        assert!(err.reason.contains("\"private\""), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        assert!(
            load_key_file(&junk)
                .unwrap_err()
                .to_string()
                .starts_with(&junk.display().to_string())
        );
        let list = dir.path().join("list.json");
        std::fs::write(
            &list,
            "[\"-----BEGIN RSA PUBLIC KEY-----\\nAAAA\\n-----END RSA PUBLIC KEY-----\"]",
        )
        .unwrap();
        assert!(load_key_file(&list).unwrap_err().reason.contains("entry 0"));
        assert!(
            Keypair::load(&dir.path().join("missing.json"))
                .unwrap_err()
                .reason
                .contains("cannot read")
        );
    }
}
