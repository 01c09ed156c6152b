//! The connecting side of a connection to a hub, shared by the client library and
//! by a hub's links to its peers.
//!
//! A [`Link`] connects, says how often it sends heartbeats, authenticates with a
//! key when the hub invites it to (`challenge`, `auth`, `session`), and then
//! carries rows both ways; what the rows mean is its owner's business. It tells
//! the owner when its own records may go out ([`Heard::SendOwn`]: at `helo`, or
//! once the hub has answered a key), signs the owner's writes under the session,
//! and drops writes offered before that, since the owner's records then go out
//! whole. It gives up on a hub that sends nothing, or reads nothing, for three of
//! the hub's heartbeats (at least the configured timeout).
//!
//! Writes never wait: what the socket does not take at once stays in the link
//! and goes out while the owner waits in [`Link::next`], which is cancel-safe and
//! so can sit in a `select!` beside the owner's own queue.

use super::{BadRows, End, patience};
use crate::protocol::auth::{SessionKey, new_challenge, sign_challenge, verify_hub_proof};
use crate::protocol::framing::{LineError, LineReader};
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::{Authorized, Fingerprint, Keypair, parse_public};
use crate::protocol::wire::Row;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

/// Longest wait for a TCP connection to a hub.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The most bytes a hub asked to prove its key may send before its proof:
/// ours send the proof ahead of their records, so what comes first is at
/// most what the sockets held already.
const MAX_UNPROVED: usize = 16 * 1024 * 1024;

/// Unsent bytes kept allocated between bursts; a larger buffer is given back
/// once it has drained.
const KEPT_BUFFER: usize = 64 * 1024;

/// How a link behaves.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Interval between our heartbeats.
    pub heartbeat: Duration,
    /// Silence after which the hub counts as dead; at least three of the hub's
    /// heartbeats are always allowed.
    pub timeout: Duration,
    /// Longest accepted line in bytes.
    pub max_line: usize,
    /// A keypair to authenticate with, for hubs that take writes only from
    /// authorized keys.
    pub keypair: Option<Arc<Keypair>>,
    /// Keys of hubs: when there are any, the hub must prove it holds one of
    /// them before anything it says is taken or anything of ours is sent.
    pub hub_keys: Authorized,
    /// Bytes of our rows that may wait for the hub to read them; past that
    /// the link ends (its owner reconnects and sends its state afresh), so a
    /// hub that reads slower than we write costs bounded memory.
    pub max_unsent: usize,
}

/// The default [`LinkConfig::max_unsent`].
pub const DEFAULT_MAX_UNSENT: usize = 64 * 1024 * 1024;

/// What the hub said that the owner acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// The hub's `helo`.
    Helo {
        /// Our address as the hub sees it (IPv4 as `a.b.c.d`, never mapped).
        addr: String,
        /// The hub's id: our hubs send one, Node hubs do not.
        hub: Option<String>,
    },
    /// A `register`, `free`, `beat`, `synced` or `pong` row from the hub.
    Row(Row),
    /// Time for the owner's own records: answer with [`Link::send_own`].
    SendOwn,
    /// The hub refused a write of ours, or our key.
    Rejected {
        /// `register`, `free`, `signed` or `auth`.
        what: String,
        /// The record concerned, if any.
        id: Option<String>,
        /// The hub's reason.
        reason: String,
        /// The key concerned, if any.
        fingerprint: Option<String>,
    },
}

/// Where the owner's own records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Own {
    /// Not yet time to send them.
    Waiting,
    /// [`Heard::SendOwn`] is on its way to the owner.
    Due,
    /// Sent; writes go out as they come.
    Sent,
}

