//! The line protocol: one JSON array ("row") per line, as spoken by seaport 2.x.
//!
//! This module is pure: it turns a line of bytes into a [`Row`] or a [`WireError`]
//! that says exactly what was wrong, and turns rows back into lines. It knows nothing
//! of sockets. Unknown row types decode to [`Row::Other`] so that extensions can be
//! added without breaking older peers (the Node implementation ignores them too);
//! trailing array elements beyond the ones a row defines are ignored for the same
//! reason.

use crate::protocol::metadata::PlainRow;
use crate::protocol::owner::Holder;
use crate::protocol::stamp::Stamp;
use bytes::Bytes;
use serde_json::{Map, Value};
use thiserror::Error;

/// Record metadata: a JSON object (`role`, `version`, `host`, `port`, `id`, and any
/// user keys, in the order they were given).
pub type Meta = Map<String, Value>;

/// How many keys a metadata object may have for [`field`] to scan them.
const SCAN_KEYS: usize = 16;

/// The value of one metadata key.
///
/// A record's metadata is a handful of keys, and comparing them in turn is
/// several times cheaper than hashing the key with the map's SipHash, which
/// a hub did a dozen times for every register row; larger objects are
/// looked up by hash. Keys are unique (a duplicate key's last value replaces
/// the first), so the first match is the only one.
pub fn field<'a>(meta: &'a Meta, key: &str) -> Option<&'a Value> {
    if meta.len() <= SCAN_KEYS {
        meta.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        meta.get(key)
    }
}

/// A metadata key's value when it is a string.
pub fn text<'a>(meta: &'a Meta, key: &str) -> Option<&'a str> {
    field(meta, key).and_then(Value::as_str)
}

/// The `port` key when it is a port number.
pub fn port(meta: &Meta) -> Option<u16> {
    field(meta, "port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
}

/// The object `value` holds as metadata (an empty one for anything else), for
/// tests that write metadata with `json!`.
#[cfg(test)]
pub(crate) fn meta_of(value: Value) -> Meta {
    match value {
        Value::Object(meta) => meta,
        _ => Meta::new(),
    }
}

/// Deepest nesting of arrays and objects accepted in one line, the row itself included.
pub const MAX_DEPTH: usize = 64;

/// One decoded protocol row.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// `["helo", ADDR, HUB?, HEARTBEAT_MS?]`: sent by a hub first; the address it
    /// sees for the peer, and, from our hub, its id and how often it sends
    /// heartbeats.
    Helo {
        /// The peer's address as the hub sees it.
        addr: String,
        /// The hub's id (the origin of the records its clients write).
        hub: Option<String>,
        /// The hub's heartbeat interval, in milliseconds.
        heartbeat_ms: Option<u64>,
    },
    /// `["register", ID, META, EXT?]`: a record exists (new or updated).
    Register {
        /// The record id.
        id: String,
        /// The record's metadata object.
        meta: Meta,
        /// Its version, owner and proof of ownership, where they travel.
        ext: Ext,
    },
    /// `["register", ID, META, EXT?]` whose metadata names the id and a
    /// host, as [`Row::decode_keeping`] reads it: what a hub stores and
    /// forwards as it arrived. Its metadata is read in place (see
    /// [`PlainRow`]); the extension element is read, and kept out of the
    /// row, so that no such element is passed on unchecked.
    Plain {
        /// The record id.
        id: String,
        /// The row without its extension element, its protocol keys found
        /// in place.
        row: PlainRow,
        /// Its version, owner and proof of ownership, where they travel.
        ext: Ext,
    },
    /// `["free", ID, EXT?]`: the record is gone.
    Free {
        /// The record id.
        id: String,
        /// The version it frees, and the proof of ownership, where they travel.
        ext: Ext,
    },
    /// `["beat", ORIGIN, V, PERIOD_MS]`: hub ORIGIN was alive at clock value V and
    /// beats every PERIOD_MS; relayed between hubs.
    Beat {
        /// The hub's id.
        origin: String,
        /// Its clock value when it sent the beat.
        v: u64,
        /// How often it sends one, in milliseconds.
        period_ms: u64,
    },
    /// `["heartbeat", PERIOD_MS?]`: liveness; our clients and hubs add how often
    /// they send one, so that the other side waits for three of them.
    Heartbeat {
        /// The sender's heartbeat interval, in milliseconds.
        period_ms: Option<u64>,
    },
    /// `["synced"]`: the initial dump is complete.
    Synced,
    /// `["challenge", NONCE]`: a hub invites a key holder to authenticate.
    Challenge(String),
    /// `["auth", PUBLIC_PEM, SIGNATURE]`: a client proves it holds a key.
    Auth {
        /// The client's public key (PEM).
        public: String,
        /// Its signature of the challenge (base64).
        signature: String,
    },
    /// `["session", SEALED_KEY, FINGERPRINT]`: the hub accepted the key.
    Session {
        /// The session key, encrypted to the client's public key (base64).
        sealed: String,
        /// The accepted key's fingerprint.
        fingerprint: String,
    },
    /// `["signed", SEQ, ROW_TEXT, MAC]`: a write under an authenticated session.
    Signed {
        /// Sequence number, increasing on each connection.
        seq: u64,
        /// The exact JSON text of the `register` or `free` row.
        text: String,
        /// HMAC-SHA256 of the sequence number and text (base64).
        mac: String,
    },
    /// `["reject", WHAT, ID, REASON, FINGERPRINT]`: the hub refused a write or a key.
    Reject {
        /// `register`, `free`, `signed` or `auth`.
        what: String,
        /// The record id concerned, if any.
        id: Option<String>,
        /// Why.
        reason: String,
        /// The key concerned, if any.
        fingerprint: Option<String>,
    },
    /// `["prove", NONCE]`: a client asks the hub to prove it holds its key.
    Prove(String),
    /// `["proof", PUBLIC_PEM, SIGNATURE]`: the hub's public key and its
    /// signature of the client's nonce.
    Proof {
        /// The hub's public key (PEM).
        public: String,
        /// Its signature of the nonce (base64).
        signature: String,
    },
    /// `["ping", TOKEN]`: asks our hub to answer `pong` once it has handled
    /// every row before it (Node hubs do not answer).
    Ping(String),
    /// `["pong", TOKEN]`: our hub's answer to `ping`.
    Pong(String),
    /// A row type this implementation does not know; ignored by receivers.
    Other(String),
}

