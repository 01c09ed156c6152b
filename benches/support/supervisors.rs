//! Supervisor scenarios: our launcher and supervisor against npm seaport 2.0.9's
//! `seaport register` (one Node process per service, plus a Node hub) and, where it
//! is installed, supervisord with an equivalent configuration.
//!
//! Every system runs the same child service (this binary in `--child` mode, see
//! [`super::child`]), which reports each start to a rendezvous port, so "the new
//! child is running" is timed the same way for all three.

use super::child::Rendezvous;
use super::procs::{
    Env, HubKind, HubProc, Proc, TICKS_PER_SEC, children_by_parent, cpu_ticks, page_table_bytes,
    pss_bytes, rss_bytes,
};
use super::report::{Figure, Measure, Report, Target, Unit, percentile};
use super::{Ctx, Res, wrap};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Who runs the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launcher {
    /// `seaport register` / `seaport supervise`.
    Ours,
    /// npm seaport 2.0.9's `seaport register`, one process per service.
    Node,
    /// supervisord.
    Supervisord,
}

impl Launcher {
    fn name(self) -> &'static str {
        match self {
            Launcher::Ours => "ours",
            Launcher::Node => "node",
            Launcher::Supervisord => "supervisord",
        }
    }

    /// The launchers this run can compare.
    fn available(env: &Env) -> Vec<Launcher> {
        let mut all = vec![Launcher::Ours, Launcher::Node];
        if env.supervisord.is_some() {
            all.push(Launcher::Supervisord);
        }
        all
    }
}