/// One connection to a hub, from the side that connected.
#[derive(Debug)]
pub struct Link {
    name: String,
    lines: LineReader,
    out: OwnedWriteHalf,
    /// Bytes the socket did not take yet, in order.
    unsent: BytesMut,
    /// The most `unsent` may hold.
    max_unsent: usize,
    /// A write failed; reported by the next call to [`Link::next`].
    failed: Option<io::Error>,
    keypair: Option<Arc<Keypair>>,
    timeout: Duration,
    /// How long the hub may stay silent, or leave our bytes unread.
    patience: Duration,
    heard_at: Instant,
    /// Since when bytes have waited without the socket taking any.
    stalled_at: Option<Instant>,
    deadline: Pin<Box<Sleep>>,
    ticker: Interval,
    heartbeat_line: Bytes,
    news: VecDeque<Heard>,
    hub: Option<String>,
    awaiting_session: bool,
    own: Own,
    session: Option<SessionKey>,
    seq: u64,
    bad_rows: BadRows,
    /// Keys one of which the hub must prove it holds (none: no proof asked).
    hub_keys: Authorized,
    /// The nonce the hub must sign, until it has.
    nonce: Option<String>,
    /// The hub's proof, if asked for, must come by then.
    proof_deadline: Pin<Box<Sleep>>,
    /// Why the hub is not one we trust.
    distrusted: Option<String>,
    /// Bytes the hub sent before its proof: held, since none of it counts yet.
    unproved: usize,
    /// Our records were due before the hub proved itself.
    own_after_proof: bool,
}

/// What woke [`Link::next`].
enum Step {
    Line(Result<Option<Bytes>, LineError>),
    Beat,
    Writable(io::Result<()>),
    Deadline,
    NoProof,
}

impl Link {
    /// Connects to `addr`, waiting at most [`CONNECT_TIMEOUT`].
    pub async fn connect(addr: &HubAddr, config: &LinkConfig) -> io::Result<Link> {
        let connect = TcpStream::connect((addr.host.as_str(), addr.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no connection within 3 s"))??;
        Ok(Link::over(stream, addr.to_string(), config))
    }

    /// A link over a connected stream to the hub named `name` (for logs).
    pub fn over(stream: TcpStream, name: String, config: &LinkConfig) -> Link {
        let _ = stream.set_nodelay(true);
        let (read, out) = stream.into_split();
        let now = Instant::now();
        // Until the hub's `helo` says how often it beats, our own timeout: a
        // hub that accepts and never speaks (frozen, a dead proxy) is given up
        // as soon as any silent one.
        let patience = config.timeout;
        let mut ticker = tokio::time::interval_at(now + config.heartbeat, config.heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let heartbeat_line = Row::Heartbeat {
            period_ms: Some(u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX)),
        }
        .encode();
        let mut link = Link {
            bad_rows: BadRows::new(name.clone()),
            name,
            // One row too long for us must not knock us off the hub.
            lines: LineReader::skipping(read, config.max_line),
            out,
            unsent: BytesMut::new(),
            max_unsent: config.max_unsent,
            failed: None,
            keypair: config.keypair.clone(),
            timeout: config.timeout,
            patience,
            heard_at: now,
            stalled_at: None,
            deadline: Box::pin(tokio::time::sleep_until(now + patience)),
            ticker,
            heartbeat_line: heartbeat_line.clone(),
            news: VecDeque::new(),
            hub: None,
            awaiting_session: false,
            own: Own::Waiting,
            session: None,
            seq: 0,
            nonce: (!config.hub_keys.is_empty()).then(new_challenge),
            hub_keys: config.hub_keys.clone(),
            proof_deadline: Box::pin(tokio::time::sleep_until(now + config.timeout)),
            distrusted: None,
            unproved: 0,
            own_after_proof: false,
        };
        // Say at once how often we beat: a hub with short heartbeats then waits
        // for three of ours instead of its own timeout.
        link.write(&heartbeat_line);
        if let Some(nonce) = link.nonce.clone() {
            link.write(&Row::Prove(nonce).encode());
        }
        link
    }

    /// The hub's id from its `helo`, once known (our hubs only).
    pub fn hub(&self) -> Option<&str> {
        self.hub.as_deref()
    }

    /// The hub's address, as the link was given it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next thing the hub said, sending heartbeats and unsent bytes meanwhile.
    /// An error ends the link. Cancel-safe.
    pub async fn next(&mut self) -> Result<Heard, End> {
        loop {
            if let Some(ready) = self.ready() {
                return ready;
            }
            let step = tokio::select! {
                // What has arrived is taken first: a busy client judges its hub
                // by what it sent in time, not by how soon the client read it.
                biased;
                line = self.lines.next_line() => Step::Line(line),
                _ = self.ticker.tick() => Step::Beat,
                ready = self.out.writable(), if !self.unsent.is_empty() => Step::Writable(ready),
                () = &mut self.deadline => Step::Deadline,
                () = &mut self.proof_deadline, if self.nonce.is_some() => Step::NoProof,
            };
            match step {
                Step::Line(line) => {
                    self.heard();
                    match line {
                        Ok(Some(line)) => self.take(&line),
                        Ok(None) => return Err(End::Closed),
                        Err(LineError::Skipped { len, limit }) => self.skipped(len, limit),
                        Err(e) => return Err(line_end(e)),
                    }
                }
                Step::Beat => {
                    let line = self.heartbeat_line.clone();
                    self.write(&line);
                }
                Step::Writable(Ok(())) => self.drain(),
                Step::Writable(Err(e)) => return Err(End::Failed(e)),
                Step::NoProof => {
                    return Err(End::Failed(io::Error::other(format!(
                        "the hub did not prove it holds a hub key within {} ms",
                        self.timeout.as_millis()
                    ))));
                }
                Step::Deadline => {
                    let stalled = self
                        .stalled_at
                        .is_some_and(|at| at + self.patience <= Instant::now());
                    if stalled {
                        return Err(End::Failed(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the hub read nothing for {} ms", self.patience.as_millis()),
                        )));
                    }
                    // Silent, unless bytes came that the client has not read yet.
                    if self.lines.received() {
                        self.heard();
                        continue;
                    }
                    return Err(End::TimedOut(self.patience));
                }
            }
        }
    }

    /// What the hub has already said, without waiting: for owners that apply a
    /// burst of rows together. `None` when nothing more is here yet.
    pub fn try_next(&mut self) -> Option<Result<Heard, End>> {
        loop {
            if let Some(ready) = self.ready() {
                return Some(ready);
            }
            match self.lines.buffered_line() {
                Ok(Some(line)) => self.take(&line),
                Ok(None) => return None,
                Err(LineError::Skipped { len, limit }) => self.skipped(len, limit),
                Err(e) => return Some(Err(line_end(e))),
            }
        }
    }

    /// Sends the owner's own records (encoded rows), then `synced`; from now on
    /// [`Link::send`] writes go out.
    pub fn send_own<I, B>(&mut self, rows: I)
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        for row in rows {
            self.write_signed(row.as_ref());
        }
        self.write(&Row::Synced.encode());
        self.own = Own::Sent;
    }

