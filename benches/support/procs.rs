//! Processes under test and what `/proc` says about them.
//!
//! Every process the benchmark starts is a [`Proc`]: killed (its whole process
//! group, where it has one) when dropped, and listed in a registry so that a
//! watchdog, Ctrl-C or SIGTERM can kill whatever is still running before the
//! benchmark exits. Nothing started here outlives the benchmark.

use super::{Res, wrap};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// What the benchmark runs and where it writes.
#[derive(Debug, Clone)]
pub struct Env {
    /// Our `seaport` binary.
    pub seaport: PathBuf,
    /// `tests/node`, where `npm ci` installs seaport 2.0.9.
    pub node_dir: PathBuf,
    /// `node_modules/seaport/bin/cmd.js`: the Node CLI (`listen`, `register`).
    pub node_cli: PathBuf,
    /// `node --version`.
    pub node_version: String,
    /// supervisord, when it is installed or could be installed.
    pub supervisord: Option<PathBuf>,
    /// `supervisord --version`.
    pub supervisord_version: Option<String>,
    /// This benchmark binary, run as the supervised child service.
    pub exe: PathBuf,
    /// `target/bench`: results, logs and scratch files.
    pub work: PathBuf,
    /// `tests/fixtures`.
    pub fixtures: PathBuf,
}

impl Env {
    /// Finds (and where needed installs) everything, failing loudly when Node or its
    /// packages are missing: a comparison without the reference is no comparison.
    pub fn detect(want_supervisord: bool) -> Res<Env> {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let exe = std::env::current_exe().map_err(wrap("locate the benchmark binary"))?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                // target/<profile>/deps/seaport-HASH
                let deps = exe.parent()?;
                (deps.file_name()? == "deps")
                    .then(|| deps.parent()?.parent().map(Path::to_path_buf))?
            })
            .unwrap_or_else(|| manifest.join("target"));
        let work = target.join("bench");
        // Logs are per run: empty the directory first.
        let _ = std::fs::remove_dir_all(work.join("logs"));
        std::fs::create_dir_all(work.join("logs")).map_err(wrap(work.display()))?;
        let seaport = std::env::var_os("SEAPORT_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_seaport")));
        if !seaport.exists() {
            return Err(format!(
                "{} is missing: run `cargo build --release --bin seaport` (cargo bench builds it)",
                seaport.display()
            ));
        }
        let node_dir = manifest.join("tests").join("node");
        let node_version = node_ready(&node_dir)?;
        let node_cli = node_dir.join("node_modules/seaport/bin/cmd.js");
        let (supervisord, supervisord_version) = if want_supervisord {
            match find_supervisord(&work) {
                Ok(path) => {
                    let version = Command::new(&path)
                        .arg("--version")
                        .output()
                        .ok()
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
                    (Some(path), version)
                }
                // The comparison is part of the benchmark (and of the test
                // suite, through the quick mode): without the peer it fails,
                // unless --no-supervisord says to leave it out.
                Err(e) => {
                    return Err(format!(
                        "supervisord is needed for the supervisor comparisons and could not be \
                         found or installed: {e} (pass --no-supervisord to leave them out)"
                    ));
                }
            }
        } else {
            (None, None)
        };
        Ok(Env {
            seaport,
            node_dir,
            node_cli,
            node_version,
            supervisord,
            supervisord_version,
            exe,
            work,
            fixtures: manifest.join("tests").join("fixtures"),
        })
    }

    /// A new file for a process's stderr under `target/bench/logs`, numbered in
    /// start order.
    pub fn log_file(&self, name: &str) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.work.join("logs").join(format!("{seq:04}-{safe}.log"))
    }

    /// A fresh, empty scratch directory under `target/bench/tmp`.
    pub fn scratch(&self, name: &str) -> Res<PathBuf> {
        let dir = self.work.join("tmp").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(wrap(dir.display()))?;
        Ok(dir)
    }
}