fn set(fig: &mut Figure, who: Launcher, m: Measure) {
    match who {
        Launcher::Ours => fig.ours = Some(m),
        Launcher::Node => fig.node = Some(m),
        Launcher::Supervisord => fig.supervisord = Some(m),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The child command line, without the port (the launchers append it).
fn child_command(env: &Env, rv: &Rendezvous) -> Vec<String> {
    vec![
        env.exe.to_string_lossy().into_owned(),
        "--child".into(),
        rv.port().to_string(),
    ]
}

// ---------------------------------------------------------------------------
// Watching a hub's records.

/// A record row a hub sent.
#[derive(Debug)]
struct RecordRow {
    register: bool,
    id: String,
    at: Instant,
}

/// A plain connection that reports every `register` and `free` row (dump included)
/// and keeps the set of live record ids.
struct RecordWatcher {
    rows: mpsc::Receiver<RecordRow>,
    live: HashSet<String>,
    stream: TcpStream,
}

impl RecordWatcher {
    fn connect(addr: SocketAddr) -> Res<RecordWatcher> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(wrap(format!("connect {addr}")))?;
        let reader = stream.try_clone().map_err(wrap("clone"))?;
        let (tx, rows) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                let Ok(row) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let register = match row[0].as_str() {
                    Some("register") => true,
                    Some("free") => false,
                    _ => continue,
                };
                if let Some(id) = row[1].as_str() {
                    let sent = tx.send(RecordRow {
                        register,
                        id: id.to_string(),
                        at: Instant::now(),
                    });
                    if sent.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(RecordWatcher {
            rows,
            live: HashSet::new(),
            stream,
        })
    }

    /// The next row before `deadline`, keeping the live set up to date.
    fn next_before(&mut self, deadline: Instant) -> Option<RecordRow> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let row = self.rows.recv_timeout(left).ok()?;
        if row.register {
            self.live.insert(row.id.clone());
        } else {
            self.live.remove(&row.id);
        }
        Some(row)
    }

    /// Waits until at least `n` records are live.
    fn wait_live(&mut self, n: usize, deadline: Instant) -> Res<()> {
        while self.live.len() < n {
            if self.next_before(deadline).is_none() {
                return Err(format!(
                    "only {} of {n} records registered in time",
                    self.live.len()
                ));
            }
        }
        Ok(())
    }

    /// Applies the rows received so far.
    fn catch_up(&mut self) {
        while self
            .next_before(Instant::now() + Duration::from_millis(1))
            .is_some()
        {}
    }
}

impl Drop for RecordWatcher {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// Starting each system.

/// A system under test running `n` services, all started and (where there is a
/// hub) registered.
struct System {
    /// The processes whose CPU and memory count as the supervisor's.
    measured: Vec<Proc>,
    /// A hub started separately (Node's), measured with the launchers; dropped
    /// after them.
    hub: Option<HubProc>,
    records: Option<RecordWatcher>,
    rv: Rendezvous,
    /// The pids of the running children.
    children: HashSet<u32>,
}

impl System {
    fn pids(&self) -> Vec<u32> {
        let hub = self.hub.iter().map(|h| h.proc.pid());
        self.measured.iter().map(Proc::pid).chain(hub).collect()
    }

    /// Total RSS of the measured processes, in bytes.
    fn rss(&self) -> Res<u64> {
        self.pids().into_iter().map(rss_bytes).sum()
    }

    /// The memory the measured processes and their helpers take, in bytes:
    /// their PSS and page tables, and those of their descendants that are
    /// not services nor below one (our keeper factory and its keepers).
    /// PSS and not RSS, so that pages shared between them count once.
    fn memory(&self) -> Res<u64> {
        let children = children_by_parent()?;
        let mut total = 0;
        for pid in self.pids() {
            total += pss_bytes(pid)? + page_table_bytes(pid)?;
            let mut helpers = children.get(&pid).cloned().unwrap_or_default();
            while let Some(helper) = helpers.pop() {
                if self.children.contains(&helper) {
                    continue;
                }
                // A helper that ended meanwhile takes nothing.
                if let (Ok(pss), Ok(tables)) = (pss_bytes(helper), page_table_bytes(helper)) {
                    total += pss + tables;
                }
                helpers.extend(children.get(&helper).into_iter().flatten());
            }
        }
        Ok(total)
    }

    /// Total CPU ticks of the measured processes.
    fn ticks(&self) -> Res<u64> {
        self.pids().into_iter().map(cpu_ticks).sum()
    }

    /// Waits for `n` distinct children and `n` live records.
    fn wait_ready(&mut self, n: usize, within: Duration) -> Res<()> {
        let deadline = Instant::now() + within;
        while self.children.len() < n {
            match self.rv.next_before(deadline) {
                Some(start) => {
                    self.children.insert(start.pid);
                }
                None => {
                    return Err(format!(
                        "only {} of {n} services started within {within:?}",
                        self.children.len()
                    ));
                }
            }
        }
        if let Some(records) = &mut self.records {
            records.wait_live(n, deadline)?;
        }
        Ok(())
    }
}

/// Writes a supervisord configuration for `programs` (name, command line) into
/// `dir` from the template in `benches/support/supervisord.conf`.
fn supervisord_conf(dir: &Path, programs: &[(String, String)]) -> Res<PathBuf> {
    const TEMPLATE: &str = include_str!("supervisord.conf");
    let (head, program) = TEMPLATE
        .split_once(";PROGRAM\n")
        .ok_or("supervisord.conf has no ;PROGRAM section")?;
    let program: String = program
        .lines()
        .map(|l| l.strip_prefix(';').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir_text = dir.to_string_lossy();
    let mut conf = head.replace("{{DIR}}", &dir_text);
    for (name, command) in programs {
        conf.push('\n');
        conf.push_str(
            &program
                .replace("{{NAME}}", name)
                .replace("{{COMMAND}}", command),
        );
        conf.push('\n');
    }
    let path = dir.join("supervisord.conf");
    std::fs::write(&path, conf).map_err(wrap(path.display()))?;
    Ok(path)
}

/// `n` distinct ports for services that do not choose their own (supervisord)
/// or choose blindly (Node's launcher picks `10000 + random(55000)` unchecked, and
/// a child that cannot bind it fails forever). Taken from 20000-32767, below the
/// kernel's ephemeral range, and bindable right now.
fn service_ports(n: usize) -> Res<Vec<u16>> {
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_768;
    let start = rand::random::<u16>() % SPAN;
    let ports: Vec<u16> = (0..SPAN)
        .map(|i| LOW + (start + i) % SPAN)
        .filter(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .take(n)
        .collect();
    if ports.len() < n {
        return Err(format!("only {} free ports in 20000-32767", ports.len()));
    }
    Ok(ports)
}

fn start_supervisord(env: &Env, dir: &Path, programs: &[(String, String)]) -> Res<Proc> {
    let conf = supervisord_conf(dir, programs)?;
    let bin = env
        .supervisord
        .as_ref()
        .ok_or("supervisord is not installed")?;
    let mut cmd = Command::new(bin);
    cmd.arg("-n").arg("-c").arg(&conf);
    // supervisord stops one program per second of its main loop: give it a
    // moment, then kill the group (orphaned children exit by themselves).
    Ok(Proc::spawn(env, "supervisord", cmd, true)?.grace(Duration::from_millis(300)))
}

/// Starts `n` services under `who` and waits until they all run (and are
/// registered, for the seaport launchers).
fn start_services(ctx: &Ctx, who: Launcher, n: usize) -> Res<System> {
    let env = &ctx.env;
    let began = Instant::now();
    let rv = Rendezvous::start()?;
    let child = child_command(env, &rv);
    let dir = env.scratch(&format!("services-{}-{n}", who.name()))?;
    let mut system = match who {
        Launcher::Ours => {
            let services = dir.join("services.d");
            std::fs::create_dir_all(&services).map_err(wrap(services.display()))?;
            for i in 0..n {
                let spec = json!({ "role": format!("svc{i:03}@1.0.0"), "command": child });
                let file = services.join(format!("svc{i:03}.json"));
                std::fs::write(&file, spec.to_string()).map_err(wrap(file.display()))?;
            }
            let mut cmd = Command::new(&env.seaport);
            cmd.arg("supervise")
                .arg(&services)
                .args(["--listen", "0", "--listen-host", "127.0.0.1", "--control"])
                .arg(dir.join("control.sock"))
                .env("SEAPORT_LOG", "warn");
            let proc = Proc::spawn(env, "supervise-ours", cmd, true)?;
            let port = super::procs::listening_port(&proc)?;
            let records = RecordWatcher::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
            System {
                measured: vec![proc],
                hub: None,
                records: Some(records),
                rv,
                children: HashSet::new(),
            }
        }
        Launcher::Node => {
            let hub = HubProc::start(env, HubKind::Node, &[])?;
            let records = RecordWatcher::connect(hub.addr)?;
            let mut measured = Vec::with_capacity(n + 1);
            let ports = service_ports(n)?;
            for (i, port) in ports.iter().enumerate() {
                let mut cmd = Command::new("node");
                cmd.arg(&env.node_cli)
                    .arg("register")
                    .arg(hub.addr.to_string())
                    .arg(format!("svc{i:03}@1.0.0"))
                    .arg(format!("--meta={{\"port\":{port}}}"))
                    .arg("--")
                    .args(&child)
                    .current_dir(&env.node_dir);
                measured.push(Proc::spawn(
                    env,
                    &format!("register-node-{i:03}"),
                    cmd,
                    true,
                )?);
            }
            // The Node hub is part of what Node needs to run services and register
            // them (ours has its hub built into the supervisor), so it is measured.
            System {
                measured,
                hub: Some(hub),
                records: Some(records),
                rv,
                children: HashSet::new(),
            }
        }
        Launcher::Supervisord => {
            let ports = service_ports(n)?;
            let programs: Vec<(String, String)> = ports
                .iter()
                .enumerate()
                .map(|(i, port)| (format!("svc{i:03}"), format!("{} {port}", child.join(" "))))
                .collect();
            let proc = start_supervisord(env, &dir, &programs)?;
            System {
                measured: vec![proc],
                hub: None,
                records: None,
                rv,
                children: HashSet::new(),
            }
        }
    };
    // Node needs about a second of CPU to start each `seaport register` process,
    // and they all start at once on a shared machine.
    let per_service = if who == Launcher::Node { 2_000 } else { 200 };
    let within = Duration::from_secs(30) + Duration::from_millis(per_service) * n as u32;
    if let Err(e) = system.wait_ready(n, within) {
        let logs: Vec<String> = system
            .measured
            .iter()
            .take(2)
            .map(|p| p.log().display().to_string())
            .collect();
        // Our supervisor can say which services are not running, and why.
        let ps = (who == Launcher::Ours)
            .then(|| {
                Command::new(&env.seaport)
                    .arg("ps")
                    .arg("--control")
                    .arg(dir.join("control.sock"))
                    .output()
                    .ok()
            })
            .flatten()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                let stuck: Vec<&str> = text.lines().filter(|l| !l.contains(" ready ")).collect();
                format!("; seaport ps: {}", stuck.join(" / "))
            })
            .unwrap_or_default();
        return Err(format!("{e} (logs: {}){ps}", logs.join(", ")));
    }
    eprintln!(
        "  {}: {n} services running and registered {:.1}s after start",
        who.name(),
        began.elapsed().as_secs_f64()
    );
    Ok(system)
}

// ---------------------------------------------------------------------------
// Scenarios.

/// Restart latency: the child is killed (SIGKILL); timed until the new child runs
/// (it reported to the rendezvous) and, for a launcher whose record goes away when
/// the child dies, until the record is back on the hub. Ours runs with
/// `--stable-after 200ms` and each kill follows 300 ms of running, so every sample
/// is "a crash after a stable run" (restarted at once; a quick second crash would
/// back off by design). Node's launcher waits a fixed 1 s and never frees the
/// record (the hub keeps advertising a dead port meanwhile). supervisord restarts
/// at once (`startsecs=0`). Target: p50 ours ≤ 20 ms.
pub fn restart(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let samples = if ctx.quick { 2 } else { 30 };
    let mut p50 = Figure::new(
        "restart",
        "restart latency (kill -> new child running, record back), p50",
        Unit::Ms,
    )
    .target(Target::OursAtMost(20.0));
    let mut p99 = Figure::new(
        "restart",
        "restart latency (kill -> new child running, record back), p99",
        Unit::Ms,
    );
    for who in Launcher::available(&ctx.env) {
        let mut lat =
            restart_samples(ctx, who, samples).map_err(|e| format!("{}: {e}", who.name()))?;
        lat.sort_by(f64::total_cmp);
        set(&mut p50, who, Measure::exact(percentile(&lat, 50.0)));
        set(&mut p99, who, Measure::exact(percentile(&lat, 99.0)));
        p50.raw[who.name()] = json!({ "samples_ms": lat });
    }
    p50.notes
        .push("node frees nothing: its record stays on the hub while the service is down".into());
    report.push(p50);
    report.push(p99);
    Ok(())
}

fn restart_samples(ctx: &Ctx, who: Launcher, samples: usize) -> Res<Vec<f64>> {
    let env = &ctx.env;
    let rv = Rendezvous::start()?;
    let child = child_command(env, &rv);
    let mut hub = None;
    let mut records = None;
    let launcher = match who {
        Launcher::Ours | Launcher::Node => {
            let kind = if who == Launcher::Ours {
                HubKind::Ours
            } else {
                HubKind::Node
            };
            let h = HubProc::start(env, kind, &[])?;
            records = Some(RecordWatcher::connect(h.addr)?);
            let mut cmd = if who == Launcher::Ours {
                let mut cmd = Command::new(&env.seaport);
                cmd.arg("register")
                    .arg(h.addr.to_string())
                    .arg("bench-restart@1.0.0")
                    .args(["--stable-after", "200ms"])
                    .env("SEAPORT_LOG", "warn");
                cmd
            } else {
                // A checked free port: Node's own choice is blind (see service_ports).
                let port = service_ports(1)?[0];
                let mut cmd = Command::new("node");
                cmd.arg(&env.node_cli)
                    .arg("register")
                    .arg(h.addr.to_string())
                    .arg("bench-restart@1.0.0")
                    .arg(format!("--meta={{\"port\":{port}}}"))
                    .current_dir(&env.node_dir);
                cmd
            };
            cmd.arg("--").args(&child);
            hub = Some(h);
            Proc::spawn(env, &format!("register-{}", who.name()), cmd, true)?
        }
        Launcher::Supervisord => {
            let dir = env.scratch("restart-supervisord")?;
            let port = service_ports(1)?[0];
            start_supervisord(
                env,
                &dir,
                &[("bench".into(), format!("{} {port}", child.join(" ")))],
            )?
        }
    };
    let first = rv
        .next_before(Instant::now() + Duration::from_secs(30))
        .ok_or("the first child never started")?;
    let mut pid = first.pid;
    let id = match &mut records {
        Some(r) => {
            let row = r
                .next_before(Instant::now() + Duration::from_secs(30))
                .ok_or("the record was never registered")?;
            Some(row.id)
        }
        None => None,
    };
    let frees_on_exit = who == Launcher::Ours;
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        std::thread::sleep(Duration::from_millis(300));
        rv.drain();
        if let Some(r) = &mut records {
            r.catch_up();
        }
        let t0 = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).map_err(wrap("kill the child"))?;
        let deadline = t0 + Duration::from_secs(10);
        let running = loop {
            let start = rv
                .next_before(deadline)
                .ok_or_else(|| format!("sample {i}: no new child within 10 s"))?;
            if start.pid != pid {
                break start;
            }
        };
        pid = running.pid;
        let mut back = running.at;
        if frees_on_exit && let (Some(r), Some(id)) = (&mut records, &id) {
            loop {
                let row = r.next_before(deadline).ok_or_else(|| {
                    format!("sample {i}: the record did not come back within 10 s")
                })?;
                if row.register && &row.id == id {
                    back = back.max(row.at);
                    break;
                }
            }
        }
        latencies.push(ms(back - t0));
    }
    drop(launcher);
    drop(records);
    drop(hub);
    Ok(latencies)
}