    /// Sends a write of the owner (an encoded `register`, `free` or `beat` row),
    /// signed under the session if there is one. Before the owner's own records
    /// went out it is dropped, since they go out whole then; returns whether it
    /// was sent.
    pub fn send(&mut self, row: &[u8]) -> bool {
        if self.own != Own::Sent {
            return false;
        }
        self.write_signed(row);
        true
    }

    /// Whether the owner's own records have gone out on this connection, so
    /// that writes go out as they come.
    pub fn own_sent(&self) -> bool {
        self.own == Own::Sent
    }

    /// Sends a row that is not a write (a `ping`), as it is.
    pub fn send_plain(&mut self, row: &[u8]) {
        self.write(row);
    }

    /// Queued news or a failed write, ahead of anything new.
    fn ready(&mut self) -> Option<Result<Heard, End>> {
        if let Some(e) = self.failed.take() {
            return Some(Err(End::Failed(e)));
        }
        if let Some(why) = self.distrusted.take() {
            return Some(Err(End::Failed(io::Error::other(why))));
        }
        // Nothing a hub says counts until it has proved itself, when asked to.
        if self.nonce.is_some() {
            return None;
        }
        self.news.pop_front().map(Ok)
    }

    /// Takes one line from the hub.
    fn take(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if self.nonce.is_some() {
            // Our hubs send their proof ahead of their records; a hub that
            // sends this much without one is not taken at its word.
            self.unproved += line.len();
            if self.unproved > MAX_UNPROVED {
                self.distrusted = Some(format!(
                    "the hub sent {} bytes before proving it holds a hub key",
                    self.unproved
                ));
                return;
            }
        }
        let row = match Row::decode(line) {
            Ok(row) => row,
            Err(e) => {
                self.bad_rows.log(line, &e);
                return;
            }
        };
        match row {
            Row::Helo {
                addr,
                hub,
                heartbeat_ms,
            } => {
                self.patience = patience(self.timeout, heartbeat_ms.map(Duration::from_millis));
                self.rearm();
                self.hub.clone_from(&hub);
                self.news.push_back(Heard::Helo {
                    addr: canonical(&addr),
                    hub,
                });
                if self.keypair.is_none() {
                    self.own_due();
                }
            }
            Row::Challenge(nonce) => self.answer_challenge(&nonce),
            Row::Session {
                sealed,
                fingerprint,
            } => {
                let Some(pair) = &self.keypair else { return };
                self.awaiting_session = false;
                match SessionKey::open(pair, &sealed) {
                    Ok(key) => {
                        tracing::info!(hub = %self.name, "authenticated to the hub as {fingerprint}");
                        self.session = Some(key);
                    }
                    Err(e) => tracing::error!(
                        hub = %self.name,
                        "the hub sent a session key we cannot use: {e}"
                    ),
                }
                self.own_due();
            }
            Row::Reject {
                what,
                id,
                reason,
                fingerprint,
            } => {
                if what == "prove" && self.nonce.is_some() {
                    self.distrusted = Some(format!("the hub proves no key: {reason}"));
                    return;
                }
                let key_refused = what == "auth";
                self.news.push_back(Heard::Rejected {
                    what,
                    id,
                    reason,
                    fingerprint,
                });
                if key_refused {
                    // Without a session the records go out plain, so that each
                    // refusal names its record.
                    self.awaiting_session = false;
                    self.own_due();
                }
            }
            Row::Synced => {
                self.news.push_back(Heard::Row(Row::Synced));
                // A hub that sent no challenge (a Node hub): records go out plain.
                if !self.awaiting_session {
                    self.own_due();
                }
            }
            row @ (Row::Register { .. } | Row::Free { .. } | Row::Beat { .. } | Row::Pong(_)) => {
                self.news.push_back(Heard::Row(row));
            }
            Row::Proof { public, signature } => self.check_proof(&public, &signature),
            // `Row::Plain` comes only from a hub's decoding.
            Row::Plain { .. }
            | Row::Heartbeat { .. }
            | Row::Other(_)
            | Row::Auth { .. }
            | Row::Signed { .. }
            | Row::Ping(_)
            | Row::Prove(_) => {}
        }
    }

