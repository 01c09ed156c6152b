//! Scale out on etcd: the same registration load on a bare etcd cluster (no
//! hub: a small etcd-client program), on our hubs sharing one registry through
//! that kind of cluster (`seaport listen 0 --store etcd://...`), and on a mesh
//! of our hubs peered with each other (`--peer`, no etcd).
//!
//! The load is C connections × R records. Two pacings:
//!
//! - **paced**: each connection has one record in flight at a time, as the
//!   raw client has one put in flight per connection (it awaits each put's
//!   answer). The seaport protocol has no answer to a `register`, so a hub
//!   client's record is in flight until a watcher on another hub has it;
//!   then the connection sends its next one. So every run has at most C
//!   records in flight.
//! - **burst**: each connection sends all its `register` rows at once, as a
//!   client with many records does; the hub paces itself to etcd (one
//!   transaction of at most 100 records in flight per hub).
//!
//! Propagation is the time from the send of a record (the raw client's put,
//! a hub client's write of its `register` row) to its arrival at a watcher:
//! for raw etcd, a watch on the prefix through a separate etcd client; for
//! the hubs, a client of another hub than the writer's (records written
//! through hub 0 are timed at a watcher on hub 1, all others at one on hub 0).
//! The writing clients do not read what their hub forwards to them (a raw
//! etcd client does not get the others' records either; the kernel buffers
//! what the hub sends and the hub's feed drops what they do not read, as for
//! clients on other machines), so the bench process spends its CPU on the
//! writes and the two watchers only.
//!
//! Every run ends with a check that nothing is missing: the keys under the
//! prefix in etcd and the records in every hub's dump, counted; a run with
//! one missing fails the scenario, and so the benchmark.

use super::etcd::Etcd;
use super::load::{Fleet, connect_synced, each_line, next_tag, record_id};
use super::procs::{HubKind, HubProc, TICKS_PER_SEC, cpu_ticks, peak_rss_bytes};
use super::report::{Figure, Measure, Report, Target, Unit, percentile};
use super::{Ctx, Res, wrap};
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The key prefix of the raw runs and of the hubs (their default).
const PREFIX: &str = "/seaport/";

/// The record number of the warm-up record's `host:port` (127.1.255.1:10000),
/// apart from every record of the load.
const WARM_UP: usize = 255 * 50_000;

/// The raw client's lease TTL, as a hub's default timeout (45 s).
const RAW_TTL: i64 = 45;

/// The most records the raw client puts on one lease: the hub's own cap
/// (`KEYS_PER_LEASE` in src/hub/store/leases.rs). In etcd 3.4 a put on a
/// lease costs in proportion to the keys already on it (etcd-io/etcd#15993):
/// with one lease for each of 10 connections, 100,000 puts had not finished
/// after 300 s (84,625 answered).
const RAW_KEYS_PER_LEASE: usize = 1000;

/// How often the raw client renews a lease while it writes on it.
const RAW_KEEP_ALIVE: Duration = Duration::from_secs(15);

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The sizes and deadlines of one mode.
struct Plan {
    /// etcd members per cluster.
    members: usize,
    /// Hubs over etcd.
    hubs: usize,
    /// Hubs in the mesh.
    mesh: usize,
    /// Connections × records per connection.
    sizes: Vec<(usize, usize)>,
    /// Longest a run's load may take.
    limit: Duration,
    /// More flags for every etcd member: `SEAPORT_BENCH_ETCD_ARGS`, split
    /// on white space (e.g. `--grpc-keepalive-min-time=1s`).
    etcd_args: Vec<String>,
}

