//! Hub scenarios: the same raw-protocol load against our hub and the Node hub,
//! each on a fresh hub process, started one after the other in the same run.
//!
//! Fairness rules common to all of them:
//! - connections are opened and synced before the clock starts;
//! - rows are serialised before the clock starts, and carry `host` and `id`, so
//!   neither hub has extra work to do on them (ours would fill them in);
//! - every row a hub forwards is really delivered to a connection (both hubs must
//!   fan each row out to every other connection: that is the protocol);
//! - only loopback addresses; the load generator runs in this process on the same
//!   two cores, which costs the faster hub more than the slower one, so ratios are,
//!   if anything, understated.

use super::load::{
    Fleet, Watcher, arm_writers, connect_synced, connect_synced_blocking, drain, each_line,
    next_tag, record_id, record_port, register_row,
};
use super::procs::{HubKind, HubProc, TICKS_PER_SEC, cpu_ticks};
use super::report::{Figure, Measure, Report, Target, Unit, percentile};
use super::{Ctx, Res, wrap};
use seaport::protocol::auth::{SessionKey, sign_challenge};
use seaport::protocol::keys::Keypair;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

fn set(fig: &mut Figure, kind: HubKind, m: Measure) {
    match kind {
        HubKind::Ours => fig.ours = Some(m),
        HubKind::Node => fig.node = Some(m),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------
// Registration load: the engine behind throughput, memory and signed.

/// A registration run whose connections are still open (their records live as
/// long as they are): drop it to close them.
struct Load {
    /// Records per second, or a bound if the deadline passed.
    rate: Measure,
    /// Raw numbers.
    raw: Value,
    /// Per-connection connect (and, signed, authenticate) times.
    handshakes: Vec<Duration>,
    _writers: JoinSet<Res<tokio::net::tcp::OwnedWriteHalf>>,
    _drains: JoinSet<()>,
    _watcher: Watcher,
    stop: CancellationToken,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `c` connections each send `r` register rows as fast as the hub takes them;
/// timed from the first byte until a separate watcher connection has received all
/// `c × r` rows. With `key`, each connection authenticates first (not timed) and
/// sends every row signed.
///
/// Every registering connection also reads what the hub forwards to it (all the
/// others' rows), as a real client must: the hub's fan-out is part of the cost.
async fn register_load(
    hub: &HubProc,
    c: usize,
    r: usize,
    key: Option<&Keypair>,
    limit: Duration,
) -> Res<Load> {
    let addr = hub.addr;
    let tag = next_tag();
    let mut watcher = Watcher::connect(addr).await?;
    let stop = CancellationToken::new();
    let mut drains = JoinSet::new();
    let mut writers = Vec::with_capacity(c);
    let mut handshakes = Vec::with_capacity(c);
    for i in 0..c {
        let began = Instant::now();
        let (stream, session) = match key {
            None => (connect_synced(addr).await?, None),
            Some(pair) => {
                let (stream, session) = connect_signed(addr, pair).await?;
                (stream, Some(session))
            }
        };
        handshakes.push(began.elapsed());
        let mut bytes = Vec::with_capacity(r * if key.is_some() { 320 } else { 160 });
        for j in 0..r {
            let row = register_row(&record_id(tag, i as u32, j as u32), record_port(i * r + j));
            match &session {
                None => bytes.extend_from_slice(row.as_bytes()),
                Some(k) => bytes.extend_from_slice(&k.sign_row(j as u64 + 1, row.as_bytes())),
            }
        }
        let (read, write) = stream.into_split();
        drains.spawn(drain(read, 64 * 1024, stop.clone()));
        writers.push((write, bytes));
    }
    let bytes: usize = writers.iter().map(|(_, b)| b.len()).sum();
    let start = CancellationToken::new();
    let writing = arm_writers(writers, &start);
    // Let every writer reach the start line.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let total = c * r;
    let cpu = |pid: u32| cpu_ticks(pid).unwrap_or(0);
    let (hub_cpu, bench_cpu) = (cpu(hub.proc.pid()), cpu(std::process::id()));
    let t0 = Instant::now();
    start.cancel();
    let outcome = watcher.wait_for(|n| n.registers >= total, t0 + limit).await;
    let hub_cpu = (cpu(hub.proc.pid()) - hub_cpu) as f64 / TICKS_PER_SEC;
    let bench_cpu = (cpu(std::process::id()) - bench_cpu) as f64 / TICKS_PER_SEC;
    let (rate, seen, secs) = match outcome {
        Ok(at) => {
            let secs = (at - t0).as_secs_f64();
            (Measure::exact(total as f64 / secs), total, secs)
        }
        Err(counts) => {
            if counts.registers == 0 {
                return Err(format!(
                    "the watcher saw no record within {limit:?} (rows refused? see the hub log)"
                ));
            }
            let secs = limit.as_secs_f64();
            (
                Measure::at_most(counts.registers as f64 / secs),
                counts.registers,
                secs,
            )
        }
    };
    Ok(Load {
        rate,
        raw: json!({
            "connections": c,
            "records_per_connection": r,
            "records_seen": seen,
            "seconds": secs,
            "bytes_sent": bytes,
            "timed_out": seen < total,
            "hub_cpu_seconds": hub_cpu,
            "bench_cpu_seconds": bench_cpu,
            // Null when the run took less than one clock tick of hub CPU.
            "hub_cpu_us_per_record": (hub_cpu > 0.0).then(|| hub_cpu * 1e6 / seen as f64),
        }),
        handshakes,
        _writers: writing,
        _drains: drains,
        _watcher: watcher,
        stop,
    })
}

/// "hub CPU per record: ours X µs, node Y µs": what each hub spent, whatever the
/// machine's other load did to the wall-clock rate.
fn cpu_note(raw: &Value) -> String {
    let us = |k: &str| {
        raw[k]["hub_cpu_us_per_record"]
            .as_f64()
            .map_or_else(|| "< 1 tick".to_string(), |v| format!("{v:.1} us"))
    };
    format!(
        "hub CPU per record (all threads): ours {}, node {}",
        us("ours"),
        us("node")
    )
}

/// Connects and authenticates as in `tests/it/auth.rs`'s `Signer`: answer the
/// `challenge` with `auth`, read the dump, open the `session` key.
async fn connect_signed(addr: SocketAddr, pair: &Keypair) -> Res<(TcpStream, SessionKey)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(wrap(format!("connect {addr}")))?;
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut pos = 0;
    let mut synced = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut lines = Vec::new();
        each_line(&buf, &mut pos, |l| {
            lines.push(l.to_vec());
            false
        });
        for line in lines {
            let row: Value = serde_json::from_slice(&line).map_err(wrap("hub row"))?;
            match row[0].as_str() {
                Some("challenge") => {
                    let nonce = row[1].as_str().ok_or("challenge without a nonce")?;
                    let signature = sign_challenge(pair, nonce).map_err(|e| e.to_string())?;
                    let mut auth = json!(["auth", pair.public_pem(), signature]).to_string();
                    auth.push('\n');
                    stream
                        .write_all(auth.as_bytes())
                        .await
                        .map_err(wrap("send auth"))?;
                }
                Some("synced") => synced = true,
                Some("session") if synced => {
                    let sealed = row[1].as_str().ok_or("session without a key")?;
                    return Ok((
                        stream,
                        SessionKey::open(pair, sealed).map_err(|e| e.to_string())?,
                    ));
                }
                Some("session") => return Err("session before synced".into()),
                Some("reject") => return Err(format!("the hub refused the key: {row}")),
                _ => {}
            }
        }
        buf.drain(..pos);
        pos = 0;
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err("the hub closed the connection during the handshake".into()),
            Err(_) => return Err("no session within 30 s".into()),
        }
    }
}