/// Idle supervisor: N services started and registered, then the supervisor's CPU
/// time (utime + stime from /proc, all threads) over a quiet period, as a percent
/// of one CPU, and its RSS. Ours: the `seaport supervise` process, hub included.
/// Node: the N `seaport register` processes plus the Node hub they register with.
/// supervisord: its process (no registry). Children are never counted.
/// Target: idle CPU ours ≤ 0.1 %.
pub fn idle(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let n = if ctx.quick { 5 } else { 50 };
    let quiet = ctx.limit(1, 60);
    let mut cpu = Figure::new(
        "supervisor-idle",
        format!(
            "supervisor CPU, idle {}s with {n} services",
            quiet.as_secs()
        ),
        Unit::Percent,
    )
    .target(Target::OursAtMost(0.1));
    let mut rss = Figure::new(
        "supervisor-idle",
        format!("supervisor RSS with {n} services"),
        Unit::MiB,
    );
    let mut memory = memory_figure("supervisor-idle", n);
    for who in Launcher::available(&ctx.env) {
        let system = start_services(ctx, who, n).map_err(|e| format!("{}: {e}", who.name()))?;
        std::thread::sleep(Duration::from_millis(if ctx.quick { 300 } else { 3000 }));
        let before = system.ticks()?;
        let began = Instant::now();
        std::thread::sleep(quiet);
        let ticks = system.ticks()?.saturating_sub(before);
        let secs = began.elapsed().as_secs_f64();
        let pct = ticks as f64 / TICKS_PER_SEC / secs * 100.0;
        set(&mut cpu, who, Measure::exact(pct));
        cpu.raw[who.name()] =
            json!({ "ticks": ticks, "seconds": secs, "processes": system.pids().len() });
        let bytes = system.rss()?;
        set(&mut rss, who, Measure::exact(bytes as f64 / 1048576.0));
        rss.raw[who.name()] = json!({ "rss_bytes": bytes, "processes": system.pids().len() });
        measure_memory(&mut memory, who, &system)?;
    }
    cpu.notes.push(format!(
        "resolution: 1 tick (10 ms) over {}s = {:.3} %",
        quiet.as_secs(),
        1.0 / TICKS_PER_SEC / quiet.as_secs_f64() * 100.0
    ));
    rss.notes
        .push("node: N `seaport register` processes plus the Node hub, summed".into());
    memory.notes.push(MEMORY_NOTE.into());
    report.push(cpu);
    report.push(rss);
    report.push(memory);
    Ok(())
}

