//! Fault injection across peered hubs: peering both ways, in a ring and in a full
//! mesh (no loops, no duplicates), our hub peering to a Node hub, client failover,
//! and faults with three hubs and several clients: SIGKILL, SIGSTOP/SIGCONT, a
//! restart on the same address, a peer link cut and healed through a TCP proxy,
//! and a graceful SIGTERM.
//!
//! Hubs listen on distinct loopback addresses (127.0.0.1, .2, .3) with 200 ms
//! heartbeats, so timeouts come within a second. What a hub holds is read from its
//! dump to a fresh raw connection, and compared by record id:
//! - no record lost: every live client's id is on every live hub, exactly once;
//! - no ghost: an id whose client is gone is on no live hub;
//! - no duplicate: no id twice in a dump, and the `seaport` record of each hub
//!   that peers exactly once on every hub of the cluster, itself included.

use crate::harness::{Proc, node, node_event, node_hub, seaport};
use nix::sys::signal::Signal;
use seaport::{Client, ClientConfig, Event, Hub, HubAddr, HubConfig};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tokio::sync::broadcast;

/// Heartbeat of the hubs and clients of these tests, in milliseconds; the
/// timeout is three of them.
const HEARTBEAT_MS: u64 = 200;

/// The longest any one wait of this file may take. Everything waited for here
/// should take a second or two; this leaves room for a loaded machine while
/// keeping each test well under a minute even when it fails.
const LIMIT: Duration = Duration::from_secs(10);

/// The version our hubs announce themselves with.
const VERSION: &str = env!("CARGO_PKG_VERSION");

// ---------------------------------------------------------------------------
// Hubs, clients and what a hub holds
// ---------------------------------------------------------------------------

/// A `seaport listen PORT --host HOST --heartbeat MS [--peer ...]` process.
struct Member {
    proc: Proc,
    host: String,
    port: u16,
}

impl Member {
    /// Starts a hub on `host` with 200 ms heartbeats, peering with `peers`.
    fn start(host: &str, port: u16, peers: &[String]) -> Member {
        Member::start_with(host, port, HEARTBEAT_MS, peers)
    }

    /// Starts a hub on `host:port` (0 for any port). A fixed port that is still
    /// taken (just released by a killed hub) is tried again until `LIMIT`.
    fn start_with(host: &str, port: u16, heartbeat: u64, peers: &[String]) -> Member {
        let end = Instant::now() + LIMIT;
        let port_text = port.to_string();
        let heartbeat_text = heartbeat.to_string();
        let mut args = vec![
            "listen",
            &port_text,
            "--host",
            host,
            "--heartbeat",
            &heartbeat_text,
        ];
        for peer in peers {
            args.extend(["--peer", peer.as_str()]);
        }
        loop {
            let proc = Proc::spawn(&format!("hub {host}:{port}"), seaport(&args));
            // A hub that cannot bind exits at once, which closes its stdout.
            if let Some(line) = proc.line_within(LIMIT) {
                let bound = line
                    .strip_prefix("seaport listening on :")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected first line from the hub: {line:?}"));
                assert!(port == 0 || bound == port, "asked for {port}, got {bound}");
                return Member {
                    proc,
                    host: host.to_string(),
                    port: bound,
                };
            }
            assert!(
                Instant::now() < end,
                "could not start a hub on {host}:{port} within {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Kills the hub with SIGKILL and waits until it is reaped.
    fn kill(&mut self) {
        self.proc.kill();
    }
}

/// Continues a SIGSTOPped process when dropped, so that no path of a test, a
/// failed assertion included, leaves a frozen hub behind.
struct Frozen {
    pid: nix::unistd::Pid,
}

impl Frozen {
    fn freeze(proc: &Proc) -> Frozen {
        proc.signal(Signal::SIGSTOP);
        Frozen {
            pid: nix::unistd::Pid::from_raw(proc.pid() as i32),
        }
    }

    fn thaw(self) {
        // Drop sends SIGCONT.
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGCONT);
    }
}

/// A port that `host` could bind a moment ago.
fn reserve(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("bind {host}:0: {e}"))
}

/// Three hubs on 127.0.0.1, .2 and .3, each peering with both others.
fn full_mesh() -> [Member; 3] {
    let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let addrs: Vec<String> = hosts
        .iter()
        .map(|h| format!("{h}:{}", reserve(h)))
        .collect();
    let start = |i: usize| {
        let others: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| addrs[j].clone())
            .collect();
        let port = addrs[i].rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        Member::start(hosts[i], port.unwrap_or(0), &others)
    };
    [start(0), start(1), start(2)]
}

/// A runtime for library clients and hubs, which run on its worker threads.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Client settings that notice a lost hub within 600 ms.
fn fast() -> ClientConfig {
    ClientConfig {
        heartbeat: Duration::from_millis(HEARTBEAT_MS),
        timeout: Duration::from_millis(3 * HEARTBEAT_MS),
        reconnect_delay: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

/// A library client that registered one service, with its events.
struct Svc {
    client: Client,
    id: String,
    events: broadcast::Receiver<Event>,
}

/// Connects a library client to `hubs` (in that order of preference) and
/// registers `role` on a free port.
fn register(rt: &Runtime, hubs: &[String], role: &str, config: ClientConfig) -> Svc {
    rt.block_on(async {
        let (client, events) = Client::connect_with_events(hubs, config).expect("client");
        let record = tokio::time::timeout(LIMIT, client.register(role, json!({})))
            .await
            .unwrap_or_else(|_| panic!("{role}: not registered within {LIMIT:?}"))
            .expect("register");
        Svc {
            id: record.id().to_string(),
            client,
            events,
        }
    })
}

/// Waits until `svc` has lost the hub at `from` and connected to another one;
/// returns that hub and how long after `since` it connected.
fn moved(rt: &Runtime, svc: &mut Svc, from: &str, since: Instant) -> (String, Duration) {
    let events = &mut svc.events;
    let moved = rt.block_on(async {
        tokio::time::timeout(LIMIT, async {
            let mut lost = false;
            loop {
                match events.recv().await {
                    Ok(Event::Disconnect(hub)) if hub.to_string() == from => lost = true,
                    Ok(Event::Connect(hub)) if lost && hub.to_string() != from => {
                        return (hub.to_string(), since.elapsed());
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        panic!("the client's events ended")
                    }
                }
            }
        })
        .await
    });
    moved.unwrap_or_else(|_| panic!("{}: did not move off {from} within {LIMIT:?}", svc.id))
}

/// The register rows a hub dumps to a new connection, as (id, meta), or why
/// they could not be read. Reads `helo`, skips `challenge` and heartbeats, stops
/// at `synced`.
fn try_dump(addr: &str) -> Result<Vec<(String, Value)>, String> {
    let sock: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut rows = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{addr} closed before synced")),
            Ok(_) => {}
            Err(e) => return Err(format!("reading {addr}: {e}")),
        }
        let row: Value =
            serde_json::from_str(&line).map_err(|e| format!("{addr} sent {line:?}: {e}"))?;
        match row[0].as_str() {
            Some("synced") => return Ok(rows),
            Some("register") => {
                let id = row[1].as_str().unwrap_or_default().to_string();
                rows.push((id, row[2].clone()));
            }
            _ => {}
        }
    }
}