/// The extension element of `register` and `free` rows, an object that the Node
/// package ignores: `{"o", "v"}` is the stamp (between our hubs), `{"wo", "wv"}`
/// the version the record's client registered when its hub wrote it again
/// at a new stamp over a store, `"owner"` who owns the record (from our
/// hubs), `"claim"` a client's proof that it does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ext {
    /// The version of the record, or of the free, between hubs.
    pub stamp: Option<Stamp>,
    /// The version of the record its client registered, when its hub wrote
    /// it again at `stamp` over a store (boxed: rare, and rows move often).
    pub was: Option<Box<Stamp>>,
    /// Who owns the record, as a hub says.
    pub owner: Option<Holder>,
    /// A client's secret for the record: the proof that it owns it.
    pub claim: Option<Box<str>>,
}

/// The element as [`Ext::to_json`] makes it (the stamp's `o` and `v`, then
/// `wo` and `wv`, `owner`, then `claim`), written without building it.
impl serde::Serialize for Ext {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        if let Some(stamp) = &self.stamp {
            map.serialize_entry("o", &*stamp.origin)?;
            map.serialize_entry("v", &stamp.v)?;
        }
        if let Some(was) = &self.was {
            map.serialize_entry("wo", &*was.origin)?;
            map.serialize_entry("wv", &was.v)?;
        }
        if let Some(owner) = &self.owner {
            map.serialize_entry("owner", &owner.to_wire())?;
        }
        if let Some(claim) = &self.claim {
            map.serialize_entry("claim", claim)?;
        }
        map.end()
    }
}

impl Ext {
    /// The version of the record its client registered: `was` when its hub
    /// wrote it again at a newer stamp, else the stamp itself.
    pub fn registered(&self) -> Option<&Stamp> {
        self.was.as_deref().or(self.stamp.as_ref())
    }

    /// Just a stamp.
    pub fn stamped(stamp: Option<Stamp>) -> Ext {
        Ext {
            stamp,
            ..Ext::default()
        }
    }

    /// Whether it carries nothing (and is left out of the row).
    pub fn is_empty(&self) -> bool {
        self.stamp.is_none() && self.was.is_none() && self.owner.is_none() && self.claim.is_none()
    }

    /// As it travels (see its `Serialize`); `None` when empty.
    pub fn to_json(&self) -> Option<Value> {
        if self.is_empty() {
            return None;
        }
        serde_json::to_value(self).ok()
    }

    /// Reads the element; what is absent or of another shape is `None`.
    pub fn from_json(value: Option<&Value>) -> Ext {
        let Some(value) = value else {
            return Ext::default();
        };
        let was = value
            .get("wo")
            .and_then(Value::as_str)
            .zip(value.get("wv").and_then(Value::as_u64))
            .and_then(|(origin, v)| Stamp::of(origin, v))
            .map(Box::new);
        Ext {
            was,
            ..Ext::of(
                Stamp::from_json(value),
                value.get("owner").and_then(Value::as_str),
                value.get("claim").and_then(Value::as_str),
            )
        }
    }

