//! Test harness: start the real `seaport` binary and real Node peers, talk raw
//! protocol, and poll for conditions with deadlines instead of fixed sleeps.
//! Every process started here is killed when its handle is dropped.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The built `seaport` binary.
pub fn seaport_bin() -> &'static str {
    env!("CARGO_BIN_EXE_seaport")
}

/// `tests/node`, where the reference npm packages are installed.
pub fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("node")
}

/// Installs the pinned npm packages once per test run. Panics, failing the test,
/// when Node or npm is missing: interop tests must never pass by skipping.
pub fn node_ready() -> &'static Path {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    READY.get_or_init(|| {
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let dir = node_dir();
        let node = Command::new("node").arg("--version").output();
        assert!(
            node.as_ref().is_ok_and(|o| o.status.success()),
            "interop tests need Node.js on PATH (`node --version` failed: {node:?})"
        );
        if !npm_packages_installed(&dir) {
            // A file lock keeps parallel test processes from installing at once.
            let lock_path = std::env::temp_dir().join("seaport-tests-npm.lock");
            let file = std::fs::File::create(&lock_path).expect("create npm lock file");
            let _held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .expect("lock the npm lock file");
            if !npm_packages_installed(&dir) {
                let status = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir)
                    .status()
                    .expect("interop tests need npm on PATH");
                assert!(status.success(), "npm ci in {} failed", dir.display());
            }
        }
        dir
    })
}

/// Whether every package that `dir/package.json` pins (dependencies and
/// devDependencies, all exact versions) is installed in `dir/node_modules` at its
/// pinned version.
fn npm_packages_installed(dir: &Path) -> bool {
    let read = |path: PathBuf| -> Value {
        std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Value::Null)
    };
    let manifest = read(dir.join("package.json"));
    let pinned: Vec<(&String, &Value)> = ["dependencies", "devDependencies"]
        .iter()
        .filter_map(|key| manifest[key].as_object())
        .flatten()
        .collect();
    assert!(
        !pinned.is_empty(),
        "{} lists no packages",
        dir.join("package.json").display()
    );
    pinned.into_iter().all(|(name, version)| {
        read(dir.join("node_modules").join(name).join("package.json"))["version"] == *version
    })
}

/// A child process killed (and reaped) on drop, with its stdout read line by
/// line and its stderr (its log) kept in a file, which is printed if the test
/// fails: a passing run shows test results, not the logs of what it ran.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub name: String,
    log: Log,
}

/// Where a process's stderr goes.
enum Log {
    /// A file of the harness's, removed with the process.
    Own(tempfile::TempPath),
    /// A file the test reads itself.
    At(PathBuf),
}

impl Log {
    fn path(&self) -> &Path {
        match self {
            Log::Own(path) => path,
            Log::At(path) => path,
        }
    }
}

impl Proc {
    /// Starts `program args` with stdout captured and stderr kept as its log.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        let file = tempfile::NamedTempFile::new().expect("a log file");
        Proc::start(name, cmd, Log::Own(file.into_temp_path()))
    }

    /// Starts `program args` with stdout captured and stderr written to `log`,
    /// for a test that reads it.
    pub fn spawn_logging_to(name: &str, cmd: Command, log: &Path) -> Proc {
        Proc::start(name, cmd, Log::At(log.to_path_buf()))
    }

    fn start(name: &str, mut cmd: Command, log: Log) -> Proc {
        let file = std::fs::File::create(log.path()).expect("create a log file");
        cmd.stdout(Stdio::piped()).stdin(Stdio::null()).stderr(file);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        Proc {
            child,
            lines: read_lines(stdout),
            name: name.to_string(),
            log,
        }
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The next line of stdout, failing the test after `DEADLINE`.
    pub fn line(&self) -> String {
        self.line_within(DEADLINE)
            .unwrap_or_else(|| panic!("{}: no output line within {DEADLINE:?}", self.name))
    }

    /// The next line of stdout, or `None` if none comes within `wait`.
    pub fn line_within(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Reads lines until one satisfies `pred`; fails the test after `DEADLINE`.
    pub fn line_where(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "{}: no line {what} within {DEADLINE:?}; saw {seen:#?}",
            self.name
        )
    }

    /// Waits for the process to exit; fails the test after `DEADLINE`.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < end,
                "{}: did not exit within {DEADLINE:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Kills the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Captured by the test harness and shown with the failure.
            eprintln!("--- stderr of {} ---\n{}", self.name, self.stderr());
        }
    }
}

fn read_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `seaport` command, logging at `info` unless the test run asks for more.
pub fn seaport(args: &[&str]) -> Command {
    let mut cmd = Command::new(seaport_bin());
    cmd.args(args);
    if std::env::var_os("SEAPORT_LOG").is_none() {
        cmd.env("SEAPORT_LOG", "info");
    }
    cmd
}