    /// A row too long for us went by: say so, and go on.
    fn skipped(&mut self, len: usize, limit: usize) {
        tracing::warn!(
            hub = %self.name,
            "skipped a row of {len} bytes from the hub, longer than our limit of {limit}"
        );
    }

    fn answer_challenge(&mut self, nonce: &str) {
        let Some(pair) = &self.keypair else { return };
        match sign_challenge(pair, nonce) {
            Ok(signature) => {
                let auth = Row::Auth {
                    public: pair.public_pem(),
                    signature,
                }
                .encode();
                self.awaiting_session = true;
                self.write(&auth);
            }
            Err(e) => {
                tracing::error!(hub = %self.name, "{e}");
                self.own_due();
            }
        }
    }

    /// The hub's answer to our nonce: it must be signed with a hub key.
    fn check_proof(&mut self, public: &str, signature: &str) {
        let Some(nonce) = &self.nonce else { return };
        let key = match parse_public(public) {
            Ok(key) => key,
            Err(e) => {
                self.distrusted = Some(format!("the hub proved a key we cannot read: {e}"));
                return;
            }
        };
        let fingerprint = Fingerprint::of(&key);
        if !self.hub_keys.allows(&fingerprint) {
            self.distrusted = Some(format!(
                "the hub holds key {fingerprint}, which is not a hub key we trust"
            ));
        } else if !verify_hub_proof(&key, nonce, signature) {
            self.distrusted = Some(format!("the hub's proof of key {fingerprint} is forged"));
        } else {
            tracing::debug!(hub = %self.name, "the hub holds hub key {fingerprint}");
            self.nonce = None;
            if self.own_after_proof {
                self.own_due();
            }
        }
    }

    fn own_due(&mut self) {
        if self.nonce.is_some() {
            self.own_after_proof = true;
            return;
        }
        if self.own == Own::Waiting {
            self.own = Own::Due;
            self.news.push_back(Heard::SendOwn);
        }
    }

    /// Something arrived: the hub is alive.
    fn heard(&mut self) {
        self.heard_at = Instant::now();
        self.rearm();
    }