impl Plan {
    fn of(ctx: &Ctx) -> Plan {
        let default = if ctx.quick {
            vec![(100, 5), (2, 200)]
        } else {
            vec![(1_000, 10), (10, 10_000)]
        };
        Plan {
            members: if ctx.quick { 1 } else { 3 },
            hubs: if ctx.quick { 3 } else { 10 },
            mesh: 3,
            sizes: ctx.sizes.clone().unwrap_or(default),
            limit: ctx.limit(20, 300),
            etcd_args: std::env::var("SEAPORT_BENCH_ETCD_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
        }
    }
}

/// A record's row: unique `host:port` for every record of a run (hubs over a
/// store claim each record's `host:port`, and refuse a second claim), made
/// of loopback addresses and ports that nothing listens on. Never on
/// 127.0.0.1, where the hubs listen: each hub's own record claims its
/// address and port, which would refuse a record of the load with the same.
fn scale_row(id: &str, n: usize) -> String {
    let host = format!("127.1.{}.1", (n / 50_000) % 256);
    let port = 10_000 + n % 50_000;
    format!(
        "[\"register\",\"{id}\",{{\"role\":\"bench\",\"version\":\"1.0.0\",\"host\":\"{host}\",\"port\":{port},\"id\":\"{id}\"}}]\n"
    )
}

// ---------------------------------------------------------------------------
// Per-record times.

/// The send, answer (raw puts) and arrival time of every record of a run, in
/// nanoseconds since `base` plus one (0: not yet).
struct Track {
    base: Instant,
    tag: u32,
    conns: usize,
    per_conn: usize,
    /// The first request of the run, when it is not a record's send (the
    /// raw client's first lease grant).
    begun: AtomicU64,
    sent: Vec<AtomicU64>,
    acked: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    count: AtomicUsize,
    /// Told when the last record arrives.
    all: Notify,
    /// One per connection: told when one of its records arrives.
    wake: Vec<Notify>,
}

impl Track {
    fn new(tag: u32, conns: usize, per_conn: usize) -> Track {
        let total = conns * per_conn;
        let zeros = || (0..total).map(|_| AtomicU64::new(0)).collect();
        Track {
            base: Instant::now(),
            tag,
            conns,
            per_conn,
            begun: AtomicU64::new(u64::MAX),
            sent: zeros(),
            acked: zeros(),
            arrived: zeros(),
            count: AtomicUsize::new(0),
            all: Notify::new(),
            wake: (0..conns).map(|_| Notify::new()).collect(),
        }
    }

    fn total(&self) -> usize {
        self.conns * self.per_conn
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn id(&self, conn: usize, rec: usize) -> String {
        record_id(self.tag, conn as u32, rec as u32)
    }

    /// (connection, record index) of one of this run's ids.
    fn index(&self, id: &[u8]) -> Option<(usize, usize)> {
        let id = std::str::from_utf8(id.get(..32)?).ok()?;
        let tag = u32::from_str_radix(&id[..8], 16).ok()?;
        let conn = usize::from_str_radix(&id[8..16], 16).ok()?;
        let rec = usize::from_str_radix(&id[16..32], 16).ok()?;
        (tag == self.tag && conn < self.conns && rec < self.per_conn)
            .then_some((conn, conn * self.per_conn + rec))
    }

    /// Record `idx` of connection `conn` arrived at `at` (its first arrival
    /// counts).
    fn arrive(&self, conn: usize, idx: usize, at: u64) {
        if self.arrived[idx]
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wake[conn].notify_one();
            if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.total() {
                self.all.notify_one();
            }
        }
    }