    /// The element with `stamp` and the texts of its `owner` and `claim`
    /// keys: an owner that is not one, or an empty claim, is none.
    pub fn of(stamp: Option<Stamp>, owner: Option<&str>, claim: Option<&str>) -> Ext {
        Ext {
            stamp,
            was: None,
            owner: owner.and_then(Holder::from_wire),
            claim: claim.filter(|claim| !claim.is_empty()).map(Box::from),
        }
    }
}

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The bytes are not valid UTF-8.
    #[error("line is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    /// The line nests arrays or objects deeper than [`MAX_DEPTH`].
    #[error("line nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The line is not JSON.
    #[error("line is not JSON: {0}")]
    NotJson(String),
    /// The line is JSON but not an array.
    #[error("row is not a JSON array")]
    NotArray,
    /// The array is empty or its first element is not a string.
    #[error("row has no type (first element must be a string)")]
    NoType,
    /// A known row type with the wrong elements.
    #[error("bad {row} row: {reason}")]
    BadShape {
        /// The row type.
        row: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Row {
    /// Decodes one line (with or without its trailing newline).
    pub fn decode(line: &[u8]) -> Result<Row, WireError> {
        let line = trim_newline(line);
        // A line that parses is UTF-8: the parser checks every string, and
        // the rest of a JSON text is ASCII.
        let Ok(parts) = serde_json::from_slice::<Parts>(line) else {
            return Err(why_not_a_row(line));
        };
        if 1 + parts
            .items
            .iter()
            .flatten()
            .map(depth)
            .fold(parts.ignored, usize::max)
            > MAX_DEPTH
        {
            return Err(WireError::TooDeep);
        }
        let kind = parts.kind;
        let mut items = parts.items.into_iter().map_while(|item| item);
        match &*kind {
            "helo" => match items.next() {
                Some(Value::String(addr)) => Ok(Row::Helo {
                    addr,
                    hub: items.next().and_then(string).filter(|h| !h.is_empty()),
                    heartbeat_ms: items.next().and_then(|v| v.as_u64()),
                }),
                _ => Err(bad("helo", "address must be a string")),
            },
            "register" => {
                let Some(Value::String(id)) = items.next() else {
                    return Err(bad("register", "id must be a string"));
                };
                let Some(Value::Object(meta)) = items.next() else {
                    return Err(bad("register", "meta must be an object"));
                };
                check_id(&id, "register")?;
                check_meta(&meta)?;
                let ext = Ext::from_json(items.next().as_ref());
                Ok(Row::Register { id, meta, ext })
            }
            "free" => match items.next() {
                Some(Value::String(id)) => {
                    check_id(&id, "free")?;
                    let ext = Ext::from_json(items.next().as_ref());
                    Ok(Row::Free { id, ext })
                }
                _ => Err(bad("free", "id must be a string")),
            },
            "beat" => match (items.next(), items.next(), items.next()) {
                (Some(Value::String(origin)), Some(v), Some(period)) if !origin.is_empty() => {
                    match (v.as_u64(), period.as_u64()) {
                        (Some(v), Some(period_ms)) => Ok(Row::Beat {
                            origin,
                            v,
                            period_ms,
                        }),
                        _ => Err(bad("beat", "clock and period must be positive integers")),
                    }
                }
                _ => Err(bad(
                    "beat",
                    "expected an origin, a clock value and a period",
                )),
            },
            "heartbeat" => Ok(Row::Heartbeat {
                period_ms: items.next().and_then(|v| v.as_u64()),
            }),
            "synced" => Ok(Row::Synced),
            "challenge" => match items.next() {
                Some(Value::String(nonce)) => Ok(Row::Challenge(nonce)),
                _ => Err(bad("challenge", "nonce must be a string")),
            },
            "auth" => match (items.next(), items.next()) {
                (Some(Value::String(public)), Some(Value::String(signature))) => {
                    Ok(Row::Auth { public, signature })
                }
                _ => Err(bad("auth", "expected a public key and a signature")),
            },
            "session" => match (items.next(), items.next()) {
                (Some(Value::String(sealed)), Some(Value::String(fingerprint))) => {
                    Ok(Row::Session {
                        sealed,
                        fingerprint,
                    })
                }
                _ => Err(bad("session", "expected a sealed key and a fingerprint")),
            },
            "signed" => match (items.next(), items.next(), items.next()) {
                (Some(seq), Some(Value::String(text)), Some(Value::String(mac))) => {
                    let seq = seq.as_u64().ok_or_else(|| {
                        bad("signed", "sequence number must be a positive integer")
                    })?;
                    Ok(Row::Signed { seq, text, mac })
                }
                _ => Err(bad("signed", "expected a sequence number, a row and a MAC")),
            },
            "prove" => match items.next() {
                Some(Value::String(nonce)) => Ok(Row::Prove(nonce)),
                _ => Err(bad("prove", "nonce must be a string")),
            },
            "proof" => match (items.next(), items.next()) {
                (Some(Value::String(public)), Some(Value::String(signature))) => {
                    Ok(Row::Proof { public, signature })
                }
                _ => Err(bad("proof", "expected a public key and a signature")),
            },
            "ping" => Ok(Row::Ping(items.next().and_then(string).unwrap_or_default())),
            "pong" => Ok(Row::Pong(items.next().and_then(string).unwrap_or_default())),
            "reject" => {
                let what = items.next().and_then(string).unwrap_or_default();
                let id = items.next().and_then(string);
                let reason = items.next().and_then(string).unwrap_or_default();
                let fingerprint = items.next().and_then(string);
                Ok(Row::Reject {
                    what,
                    id,
                    reason,
                    fingerprint,
                })
            }
            _ => Ok(Row::Other(kind.into_owned())),
        }
    }

    /// Like [`Row::decode`], reading a plain `register` row as a
    /// [`Row::Plain`] where it can: for a hub, which may store the row as it
    /// arrived.
    pub fn decode_keeping(line: &[u8]) -> Result<Row, WireError> {
        match PlainRow::read(trim_newline(line)) {
            Some((id, row, ext)) => Ok(Row::Plain { id, row, ext }),
            None => Row::decode(line),
        }
    }

    /// Encodes the row as one line, newline included.
    pub fn encode(&self) -> Bytes {
        let value = match self {
            Row::Helo {
                addr,
                hub: None,
                heartbeat_ms: _,
            } => serde_json::json!(["helo", addr]),
            Row::Helo {
                addr,
                hub: Some(hub),
                heartbeat_ms: None,
            } => serde_json::json!(["helo", addr, hub]),
            Row::Helo {
                addr,
                hub: Some(hub),
                heartbeat_ms: Some(ms),
            } => serde_json::json!(["helo", addr, hub, ms]),
            Row::Register { id, meta, ext } => return encode_register(id, meta, ext),
            Row::Plain { row, ext, .. } => return with_ext(row.row(), ext),
            Row::Free { id, ext } => return encode_free(id, ext),
            Row::Beat {
                origin,
                v,
                period_ms,
            } => serde_json::json!(["beat", origin, v, period_ms]),
            Row::Heartbeat { period_ms: None } => serde_json::json!(["heartbeat"]),
            Row::Heartbeat {
                period_ms: Some(ms),
            } => serde_json::json!(["heartbeat", ms]),
            Row::Synced => serde_json::json!(["synced"]),
            Row::Challenge(nonce) => serde_json::json!(["challenge", nonce]),
            Row::Auth { public, signature } => serde_json::json!(["auth", public, signature]),
            Row::Session {
                sealed,
                fingerprint,
            } => serde_json::json!(["session", sealed, fingerprint]),
            Row::Signed { seq, text, mac } => serde_json::json!(["signed", seq, text, mac]),
            Row::Reject {
                what,
                id,
                reason,
                fingerprint,
            } => serde_json::json!(["reject", what, id, reason, fingerprint]),
            Row::Prove(nonce) => serde_json::json!(["prove", nonce]),
            Row::Proof { public, signature } => serde_json::json!(["proof", public, signature]),
            Row::Ping(token) => serde_json::json!(["ping", token]),
            Row::Pong(token) => serde_json::json!(["pong", token]),
            Row::Other(kind) => serde_json::json!([kind]),
        };
        line_of(&value)
    }
}

/// Encodes `["register", id, meta]`, with the extension as a fourth element
/// when it carries anything, without cloning the metadata.
pub fn encode_register(id: &str, meta: &Meta, ext: &Ext) -> Bytes {
    #[derive(serde::Serialize)]
    struct RegisterRow<'a>(&'static str, &'a str, &'a Meta);
    #[derive(serde::Serialize)]
    struct ExtendedRow<'a>(&'static str, &'a str, &'a Meta, &'a Ext);
    if ext.is_empty() {
        line_of(&RegisterRow("register", id, meta))
    } else {
        line_of(&ExtendedRow("register", id, meta, ext))
    }
}