/// The dump of a hub that must answer.
fn dump(addr: &str) -> Vec<(String, Value)> {
    try_dump(addr).unwrap_or_else(|e| panic!("{e}"))
}

/// What every live hub must hold.
#[derive(Debug, Clone, Default)]
struct Want {
    /// Ids of the live clients' records (everything but `seaport` records).
    ids: BTreeSet<String>,
    /// `host:port` of every live hub that peers: its `seaport` record must be on
    /// every hub exactly once, itself included (as with Node hubs, a hub that
    /// peers shows its own record to its clients).
    hubs: BTreeSet<String>,
    /// Hubs whose `seaport` record may be held (at most once) but need not be.
    maybe: BTreeSet<String>,
}

impl Want {
    /// `ids` everywhere, and the `seaport` records of `hubs`.
    fn new<'a>(ids: impl IntoIterator<Item = &'a String>, hubs: &[&str]) -> Want {
        Want {
            ids: ids.into_iter().cloned().collect(),
            hubs: hubs.iter().map(|h| h.to_string()).collect(),
            maybe: BTreeSet::new(),
        }
    }

    /// Also allows (without requiring) the `seaport` record of `hub`.
    fn allowing(mut self, hub: &str) -> Want {
        self.maybe.insert(hub.to_string());
        self
    }
}

/// Whether the hub at `addr` holds exactly what `want` says; if not, why not.
fn check(addr: &str, want: &Want) -> Result<(), String> {
    let rows = try_dump(addr)?;
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    let mut hubs: BTreeMap<String, usize> = BTreeMap::new();
    let mut services = BTreeSet::new();
    let mut roles = BTreeMap::new();
    for (id, meta) in &rows {
        *ids.entry(id.as_str()).or_default() += 1;
        if meta["role"] == "seaport" {
            if meta["version"] != VERSION && meta["version"] != "2.0.9" {
                return Err(format!("{addr}: odd seaport record {meta}"));
            }
            let at = format!(
                "{}:{}",
                meta["host"].as_str().unwrap_or("?"),
                meta["port"].as_u64().unwrap_or(0)
            );
            *hubs.entry(at).or_default() += 1;
        } else {
            services.insert(id.clone());
            roles.insert(id.as_str(), meta["role"].as_str().unwrap_or("?"));
        }
    }
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        return Err(format!("{addr}: ids held more than once: {twice:?}"));
    }
    let missing: Vec<_> = want.ids.difference(&services).collect();
    let ghosts: Vec<_> = services.difference(&want.ids).collect();
    if !missing.is_empty() || !ghosts.is_empty() {
        return Err(format!(
            "{addr}: missing {missing:?}, ghosts {ghosts:?} (holds {roles:?})"
        ));
    }
    for (at, n) in &hubs {
        if !want.hubs.contains(at) && !want.maybe.contains(at) {
            return Err(format!("{addr}: ghost seaport record of {at}"));
        }
        if *n > 1 {
            return Err(format!("{addr}: seaport record of {at} held {n} times"));
        }
    }
    for hub in &want.hubs {
        if !hubs.contains_key(hub) {
            return Err(format!(
                "{addr}: no seaport record of {hub} (holds {hubs:?})"
            ));
        }
    }
    Ok(())
}