/// Runs `seaport ARGS`, which must fail (within `DEADLINE`: one that runs on
/// instead is killed, and the test fails), and returns what it said on stderr.
pub fn refused(args: &[&str]) -> String {
    let mut proc = Proc::spawn("seaport", seaport(args));
    assert!(!proc.wait().success(), "seaport {args:?} did not fail");
    proc.stderr()
}

/// A hub run by the real binary on a free port.
pub struct HubProc {
    pub proc: Proc,
    pub port: u16,
}

impl HubProc {
    /// `seaport listen 0 EXTRA...`, waiting for its `seaport listening on :PORT` line.
    pub fn start(extra: &[&str]) -> HubProc {
        HubProc::start_on(0, extra)
    }

    /// `seaport listen PORT --host 127.0.0.1 EXTRA...`, waiting for its
    /// `seaport listening on :PORT` line.
    pub fn start_on(port: u16, extra: &[&str]) -> HubProc {
        let port = port.to_string();
        let mut args = vec!["listen", &port, "--host", "127.0.0.1"];
        args.extend_from_slice(extra);
        let proc = Proc::spawn("seaport listen", seaport(&args));
        let first = proc.line();
        let port = first
            .strip_prefix("seaport listening on :")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the hub: {first:?}"));
        HubProc { proc, port }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A Node.js script from `tests/node`, run with the pinned npm packages.
pub fn node(script: &str, args: &[&str]) -> Proc {
    let dir = node_ready();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join(script)).args(args).current_dir(dir);
    Proc::spawn(&format!("node {script}"), cmd)
}

/// Waits for the next line a Node script (`tests/node/*.js`) prints with
/// the given `event`, each line being one JSON object.
pub fn node_event(proc: &Proc, event: &str) -> Value {
    let line = proc.line_where(&format!("with event {event:?}"), |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event)
    });
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line from node {line:?}: {e}"))
}

/// A Node hub (`seaport listen` from npm seaport 2.0.9) on a free port.
pub fn node_hub() -> (Proc, u16) {
    let dir = node_ready();
    let port = free_port();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("node_modules/seaport/bin/cmd.js"))
        .args(["listen", &port.to_string()])
        .current_dir(dir);
    let proc = Proc::spawn("node seaport listen", cmd);
    assert_eq!(proc.line(), format!("seaport listening on :{port}"));
    wait_until("the Node hub accepts connections", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, port)
}

/// A port that is free now (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive ports that are free now, below the kernel's
/// ephemeral ports: no outgoing connection, of this test or another, takes
/// one of them before the test binds it, as it could take a port found by
/// binding port 0 and letting it go.
pub fn free_ports(n: u16) -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral = seaport::registry::ports::ephemeral_ports().start;
    let (low, high) = (10_000u32, u32::from(ephemeral.saturating_sub(n)));
    assert!(
        high > low,
        "no room below the ephemeral ports ({ephemeral})"
    );
    for _ in 0..200 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = nanos ^ std::process::id().rotate_left(16) ^ call.wrapping_mul(2_654_435_761);
        let start = u16::try_from(low + seed % (high - low)).expect("below the ephemeral ports");
        let held: Vec<std::net::TcpListener> = (start..start + n)
            .filter_map(|p| std::net::TcpListener::bind(("0.0.0.0", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return start;
        }
    }
    panic!("no {n} consecutive free ports below {ephemeral}");
}