// ---------------------------------------------------------------------------
// Scenarios.

/// Registration throughput: C connections × R records each, timed until a watcher
/// has them all (see [`register_load`]); the median of three runs in full mode.
/// Targets: ours ≥ 20 × Node (40 × at 100 connections × 100), and at 100 × 100
/// the hub's RSS once the load has settled ≤ 1/4 of Node's.
pub fn throughput(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let sizes: &[(usize, usize)] = match &ctx.sizes {
        Some(sizes) => sizes,
        None if ctx.quick => &[(10, 100), (10, 1_000)],
        None => &[(10, 100), (100, 100), (10, 10_000), (100, 1_000)],
    };
    let limit = ctx.limit(20, 180);
    let reps = if ctx.quick { 1 } else { 3 };
    for &(c, r) in sizes {
        let mut fig = Figure::new(
            "throughput",
            format!("registration throughput, {c} conns x {r} records"),
            Unit::PerSec,
        )
        .target(Target::RatioAtLeast(if c >= 100 { 40.0 } else { 20.0 }));
        let mut memory = Figure::new(
            "throughput",
            format!("hub RSS after the {c} x {r} load"),
            Unit::MiB,
        );
        if (c, r) == (100, 100) {
            memory = memory.target(Target::RatioAtMost(0.25));
        }
        for &kind in ctx.hubs {
            // The median of up to three runs, each on a fresh hub; a run longer than
            // 20 s is not repeated (it is long enough to average out noise itself).
            let mut runs: Vec<(Measure, Value)> = Vec::new();
            while runs.len() < reps {
                let hub = HubProc::start(&ctx.env, kind, &[])?;
                let load = ctx.rt.block_on(register_load(&hub, c, r, None, limit))?;
                let long = load.raw["seconds"].as_f64().unwrap_or(0.0) > 20.0;
                // The hub's RSS once the load has settled, every client still
                // connected and every record live.
                std::thread::sleep(Duration::from_secs(1));
                let mut raw = load.raw.clone();
                raw["rss_after_bytes"] = json!(hub.rss()?);
                runs.push((load.rate, raw));
                ctx.rt.block_on(async { drop(load) });
                if long {
                    break;
                }
            }
            runs.sort_by(|a, b| a.0.value.total_cmp(&b.0.value));
            let (rate, raw) = runs[runs.len() / 2].clone();
            let rss = raw["rss_after_bytes"].as_u64().unwrap_or(0);
            if rate.bound != super::report::Bound::Exact {
                fig.notes.push(format!(
                    "{} did not finish within {limit:?}: the figure is a bound",
                    kind.name()
                ));
            }
            set(&mut fig, kind, rate);
            fig.raw[kind.name()] = raw;
            fig.raw[kind.name()]["runs"] =
                json!(runs.iter().map(|(m, _)| m.value).collect::<Vec<_>>());
            set(&mut memory, kind, Measure::exact(mib(rss)));
            memory.raw[kind.name()] = json!({ "rss_after_bytes": rss });
        }
        fig.notes.push(cpu_note(&fig.raw));
        report.push(fig);
        report.push(memory);
    }
    Ok(())
}