    fn arrivals(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until every record has arrived.
    async fn wait_all(&self, deadline: tokio::time::Instant, what: &str) -> Res<()> {
        if notified_until(&self.all, || self.arrivals() >= self.total(), deadline).await {
            return Ok(());
        }
        Err(format!(
            "{what}: {} of {} records arrived before the deadline",
            self.arrivals(),
            self.total()
        ))
    }

    /// Waits until record `idx` of connection `conn` has arrived.
    async fn wait_one(&self, conn: usize, idx: usize, deadline: tokio::time::Instant) -> Res<()> {
        let arrived = || self.arrived[idx].load(Ordering::Acquire) != 0;
        if notified_until(&self.wake[conn], arrived, deadline).await {
            return Ok(());
        }
        Err(format!(
            "record {idx} (connection {conn}) did not arrive before the deadline ({} of {} did)",
            self.arrivals(),
            self.total()
        ))
    }

    /// When the run's first request went.
    fn first_send(&self) -> u64 {
        self.sent
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .filter(|&t| t != 0)
            .min()
            .unwrap_or(0)
            .min(self.begun.load(Ordering::Acquire))
    }

    fn last(times: &[AtomicU64]) -> u64 {
        times
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .max()
            .unwrap_or(0)
    }

    /// Records per second from the first send to `end`.
    fn rate(&self, end: u64) -> f64 {
        let secs = end.saturating_sub(self.first_send()) as f64 / 1e9;
        self.total() as f64 / secs.max(1e-9)
    }

    /// Every record's send-to-arrival time in ms, sorted.
    fn propagation(&self) -> Vec<f64> {
        let mut lat: Vec<f64> = self
            .sent
            .iter()
            .zip(&self.arrived)
            .map(|(s, a)| {
                a.load(Ordering::Acquire)
                    .saturating_sub(s.load(Ordering::Acquire)) as f64
                    / 1e6
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        lat
    }
}

/// Waits until `done`, checked each time `notify` wakes; `false` if the
/// deadline passed first.
async fn notified_until(
    notify: &Notify,
    done: impl Fn() -> bool,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        // Woken with notify_one, which keeps a permit: a wake between the
        // check and the wait is not lost.
        let notified = notify.notified();
        if done() {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return false;
        }
    }
}

/// What one run measured.
struct Run {
    rate: f64,
    p50: f64,
    p99: f64,
    /// Sum of the etcd members' peak RSS (0 for the mesh).
    etcd_rss: u64,
    /// Sum of the hubs' peak RSS (0 for raw etcd).
    hubs_rss: u64,
    raw: Value,
}

impl Run {
    fn from(track: &Track, end: u64, mut raw: Value) -> Run {
        let lat = track.propagation();
        let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
        let rate = track.rate(end);
        raw["connections"] = json!(track.conns);
        raw["records_per_connection"] = json!(track.per_conn);
        raw["records"] = json!(track.total());
        raw["rate"] = json!(rate);
        raw["seconds"] = json!(end.saturating_sub(track.first_send()) as f64 / 1e9);
        raw["propagation_ms"] = json!({
            "min": lat.first(),
            "p50": p50,
            "p90": percentile(&lat, 90.0),
            "p99": p99,
            "max": lat.last(),
        });
        Run {
            rate,
            p50,
            p99,
            etcd_rss: 0,
            hubs_rss: 0,
            raw,
        }
    }
}

/// Sum of the peak RSS (VmHWM) of `pids`.
fn peak_sum(pids: &[u32]) -> Res<u64> {
    pids.iter().map(|&p| peak_rss_bytes(p)).sum()
}

/// Sum of the CPU seconds `pids` have used.
fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&p| cpu_ticks(p).unwrap_or(0) as f64 / TICKS_PER_SEC)
        .sum()
}

// ---------------------------------------------------------------------------
// Raw etcd.

/// C×R puts straight to etcd: each "connection" is a task that grants a
/// lease (TTL 45 s), then puts its records on it one after another, each
/// after the answer to the previous one (so at most C puts in flight: etcd
/// refuses requests once about 5,000 proposals wait), with a new lease after
/// every 1,000 records ([`RAW_KEYS_PER_LEASE`]), renewing its leases every
/// 15 s meanwhile. All tasks share one etcd client (one
/// HTTP/2 connection per member, requests balanced over the members). A
/// second client watches the prefix and times each put's event. The rate runs
/// from the first request (a lease grant) to the last put answered.
fn raw_run(ctx: &Ctx, plan: &Plan, c: usize, r: usize) -> Res<Run> {
    let etcd = Etcd::cluster_with(plan.members, &plan.etcd_args)?;
    let pids = etcd.pids();
    let urls: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("http://{e}"))
        .collect();
    let track = Arc::new(Track::new(next_tag(), c, r));
    let records = format!("{PREFIX}records/");
    let (etcd_cpu, bench_cpu) = (cpu_secs(&pids), cpu_secs(&[std::process::id()]));
    ctx.rt.block_on(async {
        let deadline = tokio::time::Instant::now() + plan.limit;
        let connect = |what: &'static str| {
            let urls = urls.clone();
            async move {
                Client::connect(&urls, None)
                    .await
                    .map_err(wrap(format!("etcd client ({what})")))
            }
        };
        let mut watch_client = connect("watcher").await?;
        let mut client = connect("writers").await?;
        let mut stream = watch_client
            .watch(records.clone(), Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(wrap("watch the prefix"))?;
        let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watching = {
            let track = track.clone();
            let records = records.clone();
            tokio::spawn(async move {
                while let Ok(Some(response)) = stream.message().await {
                    let at = track.now();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(id) = kv.key().strip_prefix(records.as_bytes()) else {
                            continue;
                        };
                        if id == b"ready" {
                            let _ = ready_tx.send(());
                        } else if let Some((conn, idx)) = track.index(id) {
                            track.arrive(conn, idx, at);
                        }
                    }
                    if track.arrivals() >= track.total() {
                        return;
                    }
                }
            })
        };
        // The watch is live once it has seen a put made after it.
        client
            .put(format!("{records}ready"), "", None)
            .await
            .map_err(wrap("put the ready key"))?;
        tokio::time::timeout_at(deadline, ready.recv())
            .await
            .map_err(|_| "the watch did not see the ready key".to_string())?;
        client
            .delete(format!("{records}ready"), None)
            .await
            .map_err(wrap("delete the ready key"))?;

        let rows: Vec<Vec<(String, Vec<u8>)>> = (0..c)
            .map(|i| {
                (0..r)
                    .map(|j| {
                        let id = track.id(i, j);
                        let row = scale_row(&id, i * r + j);
                        (format!("{records}{id}"), row.trim_end().as_bytes().to_vec())
                    })
                    .collect()
            })
            .collect();
        let start = CancellationToken::new();
        let mut writers = JoinSet::new();
        for (i, rows) in rows.into_iter().enumerate() {
            let mut client = client.clone();
            let track = track.clone();
            let start = start.clone();
            writers.spawn(async move {
                start.cancelled().await;
                track.begun.fetch_min(track.now(), Ordering::AcqRel);
                let mut leases = Vec::new();
                let mut renewed = Instant::now();
                for (j, (key, value)) in rows.into_iter().enumerate() {
                    let idx = i * r + j;
                    if j % RAW_KEYS_PER_LEASE == 0 {
                        let granted = client
                            .lease_grant(RAW_TTL, None)
                            .await
                            .map_err(wrap("lease grant"))?;
                        leases.push(granted.id());
                    }
                    let lease = *leases.last().ok_or("no lease")?;
                    track.sent[idx].store(track.now(), Ordering::Release);
                    client
                        .put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                        .map_err(wrap(format!("put record {idx}")))?;
                    track.acked[idx].store(track.now(), Ordering::Release);
                    if renewed.elapsed() >= RAW_KEEP_ALIVE {
                        for &lease in &leases {
                            let (mut keeper, _) = client
                                .lease_keep_alive(lease)
                                .await
                                .map_err(wrap("lease keep-alive"))?;
                            keeper
                                .keep_alive()
                                .await
                                .map_err(wrap("lease keep-alive"))?;
                        }
                        renewed = Instant::now();
                    }
                }
                Ok::<_, String>(())
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        start.cancel();
        while let Some(done) = tokio::time::timeout_at(deadline, writers.join_next())
            .await
            .map_err(|_| {
                format!(
                    "raw etcd: the puts did not finish before the deadline ({} of {} answered)",
                    track
                        .acked
                        .iter()
                        .filter(|t| t.load(Ordering::Acquire) != 0)
                        .count(),
                    track.total()
                )
            })?
        {
            done.map_err(wrap("writer task"))??;
        }
        track.wait_all(deadline, "raw etcd watch").await?;
        watching.abort();
        Ok::<_, String>(())
    })?;
    let first_sent = track.first_send();
    let last_ack = Track::last(&track.acked);
    let last_arrival = Track::last(&track.arrived);
    let etcd_cpu = cpu_secs(&pids) - etcd_cpu;
    let bench_cpu = cpu_secs(&[std::process::id()]) - bench_cpu;
    let mut run = Run::from(
        &track,
        last_ack,
        json!({
            "members": plan.members,
            "etcd_args": plan.etcd_args,
            "rate_until_watch_had_all": track.rate(last_arrival),
            "seconds_until_watch_had_all": last_arrival.saturating_sub(first_sent) as f64 / 1e9,
            "etcd_cpu_seconds": etcd_cpu,
            "bench_cpu_seconds": bench_cpu,
        }),
    );
    let keys = etcd.count_keys(&format!("{PREFIX}records/"))?;
    if keys != track.total() {
        return Err(format!(
            "raw etcd: {keys} keys under {PREFIX}records/, {} expected",
            track.total()
        ));
    }
    run.etcd_rss = peak_sum(&pids)?;
    run.raw["etcd_peak_rss_bytes"] = json!(run.etcd_rss);
    run.raw["keys_counted"] = json!(keys);
    Ok(run)
}

// ---------------------------------------------------------------------------
// Hubs.

/// Which hubs, and how records flow between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `--store etcd://...`, on a cluster of their own.
    Etcd,
    /// `--peer`: hub k peers with every hub before it.
    Mesh,
}

/// Reads a hub's dump (every record it holds) and returns the index of each
/// of this run's records in it.
async fn dump_held(addr: SocketAddr, track: &Track) -> Res<Vec<usize>> {
    let fut = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(wrap(format!("connect {addr}")))?;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut pos = 0;
        let mut held = Vec::new();
        loop {
            let synced = each_line(&buf, &mut pos, |line| {
                if let Some(rest) = line.strip_prefix(b"[\"register\",\"")
                    && let Some((_, idx)) = track.index(rest)
                {
                    held.push(idx);
                }
                line == b"[\"synced\"]"
            });
            if synced {
                return Ok(held);
            }
            buf.drain(..pos);
            pos = 0;
            if stream
                .read_buf(&mut buf)
                .await
                .map_err(wrap("read a dump"))?
                == 0
            {
                return Err(format!("{addr} closed the connection during its dump"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .map_err(|_| format!("{addr}: no complete dump within 60 s"))?
}

/// Registers one record on the first hub and waits until every hub's dump
/// has it: every hub's link (its watch of etcd, or its peer links) is up.
async fn warm_up(hubs: &[SocketAddr], within: Duration) -> Res<TcpStream> {
    let track = Track::new(next_tag(), 1, 1);
    let mut stream = connect_synced(hubs[0]).await?;
    stream
        .write_all(scale_row(&track.id(0, 0), WARM_UP).as_bytes())
        .await
        .map_err(wrap("register the warm-up record"))?;
    let deadline = Instant::now() + within;
    for &hub in &hubs[1..] {
        while dump_held(hub, &track).await?.is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "hub {hub} did not get a record registered on {} within {within:?}",
                    hubs[0]
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Kept open: closing it would free the record, a change every hub
    // would be handling while the load starts.
    Ok(stream)
}

/// The hub whose watcher times the records of connection `conn` (of a run
/// on `n` hubs): hub 1 for those written through hub 0, hub 0 for the rest.
fn timed_at(conn: usize, n: usize) -> usize {
    usize::from(conn % n == 0)
}

/// A client of hub `hub` (of `n`) that times the arrival of the records
/// [`timed_at`] gives it, all written through another hub.
async fn watch_hub(
    addr: SocketAddr,
    hub: usize,
    n: usize,
    track: Arc<Track>,
) -> Res<tokio::task::JoinHandle<()>> {
    let mut stream = connect_synced(addr).await?;
    Ok(tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let at = track.now();
            let mut pos = 0;
            each_line(&buf, &mut pos, |line| {
                if let Some(rest) = line.strip_prefix(b"[\"register\",\"")
                    && let Some((conn, idx)) = track.index(rest)
                    && timed_at(conn, n) == hub
                {
                    track.arrive(conn, idx, at);
                }
                false
            });
            buf.drain(..pos);
        }
    }))
}

/// The load on a set of hubs: connection i goes to hub i mod H; `paced` or
/// burst (see the module). Returns the run, with the client connections
/// still open (their records live as long as they are).
async fn hub_load(
    hubs: &[SocketAddr],
    track: Arc<Track>,
    paced: bool,
    limit: Duration,
) -> Res<(Vec<OwnedWriteHalf>, Vec<Fleet>)> {
    let n = hubs.len();
    let (c, r) = (track.conns, track.per_conn);
    let watchers = [
        watch_hub(hubs[0], 0, n, track.clone()).await?,
        watch_hub(hubs[1], 1, n, track.clone()).await?,
    ];
    // The writers: connected and synced before the clock, not reading.
    let mut fleets = Vec::with_capacity(n);
    for (h, &addr) in hubs.iter().enumerate() {
        let count = (0..c).filter(|i| i % n == h).count();
        fleets.push(Fleet::connect(addr, count, None).await?);
    }
    let mut halves: Vec<Vec<OwnedWriteHalf>> = fleets
        .iter_mut()
        .map(|f| std::mem::take(&mut f.writers))
        .collect();
    for h in &mut halves {
        h.reverse();
    }
    let start = CancellationToken::new();
    let mut writers = JoinSet::new();
    for i in 0..c {
        let mut half = halves[i % n]
            .pop()
            .ok_or("fewer connections than planned")?;
        let rows: Vec<String> = (0..r)
            .map(|j| scale_row(&track.id(i, j), i * r + j))
            .collect();
        let track = track.clone();
        let start = start.clone();
        writers.spawn(async move {
            start.cancelled().await;
            let deadline = tokio::time::Instant::now() + limit;
            if paced {
                for (j, row) in rows.iter().enumerate() {
                    let idx = i * r + j;
                    track.sent[idx].store(track.now(), Ordering::Release);
                    half.write_all(row.as_bytes())
                        .await
                        .map_err(wrap("send a register row"))?;
                    track.wait_one(i, idx, deadline).await?;
                }
            } else {
                let bytes = rows.concat();
                let now = track.now();
                for j in 0..r {
                    track.sent[i * r + j].store(now, Ordering::Release);
                }
                half.write_all(bytes.as_bytes())
                    .await
                    .map_err(wrap("send register rows"))?;
            }
            Ok::<_, String>(half)
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    start.cancel();
    let deadline = tokio::time::Instant::now() + limit;
    let mut open = Vec::with_capacity(c);
    while let Some(done) = tokio::time::timeout_at(deadline, writers.join_next())
        .await
        .map_err(|_| {
            format!(
                "the writers did not finish before the deadline ({} of {} records arrived)",
                track.arrivals(),
                track.total()
            )
        })?
    {
        open.push(done.map_err(wrap("writer task"))??);
    }
    track.wait_all(deadline, "hubs").await?;
    for w in watchers {
        w.abort();
    }
    Ok((open, fleets))
}

/// One run on fresh hubs (and, over etcd, a fresh cluster): start, warm up,
/// load, check that every hub holds every record (and etcd has a key for
/// each), measure.
fn hubs_run(ctx: &Ctx, plan: &Plan, kind: Kind, c: usize, r: usize, paced: bool) -> Res<Run> {
    let mut etcd = None;
    let mut hubs: Vec<HubProc> = Vec::new();
    match kind {
        Kind::Etcd => {
            let cluster = Etcd::cluster_with(plan.members, &plan.etcd_args)?;
            let url = cluster.url();
            for _ in 0..plan.hubs {
                hubs.push(HubProc::start(
                    &ctx.env,
                    HubKind::Ours,
                    &["--store", url.as_str()],
                )?);
            }
            etcd = Some(cluster);
        }
        Kind::Mesh => {
            for _ in 0..plan.mesh {
                let peers: Vec<String> = hubs.iter().map(|h| h.addr.to_string()).collect();
                let mut args: Vec<&str> = Vec::new();
                for p in &peers {
                    args.extend(["--peer", p.as_str()]);
                }
                hubs.push(HubProc::start(&ctx.env, HubKind::Ours, &args)?);
            }
        }
    }
    let addrs: Vec<SocketAddr> = hubs.iter().map(|h| h.addr).collect();
    let hub_pids: Vec<u32> = hubs.iter().map(|h| h.proc.pid()).collect();
    let etcd_pids = etcd.as_ref().map(Etcd::pids).unwrap_or_default();
    let track = Arc::new(Track::new(next_tag(), c, r));
    let _warm = ctx.rt.block_on(warm_up(&addrs, Duration::from_secs(20)))?;
    let cpu_before = (
        cpu_secs(&hub_pids),
        cpu_secs(&etcd_pids),
        cpu_secs(&[std::process::id()]),
    );
    let (open, fleets) = ctx
        .rt
        .block_on(hub_load(&addrs, track.clone(), paced, plan.limit))?;
    let end = Track::last(&track.arrived);
    let cpu = (
        cpu_secs(&hub_pids) - cpu_before.0,
        cpu_secs(&etcd_pids) - cpu_before.1,
        cpu_secs(&[std::process::id()]) - cpu_before.2,
    );
    // Nothing missing: every hub's dump has every record, and etcd a key.
    // The watchers saw every record on one hub other than its writer's;
    // the other hubs may still be applying the last ones: each hub's dump
    // is read again until it has every record, up to a deadline.
    let total = track.total();
    let settle = Instant::now();
    let settle_limit = ctx.limit(10, 30);
    let dumps: Vec<Vec<usize>> = ctx.rt.block_on(async {
        let mut dumps = Vec::with_capacity(addrs.len());
        for &addr in &addrs {
            loop {
                let held = dump_held(addr, &track).await?;
                if held.len() >= total || settle.elapsed() > settle_limit {
                    dumps.push(held);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok::<_, String>(dumps)
    })?;
    let settled_ms = settle.elapsed().as_secs_f64() * 1000.0;
    let held: Vec<usize> = dumps.iter().map(Vec::len).collect();
    let what = match kind {
        Kind::Etcd => format!("{} hubs over etcd", plan.hubs),
        Kind::Mesh => format!("a mesh of {} hubs", plan.mesh),
    };
    if let Some(i) = held.iter().position(|&h| h != total) {
        return Err(format!(
            "{what}: {settle_limit:?} after the watchers had every record, hub {i} holds {} \
             of the {total} (all hubs: {held:?}); {}; see its log {}",
            held[i],
            missing(&track, &dumps[i], addrs.len()),
            hubs[i].proc.log().display()
        ));
    }
    let keys = match &etcd {
        Some(etcd) => {
            let keys = etcd.count_keys(&format!("{PREFIX}records/{:08X}", track.tag))?;
            if keys != total {
                return Err(format!("{what}: {keys} of the {total} records are in etcd"));
            }
            Some(keys)
        }
        None => None,
    };
    let mut run = Run::from(
        &track,
        end,
        json!({
            "hubs": addrs.len(),
            "etcd_members": etcd_pids.len(),
            "etcd_args": plan.etcd_args,
            "paced": paced,
            "records_held_by_each_hub": held,
            // From the watchers having every record to every hub's dump
            // having every record (the dumps read one hub after another).
            "all_hubs_had_all_ms_after": settled_ms,
            "keys_counted": keys,
            "hub_cpu_seconds": cpu.0,
            "etcd_cpu_seconds": cpu.1,
            "bench_cpu_seconds": cpu.2,
        }),
    );
    run.hubs_rss = peak_sum(&hub_pids)?;
    run.etcd_rss = peak_sum(&etcd_pids)?;
    run.raw["hubs_peak_rss_bytes"] = json!(run.hubs_rss);
    run.raw["hubs_peak_rss_each_bytes"] = json!(
        hub_pids
            .iter()
            .map(|&p| peak_rss_bytes(p).unwrap_or(0))
            .collect::<Vec<_>>()
    );
    run.raw["etcd_peak_rss_bytes"] = json!(run.etcd_rss);
    ctx.rt.block_on(async move {
        drop(open);
        for fleet in fleets {
            fleet.close();
        }
    });
    Ok(run)
}

/// Which of the run's records `held` lacks: how many were written through
/// each hub, and the first few ids.
fn missing(track: &Track, held: &[usize], hubs: usize) -> String {
    let mut have = vec![false; track.total()];
    for &idx in held {
        have[idx] = true;
    }
    let mut per_hub = vec![0usize; hubs];
    let mut ids = Vec::new();
    for (idx, _) in have.iter().enumerate().filter(|(_, h)| !**h) {
        let (conn, rec) = (idx / track.per_conn, idx % track.per_conn);
        per_hub[conn % hubs] += 1;
        if ids.len() < 5 {
            ids.push(track.id(conn, rec));
        }
    }
    format!("missing records by the hub they were written through: {per_hub:?}, first ids {ids:?}")
}

// ---------------------------------------------------------------------------
// The scenario.

/// Scale out on etcd: for each size, raw etcd, hubs over etcd (paced and
/// burst) and a mesh (paced and burst), each on fresh processes, each part
/// reported as soon as it is measured. A run that fails (a deadline passed,
/// a record missing) is reported and the others still run; the scenario
/// fails at the end. Targets (paced, against raw etcd): the hubs' rate at
/// least 0.8 × raw etcd's, and their p99 propagation at most 2 ms over raw
/// etcd's watch p99.
pub fn scale(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let plan = Plan::of(ctx);
    let (members, hubs, mesh) = (plan.members, plan.hubs, plan.mesh);
    let mut failures: Vec<String> = Vec::new();
    let mut attempt = |what: String, run: &dyn Fn() -> Res<Run>| {
        eprintln!("[scale] {what}");
        run().map_err(|e| {
            let e = format!("{what}: {e}");
            eprintln!("[scale] FAILED: {e}");
            failures.push(e);
        })
    };
    for &(c, r) in &plan.sizes {
        let size = format!("{c} conns x {r}");
        let row = |name: String, unit: Unit, value: f64, raw_json: &Value| {
            let mut fig = Figure::new("scale", format!("{size}: {name}"), unit);
            fig.ours = Some(Measure::exact(value));
            fig.raw = json!({ "ours": raw_json });
            fig
        };

        if !plan.etcd_args.is_empty() {
            eprintln!(
                "[scale] every etcd member with {} (SEAPORT_BENCH_ETCD_ARGS)",
                plan.etcd_args.join(" ")
            );
        }
        let raw = attempt(format!("{size}: raw etcd ({members} members)"), &|| {
            raw_run(ctx, &plan, c, r)
        });
        if let Ok(raw) = &raw {
            let mut fig = row(
                format!("raw etcd ({members} members), paced: rate"),
                Unit::PerSec,
                raw.rate,
                &raw.raw,
            );
            fig.notes.push(format!(
                "raw etcd: {c} connections, each with its {r} puts one after another, \
                 on a lease per {RAW_KEYS_PER_LEASE} records; {:.0} records/s until the \
                 watch had every put",
                raw.raw["rate_until_watch_had_all"].as_f64().unwrap_or(0.0)
            ));
            report.push(fig);
            report.push(row(
                "raw etcd, paced: watch propagation p99".into(),
                Unit::Ms,
                raw.p99,
                &raw.raw,
            ));
            report.push(row(
                format!("raw etcd: peak RSS of the {members} members"),
                Unit::MiB,
                mib(raw.etcd_rss),
                &raw.raw,
            ));
        }
        // The ratio of a rate to raw etcd's, when both were measured.
        let vs_raw = |mut fig: Figure, of: &'static str, rate: f64| {
            if let Ok(raw) = &raw {
                fig.ratio_of = of;
                fig.ratio = Some(Measure::exact(rate / raw.rate));
            }
            fig
        };

        for kind in [Kind::Etcd, Kind::Mesh] {
            let who = match kind {
                Kind::Etcd => format!("{hubs} hubs over etcd"),
                Kind::Mesh => format!("mesh of {mesh} hubs"),
            };
            let of = match kind {
                Kind::Etcd => "hubs/raw etcd",
                Kind::Mesh => "mesh/raw etcd",
            };
            let paced = attempt(format!("{size}: {who}, paced"), &|| {
                hubs_run(ctx, &plan, kind, c, r, true)
            });
            let burst = attempt(format!("{size}: {who}, burst"), &|| {
                hubs_run(ctx, &plan, kind, c, r, false)
            });
            if let Ok(run) = &paced {
                let mut fig = vs_raw(
                    row(
                        format!("{who}, paced: rate"),
                        Unit::PerSec,
                        run.rate,
                        &run.raw,
                    ),
                    of,
                    run.rate,
                );
                if kind == Kind::Etcd {
                    fig = fig.target(Target::RatioAtLeast(0.8));
                }
                report.push(fig);
                let mut fig = row(
                    format!("{who}, paced: propagation p99"),
                    Unit::Ms,
                    run.p99,
                    &run.raw,
                );
                if let Ok(raw) = &raw {
                    fig.notes.push(format!(
                        "p50: raw etcd {:.2} ms, {who} {:.2} ms",
                        raw.p50, run.p50
                    ));
                }
                report.push(fig);
                if let (Kind::Etcd, Ok(raw)) = (kind, &raw) {
                    let mut fig = row(
                        "hubs p99 - raw etcd p99 (paced)".into(),
                        Unit::Ms,
                        run.p99 - raw.p99,
                        &json!({ "hubs_p99_ms": run.p99, "raw_etcd_p99_ms": raw.p99 }),
                    )
                    .target(Target::OursAtMost(2.0));
                    fig.ratio_of = "hubs-raw";
                    report.push(fig);
                }
            }
            if let Ok(run) = &burst {
                report.push(vs_raw(
                    row(
                        format!("{who}, burst: rate"),
                        Unit::PerSec,
                        run.rate,
                        &run.raw,
                    ),
                    of,
                    run.rate,
                ));
                report.push(row(
                    format!("{who}, burst: propagation p99"),
                    Unit::Ms,
                    run.p99,
                    &run.raw,
                ));
            }
            let runs: Vec<&Run> = [&paced, &burst]
                .into_iter()
                .filter_map(|r| r.as_ref().ok())
                .collect();
            if runs.is_empty() {
                continue;
            }
            let peak = |f: fn(&Run) -> u64| runs.iter().map(|r| f(r)).max().unwrap_or(0);
            let each = |f: fn(&Run) -> u64| {
                json!({
                    "paced": paced.as_ref().ok().map(f),
                    "burst": burst.as_ref().ok().map(f),
                })
            };
            if kind == Kind::Etcd {
                report.push(row(
                    format!("{who}: peak RSS of the {members} etcd members"),
                    Unit::MiB,
                    mib(peak(|r| r.etcd_rss)),
                    &each(|r| r.etcd_rss),
                ));
            }
            report.push(row(
                format!("{who}: peak RSS of the hubs (sum)"),
                Unit::MiB,
                mib(peak(|r| r.hubs_rss)),
                &each(|r| r.hubs_rss),
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