/// What [`memory_figure`] counts.
const MEMORY_NOTE: &str = "PSS and page tables of the supervisor and of its own helper processes \
(ours: the keeper factory and a keeper per service, forked from the factory), the services not counted";

/// Sets `who`'s figure of [`System::memory`] in `memory`.
fn measure_memory(memory: &mut Figure, who: Launcher, system: &System) -> Res<()> {
    let bytes = system.memory()?;
    set(memory, who, Measure::exact(bytes as f64 / 1048576.0));
    memory.raw[who.name()] = json!({ "bytes": bytes });
    Ok(())
}

/// The figure of [`System::memory`] with `n` services.
fn memory_figure(scenario: &'static str, n: usize) -> Figure {
    Figure::new(
        scenario,
        format!("supervisor memory with {n} services, helpers included"),
        Unit::MiB,
    )
}

/// Supervisor memory with many services: as in [`idle`], RSS only, with 500
/// services (15 in quick mode). Node is not run above 100 services: one Node
/// process per service would need tens of GiB.
pub fn rss(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let n = if ctx.quick { 15 } else { 500 };
    let mut fig = Figure::new(
        "supervisor-rss",
        format!("supervisor RSS with {n} services"),
        Unit::MiB,
    );
    let mut memory = memory_figure("supervisor-rss", n);
    for who in Launcher::available(&ctx.env) {
        if who == Launcher::Node && n > 100 {
            fig.notes.push(format!(
                "node not run: {n} Node processes (one per service) would not fit this machine"
            ));
            continue;
        }
        let system = start_services(ctx, who, n).map_err(|e| format!("{}: {e}", who.name()))?;
        std::thread::sleep(Duration::from_millis(if ctx.quick { 300 } else { 3000 }));
        let bytes = system.rss()?;
        set(&mut fig, who, Measure::exact(bytes as f64 / 1048576.0));
        fig.raw[who.name()] = json!({ "rss_bytes": bytes, "processes": system.pids().len() });
        measure_memory(&mut memory, who, &system)?;
    }
    memory.notes.push(MEMORY_NOTE.into());
    report.push(fig);
    report.push(memory);
    Ok(())
}