    /// The deadline: the hub must send something, and take our bytes, within
    /// the patience.
    fn rearm(&mut self) {
        let since = match self.stalled_at {
            Some(stalled) => stalled.min(self.heard_at),
            None => self.heard_at,
        };
        self.deadline.as_mut().reset(since + self.patience);
    }

    fn write_signed(&mut self, row: &[u8]) {
        match &self.session {
            Some(key) => {
                self.seq += 1;
                let line = key.sign_row(self.seq, row);
                self.write(&line);
            }
            None => self.write(row),
        }
    }

    /// Writes what the socket takes now and keeps the rest, in order.
    fn write(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if !self.unsent.is_empty() {
            if self.unsent.len() + bytes.len() > self.max_unsent {
                self.failed = Some(io::Error::other(format!(
                    "the hub reads our rows too slowly: {} bytes wait for it, more than {}",
                    self.unsent.len() + bytes.len(),
                    self.max_unsent
                )));
                self.unsent = BytesMut::new();
                return;
            }
            self.unsent.extend_from_slice(bytes);
            return;
        }
        let taken = match self.out.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        if taken < bytes.len() {
            self.unsent.extend_from_slice(&bytes[taken..]);
            self.stalled_at = Some(Instant::now());
            self.rearm();
        }
    }

    /// Writes unsent bytes as far as the socket takes them.
    fn drain(&mut self) {
        let mut progress = false;
        while !self.unsent.is_empty() {
            match self.out.try_write(&self.unsent) {
                Ok(0) => {
                    self.failed = Some(io::ErrorKind::WriteZero.into());
                    return;
                }
                Ok(n) => {
                    self.unsent.advance(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
        if self.unsent.is_empty() {
            self.stalled_at = None;
            if self.unsent.capacity() > KEPT_BUFFER {
                self.unsent = BytesMut::new();
            }
        } else if progress {
            self.stalled_at = Some(Instant::now());
        }
        self.rearm();
    }
}

fn line_end(error: LineError) -> End {
    match error {
        LineError::TooLong { limit } | LineError::Skipped { limit, .. } => End::TooLong(limit),
        LineError::Io(e) => End::Failed(e),
    }
}

/// An address as IP text, an IPv4-mapped IPv6 address (which a Node hub sends)
/// as plain IPv4.
fn canonical(addr: &str) -> String {
    match addr.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    fn config() -> LinkConfig {
        LinkConfig {
            heartbeat: Duration::from_secs(15),
            timeout: Duration::from_secs(45),
            max_line: 1 << 20,
            keypair: None,
            hub_keys: Authorized::default(),
            max_unsent: DEFAULT_MAX_UNSENT,
        }
    }

    /// A link to a scripted hub on loopback, and the hub's side.
    async fn pair(config: &LinkConfig) -> (Link, BufReader<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hub = HubAddr::new("127.0.0.1", addr.port());
        let (link, accepted) = tokio::join!(Link::connect(&hub, config), listener.accept());
        (
            link.expect("connect"),
            BufReader::new(accepted.expect("accept").0),
        )
    }

    async fn read_line(hub: &mut BufReader<TcpStream>) -> String {
        let mut line = String::new();
        hub.read_line(&mut line).await.expect("read");
        line
    }

    #[tokio::test]
    async fn says_its_heartbeat_then_sends_own_records_at_helo_and_writes_after() {
        let (mut link, mut hub) = pair(&config()).await;
        assert_eq!(read_line(&mut hub).await, "[\"heartbeat\",15000]\n");
        assert!(
            !link.send(b"[\"free\",\"early\"]\n"),
            "no write before the dump"
        );
        hub.get_mut()
            .write_all(b"[\"helo\",\"::ffff:10.1.2.3\",\"HUB\",200]\n[\"synced\"]\n")
            .await
            .expect("write");
        assert_eq!(
            link.next().await.expect("helo"),
            Heard::Helo {
                addr: "10.1.2.3".into(),
                hub: Some("HUB".into())
            }
        );
        assert_eq!(link.next().await.expect("own"), Heard::SendOwn);
        link.send_own([b"[\"register\",\"A\",{\"port\":1}]\n".as_slice()]);
        assert!(link.send(b"[\"free\",\"A\"]\n"));
        assert_eq!(link.next().await.expect("synced"), Heard::Row(Row::Synced));
        assert_eq!(link.hub(), Some("HUB"));
        assert_eq!(
            read_line(&mut hub).await,
            "[\"register\",\"A\",{\"port\":1}]\n"
        );
        assert_eq!(read_line(&mut hub).await, "[\"synced\"]\n");
        assert_eq!(read_line(&mut hub).await, "[\"free\",\"A\"]\n");
    }

    #[tokio::test]
    async fn a_hub_that_reads_slower_than_we_write_ends_the_link_at_the_byte_bound() {
        let mut config = config();
        config.max_unsent = 256 * 1024;
        let (mut link, mut hub) = pair(&config).await;
        assert_eq!(read_line(&mut hub).await, "[\"heartbeat\",15000]\n");
        hub.get_mut()
            .write_all(b"[\"helo\",\"::ffff:10.1.2.3\",\"HUB\",200]\n[\"synced\"]\n")
            .await
            .expect("write");
        assert!(matches!(link.next().await, Ok(Heard::Helo { .. })));
        assert_eq!(link.next().await.expect("own"), Heard::SendOwn);
        link.send_own(std::iter::empty::<&[u8]>());
        assert_eq!(link.next().await.expect("synced"), Heard::Row(Row::Synced));
        // The hub reads nothing more: 32 MiB of rows, far past every buffer.
        let row = format!(
            "[\"register\",\"big\",{{\"port\":1,\"x\":\"{}\"}}]\n",
            "x".repeat(64 * 1024)
        );
        for _ in 0..512 {
            link.send(row.as_bytes());
        }
        assert!(
            link.unsent.len() <= config.max_unsent,
            "{} bytes kept",
            link.unsent.len()
        );
        match link.next().await {
            Err(End::Failed(e)) => assert!(
                e.to_string().contains("the hub reads our rows too slowly"),
                "{e}"
            ),
            other => panic!("the link went on: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hub_that_accepts_and_never_speaks_gets_our_timeout() {
        let mut config = config();
        config.timeout = Duration::from_millis(300);
        let (mut link, _hub) = pair(&config).await;
        let started = Instant::now();
        let end = link.next().await;
        assert!(
            matches!(end, Err(End::TimedOut(t)) if t == Duration::from_millis(300)),
            "{end:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn rows_that_came_in_time_are_taken_however_late_the_link_is_read() {
        let mut config = config();
        config.timeout = Duration::from_millis(300);
        let (mut link, mut hub) = pair(&config).await;
        // A hub of ours that beats every 100 ms: the link's patience is 300 ms.
        hub.get_mut()
            .write_all(b"[\"helo\",\"127.0.0.1\",\"HUB\",100]\n")
            .await
            .expect("write");
        assert!(matches!(link.next().await, Ok(Heard::Helo { .. })));
        assert_eq!(link.next().await.expect("own"), Heard::SendOwn);
        // The rows arrive in time; the link is read long after its deadline,
        // as by a client busy with other work.
        hub.get_mut()
            .write_all(b"[\"synced\"]\n[\"free\",\"A\"]\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_secs(5)).await;
        for _ in 0..20 {
            assert_eq!(link.next().await.expect("synced"), Heard::Row(Row::Synced));
            assert!(matches!(
                link.next().await,
                Ok(Heard::Row(Row::Free { .. }))
            ));
            hub.get_mut()
                .write_all(b"[\"synced\"]\n[\"free\",\"A\"]\n")
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_hub_is_given_three_of_its_heartbeats() {
        let mut config = config();
        config.timeout = Duration::from_millis(300);
        config.heartbeat = Duration::from_millis(100);
        let (mut link, mut hub) = pair(&config).await;
        hub.get_mut()
            .write_all(b"[\"helo\",\"127.0.0.1\",\"HUB\",1000]\n")
            .await
            .expect("write");
        assert!(matches!(link.next().await, Ok(Heard::Helo { .. })));
        assert_eq!(link.next().await.expect("own"), Heard::SendOwn);
        let started = Instant::now();
        let end = link.next().await;
        assert!(
            matches!(end, Err(End::TimedOut(t)) if t == Duration::from_secs(3)),
            "{end:?}"
        );
        assert!(started.elapsed() >= Duration::from_secs(3));
    }
}