/// Encodes `["free", id]`, with the extension as a third element when it
/// carries anything.
pub fn encode_free(id: &str, ext: &Ext) -> Bytes {
    if ext.is_empty() {
        line_of(&("free", id))
    } else {
        line_of(&("free", id, ext))
    }
}

/// A `register` or `free` line without an extension, with `ext` appended as
/// its last element (unchanged when `ext` is empty).
pub fn with_ext(line: &Bytes, ext: &Ext) -> Bytes {
    let body = trim_newline(line);
    let body = body.strip_suffix(b"]").unwrap_or(body);
    body_with_ext(body, ext).unwrap_or_else(|| line.clone())
}

/// The line whose elements before its closing `]` are `body`, with `ext`
/// as its last element; `None` when `ext` is empty.
pub fn body_with_ext(body: &[u8], ext: &Ext) -> Option<Bytes> {
    if ext.is_empty() {
        return None;
    }
    // Written first to the stack, so that the line, which a registry keeps
    // as long as its record lives, is allocated at its exact size.
    let mut small = [0u8; 256];
    let mut cursor = std::io::Cursor::new(&mut small[..]);
    let ext_json: std::borrow::Cow<'_, [u8]> = match serde_json::to_writer(&mut cursor, ext) {
        Ok(()) => {
            let len = usize::try_from(cursor.position()).unwrap_or(0);
            std::borrow::Cow::Borrowed(&small[..len])
        }
        // Writing a map of strings and numbers into a Vec cannot fail.
        Err(_) => std::borrow::Cow::Owned(
            serde_json::to_vec(ext).expect("an extension always serialises"),
        ),
    };
    let mut out = Vec::with_capacity(body.len() + ext_json.len() + 3);
    out.extend_from_slice(body);
    out.push(b',');
    out.extend_from_slice(&ext_json);
    out.extend_from_slice(b"]\n");
    Some(Bytes::from(out))
}

