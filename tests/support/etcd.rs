//! Real etcd servers on loopback for the tests and the benchmark: a cluster
//! of one or more members, each its own `etcd` process (Debian's
//! `etcd-server`, 3.4) with loopback client and peer ports that stay its own
//! for the cluster's life (so a killed member can be restarted on them), a
//! data directory in a temporary directory and its log in a file next to it.
//! `etcd` and `etcdctl` (Debian's `etcd-client`) are installed with
//! `apt-get` when missing; without them the caller gets an error, it never
//! skips. Readiness is polled (`GET /health` on each member's client port)
//! under a deadline, never slept for. Dropping an [`Etcd`] kills its members
//! and removes their directories, so no etcd outlives its test.
//!
//! Shared by the integration tests and the benchmark: each includes this
//! file next to `debian.rs`, which it reaches as `super::debian`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use socket2::{Domain, Socket, Type};

/// How long a member may take to become healthy after it is started.
const READY: Duration = Duration::from_secs(20);

/// How long a member may take to exit after `SIGTERM`.
const STOPPING: Duration = Duration::from_secs(10);

/// How many times a cluster is started afresh, on new ports, when a member
/// could not bind the ports picked for it (another listener with
/// `SO_REUSEADDR` took one).
const PORT_ATTEMPTS: usize = 3;

/// Makes sure `etcd` and `etcdctl` are installed: installs Debian's
/// `etcd-server` and `etcd-client` with `apt-get` when they are missing, and
/// is an error when that fails.
pub fn ensure_etcd() -> Result<(), String> {
    super::debian::ensure_debian(&[("etcd", "etcd-server"), ("etcdctl", "etcd-client")])
}

/// The files of a cluster that serves its clients over TLS and asks them
/// for certificates (`--client-cert-auth`): the CA, and the members'
/// certificate and key (for `127.0.0.1`, usable as a client certificate
/// too, which is what [`Etcd::etcdctl`] shows).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM of the CA that signed the certificates.
    pub ca: PathBuf,
    /// PEM of the members' certificate.
    pub cert: PathBuf,
    /// PEM of its private key.
    pub key: PathBuf,
}

/// One etcd process: its name, ports, directory and, while it runs, its
/// process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// With TLS: the plain HTTP port of `/health` (`--listen-metrics-urls`).
    metrics_port: Option<u16>,
    tls: Option<ServerTls>,
    /// Holds `data/` (etcd's data directory) and `etcd.log` (its output).
    dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Where `/health` answers over plain HTTP.
    fn health_port(&self) -> u16 {
        self.metrics_port.unwrap_or(self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts the process. The `--initial-cluster*` flags only matter the
    /// first time: etcd ignores them once the data directory holds a member,
    /// so a restart passes the same ones.
    fn spawn(
        &mut self,
        initial_cluster: &str,
        token: &str,
        extra: &[String],
    ) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", self.log_path().display()))?;
        let client = self.client_url();
        let peer = self.peer_url();
        let mut cmd = Command::new("etcd");
        without_etcd_env(&mut cmd);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"]);
        if let (Some(tls), Some(metrics)) = (&self.tls, self.metrics_port) {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth")
                .arg(format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"));
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start etcd {}: {e}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process has been started and has not been reaped.
    fn running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) | None => false,
        }
    }

    /// Sends `signal` and waits for the process to exit, up to `patience`;
    /// then kills it. Nothing to do when it is not running.
    fn end(&mut self, signal: Signal, patience: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // Not reaped yet, so the pid is still this child's, even if it exited.
        let pid = Pid::from_raw(
            i32::try_from(child.id()).map_err(|e| format!("pid {}: {e}", child.id()))?,
        );
        let _ = kill(pid, signal);
        let end = Instant::now() + patience;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "etcd {} did not exit within {patience:?} of {signal}; killed it",
                        self.name
                    ));
                }
                Err(e) => return Err(format!("cannot wait for etcd {}: {e}", self.name)),
            }
        }
    }

    /// The last lines of the member's log, for error messages.
    fn log_tail(&self) -> String {
        let mut text = String::new();
        let _ = File::open(self.log_path()).and_then(|mut f| f.read_to_string(&mut text));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!(
            "log of etcd {} ({}):\n{tail}",
            self.name,
            self.log_path().display()
        )
    }

    /// Whether the log says a port was taken.
    fn port_clash(&self) -> bool {
        std::fs::read_to_string(self.log_path())
            .is_ok_and(|text| text.contains("address already in use"))
    }
}