/// Polls `cond` until it holds; fails the test after `DEADLINE`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw protocol connection: send lines, read rows.
pub struct Raw {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Raw {
    /// Connects to `addr`.
    pub fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("set timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone stream"));
        Raw { stream, reader }
    }

    /// Waits up to `wait` for each row from now on, instead of `DEADLINE`.
    pub fn wait_per_row(&mut self, wait: Duration) {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set timeout");
    }

    /// Connects and reads `helo`, the dump and `synced`; returns the helo address
    /// and the dumped register rows.
    pub fn connect_synced(addr: &str) -> (Raw, String, Vec<Value>) {
        let mut raw = Raw::connect(addr);
        let helo = raw.row();
        assert_eq!(helo[0], "helo", "first row must be helo, got {helo}");
        let host = helo[1].as_str().expect("helo address").to_string();
        let mut dump = Vec::new();
        loop {
            let row = raw.row();
            match row[0].as_str() {
                Some("synced") => break,
                Some("register") => dump.push(row),
                // The signed mode's invitation; plain clients ignore it.
                Some("challenge") => {}
                _ => panic!("unexpected row in the dump: {row}"),
            }
        }
        (raw, host, dump)
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one line (newline added).
    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {line}: {e}"));
    }

    /// Reads the next row, skipping heartbeats; fails the test on timeout or EOF.
    pub fn row(&mut self) -> Value {
        loop {
            let row = self.next_any_row();
            if row[0] != "heartbeat" {
                return row;
            }
        }
    }

    /// Reads the next line as it was sent, newline included, skipping
    /// heartbeats; fails the test on timeout or EOF.
    pub fn text_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read a row");
            assert!(n > 0, "connection closed while waiting for a row");
            if !line.starts_with("[\"heartbeat\"") {
                return line;
            }
        }
    }

    /// Reads the next row, heartbeats included; fails the test on timeout or EOF.
    pub fn next_any_row(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a row");
        assert!(n > 0, "connection closed while waiting for a row");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("hub sent a bad line {line:?}: {e}"))
    }

    /// When the hub closes the connection, from a thread that reads (and
    /// drops) what it sends until then.
    pub fn closed_at(self) -> std::thread::JoinHandle<Instant> {
        let mut reader = self.reader;
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                line.clear();
            }
            Instant::now()
        })
    }

    /// Closes the connection, both ways, for every clone of it (a
    /// `keep_alive` thread's included).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a heartbeat every `every` from a background thread, for `total`.
    /// Returns the longest time, in milliseconds, between two heartbeats
    /// sent so far: on a loaded machine the thread itself may run late.
    pub fn keep_alive(&self, every: Duration, total: Duration) -> Arc<AtomicU64> {
        let mut stream = self.stream.try_clone().expect("clone stream");
        let longest = Arc::new(AtomicU64::new(0));
        let gap = longest.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + total;
            let mut last = Instant::now();
            while Instant::now() < end {
                if stream.write_all(b"[\"heartbeat\"]\n").is_err() {
                    return;
                }
                let ms = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
                gap.fetch_max(ms, Ordering::Relaxed);
                last = Instant::now();
                std::thread::sleep(every);
            }
        });
        longest
    }

    /// Whether the peer closed the connection within `wait` (other rows are skipped).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set timeout");
        let end = Instant::now() + wait;
        let mut line = String::new();
        while Instant::now() < end {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The path of a script in `tests/fixtures`.
pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Whether process `pid` exists and is not a zombie (an orphan nobody reaps yet
/// counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// When process `pid` started (in clock ticks after boot), which tells it from
/// a later process given the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields after the command name start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// SIGKILLs the listed processes on drop, should a failed test leave them
/// behind: those still running as the processes they were when listed (pids
/// are soon given to new processes).
pub struct KillOnDrop(Vec<(u32, u64)>);

impl KillOnDrop {
    /// Notes each process of `pids` that runs now.
    pub fn new(pids: impl IntoIterator<Item = u32>) -> KillOnDrop {
        KillOnDrop(
            pids.into_iter()
                .filter_map(|pid| start_time(pid).map(|start| (pid, start)))
                .collect(),
        )
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &(pid, start) in &self.0 {
            if pid_alive(pid)
                && start_time(pid) == Some(start)
                && let Ok(pid) = i32::try_from(pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Waits until process `pid` is gone; fails the test after `DEADLINE`.
pub fn wait_gone(what: &str, pid: u32) {
    wait_until(&format!("{what} (pid {pid}) is gone"), || !pid_alive(pid));
}

/// A synced raw connection whose later rows (heartbeats skipped) a background
/// thread reads onto a channel, so a test can also wait for "nothing happens".
pub struct Rows {
    rows: mpsc::Receiver<Value>,
    stream: TcpStream,
}

impl Rows {
    /// Connects to `addr`, reads the dump and returns the watcher and the dump.
    pub fn connect(addr: &str) -> (Rows, Vec<Value>) {
        let (raw, _, dump) = Raw::connect_synced(addr);
        raw.keep_alive(Duration::from_secs(5), Duration::from_secs(300));
        let stream = raw.stream.try_clone().expect("clone stream");
        let mut reader = raw.reader;
        reader
            .get_ref()
            .set_read_timeout(None)
            .expect("clear timeout");
        let (tx, rows) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let Ok(row) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if row[0] != "heartbeat" && tx.send(row).is_err() {
                    return;
                }
            }
        });
        (Rows { rows, stream }, dump)
    }

    /// The next row; fails the test after `DEADLINE`.
    pub fn next(&self) -> Value {
        self.next_within(DEADLINE)
            .unwrap_or_else(|| panic!("no row from the hub within {DEADLINE:?}"))
    }

    /// The next row, or `None` if none comes within `wait`.
    pub fn next_within(&self, wait: Duration) -> Option<Value> {
        self.rows.recv_timeout(wait).ok()
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Proc {
    /// Sends `signal` and waits up to `within` for the process to exit, without
    /// failing the test (for cleanup in `Drop`); `None` if it is still running.
    pub fn stop_within(
        &mut self,
        signal: nix::sys::signal::Signal,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(signal);
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// `seaport show HUB` as JSON; fails the test if the command fails.
pub fn show(hub: &str) -> Value {
    let out = seaport(&["show", hub]).output().expect("run show");
    assert!(
        out.status.success(),
        "show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("show prints JSON")
}