fn line_of<T: serde::Serialize>(value: &T) -> Bytes {
    // Serialising JSON values, strings and string-keyed maps into a Vec cannot fail.
    let mut out = serde_json::to_vec(value).expect("JSON rows always serialise");
    out.push(b'\n');
    Bytes::from(out)
}

/// The elements a row may define after its type; more are ignored.
const ROW_ITEMS: usize = 4;

/// A row as the parser reads it: its type, borrowed from the line where it
/// can be, and its first elements, without the array a `Value` would make.
struct Parts<'a> {
    kind: std::borrow::Cow<'a, str>,
    items: [Option<Value>; ROW_ITEMS],
    /// How deeply the elements after those nest.
    ignored: usize,
}

impl<'de> serde::Deserialize<'de> for Parts<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PartsVisitor)
    }
}

struct PartsVisitor;

impl<'de> serde::de::Visitor<'de> for PartsVisitor {
    type Value = Parts<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array starting with a string")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Parts<'de>, A::Error> {
        let kind = seq
            .next_element::<Kind<'de>>()?
            .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?
            .0;
        let mut items: [Option<Value>; ROW_ITEMS] = Default::default();
        for (at, item) in items.iter_mut().enumerate() {
            *item = if at == 1 && kind == "register" {
                seq.next_element::<Object>()?.map(|o| o.0)
            } else {
                seq.next_element()?
            };
            if item.is_none() {
                return Ok(Parts {
                    kind,
                    items,
                    ignored: 0,
                });
            }
        }
        // Elements no row defines are dropped, but nest within the same limit.
        let mut ignored = 0;
        while let Some(extra) = seq.next_element::<Value>()? {
            ignored = ignored.max(depth(&extra));
        }
        Ok(Parts {
            kind,
            items,
            ignored,
        })
    }
}

/// A register row's metadata: an object is read into a map made with room
/// for a typical record's keys (growing a map key by key costs more than
/// parsing them); anything else as a `Value`, which the row's checks refuse.
struct Object(Value);