/// Checks `node` and installs the pinned packages (`npm ci`: seaport 2.0.9, and
/// bouncy 3.2.2 for the router scenario) when they are missing;
/// returns `node --version`.
fn node_ready(dir: &Path) -> Res<String> {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("the benchmark compares with Node: `node --version` failed: {e}"))?;
    if !version.status.success() {
        return Err("the benchmark compares with Node: `node --version` failed".into());
    }
    let installed = ["seaport", "bouncy"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    });
    if !installed {
        eprintln!(
            "installing the Node reference (npm ci in {}) ...",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir)
            .status()
            .map_err(|e| {
                format!(
                    "npm is needed to install seaport 2.0.9 in {}: {e}",
                    dir.display()
                )
            })?;
        if !status.success() || !dir.join("node_modules/seaport/package.json").exists() {
            return Err(format!(
                "npm ci failed in {}: run `npm ci` there by hand and try again",
                dir.display()
            ));
        }
    }
    Ok(String::from_utf8_lossy(&version.stdout).trim().to_string())
}

/// supervisord from `target/bench/venv`, else from PATH, else installed from PyPI
/// into `target/bench/venv` (bounded in time).
fn find_supervisord(work: &Path) -> Res<PathBuf> {
    let venv = work.join("venv");
    let local = venv.join("bin").join("supervisord");
    if local.exists() {
        return Ok(local);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("supervisord");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    eprintln!(
        "installing supervisord from PyPI into {} ...",
        venv.display()
    );
    let log = work.join("logs").join("pip-install-supervisor.log");
    run_bounded(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        &log,
        Duration::from_secs(120),
    )?;
    run_bounded(
        Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", "supervisor"]),
        &log,
        Duration::from_secs(300),
    )?;
    if local.exists() {
        Ok(local)
    } else {
        Err(format!(
            "pip did not install supervisord (see {})",
            log.display()
        ))
    }
}

/// Runs a command to completion within `limit`, its output appended to `log`.
fn run_bounded(cmd: &mut Command, log: &Path, limit: Duration) -> Res<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(wrap(log.display()))?;
    let err = out.try_clone().map_err(wrap(log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(wrap(format!("{cmd:?}")))?;
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(wrap("wait"))? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?} failed ({status}); see {}", log.display()))
            };
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} took more than {limit:?}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Every live process, for the emergency exits.

/// Live processes: (pid, whether it leads its own process group).
fn registry() -> &'static Mutex<HashSet<(u32, bool)>> {
    static LIVE: OnceLock<Mutex<HashSet<(u32, bool)>>> = OnceLock::new();
    LIVE.get_or_init(Mutex::default)
}