/// [`check`] on every hub of `hubs`, with every hub's problems.
fn check_all(hubs: &[&str], want: &Want) -> Result<(), String> {
    let errors: Vec<String> = hubs.iter().filter_map(|h| check(h, want).err()).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Polls `cond` every 25 ms until it holds, and returns how long that took;
/// fails the test with the last reason after `LIMIT`.
fn wait_for(what: &str, mut cond: impl FnMut() -> Result<(), String>) -> Duration {
    let start = Instant::now();
    loop {
        let last = match cond() {
            Ok(()) => return start.elapsed(),
            Err(e) => e,
        };
        assert!(
            start.elapsed() < LIMIT,
            "timed out after {LIMIT:?} waiting until {what}: {last}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until every hub of `hubs` holds exactly `want`; returns how long it took.
fn converge(what: &str, hubs: &[&str], want: &Want) -> Duration {
    let took = wait_for(what, || check_all(hubs, want));
    eprintln!("cluster: {what}: {} ms", took.as_millis());
    took
}

/// How long the state left by a fault can take to be cleaned up: a hub's link
/// to a lost peer keeps what it learned until its timeout (three heartbeats) has
/// passed, and notices that at its next attempt (links retry every second).
const SETTLE: Duration = Duration::from_millis(3 * HEARTBEAT_MS + 1000);

/// After a fault: waits until every hub of `hubs` holds exactly `want`, and
/// goes on holding it for `SETTLE`, so that what is checked is the state the
/// cluster settles in, not copies a fault has yet to clean up. Returns how long
/// after the call that final state was first reached.
fn settle(what: &str, hubs: &[&str], want: &Want) -> Duration {
    settle_with(what, || check_all(hubs, want))
}

/// Like [`settle`], for any condition.
fn settle_with(what: &str, mut cond: impl FnMut() -> Result<(), String>) -> Duration {
    let start = Instant::now();
    let mut since: Option<Instant> = None;
    loop {
        match cond() {
            Ok(()) => {
                let first = *since.get_or_insert_with(Instant::now);
                if first.elapsed() >= SETTLE {
                    let took = first - start;
                    eprintln!("cluster: {what}: settled after {} ms", took.as_millis());
                    return took;
                }
            }
            Err(e) => {
                since = None;
                assert!(
                    start.elapsed() < LIMIT,
                    "not settled after {LIMIT:?}: {what}: {e}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The id of the only record with `role` on the hub at `addr`, once there is one.
fn id_of_role(addr: &str, role: &str) -> String {
    let mut found = String::new();
    wait_for(&format!("a {role} record is on {addr}"), || {
        let rows = try_dump(addr)?;
        let ids: Vec<&String> = rows
            .iter()
            .filter(|(_, m)| m["role"] == role)
            .map(|(id, _)| id)
            .collect();
        match ids.as_slice() {
            [id] => {
                found = (*id).clone();
                Ok(())
            }
            _ => Err(format!("{role} records: {ids:?}")),
        }
    });
    found
}

/// A raw connection to a hub that keeps itself alive and collects the register
/// and free rows that arrive after its dump, so that a test can show that
/// nothing moves any more (rows circling between peers would).
struct Watch {
    rows: mpsc::Receiver<Value>,
    stream: TcpStream,
    addr: String,
}

impl Watch {
    fn connect(addr: &str) -> Watch {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(LIMIT)).expect("set timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("read the dump");
            assert!(n > 0, "{addr} closed during its dump");
            if line.starts_with("[\"synced\"") {
                break;
            }
        }
        stream.set_read_timeout(None).expect("clear timeout");
        let (tx, rows) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(n) if n > 0 => {}
                    _ => {
                        let _ = tx.send(json!(["connection closed"]));
                        return;
                    }
                }
                if let Ok(row) = serde_json::from_str::<Value>(&line)
                    && row[0] != "heartbeat"
                    && tx.send(row).is_err()
                {
                    return;
                }
            }
        });
        let mut beat = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            while beat.write_all(b"[\"heartbeat\"]\n").is_ok() {
                std::thread::sleep(Duration::from_millis(HEARTBEAT_MS / 2));
            }
        });
        Watch {
            rows,
            stream,
            addr: addr.to_string(),
        }
    }

    /// Fails the test if any row (or the end of the connection) comes within `wait`.
    fn assert_quiet(&self, wait: Duration) {
        if let Ok(row) = self.rows.recv_timeout(wait) {
            let mut more = vec![row];
            while let Ok(row) = self.rows.recv_timeout(Duration::from_millis(200)) {
                more.push(row);
                if more.len() > 20 {
                    break;
                }
            }
            panic!("{} was not quiet after converging: {more:#?}", self.addr);
        }
    }
}

impl Watch {
    /// Every row that came before the hub closed the connection; fails the test
    /// if it is still open after `LIMIT`.
    fn rows_until_closed(&self) -> Vec<Value> {
        let mut rows = Vec::new();
        loop {
            match self.rows.recv_timeout(LIMIT) {
                Ok(row) if row[0] == "connection closed" => return rows,
                Ok(row) => rows.push(row),
                Err(_) => panic!("{} did not close the connection", self.addr),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Shows that nothing circles between the hubs once they agree.
fn assert_quiet(hubs: &[&str]) {
    let watches: Vec<Watch> = hubs.iter().map(|h| Watch::connect(h)).collect();
    // Five heartbeats: a row relayed in a loop would come round many times.
    let wait = Duration::from_millis(5 * HEARTBEAT_MS);
    let start = Instant::now();
    for watch in &watches {
        watch.assert_quiet(wait.saturating_sub(start.elapsed()));
    }
}

/// A `seaport register HUB ROLE --heartbeat 200 --ready none -- sleep 600`
/// process: a CLI client whose command runs until it is killed.
fn cli_register(hub: &str, role: &str, heartbeat: u64) -> Proc {
    let heartbeat = heartbeat.to_string();
    let args = [
        "register",
        hub,
        role,
        "--heartbeat",
        &heartbeat,
        "--ready",
        "none",
        "--",
        "sleep",
        "600",
    ];
    Proc::spawn(&format!("seaport register {role}"), seaport(&args))
}

/// A `seaport supervise DIR --hub A --hub B ... --heartbeat 200` running one
/// service `ROLE` (a `sleep`, registered at once).
struct Supervise {
    proc: Proc,
    _dir: TempDir,
}

impl Supervise {
    fn start(hubs: &[String], role: &str) -> Supervise {
        let dir = tempfile::tempdir().expect("temp dir");
        let services = dir.path().join("services");
        std::fs::create_dir(&services).expect("services dir");
        std::fs::write(
            services.join("svc.toml"),
            format!(
                "role = {}\ncommand = [\"sleep\", \"600\"]\nready = \"none\"\n",
                json!(role)
            ),
        )
        .expect("service file");
        let services = services.to_string_lossy().into_owned();
        let control = dir.path().join("ctl.sock").to_string_lossy().into_owned();
        let heartbeat = HEARTBEAT_MS.to_string();
        let mut args = vec![
            "supervise",
            services.as_str(),
            "--control",
            &control,
            "--heartbeat",
            &heartbeat,
        ];
        for hub in hubs {
            args.extend(["--hub", hub.as_str()]);
        }
        Supervise {
            proc: Proc::spawn("seaport supervise", seaport(&args)),
            _dir: dir,
        }
    }
}

impl Drop for Supervise {
    fn drop(&mut self) {
        let _ = self
            .proc
            .stop_within(Signal::SIGTERM, Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// A TCP proxy that can cut a peer link and heal it
// ---------------------------------------------------------------------------

const PASS: u8 = 0;
const REFUSE: u8 = 1;
const BLACKHOLE: u8 = 2;

/// What a proxy does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Mode {
    /// Relays bytes both ways.
    Pass,
    /// Closes every connection and stops listening: connecting is refused.
    Refuse,
    /// Keeps connections open (and accepts new ones) but drops every byte and
    /// passes no close on: a silent partition that only heartbeats can detect.
    Blackhole,
}

#[derive(Debug)]
struct ProxyState {
    mode: AtomicU8,
    stop: AtomicBool,
    /// Both ends of every connection, to close them on a mode change.
    conns: Mutex<Vec<TcpStream>>,
    target: SocketAddr,
    listen: SocketAddr,
}

impl ProxyState {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    fn close_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for conn in conns.drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    fn track(&self, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            self.conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(clone);
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`, run by std threads.
pub(crate) struct Proxy {
    state: Arc<ProxyState>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub(crate) fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(ProxyState {
            mode: AtomicU8::new(PASS),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            target: target.parse().expect("target address"),
            listen: listener.local_addr().expect("proxy address"),
        });
        let shared = state.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, &shared));
        Proxy {
            state,
            accept: Some(accept),
        }
    }

    pub(crate) fn addr(&self) -> String {
        self.state.listen.to_string()
    }

    pub(crate) fn set(&self, mode: Mode) {
        let code = match mode {
            Mode::Pass => PASS,
            Mode::Refuse => REFUSE,
            Mode::Blackhole => BLACKHOLE,
        };
        self.state.mode.store(code, Ordering::SeqCst);
        // A cut closes what is open; a heal starts afresh, since connections that
        // lived through a blackhole have been given up by both ends.
        if mode != Mode::Blackhole {
            self.state.close_all();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.close_all();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(first: TcpListener, state: &Arc<ProxyState>) {
    let mut listener = Some(first);
    while !state.stop.load(Ordering::SeqCst) {
        if state.mode() == REFUSE {
            listener = None;
        } else if listener.is_none() {
            // Listen again on the same port (std sets SO_REUSEADDR).
            listener = TcpListener::bind(state.listen).ok();
            if let Some(l) = &listener {
                let _ = l.set_nonblocking(true);
            }
        }
        let accepted = listener.as_ref().map(TcpListener::accept);
        match accepted {
            Some(Ok((client, _))) => {
                let _ = client.set_nonblocking(false);
                serve(client, state);
            }
            Some(Err(e)) if e.kind() != ErrorKind::WouldBlock => {}
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(client: TcpStream, state: &Arc<ProxyState>) {
    state.track(&client);
    if state.mode() == BLACKHOLE {
        let state = state.clone();
        std::thread::spawn(move || pump(client, None, &state));
        return;
    }
    let Ok(upstream) = TcpStream::connect_timeout(&state.target, Duration::from_secs(1)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    state.track(&upstream);
    let (c2, u2) = match (client.try_clone(), upstream.try_clone()) {
        (Ok(c), Ok(u)) => (c, u),
        _ => return,
    };
    let s1 = state.clone();
    let s2 = state.clone();
    std::thread::spawn(move || pump(client, Some(upstream), &s1));
    std::thread::spawn(move || pump(u2, Some(c2), &s2));
}

/// Copies `from` to `to` until either end closes, then closes both (unless
/// blackholed, when bytes are dropped and closes are not passed on).
fn pump(mut from: TcpStream, mut to: Option<TcpStream>, state: &ProxyState) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.mode() == BLACKHOLE {
            continue;
        }
        let Some(out) = to.as_mut() else { continue };
        if out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if state.mode() != BLACKHOLE {
        let _ = from.shutdown(Shutdown::Both);
        if let Some(out) = to {
            let _ = out.shutdown(Shutdown::Both);
        }
    }
}

/// `seaport show HUB`: the ids it prints, in order (duplicates kept).
fn show_ids(addr: &str) -> Vec<String> {
    let out = seaport(&["show", addr]).output().expect("run seaport show");
    assert!(
        out.status.success(),
        "seaport show {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Value = serde_json::from_slice(&out.stdout).expect("show prints JSON");
    records
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The `seaport` record that the hub at `addr` holds for the hub on `port`.
fn announcement(addr: &str, port: u16) -> Value {
    let rows = dump(addr);
    let found: Vec<&Value> = rows
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m["role"] == "seaport" && m["port"] == port)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{addr}: seaport records for port {port}: {found:?}"
    );
    found[0].clone()
}

// ---------------------------------------------------------------------------
// Peering
// ---------------------------------------------------------------------------

#[test]
fn two_hubs_peered_both_ways_hold_each_record_once_and_free_it_everywhere() {
    let rt = runtime();
    let config = HubConfig::with_heartbeat(Duration::from_millis(HEARTBEAT_MS));
    // One side is the library's Hub::peer, the other `seaport listen --peer`.
    let lib = rt
        .block_on(Hub::bind("127.0.0.1:0", config))
        .expect("bind a library hub");
    let a = lib.local_addr().to_string();
    let bin = Member::start("127.0.0.2", 0, std::slice::from_ref(&a));
    let b = bin.addr();
    {
        let _in_runtime = rt.enter();
        lib.peer(b.parse::<HubAddr>().expect("hub address"));
    }
    let a1 = register(&rt, std::slice::from_ref(&a), "alpha@1.0.0", fast());
    let a2 = register(&rt, std::slice::from_ref(&a), "beta@1.0.0", fast());
    let b1 = register(&rt, std::slice::from_ref(&b), "gamma@1.0.0", fast());
    let hubs = [a.as_str(), b.as_str()];
    converge(
        "both hubs hold the three records and both announcements",
        &hubs,
        &Want::new([&a1.id, &a2.id, &b1.id], &hubs),
    );
    // Each announces itself with its version, its port and the address it is
    // bound to.
    let of_a = announcement(&b, lib.local_addr().port());
    assert_eq!(
        (&of_a["host"], &of_a["version"]),
        (&json!("127.0.0.1"), &json!(VERSION))
    );
    let of_b = announcement(&a, bin.port);
    assert_eq!(
        (&of_b["host"], &of_b["version"]),
        (&json!("127.0.0.2"), &json!(VERSION))
    );
    assert_quiet(&hubs);
    let seen: Vec<String> = lib
        .query(&seaport::Pattern::parse("gamma").expect("pattern"))
        .iter()
        .map(|r| r.id().to_string())
        .collect();
    assert_eq!(
        seen,
        std::slice::from_ref(&b1.id),
        "Hub::query sees the peer's record"
    );

    // A client that closes is freed on both hubs, whichever it was on.
    a1.client.close();
    converge(
        "a closed client of the library hub is freed on both",
        &hubs,
        &Want::new([&a2.id, &b1.id], &hubs),
    );
    b1.client.close();
    converge(
        "a closed client of the binary hub is freed on both",
        &hubs,
        &Want::new([&a2.id], &hubs),
    );
    assert_quiet(&hubs);
    rt.block_on(lib.shutdown());
}

#[test]
fn a_ring_of_three_hubs_shares_every_record_once_without_looping() {
    let hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let ports = hosts.map(reserve);
    let addr = |i: usize| format!("{}:{}", hosts[i % 3], ports[i % 3]);
    // 1 -> 2 -> 3 -> 1.
    let ring: Vec<Member> = (0..3)
        .map(|i| Member::start(hosts[i], ports[i], &[addr(i + 1)]))
        .collect();
    let addrs: Vec<String> = ring.iter().map(Member::addr).collect();
    let hubs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let rt = runtime();
    let svcs: Vec<Svc> = (0..3)
        .map(|i| register(&rt, &addrs[i..=i], &format!("ring{i}@1.0.0"), fast()))
        .collect();
    let ids: Vec<&String> = svcs.iter().map(|s| &s.id).collect();
    converge(
        "every hub of the ring holds every record and announcement once",
        &hubs,
        &Want::new(ids.iter().copied(), &hubs),
    );
    assert_quiet(&hubs);
    svcs[1].client.close();
    converge(
        "a closed client is freed all round the ring",
        &hubs,
        &Want::new([&svcs[0].id, &svcs[2].id], &hubs),
    );
    assert_quiet(&hubs);
}

#[test]
fn a_full_mesh_of_three_hubs_shares_every_record_once_without_looping() {
    let mesh = full_mesh();
    let addrs: Vec<String> = mesh.iter().map(Member::addr).collect();
    let hubs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let rt = runtime();
    let mut svcs: Vec<Svc> = (0..3)
        .map(|i| register(&rt, &addrs[i..=i], &format!("mesh{i}@1.0.0"), fast()))
        .collect();
    // Two records from one client, so a connection owning several is covered.
    let extra = rt
        .block_on(svcs[0].client.register("mesh-extra@1.0.0", json!({"n": 1})))
        .expect("register");
    let mut ids: Vec<String> = svcs.iter().map(|s| s.id.clone()).collect();
    ids.push(extra.id().to_string());
    converge(
        "every hub of the mesh holds every record and announcement once",
        &hubs,
        &Want::new(&ids, &hubs),
    );
    for hub in &hubs {
        let mut shown = show_ids(hub);
        let listed = shown.len();
        shown.sort();
        shown.dedup();
        assert_eq!(shown.len(), listed, "seaport show {hub} lists an id twice");
        assert_eq!(
            listed,
            4 + 3,
            "{hub}: four services and the three hubs: {shown:?}"
        );
    }
    assert_quiet(&hubs);
    // An update travels once round the mesh and settles.
    rt.block_on(async { svcs[2].client.set(&svcs[2].id, json!({"weight": 5})) })
        .expect("set");
    wait_for("the update reaches every hub", || {
        for hub in &hubs {
            let rows = try_dump(hub)?;
            let updated = rows
                .iter()
                .any(|(id, m)| *id == svcs[2].id && m["weight"] == 5);
            if !updated {
                return Err(format!("{hub} has not got the update"));
            }
        }
        Ok(())
    });
    converge(
        "the update duplicates nothing",
        &hubs,
        &Want::new(&ids, &hubs),
    );
    assert_quiet(&hubs);
    let gone = svcs.remove(0);
    gone.client.close();
    let left: Vec<String> = svcs.iter().map(|s| s.id.clone()).collect();
    converge(
        "a closed client's two records are freed on the whole mesh",
        &hubs,
        &Want::new(&left, &hubs),
    );
}

#[test]
fn a_node_hubs_clients_keep_their_records_however_often_our_link_drops() {
    // A Node hub frees, everywhere, every record that arrived over a
    // connection when that connection ends, its own clients' included: our
    // link must never send it back what it gave us.
    let (_node_hub, node_port) = node_hub();
    let node_addr = format!("127.0.0.1:{node_port}");
    let proxy = Proxy::start(&node_addr);
    let ours = Member::start("127.0.0.1", 0, &[proxy.addr()]);
    let our_addr = ours.addr();
    let node_client = node(
        "client.js",
        &["register", &node_addr, "from-node@1.0.0", "{}"],
    );
    let node_id = node_event(&node_client, "registered")["record"]["id"]
        .as_str()
        .expect("node id")
        .to_string();
    let both = Want::new([&node_id], &[our_addr.as_str()]);
    converge(
        "our hub learns the Node client's record",
        &[&our_addr],
        &both,
    );
    for cut in 1..=3 {
        proxy.set(Mode::Refuse);
        proxy.set(Mode::Pass);
        converge(
            &format!("after cut {cut}, both hubs hold the Node client's record"),
            &[&our_addr, &node_addr],
            &both,
        );
    }
    drop(ours);
    converge(
        "with our hub gone, the Node hub still holds its client's record",
        &[&node_addr],
        &Want::new([&node_id], &[]).allowing(&our_addr),
    );
}

#[test]
fn our_hub_peers_to_a_node_hub_and_records_cross_both_ways() {
    let (_node_hub, node_port) = node_hub();
    let node_addr = format!("127.0.0.1:{node_port}");
    // Our hub beats every 200 ms (timeout 600 ms), the Node hub every 15 s: our
    // side of the link must wait for three of the Node hub's heartbeats, not
    // time out and reconnect over and over (assert_quiet below would see it).
    let ours = Member::start("127.0.0.1", 0, std::slice::from_ref(&node_addr));
    let our_addr = ours.addr();

    // Our hub announces itself on the Node hub, once.
    wait_for("our seaport record reaches the Node hub", || {
        let n = try_dump(&node_addr)?
            .iter()
            .filter(|(_, m)| m["role"] == "seaport")
            .count();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} seaport records"))
        }
    });
    let record = announcement(&node_addr, ours.port);
    assert_eq!(record["version"], VERSION);
    assert_eq!(record["host"], "127.0.0.1");

    // Node side to ours.
    let node_client = node(
        "client.js",
        &["register", &node_addr, "from-node@1.0.0", r#"{"x":1}"#],
    );
    let node_id = node_event(&node_client, "registered")["record"]["id"]
        .as_str()
        .expect("node id")
        .to_string();
    // Ours to Node.
    let rt = runtime();
    let ours_client = register(
        &rt,
        std::slice::from_ref(&our_addr),
        "from-rust@1.0.0",
        fast(),
    );
    let node_view = Want::new([&node_id, &ours_client.id], &[our_addr.as_str()]);
    let our_view = Want::new([&node_id, &ours_client.id], &[our_addr.as_str()]);
    converge(
        "the Node hub holds both records once",
        &[&node_addr],
        &node_view,
    );
    converge("our hub holds both records once", &[&our_addr], &our_view);
    assert_eq!(
        dump(&our_addr)
            .iter()
            .find(|(id, _)| *id == node_id)
            .map(|(_, m)| m["x"].clone()),
        Some(json!(1)),
        "the Node record's metadata came through"
    );
    assert_quiet(&[&our_addr, &node_addr]);

    // Frees cross both ways.
    drop(node_client);
    converge(
        "the killed Node client's record is freed on both",
        &[&node_addr],
        &Want::new([&ours_client.id], &[our_addr.as_str()]),
    );
    converge(
        "our hub frees it too",
        &[&our_addr],
        &Want::new([&ours_client.id], &[our_addr.as_str()]),
    );
    ours_client.client.close();
    converge(
        "our closed client's record is freed on the Node hub",
        &[&node_addr],
        &Want::new([], &[our_addr.as_str()]),
    );
    converge(
        "and on ours",
        &[&our_addr],
        &Want::new([], &[our_addr.as_str()]),
    );
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

/// Three hubs in a full mesh, and clients of every kind on hub 1.
struct Cluster {
    mesh: [Member; 3],
    addrs: Vec<String>,
    rt: Runtime,
    /// Knows hubs 1 and 2 from its caller.
    given: Svc,
    /// Knows only hub 1; learns the others from their `seaport` records.
    learned: Svc,
    /// `seaport register HUB1`, which also learns the other hubs.
    cli: Proc,
    /// `seaport supervise --hub HUB1 --hub HUB3`.
    sup: Supervise,
    /// Clients of hubs 2 and 3, which no fault touches.
    _on2: Svc,
    _on3: Svc,
    /// Every live client's record id: given, learned, cli, sup, on2, on3.
    ids: Vec<String>,
}

impl Cluster {
    fn start() -> Cluster {
        let mesh = full_mesh();
        let addrs: Vec<String> = mesh.iter().map(Member::addr).collect();
        let rt = runtime();
        let given = register(&rt, &addrs[0..2], "given@1.0.0", fast());
        let learned = register(&rt, &addrs[0..1], "learned@1.0.0", fast());
        let cli = cli_register(&addrs[0], "cli@1.0.0", HEARTBEAT_MS);
        let sup = Supervise::start(&[addrs[0].clone(), addrs[2].clone()], "sup@1.0.0");
        let on2 = register(&rt, &addrs[1..2], "on-two@1.0.0", fast());
        let on3 = register(&rt, &addrs[2..3], "on-three@1.0.0", fast());
        let ids = vec![
            given.id.clone(),
            learned.id.clone(),
            id_of_role(&addrs[0], "cli"),
            id_of_role(&addrs[0], "sup"),
            on2.id.clone(),
            on3.id.clone(),
        ];
        eprintln!(
            "cluster: hubs {addrs:?}; ids of given, learned, cli, sup, on-two, on-three: {ids:?}"
        );
        let cluster = Cluster {
            mesh,
            addrs,
            rt,
            given,
            learned,
            cli,
            sup,
            _on2: on2,
            _on3: on3,
            ids,
        };
        let all = cluster.hubs(&[0, 1, 2]);
        converge(
            "the three hubs hold the six records and three announcements",
            &all,
            &Want::new(&cluster.ids, &all),
        );
        // Every client of hub 1 has seen the other hubs' announcements by now:
        // hub 1 held them before they registered, or forwarded them since.
        cluster
    }

    fn hubs(&self, which: &[usize]) -> Vec<&str> {
        which.iter().map(|i| self.addrs[*i].as_str()).collect()
    }

    /// The live clients' records, and the announcements of hubs `which`.
    fn want(&self, which: &[usize]) -> Want {
        Want::new(&self.ids, &self.hubs(which))
    }

    /// After a fault of hub 1 at `since`: its two library clients move to
    /// other hubs within `within`, and hubs 2 and 3 settle on every record, the
    /// CLI and supervisor clients' included (had they not registered again,
    /// their records would go with hub 1), and not on hub 1's announcement.
    /// Returns how long settling took.
    fn lose_hub_one(&mut self, since: Instant, within: Duration, what: &str) -> Duration {
        let clients = [&mut self.given, &mut self.learned];
        library_clients_move(&self.rt, clients, &self.addrs[0], since, within);
        settle(what, &self.hubs(&[1, 2]), &self.want(&[1, 2]))
    }

    /// Once hub 1 is back: every hub settles on every record and announcement
    /// once, nothing circles, and a new client of hub 1 is seen everywhere.
    /// Returns that client.
    fn rejoined(&mut self, what: &str) -> Svc {
        let all = self.addrs.clone();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let took = settle(what, &all, &self.want(&[0, 1, 2]));
        assert!(took < Duration::from_secs(5), "rejoining took {took:?}");
        assert_quiet(&all);
        let late = register(&self.rt, &self.addrs[0..1], "late@1.0.0", fast());
        self.ids.push(late.id.clone());
        converge(
            "a new client of hub 1 is on every hub",
            &all,
            &self.want(&[0, 1, 2]),
        );
        late
    }
}

/// Both library clients of hub 1 leave it for another hub within `within` of
/// `since`.
fn library_clients_move(
    rt: &Runtime,
    clients: [&mut Svc; 2],
    from: &str,
    since: Instant,
    within: Duration,
) {
    for (name, svc) in ["given", "learned"].into_iter().zip(clients) {
        let (to, took) = moved(rt, svc, from, since);
        eprintln!(
            "cluster: {name} moved to {to} after {} ms",
            took.as_millis()
        );
        assert!(took < within, "{name} took {took:?} to move to {to}");
    }
}

#[test]
fn a_killed_hubs_clients_fail_over_and_nothing_is_lost_or_left_behind() {
    let mut c = Cluster::start();
    let killed = Instant::now();
    c.mesh[0].kill();
    // The connection ends at once, so the clients move at once.
    let took = c.lose_hub_one(
        killed,
        Duration::from_millis(1500),
        "after SIGKILL of hub 1, hubs 2 and 3 hold every record and not hub 1's",
    );
    assert!(took < Duration::from_secs(3), "recovery took {took:?}");

    // A client that is really gone is freed everywhere: when its connection
    // ends...
    let addrs = c.addrs.clone();
    let survivors = [addrs[1].as_str(), addrs[2].as_str()];
    let without = |gone: &[usize]| {
        let ids = (0..c.ids.len())
            .filter(|i| !gone.contains(i))
            .map(|i| &c.ids[i]);
        Want::new(ids, &survivors)
    };
    c.cli.kill();
    converge(
        "a killed `seaport register` is freed on every hub",
        &survivors,
        &without(&[2]),
    );
    // ... and when its heartbeats stop.
    let frozen = Frozen::freeze(&c.sup.proc);
    let took = converge(
        "a frozen `seaport supervise` is freed on every hub",
        &survivors,
        &without(&[2, 3]),
    );
    assert!(took < Duration::from_secs(3), "freeing took {took:?}");
    frozen.thaw();
    converge(
        "the supervisor, continued, registers again everywhere",
        &survivors,
        &without(&[2]),
    );
    assert_quiet(&survivors);
}

#[test]
fn a_frozen_hub_loses_its_clients_and_rejoins_without_duplicates() {
    let mut c = Cluster::start();
    let frozen_at = Instant::now();
    let frozen = Frozen::freeze(&c.mesh[0].proc);
    // Its clients notice by their heartbeats (600 ms) and move; hubs 2 and 3
    // stop hearing hub 1 and drop its announcement.
    c.lose_hub_one(
        frozen_at,
        Duration::from_millis(3000),
        "with hub 1 frozen, hubs 2 and 3 hold every record and not hub 1's",
    );
    frozen.thaw();
    // Continued, hub 1 finds its clients gone, hears the others again and
    // learns what moved.
    c.rejoined("hub 1, continued, rejoins: every hub holds every record once");
}

#[test]
fn a_restarted_hub_rejoins_and_learns_the_registry() {
    let mut c = Cluster::start();
    let killed = Instant::now();
    c.mesh[0].kill();
    c.lose_hub_one(
        killed,
        Duration::from_millis(1500),
        "after SIGKILL of hub 1, hubs 2 and 3 hold every record and not hub 1's",
    );
    // The same command line again, on the same address.
    let port = c.mesh[0].port;
    let peers = [c.addrs[1].clone(), c.addrs[2].clone()];
    c.mesh[0] = Member::start("127.0.0.1", port, &peers);
    let late = c.rejoined("hub 1, restarted, learns every record; every hub holds each once");
    let all = c.addrs.clone();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    late.client.close();
    c.ids.pop();
    converge(
        "and freed on every hub when it closes",
        &all,
        &c.want(&[0, 1, 2]),
    );
}

#[test]
fn a_cut_peer_link_frees_what_it_carried_and_heals_without_stale_records() {
    let a_port = reserve("127.0.0.1");
    let b_port = reserve("127.0.0.2");
    // Hub a peers with hub b through the proxy; that link is the only one.
    let proxy = Proxy::start(&format!("127.0.0.2:{b_port}"));
    let a = Member::start("127.0.0.1", a_port, &[proxy.addr()]);
    let b = Member::start("127.0.0.2", b_port, &[]);
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let rt = runtime();
    let on_a = |role: &str| register(&rt, std::slice::from_ref(&a_addr), role, fast());
    let on_b = |role: &str| register(&rt, std::slice::from_ref(&b_addr), role, fast());
    let (a1, a2) = (on_a("a1@1.0.0"), on_a("a2@1.0.0"));
    let (b1, b2) = (on_b("b1@1.0.0"), on_b("b2@1.0.0"));
    let both = [a_addr.as_str(), b_addr.as_str()];
    // a announces itself on b; b does not peer, so announces nothing.
    let linked = |ids: &[&String]| Want::new(ids.iter().copied(), &[a_addr.as_str()]);
    converge(
        "both hubs hold the four records",
        &both,
        &linked(&[&a1.id, &a2.id, &b1.id, &b2.id]),
    );

    // Cut: the link is closed and reconnecting is refused. Each side keeps its
    // own clients' records and frees the other side's; a keeps its own
    // announcement, which b drops.
    proxy.set(Mode::Refuse);
    let split = |ids_a: &[&String], ids_b: &[&String]| -> Result<(), String> {
        check(
            &a_addr,
            &Want::new(ids_a.iter().copied(), &[a_addr.as_str()]),
        )?;
        check(&b_addr, &Want::new(ids_b.iter().copied(), &[]))
    };
    let took = settle_with("the cut hubs free each other's records", || {
        split(&[&a1.id, &a2.id], &[&b1.id, &b2.id])
    });
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Changes on both sides while they are apart.
    a1.client.close();
    let a3 = on_a("a3@1.0.0");
    rt.block_on(async { b1.client.set(&b1.id, json!({"weight": 7})) })
        .expect("update b1");
    let b3 = on_b("b3@1.0.0");
    b2.client.close();
    wait_for("the changes are made on each side", || {
        split(&[&a2.id, &a3.id], &[&b1.id, &b3.id])
    });

    // Heal: the link comes back and the two registries reconcile.
    proxy.set(Mode::Pass);
    let now = [&a2.id, &a3.id, &b1.id, &b3.id];
    settle(
        "after healing, both hubs hold the live records once",
        &both,
        &linked(&now),
    );
    let b1_on_a = dump(&a_addr)
        .into_iter()
        .find(|(id, _)| *id == b1.id)
        .map(|(_, meta)| meta);
    assert_eq!(
        b1_on_a.map(|m| m["weight"].clone()),
        Some(json!(7)),
        "hub a holds b1 as updated during the cut, not as it was"
    );
    assert_quiet(&both);

    // A silent cut: bytes are dropped and no close passes, so only heartbeats
    // can tell. Both sides must give up the other's records all the same.
    let silenced = Instant::now();
    proxy.set(Mode::Blackhole);
    settle_with("the silently cut hubs free each other's records", || {
        split(&[&a2.id, &a3.id], &[&b1.id, &b3.id])
    });
    let noticed = silenced.elapsed();
    assert!(
        noticed >= Duration::from_millis(2 * HEARTBEAT_MS),
        "a silent cut was acted on after {noticed:?}, before any timeout could expire"
    );
    proxy.set(Mode::Pass);
    settle(
        "after the silent cut heals, both hubs hold the live records once",
        &both,
        &linked(&now),
    );
    assert_quiet(&both);
}

#[test]
fn cutting_one_of_two_links_loses_no_record_and_the_heal_restores_both_announcements() {
    let b_port = reserve("127.0.0.2");
    let proxy = Proxy::start(&format!("127.0.0.2:{b_port}"));
    // a -> proxy -> b, and b -> a directly.
    let a = Member::start("127.0.0.1", 0, &[proxy.addr()]);
    let b = Member::start("127.0.0.2", b_port, &[a.addr()]);
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let both = [a_addr.as_str(), b_addr.as_str()];
    let rt = runtime();
    let a1 = register(&rt, std::slice::from_ref(&a_addr), "a1@1.0.0", fast());
    let b1 = register(&rt, std::slice::from_ref(&b_addr), "b1@1.0.0", fast());
    let ids = [&a1.id, &b1.id];
    converge(
        "both hubs hold both records and both announcements",
        &both,
        &Want::new(ids, &both),
    );

    // With a's link cut, b's link still joins the two registries: no client
    // record may be lost, and b stays announced on a. a's announcement travels
    // on a's own link, so b may drop it while that link is down.
    proxy.set(Mode::Refuse);
    settle(
        "with one link cut, both hubs still hold both records",
        &both,
        &Want::new(ids, &[b_addr.as_str()]).allowing(&a_addr),
    );
    proxy.set(Mode::Pass);
    settle(
        "after healing, both announcements and both records are on both hubs once",
        &both,
        &Want::new(ids, &both),
    );
    assert_quiet(&both);
}

#[test]
fn sigterm_stops_a_hub_at_once_and_its_clients_move_without_waiting_for_a_timeout() {
    // Long heartbeats (timeout 15 s): a client or peer that only noticed the
    // stop by a timeout would be far too late for this test.
    let heartbeat = 5000;
    let slow = ClientConfig {
        heartbeat: Duration::from_millis(heartbeat),
        timeout: Duration::from_millis(3 * heartbeat),
        reconnect_delay: Duration::from_millis(100),
        ..ClientConfig::default()
    };
    let b_port = reserve("127.0.0.2");
    let b_target = format!("127.0.0.2:{b_port}");
    let mut a = Member::start_with("127.0.0.1", 0, heartbeat, std::slice::from_ref(&b_target));
    let b = Member::start_with("127.0.0.2", b_port, heartbeat, &[a.addr()]);
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let rt = runtime();
    let mut given = register(
        &rt,
        &[a_addr.clone(), b_addr.clone()],
        "given@1.0.0",
        slow.clone(),
    );
    let mut learned = register(
        &rt,
        std::slice::from_ref(&a_addr),
        "learned@1.0.0",
        slow.clone(),
    );
    let mut cli = cli_register(&a_addr, "cli@1.0.0", heartbeat);
    let cli_id = id_of_role(&a_addr, "cli");
    let on_b = register(&rt, std::slice::from_ref(&b_addr), "on-b@1.0.0", slow);
    let ids = [&given.id, &learned.id, &cli_id, &on_b.id].map(String::clone);
    let both = [a_addr.as_str(), b_addr.as_str()];
    converge(
        "both hubs hold the four records",
        &both,
        &Want::new(&ids, &both),
    );
    wait_for("the client that knows only hub a has learned hub b", || {
        let hubs = learned.client.query("seaport").map_err(|e| e.to_string())?;
        if hubs.iter().any(|r| r.port() == Some(b.port)) {
            Ok(())
        } else {
            Err(format!("it knows {hubs:?}"))
        }
    });

    // A raw client of hub a, to see what a stopping hub tells its clients.
    let watch = Watch::connect(&a_addr);
    let b_announced = announcement(&a_addr, b.port)["id"].clone();

    let stopped = Instant::now();
    a.proc.signal(Signal::SIGTERM);
    let status = a.proc.wait();
    let exit = stopped.elapsed();
    eprintln!("cluster: hub stopped {} ms after SIGTERM", exit.as_millis());
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {status:?}");
    assert!(exit < Duration::from_secs(3), "hub a took {exit:?} to stop");
    assert!(
        TcpStream::connect(&a_addr).is_err(),
        "hub a's listener is closed"
    );
    // Closing is the message. A free would tell the clients that services and
    // hubs still running elsewhere are gone, and would take from them the
    // `seaport` record of the hub they need to move to.
    let told = watch.rows_until_closed();
    let false_frees: Vec<&Value> = told
        .iter()
        .filter(|row| {
            row[0] == "free" && (ids.iter().any(|id| row[1] == **id) || row[1] == b_announced)
        })
        .collect();
    assert!(
        false_frees.is_empty(),
        "while stopping, hub a told its clients that live records were freed: {false_frees:?} \
         (hub b's announcement is {b_announced})"
    );
    for (name, svc) in [("given", &mut given), ("learned", &mut learned)] {
        let (to, took) = moved(&rt, svc, &a_addr, stopped);
        eprintln!(
            "cluster: {name} moved to {to} {} ms after SIGTERM",
            took.as_millis()
        );
        assert_eq!(to, b_addr, "{name} moved to the other hub");
        assert!(
            took < Duration::from_secs(2),
            "{name} moved {took:?} after SIGTERM, as if by a timeout"
        );
    }
    let took = converge(
        "hub b holds every record, and not a's announcement",
        &[&b_addr],
        &Want::new(&ids, &[b_addr.as_str()]),
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // b holds the moved records for their clients now, not for the link that
    // carried them: a client that goes is freed at once. (The CLI client shows
    // that it moved only this way: had it not, b's link to a would keep its
    // record until that link's 15 s timeout.)
    let gone = Instant::now();
    cli.kill();
    given.client.close();
    converge(
        "the moved clients (the CLI one included) are freed as soon as they go",
        &[&b_addr],
        &Want::new([&learned.id, &on_b.id], &[b_addr.as_str()]),
    );
    assert!(gone.elapsed() < Duration::from_secs(3));
}

/// The records of the hub at `addr`, by id.
fn dump_ids(addr: &str) -> BTreeSet<String> {
    let (_c, _, dump) = crate::harness::Raw::connect_synced(addr);
    dump.iter()
        .filter_map(|r| r[1].as_str().map(str::to_string))
        .collect()
}

#[test]
fn records_a_hub_dropped_for_a_silence_come_back_when_it_is_heard_again() {
    use crate::harness::{HubProc, Raw, wait_until};
    // X beats every 8 s; A relays it to B, whose timeout is 300 ms. B gets
    // X's records from A before it hears X, so it drops them; X's next beat
    // must bring them back, though A never changed them.
    let a = HubProc::start(&["--heartbeat", "200"]);
    let x = HubProc::start(&["--heartbeat", "8000", "--peer", &a.addr()]);
    let (mut on_x, _, _) = Raw::connect_synced(&x.addr());
    on_x.send(r#"["register","R",{"role":"web","version":"1.0.0","port":4000}]"#);
    wait_until("A holds R", || dump_ids(&a.addr()).contains("R"));
    // Right after one of X's beats passes A, so that B hears none for 8 s: a
    // connection that beats as a hub gets the others' beats.
    let (_, _, dump) = Raw::connect_synced(&a.addr());
    let x_id = dump
        .iter()
        .find(|r| r[2]["role"] == "seaport" && r[2]["port"] == x.port)
        .and_then(|r| r[1].as_str())
        .expect("X's seaport record on A")
        .to_string();
    let mut observer = Raw::connect(&a.addr());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    observer.send(&json!(["beat", "0000000000000000000000000000000b", now_ms, 60000]).to_string());
    loop {
        let row = observer.row();
        if row[0] == "beat" && row[1] == x_id.as_str() {
            break;
        }
    }
    let b = HubProc::start(&["--heartbeat", "100", "--peer", &a.addr()]);
    let (mut on_b, _, _) = Raw::connect_synced(&b.addr());
    // B has R from A, then drops it: X is silent for longer than B waits.
    let mut had = dump_ids(&b.addr()).contains("R");
    loop {
        let row = on_b.row();
        if row[1] == "R" {
            match row[0].as_str() {
                Some("register") => had = true,
                Some("free") if had => break,
                _ => {}
            }
        }
    }
    wait_until("R is back on B", || dump_ids(&b.addr()).contains("R"));
    drop(on_x);
}