/// Keys a typical record has, with room to spare.
const TYPICAL_KEYS: usize = 8;

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> serde::de::Visitor<'de> for ObjectVisitor {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metadata object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Object, A::Error> {
                let mut meta = Meta::with_capacity(TYPICAL_KEYS);
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    meta.insert(key, value);
                }
                Ok(Object(Value::Object(meta)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Object, E> {
                Ok(Object(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Object, E> {
                Ok(Object(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Object, E> {
                Ok(Object(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Object, E> {
                Ok(Object(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Object, E> {
                Ok(Object(Value::String(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Object, E> {
                Ok(Object(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Object, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Value>()? {
                    items.push(item);
                }
                Ok(Object(Value::Array(items)))
            }
        }
        deserializer.deserialize_any(ObjectVisitor)
    }
}

/// A row's type: borrowed from the line unless it holds escapes.
struct Kind<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Kind<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl<'de> serde::de::Visitor<'de> for KindVisitor {
            type Value = Kind<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a row type")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Kind<'de>, E> {
                Ok(Kind(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Kind<'de>, E> {
                Ok(Kind(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KindVisitor)
    }
}

/// Why `line`, which did not parse as a row, is not one (the slow path, for
/// refused lines only).
fn why_not_a_row(line: &[u8]) -> WireError {
    if let Err(e) = std::str::from_utf8(line) {
        return WireError::NotUtf8(e.valid_up_to());
    }
    if let Err(e) = check_depth(line) {
        return e;
    }
    match serde_json::from_slice::<Value>(line) {
        Err(e) => WireError::NotJson(e.to_string()),
        Ok(Value::Array(items)) if items.first().is_some_and(Value::is_string) => {
            WireError::NotJson("the row could not be read".into())
        }
        Ok(Value::Array(_)) => WireError::NoType,
        Ok(_) => WireError::NotArray,
    }
}

fn string(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn bad(row: &'static str, reason: &'static str) -> WireError {
    WireError::BadShape { row, reason }
}

/// A line without its newline (`\n` or `\r\n`).
pub(crate) fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn check_id(id: &str, row: &'static str) -> Result<(), WireError> {
    if id.is_empty() {
        return Err(bad(row, "id must not be empty"));
    }
    Ok(())
}

/// Checks the keys the protocol itself gives a meaning; user keys are free-form.
fn check_meta(meta: &Meta) -> Result<(), WireError> {
    if let Some(role) = field(meta, "role")
        && !role.is_string()
    {
        return Err(bad("register", "role must be a string"));
    }
    if let Some(version) = field(meta, "version")
        && !(version.is_string() || version.is_null())
    {
        return Err(bad("register", "version must be a string"));
    }
    if let Some(host) = field(meta, "host")
        && !(host.is_string() || host.is_null())
    {
        return Err(bad("register", "host must be a string"));
    }
    if let Some(port) = field(meta, "port") {
        let valid = port.as_u64().is_some_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err(bad("register", "port must be an integer from 1 to 65535"));
        }
    }
    Ok(())
}

/// How deeply `value` nests arrays and objects (a scalar is 0).
///
/// Checked after parsing: the parser's own limit (128) keeps hostile input
/// from costing more than the line's length, and a scan of every line before
/// parsing cost a tenth of decoding a typical row.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `line` nests arrays or objects deeper than [`MAX_DEPTH`], found by
/// a scan that works on any bytes: what a line the parser refused is told.
fn check_depth(line: &[u8]) -> Result<(), WireError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in line {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(WireError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<Row, WireError> {
        Row::decode(s.as_bytes())
    }

    #[test]
    fn decodes_each_row_type() {
        assert_eq!(
            decode(r#"["helo","127.0.0.1"]"#),
            Ok(Row::Helo {
                addr: "127.0.0.1".into(),
                hub: None,
                heartbeat_ms: None
            })
        );
        assert_eq!(
            decode(r#"["free","AB"]"#),
            Ok(Row::Free {
                id: "AB".into(),
                ext: Ext::default()
            })
        );
        assert_eq!(
            decode("[\"heartbeat\"]\n"),
            Ok(Row::Heartbeat { period_ms: None })
        );
        assert_eq!(
            decode("[\"heartbeat\",15000]\n"),
            Ok(Row::Heartbeat {
                period_ms: Some(15000)
            })
        );
        assert_eq!(decode("[\"synced\"]\r\n"), Ok(Row::Synced));
        let Ok(Row::Register { id, meta, .. }) =
            decode(r#"["register","X",{"role":"web","port":80,"a":{"b":[1]}}]"#)
        else {
            panic!("register row did not decode");
        };
        assert_eq!(id, "X");
        assert_eq!(meta["a"]["b"][0], 1);
    }

    #[test]
    fn unknown_types_and_extra_elements_are_room_for_extensions() {
        assert_eq!(decode(r#"["sig","x",1]"#), Ok(Row::Other("sig".into())));
        assert_eq!(
            decode(r#"["free","AB",{"sig":"..."}]"#),
            Ok(Row::Free {
                id: "AB".into(),
                ext: Ext::default()
            })
        );
    }

    #[test]
    fn stamps_and_beats_travel_as_extra_elements() {
        let stamp = Stamp {
            v: 7,
            origin: "h1".into(),
        };
        let line = encode_free("AB", &Ext::stamped(Some(stamp.clone())));
        assert_eq!(&line[..], b"[\"free\",\"AB\",{\"o\":\"h1\",\"v\":7}]\n");
        assert_eq!(
            Row::decode(&line),
            Ok(Row::Free {
                id: "AB".into(),
                ext: Ext::stamped(Some(stamp.clone()))
            })
        );
        let line = encode_register("AB", &Meta::new(), &Ext::stamped(Some(stamp.clone())));
        assert_eq!(
            with_ext(
                &encode_register("AB", &Meta::new(), &Ext::default()),
                &Ext::stamped(Some(stamp.clone()))
            ),
            line
        );
        assert!(
            matches!(Row::decode(&line), Ok(Row::Register { ext: Ext { stamp: Some(s), .. }, .. }) if s == stamp)
        );
        let beat = Row::Beat {
            origin: "h1".into(),
            v: 9,
            period_ms: 200,
        };
        assert_eq!(Row::decode(&beat.encode()), Ok(beat));
        assert!(matches!(
            decode(r#"["beat","h1",-1,200]"#),
            Err(WireError::BadShape { row: "beat", .. })
        ));
    }

    #[test]
    fn refuses_bad_lines_with_a_reason() {
        assert!(matches!(decode("not json"), Err(WireError::NotJson(_))));
        assert_eq!(decode(r#"{"a":1}"#), Err(WireError::NotArray));
        assert_eq!(decode("[]"), Err(WireError::NoType));
        assert_eq!(decode("[1]"), Err(WireError::NoType));
        assert!(matches!(
            decode(r#"["register",1,{}]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["register","a"]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["register","a",[]]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["register","",{}]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["free",7]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["helo"]"#),
            Err(WireError::BadShape { .. })
        ));
    }

    #[test]
    fn refuses_ports_out_of_range_and_mistyped_keys() {
        for meta in [
            r#"{"port":0}"#,
            r#"{"port":65536}"#,
            r#"{"port":-1}"#,
            r#"{"port":80.5}"#,
            r#"{"port":"80"}"#,
            r#"{"role":5}"#,
            r#"{"version":1}"#,
            r#"{"host":[]}"#,
        ] {
            let line = format!(r#"["register","a",{meta}]"#);
            assert!(
                matches!(decode(&line), Err(WireError::BadShape { .. })),
                "{line} was accepted"
            );
        }
        assert!(decode(r#"["register","a",{"port":65535}]"#).is_ok());
    }

    #[test]
    fn refuses_deep_nesting_without_parsing() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(decode(&deep), Err(WireError::TooDeep));
        // Brackets inside strings do not count.
        let quoted = format!(r#"["register","a",{{"x":"{}"}}]"#, "[".repeat(500));
        assert!(decode(&quoted).is_ok());
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(!matches!(decode(&ok), Err(WireError::TooDeep)));
        // Past the parser's own limit, and deep in a record's metadata.
        let deeper = format!("{}{}", "[".repeat(500), "]".repeat(500));
        assert_eq!(decode(&deeper), Err(WireError::TooDeep));
        assert_eq!(decode(&"[".repeat(500)), Err(WireError::TooDeep));
        let nested = |n: usize| {
            format!(
                r#"["register","a",{{"x":{}{}}}]"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(decode(&nested(MAX_DEPTH - 1)), Err(WireError::TooDeep));
        // In an element no row defines, too.
        let extra = format!(
            r#"["heartbeat",1,2,3,4,5,{}{}]"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(decode(&extra), Err(WireError::TooDeep));
        assert!(decode(&nested(MAX_DEPTH - 2)).is_ok());
    }

    #[test]
    fn a_row_type_with_escapes_and_rows_with_many_elements_decode() {
        assert!(matches!(
            decode(r#"["regist\u0065r","a",{"port":1}]"#),
            Ok(Row::Register { .. })
        ));
        assert_eq!(
            decode(r#"["heartbeat",500,1,2,3,4,[5],{"6":7}]"#),
            Ok(Row::Heartbeat {
                period_ms: Some(500)
            })
        );
        assert_eq!(decode(r#"["sneeze",1]"#), Ok(Row::Other("sneeze".into())));
    }

    #[test]
    fn signed_mode_rows_round_trip() {
        for row in [
            Row::Challenge("N".into()),
            Row::Auth {
                public: "P".into(),
                signature: "S".into(),
            },
            Row::Session {
                sealed: "K".into(),
                fingerprint: "F".into(),
            },
            Row::Signed {
                seq: 3,
                text: "[\"free\",\"x\"]".into(),
                mac: "M".into(),
            },
            Row::Reject {
                what: "register".into(),
                id: Some("x".into()),
                reason: "no".into(),
                fingerprint: None,
            },
        ] {
            assert_eq!(Row::decode(&row.encode()), Ok(row));
        }
        assert!(matches!(
            decode(r#"["signed",-1,"x","m"]"#),
            Err(WireError::BadShape { .. })
        ));
        assert!(matches!(
            decode(r#"["auth","p"]"#),
            Err(WireError::BadShape { .. })
        ));
    }

    #[test]
    fn refuses_invalid_utf8() {
        assert_eq!(
            Row::decode(b"[\"free\",\"\xff\xfe\"]"),
            Err(WireError::NotUtf8(9))
        );
        // In a key, a value, past the elements a row defines, and outside strings.
        for line in [
            &b"[\"register\",\"a\",{\"\xc3\":1}]"[..],
            b"[\"register\",\"a\",{\"role\":\"w\xffb\"}]",
            b"[\"free\",\"a\",{},1,2,\"\xe2\x82\"]",
            b"[\"free\",\"a\"]\xff",
        ] {
            assert!(
                matches!(Row::decode(line), Err(WireError::NotUtf8(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn register_metadata_must_be_an_object_and_its_last_duplicate_key_wins() {
        for meta in ["\"web\"", "1", "-1", "1.5", "true", "null", "[1]", "[]"] {
            let line = format!(r#"["register","a",{meta}]"#);
            assert_eq!(
                Row::decode(line.as_bytes()),
                Err(bad("register", "meta must be an object")),
                "{line}"
            );
        }
        let Ok(Row::Register { meta, .. }) =
            Row::decode(br#"["register","a",{"port":1,"role":"x","port":2,"n":{"k":[1]}}]"#)
        else {
            panic!("not decoded");
        };
        assert_eq!(
            Value::Object(meta),
            serde_json::json!({"port": 2, "role": "x", "n": {"k": [1]}})
        );
    }

    #[test]
    fn a_register_row_is_kept_as_it_arrived_without_its_extension_element() {
        let plain = br#"["register","ID",{"role":"web","host":"h","port":1,"id":"ID"}]"#;
        let Ok(Row::Plain { id, row, .. }) = Row::decode_keeping(plain) else {
            panic!("a plain row is read in place");
        };
        assert_eq!(id, "ID");
        assert_eq!(&row.row()[..plain.len()], plain);
        assert_eq!(&row.row()[plain.len()..], b"\n");
        // Only where asked: a client decodes the metadata.
        assert!(matches!(Row::decode(plain), Ok(Row::Register { .. })));
        // An extension element is read, and never kept in the row: the
        // element must never travel on unchecked.
        let stamped =
            br#"["register","ID",{"host":"h","id":"ID"},{"o":"H","v":9,"claim":"secret"}]"#;
        let Ok(Row::Plain { row, ext, .. }) = Row::decode_keeping(stamped) else {
            panic!("a row with a flat extension element is read in place");
        };
        assert_eq!(
            &row.row()[..],
            br#"["register","ID",{"host":"h","id":"ID"}]
"#
        );
        assert_eq!(ext.stamp.map(|s| s.v), Some(9));
        assert_eq!(ext.claim.as_deref(), Some("secret"));
    }

    #[test]
    fn encodes_lines_that_decode_back() {
        let mut meta = Meta::new();
        meta.insert("role".into(), "web".into());
        meta.insert("z".into(), 1.into());
        meta.insert("a".into(), 2.into());
        let line = encode_register("ID", &meta, &Ext::default());
        assert_eq!(
            &line[..],
            b"[\"register\",\"ID\",{\"role\":\"web\",\"z\":1,\"a\":2}]\n"
        );
        assert_eq!(
            Row::decode(&line),
            Ok(Row::Register {
                id: "ID".into(),
                meta,
                ext: Ext::default(),
            })
        );
        assert_eq!(
            &encode_free("ID", &Ext::default())[..],
            b"[\"free\",\"ID\"]\n"
        );
        assert_eq!(
            &Row::Heartbeat { period_ms: None }.encode()[..],
            b"[\"heartbeat\"]\n"
        );
        assert_eq!(
            &Row::Heartbeat {
                period_ms: Some(200)
            }
            .encode()[..],
            b"[\"heartbeat\",200]\n"
        );
    }

    #[test]
    fn an_extension_is_written_with_its_keys_in_order() {
        use crate::protocol::owner::Holder;
        let stamp = Stamp {
            v: 1_700_000_000_123,
            origin: "hub-\"a\"".into(),
        };
        for (ext, want) in [
            (Ext::default(), None),
            (
                Ext::stamped(Some(stamp.clone())),
                Some(r#"{"o":"hub-\"a\"","v":1700000000123}"#),
            ),
            (
                Ext {
                    stamp: Some(stamp.clone()),
                    was: Stamp::of("b", 5).map(Box::new),
                    owner: Some(Holder::Connection),
                    claim: Some("s3cret".into()),
                },
                Some(
                    r#"{"o":"hub-\"a\"","v":1700000000123,"wo":"b","wv":5,"owner":"connection","claim":"s3cret"}"#,
                ),
            ),
            (
                Ext {
                    owner: Some(Holder::Connection),
                    ..Ext::default()
                },
                Some(r#"{"owner":"connection"}"#),
            ),
        ] {
            let direct = serde_json::to_string(&ext).expect("serialise");
            assert_eq!(direct, want.unwrap_or("{}"));
            assert_eq!(ext.to_json().map(|v| v.to_string()).as_deref(), want);
        }
        let body = br#"["register","A",{"id":"A"}"#;
        let ext = Ext {
            was: Stamp::of("b", 5).map(Box::new),
            ..Ext::stamped(Some(stamp))
        };
        let line = body_with_ext(body, &ext).expect("an extension");
        let decoded = Row::decode(&line).expect("decode");
        assert!(matches!(decoded, Row::Register { ext: got, .. } if got == ext));
        // Read in place the same (an escaped origin would need the full decoder).
        let ext = Ext {
            was: Stamp::of("b", 5).map(Box::new),
            ..Ext::stamped(Stamp::of("a", 7))
        };
        let body =
            br#"["register","A",{"role":"web","version":"1.0.0","host":"h","port":80,"id":"A"}"#;
        let line = body_with_ext(body, &ext).expect("an extension");
        let kept = Row::decode_keeping(&line).expect("decode");
        assert!(
            matches!(&kept, Row::Plain { ext: got, .. } if *got == ext),
            "{kept:?}"
        );
        assert!(body_with_ext(body, &Ext::default()).is_none());
    }
}