/// Kills every process still registered (and its group): the emergency exit.
pub fn kill_all() {
    let live: Vec<(u32, bool)> = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (pid, group) in live {
        let pid = Pid::from_raw(pid as i32);
        let _ = kill(pid, Signal::SIGKILL);
        if group {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP, kills every started process before the benchmark
/// exits. Uses handlers on `rt` rather than a blocked signal mask, which spawned
/// processes would inherit (and then ignore our SIGTERM).
pub fn exit_cleanly_on_signals(rt: &tokio::runtime::Runtime) {
    use tokio::signal::unix::{SignalKind, signal};
    rt.spawn(async {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        };
        eprintln!("\n{name}: killing every process the benchmark started");
        kill_all();
        std::process::exit(130);
    });
}

/// Ends the benchmark, killing what it started, if it runs past `limit`: a safety
/// net above every scenario's own deadlines, so that CI can never hang on it.
pub fn watchdog(limit: Duration) {
    thread::spawn(move || {
        thread::sleep(limit);
        eprintln!("benchmark watchdog: still running after {limit:?}; killing everything");
        kill_all();
        std::process::exit(3);
    });
}

/// Raises this process's open-file limit (children inherit it): 10,000
/// connections need 10,000 descriptors on each side. Returns the soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 65_536;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

// ---------------------------------------------------------------------------
// One process.

/// A started process, killed on drop, with its stdout read line by line.
pub struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
    group: bool,
    grace: Duration,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` with stdout captured, stderr appended to `target/bench/logs`,
    /// and, when `group`, in a new process group (so that killing the group also
    /// kills what it started).
    pub fn spawn(env: &Env, name: &str, mut cmd: Command, group: bool) -> Res<Proc> {
        let log_path = env.log_file(name);
        let log = std::fs::File::create(&log_path).map_err(wrap(log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        if group {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(wrap(format!("start {name}")))?;
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((child.id(), group));
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        // Nobody listens: keep draining so the process never blocks.
                        continue;
                    }
                }
            });
        }
        Ok(Proc {
            name: name.to_string(),
            log: log_path,
            child,
            group,
            grace: Duration::from_secs(5),
            lines,
        })
    }

    /// Sets how long a stop waits after SIGTERM before SIGKILL (default 5 s).
    pub fn grace(mut self, grace: Duration) -> Proc {
        self.grace = grace;
        self
    }

    /// Where its stderr goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line within `wait`.
    pub fn line(&self, wait: Duration) -> Res<String> {
        self.lines.recv_timeout(wait).map_err(|_| {
            format!(
                "{}: no output line within {wait:?} (it may have died; see its log under target/bench/logs)",
                self.name
            )
        })
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL (to the whole group, if any).
    pub fn stop(&mut self, grace: Duration) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.running() {
            let began = Instant::now();
            let _ = kill(pid, Signal::SIGTERM);
            let end = began + grace;
            while self.running() && Instant::now() < end {
                thread::sleep(Duration::from_millis(10));
            }
            if began.elapsed() > Duration::from_secs(1) {
                let killed = if self.running() { " (killed)" } else { "" };
                eprintln!(
                    "note: {} took {:.1}s to stop on SIGTERM{killed}",
                    self.name,
                    began.elapsed().as_secs_f64(),
                );
            }
        }
        let _ = self.child.kill();
        if self.group {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        let _ = self.child.wait();
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.child.id(), self.group));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(self.grace);
    }
}

// ---------------------------------------------------------------------------
// Hubs.

/// Which hub implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubKind {
    /// Our `seaport listen`.
    Ours,
    /// npm seaport 2.0.9's `seaport listen`.
    Node,
}

impl HubKind {
    /// Both, in the order the table shows them.
    pub const BOTH: [HubKind; 2] = [HubKind::Ours, HubKind::Node];

    /// `ours` or `node`.
    pub fn name(self) -> &'static str {
        match self {
            HubKind::Ours => "ours",
            HubKind::Node => "node",
        }
    }
}

/// A running hub.
pub struct HubProc {
    /// The hub process.
    pub proc: Proc,
    /// Where it listens (loopback).
    pub addr: SocketAddr,
}

impl HubProc {
    /// Starts a hub of `kind` on a loopback port. `extra` goes to our hub only.
    ///
    /// Our hub runs with `--timeout 600000`: the load generator's connections do not
    /// send heartbeats, and the Node hub never times out such connections either
    /// (its timer starts at the first heartbeat), so this keeps the two alike.
    pub fn start(env: &Env, kind: HubKind, extra: &[&str]) -> Res<HubProc> {
        match kind {
            HubKind::Ours => {
                let mut cmd = Command::new(&env.seaport);
                cmd.args(["listen", "0", "--host", "127.0.0.1", "--timeout", "600000"])
                    .args(extra)
                    // SEAPORT_BENCH_LOG (default "warn") sets our hub's log level.
                    .env(
                        "SEAPORT_LOG",
                        std::env::var("SEAPORT_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                    );
                let proc = Proc::spawn(env, "hub-ours", cmd, false)?;
                let port = listening_port(&proc)?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_accepting(addr, Duration::from_secs(10))?;
                Ok(HubProc { proc, addr })
            }
            HubKind::Node => {
                let port = free_port()?;
                // The Node CLI prints the port it was given, never the real one for
                // 0, so the port is chosen here. `ulimit` in case the inherited
                // limit is low; `exec` so the pid is node's.
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg("ulimit -n 65536 2>/dev/null; exec node \"$0\" listen \"$1\"")
                    .arg(&env.node_cli)
                    .arg(port.to_string())
                    .current_dir(&env.node_dir);
                let proc = Proc::spawn(env, "hub-node", cmd, false)?;
                let first = proc.line(Duration::from_secs(20))?;
                if first != format!("seaport listening on :{port}") {
                    return Err(format!("the Node hub printed {first:?}"));
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_accepting(addr, Duration::from_secs(10))?;
                Ok(HubProc { proc, addr })
            }
        }
    }

    /// The hub's resident memory now, in bytes.
    pub fn rss(&self) -> Res<u64> {
        rss_bytes(self.proc.pid())
    }

    /// The hub's peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> Res<u64> {
        peak_rss_bytes(self.proc.pid())
    }
}

/// Reads stdout until `seaport listening on :PORT` (a wrapper such as a profiler
/// may print first); returns PORT.
pub fn listening_port(proc: &Proc) -> Res<u16> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Ok(line) = proc.line(left) else { break };
        if let Some(port) = line
            .strip_prefix("seaport listening on :")
            .and_then(|p| p.trim().parse().ok())
        {
            return Ok(port);
        }
        seen.push(line);
    }
    Err(format!(
        "{}: no `seaport listening on :PORT` line; printed {seen:?}",
        proc.name
    ))
}

/// Polls until something accepts on `addr`.
pub fn wait_accepting(addr: SocketAddr, within: Duration) -> Res<()> {
    let end = Instant::now() + within;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("nothing accepts on {addr} after {within:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(wrap("bind an ephemeral port"))
}

// ---------------------------------------------------------------------------
// /proc.

/// `VmRSS` of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Res<u64> {
    status_bytes(pid, "VmRSS")
}

/// `VmHWM` of `pid`, its peak resident memory so far, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Res<u64> {
    status_bytes(pid, "VmHWM")
}

/// `pid`'s proportional share of the memory it maps (`Pss` in
/// `/proc/PID/smaps_rollup`: each page divided among the processes that
/// share it, copy-on-write pages of a fork included), in bytes.
pub fn pss_bytes(pid: u32) -> Res<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(wrap(format!("/proc/{pid}/smaps_rollup")))?;
    kib_field(&rollup, "Pss").ok_or_else(|| format!("no Pss for pid {pid}"))
}

/// `VmPTE` of `pid`, the memory of its page tables, in bytes.
pub fn page_table_bytes(pid: u32) -> Res<u64> {
    status_bytes(pid, "VmPTE")
}

/// Every process's children, from one reading of `/proc`: parent to children.
pub fn children_by_parent() -> Res<HashMap<u32, Vec<u32>>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").map_err(wrap("/proc"))? {
        let Ok(entry) = entry else { continue };
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that ended meanwhile is no child.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if let Some(parent) = stat_field(&stat, 4).and_then(|p| u32::try_from(p).ok()) {
            children.entry(parent).or_default().push(child);
        }
    }
    Ok(children)
}

/// A `kB` field (`NAME: N kB`) of a `/proc` text, in bytes.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(wrap(format!("/proc/{pid}/status")))?;
    kib_field(&status, field).ok_or_else(|| format!("no {field} for pid {pid}"))
}

/// CPU time (user + system, all threads) `pid` has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(wrap(format!("/proc/{pid}/stat")))?;
    // utime is field 14, stime 15.
    let field = |n: usize| -> Res<u64> {
        stat_field(&stat, n).ok_or_else(|| format!("bad /proc/{pid}/stat field {n}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Numeric field `n` (counted from 1, as in proc(5)) of a `/proc/PID/stat`
/// text. The fields are counted after the parenthesised name, which may hold
/// blanks: the state is field 3.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// Clock ticks per second in `/proc/*/stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;