/// Propagation latency: one connection registers a record at a time; four watcher
/// connections, spread through the connection order (first, a third, two thirds
/// and last connected), time its arrival. The other connections are connected and
/// synced, so the hub fans every row out to all of them, but they do not read:
/// they stand for clients on other machines and take no CPU from this one. Samples
/// are sent one at a time, each after the previous one arrived everywhere, with a
/// random 1-3 ms pause. p50 and p99 over all (sample, watcher) pairs.
/// Target: p99 ours ≤ 1/10 of Node's at 10 clients, ≤ 1/4 at 100 and 1,000.
pub fn latency(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let sizes: &[usize] = if ctx.quick {
        &[10, 100]
    } else {
        &[10, 100, 1_000]
    };
    let samples = if ctx.quick { 30 } else { 300 };
    for &n in sizes {
        let mut p50 = Figure::new(
            "latency",
            format!("propagation register -> watcher, p50, {n} clients"),
            Unit::Ms,
        );
        let mut p99 = Figure::new(
            "latency",
            format!("propagation register -> watcher, p99, {n} clients"),
            Unit::Ms,
        )
        .target(Target::RatioAtMost(if n >= 100 { 0.25 } else { 0.1 }));
        for &kind in ctx.hubs {
            let hub = HubProc::start(&ctx.env, kind, &[])?;
            let mut lat = measure_latency(ctx, hub.addr, n, samples)?;
            lat.sort_by(f64::total_cmp);
            set(&mut p50, kind, Measure::exact(percentile(&lat, 50.0)));
            set(&mut p99, kind, Measure::exact(percentile(&lat, 99.0)));
            let raw = json!({
                "samples": lat.len(),
                "min_ms": lat.first(),
                "p90_ms": percentile(&lat, 90.0),
                "max_ms": lat.last(),
            });
            p50.raw[kind.name()] = raw.clone();
            p99.raw[kind.name()] = raw;
        }
        report.push(p50);
        report.push(p99);
    }
    Ok(())
}