/// Removes every `ETCD*` variable (etcd reads its flags from `ETCD_*`,
/// etcdctl from `ETCDCTL_*`) so that the environment cannot change what
/// is run.
fn without_etcd_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(name);
        }
    }
}

/// Whether `GET /health` on `port` says `{"health":"true"}`: the member is
/// up and its cluster has a leader.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .is_err()
        || stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.contains("\"health\":\"true\"")
}

/// `n` distinct loopback ports, each held by a socket that is bound (with
/// `SO_REUSEADDR`) and not listening: etcd, which sets `SO_REUSEADDR` too,
/// can bind and listen on it, a connection to it is refused while its
/// member is down, and no other socket without `SO_REUSEADDR` gets it, not
/// even as the local port of an outgoing connection. So a member that is
/// killed finds its ports free when it is restarted, however busy the
/// machine.
fn reserve_ports(n: usize) -> Result<(Vec<u16>, Vec<Socket>), String> {
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)
            .map_err(|e| format!("cannot make a socket: {e}"))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| format!("cannot set SO_REUSEADDR: {e}"))?;
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .ok_or("cannot read a bound port")?;
        ports.push(port);
        held.push(socket);
    }
    Ok((ports, held))
}

/// A token no other cluster started by this machine's tests has.
fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "seaport-test-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running etcd cluster of one or more members on loopback, killed and
/// removed on drop. Members are numbered from 0 (named `m0`, `m1`, ...).
pub struct Etcd {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// More flags for every member (see [`Etcd::cluster_with`]).
    extra: Vec<String>,
    tls: Option<ServerTls>,
    /// Keeps the members' ports for them, running or not (see
    /// [`reserve_ports`]).
    _reserved: Vec<Socket>,
    /// Holds each member's directory; removed on drop, after the members
    /// are killed.
    root: tempfile::TempDir,
}

impl Etcd {
    /// A single-member cluster, healthy.
    pub fn single() -> Result<Etcd, String> {
        Etcd::cluster(1)
    }

    /// An `n`-member cluster, every member healthy (the cluster has a
    /// leader). Installs etcd when missing. Started again on new ports, up
    /// to a few times, when a member could not bind the ports picked for it.
    pub fn cluster(n: usize) -> Result<Etcd, String> {
        Etcd::cluster_with(n, &[])
    }

    /// A single member serving its clients over TLS only, with client
    /// certificates required, healthy.
    pub fn single_tls(tls: ServerTls) -> Result<Etcd, String> {
        Etcd::start(1, &[], Some(tls))
    }

    /// As [`Etcd::cluster`], every member started with `extra` flags after
    /// the ones it always has (a later flag wins over an earlier one).
    pub fn cluster_with(n: usize, extra: &[String]) -> Result<Etcd, String> {
        Etcd::start(n, extra, None)
    }