/// How a service is restarted on request, for [`restart_gap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restarted {
    /// `seaport supervise` and `seaport restart`, with `socket = true` or not.
    Ours { socket: bool },
    /// supervisord and `supervisorctl restart`.
    Supervisord,
}

/// Connects to a port again and again, each connection until the service
/// accepts and closes it, counting refused connections and noting when each
/// served one completed.
struct Hammer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    served: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    fn start(port: u16) -> Hammer {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let mut hammer = Hammer {
            stop: Default::default(),
            refused: Default::default(),
            served: Default::default(),
            thread: None,
        };
        let (stop, refused, served) = (
            hammer.stop.clone(),
            hammer.refused.clone(),
            hammer.served.clone(),
        );
        let thread = std::thread::spawn(move || {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while !stop.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(mut conn) => {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = conn.read(&mut [0u8; 1]);
                        if let Ok(mut served) = served.lock() {
                            served.push(Instant::now());
                        }
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        });
        hammer.thread = Some(thread);
        hammer
    }

    /// Served connections so far, and the refused count; both start over.
    fn take(&self) -> (Vec<Instant>, u64) {
        let served = self
            .served
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let refused = self.refused.swap(0, std::sync::atomic::Ordering::Relaxed);
        (served, refused)
    }

    fn served_since(&self, t: Instant) -> usize {
        self.served
            .lock()
            .map(|s| s.iter().filter(|&&at| at > t).count())
            .unwrap_or(0)
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Restarts on request under a client that connects again and again: the
/// connections refused per restart, and the restart gap (the longest time
/// with no connection served, around the restart), for ours with
/// `socket = true` (the supervisor holds the port; the new process starts on
/// it before the old one stops), ours without, and supervisord (stop, then
/// start). One service, one instance. Target: ours refuses nothing with
/// `socket = true`.
pub fn restart_gap(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let samples = if ctx.quick { 2 } else { 10 };
    let mut variants = vec![
        Restarted::Ours { socket: true },
        Restarted::Ours { socket: false },
    ];
    if ctx.env.supervisord.is_some() {
        variants.push(Restarted::Supervisord);
    }
    let mut results = Vec::new();
    for variant in variants {
        let samples =
            gap_samples(ctx, variant, samples).map_err(|e| format!("{variant:?}: {e}"))?;
        results.push((variant, samples));
    }
    for socket in [true, false] {
        let with = if socket { "socket = true" } else { "no socket" };
        let mut refused = Figure::new(
            "restart-gap",
            format!("connections refused per restart on request, ours with {with}"),
            Unit::Count,
        );
        let mut gap = Figure::new(
            "restart-gap",
            format!("restart gap (longest time with no connection served), ours with {with}, p50"),
            Unit::Ms,
        );
        if socket {
            refused = refused.target(Target::OursAtMost(0.0));
        }
        for (variant, samples) in &results {
            let who = match variant {
                Restarted::Ours { socket: s } if *s == socket => Launcher::Ours,
                Restarted::Supervisord => Launcher::Supervisord,
                Restarted::Ours { .. } => continue,
            };
            let count: Vec<f64> = samples.iter().map(|s| s.0 as f64).collect();
            let mut gaps: Vec<f64> = samples.iter().map(|s| s.1).collect();
            gaps.sort_by(f64::total_cmp);
            set(
                &mut refused,
                who,
                Measure::exact(count.iter().sum::<f64>() / count.len().max(1) as f64),
            );
            set(&mut gap, who, Measure::exact(percentile(&gaps, 50.0)));
            gap.raw[who.name()] = json!({ "gaps_ms": gaps, "refused": count });
        }
        refused.ratio_of = "ours/supervisord";
        gap.ratio_of = "ours/supervisord";
        gap.ratio = match (gap.ours, gap.supervisord) {
            (Some(o), Some(s)) if s.value > 0.0 => Some(o.ratio(s)),
            _ => None,
        };
        report.push(refused);
        report.push(gap);
    }
    Ok(())
}

/// `samples` restarts of one service under `variant`: (refused, gap in ms) each.
fn gap_samples(ctx: &Ctx, variant: Restarted, samples: usize) -> Res<Vec<(u64, f64)>> {
    let env = &ctx.env;
    let rv = Rendezvous::start()?;
    let child = child_command(env, &rv);
    let dir = env.scratch(&format!("restart-gap-{variant:?}").replace([' ', '{', '}', ':'], ""))?;
    let (system, mut restart): (Proc, Command) = match variant {
        Restarted::Ours { socket } => {
            let services = dir.join("services.d");
            std::fs::create_dir_all(&services).map_err(wrap(services.display()))?;
            let spec = json!({ "role": "bench@1.0.0", "command": child, "socket": socket });
            let file = services.join("bench.json");
            std::fs::write(&file, spec.to_string()).map_err(wrap(file.display()))?;
            let control = dir.join("control.sock");
            let mut cmd = Command::new(&env.seaport);
            cmd.arg("supervise")
                .arg(&services)
                .args(["--listen", "0", "--listen-host", "127.0.0.1", "--control"])
                .arg(&control)
                .env("SEAPORT_LOG", "warn");
            let mut restart = Command::new(&env.seaport);
            restart
                .arg("restart")
                .arg("bench")
                .arg("--control")
                .arg(&control);
            (Proc::spawn(env, "supervise-gap", cmd, true)?, restart)
        }
        Restarted::Supervisord => {
            let port = service_ports(1)?[0];
            let proc = start_supervisord(
                env,
                &dir,
                &[("bench".into(), format!("{} {port}", child.join(" ")))],
            )?;
            let ctl = env
                .supervisord
                .as_ref()
                .and_then(|s| s.parent())
                .map(|d| d.join("supervisorctl"))
                .ok_or("no supervisorctl")?;
            let mut restart = Command::new(ctl);
            restart
                .arg("-c")
                .arg(dir.join("supervisord.conf"))
                .args(["restart", "bench"]);
            (proc, restart)
        }
    };
    let first = rv
        .next_before(Instant::now() + Duration::from_secs(30))
        .ok_or("the service never started")?;
    let hammer = Hammer::start(first.port);
    let mut pid = first.pid;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        std::thread::sleep(Duration::from_millis(300));
        let before = Instant::now();
        if hammer.served_since(before - Duration::from_millis(300)) == 0 {
            return Err(format!(
                "sample {i}: the service serves nothing before the restart"
            ));
        }
        rv.drain();
        let _ = hammer.take();
        let asked = restart.output().map_err(wrap("restart"))?;
        if !asked.status.success() {
            return Err(format!(
                "sample {i}: restart failed: {}",
                String::from_utf8_lossy(&asked.stderr).trim()
            ));
        }
        let deadline = before + Duration::from_secs(15);
        let new = loop {
            let start = rv
                .next_before(deadline)
                .ok_or_else(|| format!("sample {i}: no new process within 15 s"))?;
            if start.pid != pid {
                break start;
            }
        };
        pid = new.pid;
        // Served again, well after the new process started (and after the
        // old one stopped, for a replacement).
        while hammer.served_since(new.at + Duration::from_millis(200)) < 5 {
            if Instant::now() > deadline {
                return Err(format!("sample {i}: nothing served after the restart"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (served, refused) = hammer.take();
        let mut last = before;
        let mut gap = Duration::ZERO;
        for at in served {
            gap = gap.max(at.saturating_duration_since(last));
            last = at;
        }
        out.push((refused, ms(gap)));
    }
    drop(hammer);
    drop(system);
    Ok(out)
}