/// One latency run on one hub; returns every (sample, watcher) latency in ms.
fn measure_latency(ctx: &Ctx, addr: SocketAddr, n: usize, samples: usize) -> Res<Vec<f64>> {
    const WATCHERS: usize = 4;
    let idle = n.saturating_sub(WATCHERS + 1);
    let chunks = [idle / 3, idle / 3, idle - 2 * (idle / 3)];
    let (tx, arrivals) = mpsc::channel::<(usize, Instant)>();
    let mut fleets = Vec::new();
    let mut watchers = Vec::new();
    for w in 0..WATCHERS {
        let (stream, _) = connect_synced_blocking(addr)?;
        let reader = stream.try_clone().map_err(wrap("clone a watcher"))?;
        let tx = tx.clone();
        std::thread::spawn(move || time_arrivals(reader, tx));
        watchers.push(stream);
        if let Some(&chunk) = chunks.get(w) {
            fleets.push(ctx.rt.block_on(Fleet::connect(addr, chunk, None))?);
        }
    }
    let (mut sender, _) = connect_synced_blocking(addr)?;
    let mut latencies = Vec::with_capacity(samples * WATCHERS);
    for i in 0..samples {
        let row = register_row(&format!("L{i:031}"), record_port(i));
        let t0 = Instant::now();
        sender
            .write_all(row.as_bytes())
            .map_err(wrap("send a sample"))?;
        let deadline = t0 + Duration::from_secs(10);
        let mut got = 0;
        while got < WATCHERS {
            let left = deadline.saturating_duration_since(Instant::now());
            match arrivals.recv_timeout(left) {
                Ok((sample, at)) if sample == i => {
                    latencies.push(ms(at - t0));
                    got += 1;
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "sample {i}: {got} of {WATCHERS} watchers saw it within 10 s"
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_micros(1_000 + rand::random::<u64>() % 2_000));
    }
    for w in &watchers {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    drop(fleets);
    Ok(latencies)
}

/// A watcher thread: the arrival time of every latency sample (`L` + its number).
fn time_arrivals(mut stream: std::net::TcpStream, tx: mpsc::Sender<(usize, Instant)>) {
    const PREFIX: &[u8] = b"[\"register\",\"L";
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let at = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        each_line(&buf, &mut pos, |line| {
            if let Some(rest) = line.strip_prefix(PREFIX) {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                if let Some(i) = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|d| d.parse().ok())
                {
                    let _ = tx.send((i, at));
                }
            }
            false
        });
        buf.drain(..pos);
    }
}

/// Free propagation: N clients have one record each; all their connections close
/// at once (one FIN each, in a tight loop); timed until a watcher has received all
/// N `free` rows. The clients read what the hub sends them, as real ones do.
pub fn free(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let n = if ctx.quick { 100 } else { 1_000 };
    let limit = ctx.limit(20, 120);
    let mut fig = Figure::new(
        "free",
        format!("free propagation, {n} clients drop at once: all freed"),
        Unit::Ms,
    );
    for &kind in ctx.hubs {
        let hub = HubProc::start(&ctx.env, kind, &[])?;
        let m = ctx.rt.block_on(async {
            let mut watcher = Watcher::connect(hub.addr).await?;
            let mut fleet = Fleet::connect(hub.addr, n, Some(4096)).await?;
            let tag = next_tag();
            for (i, w) in fleet.writers.iter_mut().enumerate() {
                let row = register_row(&record_id(tag, i as u32, 0), record_port(i));
                w.write_all(row.as_bytes())
                    .await
                    .map_err(wrap("register"))?;
            }
            watcher
                .wait_for(|c| c.registers >= n, Instant::now() + limit)
                .await
                .map_err(|c| format!("only {} of {n} records arrived", c.registers))?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t0 = Instant::now();
            fleet.close();
            Ok::<_, String>(match watcher.wait_for(|c| c.frees >= n, t0 + limit).await {
                Ok(at) => Measure::exact(ms(at - t0)),
                Err(_) => Measure::at_least(ms(limit)),
            })
        })?;
        set(&mut fig, kind, m);
    }
    report.push(fig);
    Ok(())
}

/// Hub memory: RSS (VmRSS) of the hub process with N idle synced connections, and
/// with M records (registered over 4 connections, which stay open). Measured one
/// second after the load settles. Target at 10,000 connections: ours ≤ 1/4 of Node.
pub fn memory(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let conns = if ctx.quick { 1_000 } else { 10_000 };
    let records = if ctx.quick { 10_000 } else { 100_000 };
    let limit = ctx.limit(30, 180);
    let settle = Duration::from_millis(if ctx.quick { 300 } else { 1000 });

    let mut fig = Figure::new(
        "memory",
        format!("hub RSS with {conns} idle connections"),
        Unit::MiB,
    )
    .target(Target::RatioAtMost(0.25));
    for &kind in ctx.hubs {
        let hub = HubProc::start(&ctx.env, kind, &[])?;
        let empty = hub.rss()?;
        let fleet = ctx.rt.block_on(Fleet::connect(hub.addr, conns, None))?;
        std::thread::sleep(settle);
        let rss = hub.rss()?;
        set(&mut fig, kind, Measure::exact(mib(rss)));
        fig.raw[kind.name()] = json!({
            "connections": fleet.len(),
            "empty_hub_bytes": empty,
            "rss_bytes": rss,
            "bytes_per_connection": (rss.saturating_sub(empty)) as f64 / conns as f64,
        });
        ctx.rt.block_on(async { fleet.close() });
    }
    report.push(fig);

    let mut fig = Figure::new(
        "memory",
        format!("hub RSS with {records} records"),
        Unit::MiB,
    );
    for &kind in ctx.hubs {
        let hub = HubProc::start(&ctx.env, kind, &[])?;
        let empty = hub.rss()?;
        let load = ctx
            .rt
            .block_on(register_load(&hub, 4, records / 4, None, limit))?;
        std::thread::sleep(settle);
        let rss = hub.rss()?;
        set(&mut fig, kind, Measure::exact(mib(rss)));
        fig.raw[kind.name()] = json!({
            "records": records,
            "empty_hub_bytes": empty,
            "rss_bytes": rss,
            "bytes_per_record": (rss.saturating_sub(empty)) as f64 / records as f64,
            "load": load.raw,
        });
        ctx.rt.block_on(async { drop(load) });
    }
    report.push(fig);
    Ok(())
}

/// A storm: N clients connect (each reading what the hub sends, as clients do),
/// register 3 records each at once, and all leave together. Figures: the hub's
/// peak RSS (VmHWM), the time from the last client's FIN until a watcher has every
/// `free`, and the RSS once the hub is empty again against its RSS before the
/// storm (target: at most 2x, the registry being empty again).
pub fn storm(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let default = [(if ctx.quick { 500 } else { 5_000 }, 3)];
    for &(n, per_conn) in ctx.sizes.as_deref().unwrap_or(&default) {
        storm_of(ctx, report, n, per_conn)?;
    }
    Ok(())
}

/// One storm of `n` connections × `per_conn` records on each hub.
fn storm_of(ctx: &Ctx, report: &mut Report, n: usize, per_conn: usize) -> Res<()> {
    let total = n * per_conn;
    let limit = ctx.limit(60, 120);
    let mut arrived = Figure::new(
        "storm",
        format!("storm of {n} conns x {per_conn} records: all registered"),
        Unit::Ms,
    );
    let mut peak = Figure::new(
        "storm",
        format!("storm of {n} conns x {per_conn} records: peak hub RSS"),
        Unit::MiB,
    );
    let mut freed = Figure::new(
        "storm",
        format!("storm of {n} conns x {per_conn} records: all leave, all freed"),
        Unit::Ms,
    );
    let mut after = Figure::new(
        "storm",
        format!("storm of {n} conns x {per_conn} records: hub RSS after all left"),
        Unit::MiB,
    );
    for &kind in ctx.hubs {
        let hub = HubProc::start(&ctx.env, kind, &[])?;
        std::thread::sleep(Duration::from_millis(200));
        let before = hub.rss()?;
        let (registered, free_ms) = ctx.rt.block_on(async {
            let mut watcher = Watcher::connect(hub.addr).await?;
            let mut fleet = Fleet::connect(hub.addr, n, Some(4096)).await?;
            let tag = next_tag();
            let rows: Vec<String> = (0..n)
                .map(|i| {
                    (0..per_conn)
                        .map(|j| {
                            register_row(
                                &record_id(tag, i as u32, j as u32),
                                record_port(i * per_conn + j),
                            )
                        })
                        .collect()
                })
                .collect();
            let t0 = Instant::now();
            for (w, row) in fleet.writers.iter_mut().zip(&rows) {
                w.write_all(row.as_bytes())
                    .await
                    .map_err(wrap("register"))?;
            }
            // A hub that cannot take the storm in time gives a bound, and
            // its clients leave all the same.
            let registered = match watcher.wait_for(|c| c.registers >= total, t0 + limit).await {
                Ok(at) => Measure::exact(ms(at - t0)),
                Err(_) => Measure::at_least(ms(limit)),
            };
            let t0 = Instant::now();
            fleet.close();
            let freed = match watcher.wait_for(|c| c.frees >= total, t0 + limit).await {
                Ok(at) => Measure::exact(ms(at - t0)),
                Err(_) => Measure::at_least(ms(limit)),
            };
            Ok::<_, String>((registered, freed))
        })?;
        let peak_rss = hub.peak_rss()?;
        // What the hub holds once every client is gone: the lowest RSS seen over
        // two seconds (memory given back after the last free counts).
        let mut rss = hub.rss()?;
        let settle = Instant::now() + Duration::from_secs(2);
        while Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(100));
            rss = rss.min(hub.rss()?);
        }
        set(&mut arrived, kind, registered);
        set(&mut peak, kind, Measure::exact(mib(peak_rss)));
        set(&mut freed, kind, free_ms);
        set(&mut after, kind, Measure::exact(mib(rss)));
        let raw = json!({
            "connections": n,
            "records": total,
            "rss_before_bytes": before,
            "peak_rss_bytes": peak_rss,
            "rss_after_bytes": rss,
            "after_over_before": rss as f64 / before as f64,
            "all_registered_ms": registered.value,
            "all_freed_ms": free_ms.value,
        });
        after.notes.push(format!(
            "{}: {:.1} MiB before the storm, after/before {:.2} (target for ours: at most 2)",
            kind.name(),
            mib(before),
            rss as f64 / before as f64
        ));
        arrived.raw[kind.name()] = raw.clone();
        peak.raw[kind.name()] = raw.clone();
        freed.raw[kind.name()] = raw.clone();
        after.raw[kind.name()] = raw;
    }
    report.push(arrived);
    report.push(peak);
    report.push(freed);
    report.push(after);
    Ok(())
}