    fn start(n: usize, extra: &[String], tls: Option<ServerTls>) -> Result<Etcd, String> {
        if n == 0 {
            return Err("an etcd cluster needs at least one member".into());
        }
        ensure_etcd()?;
        let mut attempt = 1;
        loop {
            let mut etcd = Etcd::create(n, extra, tls.clone())?;
            match etcd.boot() {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    let clash = etcd.members.iter().any(Member::port_clash);
                    drop(etcd);
                    if !clash || attempt == PORT_ATTEMPTS {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// The members' directories and ports, nothing started yet.
    fn create(n: usize, extra: &[String], tls: Option<ServerTls>) -> Result<Etcd, String> {
        let root = tempfile::Builder::new()
            .prefix("seaport-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot create a directory for etcd: {e}"))?;
        let per_member = if tls.is_some() { 3 } else { 2 };
        let (ports, reserved) = reserve_ports(per_member * n)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[per_member * i],
                peer_port: ports[per_member * i + 1],
                metrics_port: tls.as_ref().map(|_| ports[per_member * i + 2]),
                tls: tls.clone(),
                dir: root.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Etcd {
            members,
            initial_cluster,
            token: unique_token(),
            extra: extra.to_vec(),
            tls,
            _reserved: reserved,
            root,
        })
    }

    /// Starts every member and waits until all are healthy.
    fn boot(&mut self) -> Result<(), String> {
        for m in &mut self.members {
            m.spawn(&self.initial_cluster, &self.token, &self.extra)?;
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.wait_healthy_members(&all)
    }

    /// Waits until each of `which` answers healthy, failing early when one
    /// exits, with that member's log.
    fn wait_healthy_members(&mut self, which: &[usize]) -> Result<(), String> {
        let end = Instant::now() + READY;
        let mut pending: Vec<usize> = which.to_vec();
        while !pending.is_empty() {
            for &i in &pending {
                if !self.members[i].running() {
                    let m = &self.members[i];
                    return Err(format!(
                        "etcd {} exited before it was healthy\n{}",
                        m.name,
                        m.log_tail()
                    ));
                }
            }
            pending.retain(|&i| !healthy(self.members[i].health_port()));
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= end {
                let tails: Vec<String> = pending
                    .iter()
                    .map(|&i| self.members[i].log_tail())
                    .collect();
                return Err(format!(
                    "etcd not healthy within {READY:?}\n{}",
                    tails.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The member, or an error naming the valid range.
    fn member(&mut self, member: usize) -> Result<&mut Member, String> {
        let n = self.members.len();
        self.members
            .get_mut(member)
            .ok_or_else(|| format!("no etcd member {member}: the cluster has {n}"))
    }

    /// The process id of running member `member` (to pause it with
    /// SIGSTOP, say).
    pub fn pid(&mut self, member: usize) -> Result<u32, String> {
        self.member(member)?
            .child
            .as_ref()
            .map(|child| child.id())
            .ok_or_else(|| format!("etcd member {member} is not running"))
    }

    /// Every member's client address, `127.0.0.1:PORT`, running or not, in
    /// member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The store URL of the whole cluster: `etcd://127.0.0.1:P0,127.0.0.1:P1,...`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// The process ids of the members that are running (not killed or
    /// stopped), in member order.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// The directory that holds every member's data directory and log.
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// Kills `member` with `SIGKILL` and waits for it to exit (nothing to
    /// do when it is not running).
    pub fn kill(&mut self, member: usize) -> Result<(), String> {
        self.member(member)?.end(Signal::SIGKILL, STOPPING)
    }

    /// Stops `member` with `SIGTERM` and waits for it to exit; kills it, and
    /// is an error, when it has not within 10 s.
    pub fn stop(&mut self, member: usize) -> Result<(), String> {
        self.member(member)?.end(Signal::SIGTERM, STOPPING)
    }

    /// Starts `member` again, after [`Etcd::kill`] or [`Etcd::stop`], with its
    /// data directory and ports, and waits until it is healthy: it is up
    /// and, for a cluster, has a leader. An error when it is running.
    pub fn restart(&mut self, member: usize) -> Result<(), String> {
        let (cluster, token) = (self.initial_cluster.clone(), self.token.clone());
        let extra = self.extra.clone();
        let m = self.member(member)?;
        if m.running() {
            return Err(format!("etcd {} is running: kill or stop it first", m.name));
        }
        m.spawn(&cluster, &token, &extra)?;
        let result = self.wait_healthy_members(&[member]);
        if result.is_err() {
            let _ = self.kill(member);
        }
        result
    }

    /// Waits until every member that is not killed or stopped is healthy:
    /// up, with a leader, and answering a quorum read. After a kill of the
    /// leader, this is the wait for a new one; a write sent before it may
    /// hang in etcd for 5 s and fail with "request timed out".
    pub fn wait_healthy(&mut self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect();
        self.wait_healthy_members(&live)
    }

    /// Runs `etcdctl` (API 3) with `args` against the members that are not
    /// killed or stopped (see [`Etcd::kill`], [`Etcd::stop`]) and returns
    /// what it printed; an error with its output when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        if live.is_empty() {
            return Err("etcdctl: no etcd member is running".into());
        }
        let mut cmd = Command::new("etcdctl");
        without_etcd_env(&mut cmd);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        let out = cmd
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", live.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "etcdctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// How many keys start with `prefix` (all keys for `""`), read
    /// linearizably through `etcdctl get --prefix`. etcd 3.4's etcdctl has
    /// no `--count-only`: this asks for one key and reads the `count` of
    /// the JSON answer, which etcd leaves out when it is 0.
    pub fn count_keys(&self, prefix: &str) -> Result<usize, String> {
        let out = self.etcdctl(&[
            "get",
            prefix,
            "--prefix",
            "--keys-only",
            "--limit=1",
            "--write-out=json",
        ])?;
        let reply: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("etcdctl get: not JSON ({e}): {out:?}"))?;
        match reply.get("count") {
            None => Ok(0),
            Some(count) => count
                .as_u64()
                .and_then(|c| usize::try_from(c).ok())
                .ok_or_else(|| format!("etcdctl get: bad count in {out:?}")),
        }
    }
}

impl Drop for Etcd {
    /// Kills every member and waits for it; the directories go with `root`.
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.end(Signal::SIGKILL, STOPPING);
        }
    }
}