/// Signed mode: the same registration load on our hub, open and then with
/// `--authorized` (a fixture key), each connection authenticating first (not
/// timed) and signing every row (HMAC-SHA256, signed before the clock starts like
/// every row). Target: signed ≥ half the open rate.
pub fn signed(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let (c, r) = if ctx.quick { (4, 500) } else { (10, 10_000) };
    let limit = ctx.limit(20, 180);
    let key_file = ctx.env.fixtures.join("keys").join("alice.json");
    let pair = Keypair::load(&key_file).map_err(|e| e.to_string())?;
    let key_arg = key_file.to_string_lossy().into_owned();

    let open_hub = HubProc::start(&ctx.env, HubKind::Ours, &[])?;
    let open = ctx
        .rt
        .block_on(register_load(&open_hub, c, r, None, limit))?;
    let open_rate = open.rate;
    let open_raw = open.raw.clone();
    ctx.rt.block_on(async { drop(open) });
    drop(open_hub);

    let mut args: Vec<&str> = Vec::new();
    args.extend(["--authorized", key_arg.as_str()]);
    let signed_hub = HubProc::start(&ctx.env, HubKind::Ours, &args)?;
    let signed = ctx
        .rt
        .block_on(register_load(&signed_hub, c, r, Some(&pair), limit))?;
    let mut handshakes: Vec<f64> = signed.handshakes.iter().map(|d| ms(*d)).collect();
    handshakes.sort_by(f64::total_cmp);
    let signed_rate = signed.rate;
    let signed_raw = signed.raw.clone();
    ctx.rt.block_on(async { drop(signed) });

    let mut fig = Figure::new(
        "signed",
        format!("registration rate, open mode, {c} conns x {r} (ours)"),
        Unit::PerSec,
    );
    fig.ours = Some(open_rate);
    fig.raw = json!({ "ours": open_raw });
    report.push(fig);

    let mut fig = Figure::new(
        "signed",
        format!("registration rate, signed mode, {c} conns x {r} (ours)"),
        Unit::PerSec,
    )
    .target(Target::RatioAtLeast(0.5));
    fig.ours = Some(signed_rate);
    fig.ratio_of = "signed/open";
    fig.ratio = Some(signed_rate.ratio(open_rate));
    fig.raw = json!({ "ours": signed_raw });
    report.push(fig);

    let mut fig = Figure::new(
        "signed",
        "signed mode: connect + authenticate one connection, p50 (ours)",
        Unit::Ms,
    );
    fig.ours = Some(Measure::exact(percentile(&handshakes, 50.0)));
    fig.raw = json!({ "ours": { "handshakes_ms": handshakes } });
    fig.notes.push(
        "client side included: RSA-PSS sign and RSA-OAEP decrypt in the bench process".into(),
    );
    report.push(fig);
    Ok(())
}
