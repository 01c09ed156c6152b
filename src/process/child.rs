//! A service's processes, started and stopped as one.
//!
//! Each command starts below its own keeper ([`super::keeper`]) and, where
//! cgroup v2 is writable, in a cgroup of its own ([`super::containment`] says
//! which guarantee holds where). A stop sends the stop signal to every process
//! of the service, not only its first: those of its cgroup, or else every
//! descendant of its keeper; what is still there when the stop timeout ends is
//! killed. When the first process (the leader) exits on its own, the rest is
//! killed at once, so that nothing holds the service's port across a restart.
//! "No such process" from a signal means already gone, not an error.

use crate::process::activation::{self, HeldSocket};
use crate::process::cgroup::{self, Cgroup};
use crate::process::containment;
use crate::process::factory::{self, Made, Order, Output};
use crate::process::keeper::{self, Activation, Plan};
use crate::process::reaper;
use crate::process::restart::Exit;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::time::Instant;

/// systemd's variables that describe the supervisor's own sockets, its
/// notification socket and its watchdog: a service or a check that
/// inherited them could speak for the supervisor (or be refused as it).
pub(crate) fn never_inherited() -> impl Iterator<Item = &'static str> {
    activation::VARIABLES
        .into_iter()
        .chain(["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"])
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The instance's name, which its cgroup is named after.
    pub name: &'a str,
    /// Program and arguments; the port is appended as the last argument.
    pub command: &'a [String],
    /// The service port, appended and exported as `PORT`.
    pub port: u16,
    /// Extra environment variables.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// Capture stdout and stderr (to prefix them) instead of inheriting them.
    pub capture: bool,
    /// A listening socket to pass as descriptor 3 ([`super::activation`]).
    pub socket: Option<&'a HeldSocket>,
}

/// Where to find a running service's processes, apart from the service itself
/// (so that it can be looked at while the service is waited for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tree {
    /// Every process of this cgroup directory.
    Cgroup(PathBuf),
    /// Every descendant of this keeper.
    Below(u32),
}

impl Tree {
    /// The processes of the service now.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Tree::Cgroup(dir) => cgroup::members(dir).unwrap_or_default(),
            Tree::Below(keeper) => reaper::descendants(*keeper),
        }
    }

    /// Pauses every process of the service until the guard is dropped: its
    /// cgroup frozen (waiting, up to a bound, until the kernel says it is),
    /// else SIGSTOP to each process, and SIGCONT to the same ones after.
    pub async fn pause(&self) -> Paused {
        match self {
            Tree::Cgroup(dir) => {
                // The guard first: a wait cancelled below still thaws.
                let paused = Paused::Frozen(dir.clone());
                if std::fs::write(dir.join("cgroup.freeze"), "1").is_ok() {
                    let end = Instant::now() + FREEZE_WITHIN;
                    while !cgroup::frozen(dir) && Instant::now() < end {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                paused
            }
            Tree::Below(_) => {
                let paused = Paused::Stopped(self.pids());
                if let Paused::Stopped(pids) = &paused {
                    for &pid in pids {
                        if let Ok(pid) = i32::try_from(pid) {
                            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                        }
                    }
                }
                paused
            }
        }
    }
}

/// How long a freeze may take before a pause goes on without it.
const FREEZE_WITHIN: Duration = Duration::from_millis(100);

/// A service paused by [`Tree::pause`]; dropping it lets the service go on.
#[derive(Debug)]
pub enum Paused {
    /// This cgroup is frozen.
    Frozen(PathBuf),
    /// These processes were sent SIGSTOP.
    Stopped(Vec<u32>),
}

impl Drop for Paused {
    fn drop(&mut self) {
        match self {
            Paused::Frozen(dir) => {
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
            }
            Paused::Stopped(pids) => {
                for &pid in pids.iter() {
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    }
                }
            }
        }
    }
}

/// A running service: its keeper, its leader and whatever they started.
#[derive(Debug)]
pub struct Running {
    /// The keeper, the process this one waits for.
    keeper: Keeper,
    leader: Pid,
    /// The read end of the keeper's report.
    report: File,
    cgroup: Option<Cgroup>,
    started: Instant,
    exit: Option<Exit>,
}

impl Running {
    /// Starts the command below a keeper, in its own cgroup where there are
    /// cgroups.
    pub fn spawn(launch: &Launch<'_>) -> io::Result<Running> {
        let (program, args) = launch
            .command
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg(launch.port.to_string())
            .env("PORT", launch.port.to_string())
            .envs(launch.env)
            // The keeper leads a group of its own, away from the terminal's
            // signals; the leader leads another.
            .process_group(0);
        if let Some(cwd) = launch.cwd {
            cmd.current_dir(cwd);
        }
        for var in never_inherited() {
            cmd.env_remove(var);
        }
        let output = if launch.capture {
            Output::Piped
        } else {
            Output::Inherit
        };
        let activation = match launch.socket {
            Some(socket) => {
                let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
                env.insert("PORT".into(), launch.port.to_string().into());
                env.extend(launch.env.iter().map(|(k, v)| (k.into(), v.into())));
                Some(socket.activation(launch.name, launch.command, &env, launch.cwd)?)
            }
            None => None,
        };
        let cgroup = containment::get().cgroup_for(launch.name);
        let started = start_below_keeper(cmd, [output, output], cgroup.as_ref(), activation);
        if started.is_err()
            && let Some(cgroup) = &cgroup
        {
            cgroup.remove_now();
        }
        let (keeper, leader, report) = started?;
        Ok(Running {
            keeper,
            leader,
            report,
            cgroup,
            started: Instant::now(),
            exit: None,
        })
    }

    /// The process id of the leader, the command itself.
    pub fn pid(&self) -> u32 {
        self.leader.as_raw().unsigned_abs()
    }

    /// Where its processes are.
    pub fn tree(&self) -> Tree {
        match &self.cgroup {
            Some(cgroup) => Tree::Cgroup(cgroup.dir().to_path_buf()),
            None => Tree::Below(self.keeper.pid().as_raw().unsigned_abs()),
        }
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Takes the captured stdout.
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.keeper.stdout()
    }

    /// Takes the captured stderr.
    pub fn stderr(&mut self) -> Option<ChildStderr> {
        self.keeper.stderr()
    }

    /// Waits for the leader to exit and for the rest of the service (killed by
    /// the keeper when the leader exits on its own) to be gone. Safe to call
    /// again after it returned, and to cancel.
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let status = self.keeper.wait().await;
        self.keeper.disown();
        // A cgroup's leftovers are killed with the cgroup, below.
        let exit = leader_exit(&mut self.report, status, self.cgroup.is_some());
        self.exit = Some(exit);
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove().await;
        }
        exit
    }

    /// Sends `signal` to every process of the service: those of its cgroup, or
    /// every descendant of its keeper. Processes already gone are no error.
    pub fn signal_all(&self, signal: Signal) {
        match &self.cgroup {
            Some(cgroup) => cgroup.signal_all(signal),
            None => reaper::signal_descendants(self.keeper.pid().as_raw().unsigned_abs(), signal),
        }
    }

    /// Signals the keeper, while it is there to be signalled (a reaped keeper's
    /// pid may belong to another process by now).
    fn tell_keeper(&self, signal: Signal) {
        if self.exit.is_none() {
            self.keeper.signal(signal);
        }
    }

    /// Stops the service: `signal` to every process, then SIGKILL to whatever
    /// is still running when `timeout` has passed (the leader and the rest alike
    /// get the whole timeout to finish), and waits until all are gone.
    pub async fn stop(&mut self, signal: Signal, timeout: Duration) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let deadline = Instant::now() + timeout;
        // First, so that the leader's exit does not make the keeper kill the
        // rest before their time.
        self.tell_keeper(keeper::STOPPING);
        self.signal_all(signal);
        match tokio::time::timeout_at(deadline, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid(),
                    "still running {} after {signal}; sending SIGKILL",
                    crate::human::format_duration(timeout)
                );
                self.tell_keeper(keeper::KILL_NOW);
                if let Some(cgroup) = &self.cgroup {
                    cgroup.kill();
                }
                self.wait().await
            }
        }
    }
}

impl Drop for Running {
    /// A service whose owner goes away without stopping it is killed, all of
    /// it; the keeper then ends, and the runtime reaps it.
    fn drop(&mut self) {
        self.tell_keeper(keeper::KILL_NOW);
        if self.exit.is_none() {
            if let Some(cgroup) = &self.cgroup {
                cgroup.kill();
            }
            // Whoever reaps it, its pid may be used again: as an orphan's,
            // it must not be taken for this keeper's.
            self.keeper.disown();
        }
    }
}

/// The keeper of a command: a child of this process, or one the keeper
/// factory made ([`super::factory`]).
#[derive(Debug)]
enum Keeper {
    Child { child: Child, pid: Pid },
    Made(Made),
}

impl Keeper {
    fn pid(&self) -> Pid {
        match self {
            Keeper::Child { pid, .. } => *pid,
            Keeper::Made(made) => made.pid,
        }
    }

    fn stdout(&mut self) -> Option<ChildStdout> {
        match self {
            Keeper::Child { child, .. } => child.stdout.take(),
            Keeper::Made(made) => made.stdout.take(),
        }
    }

    fn stderr(&mut self) -> Option<ChildStderr> {
        match self {
            Keeper::Child { child, .. } => child.stderr.take(),
            Keeper::Made(made) => made.stderr.take(),
        }
    }

    /// Waits until it has ended: its status when it was this process's
    /// child (the factory reaps its own).
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Keeper::Child { child, .. } => child.wait().await,
            Keeper::Made(made) => {
                made.ended().await;
                Err(io::Error::other("the keeper factory reaped the keeper"))
            }
        }
    }

    /// Forgets its pid among this process's own children, for a keeper
    /// that was one (the factory's are not).
    fn disown(&self) {
        if let Keeper::Child { pid, .. } = self {
            reaper::disown(pid.as_raw().unsigned_abs());
        }
    }

    /// Sends `signal` to the keeper while it runs: a reaped keeper's pid may
    /// belong to another process by now.
    fn signal(&self, signal: Signal) {
        match self {
            Keeper::Child { child, pid } => {
                if child.id().is_some() {
                    let _ = kill(*pid, signal);
                }
            }
            Keeper::Made(made) => made.signal(signal),
        }
    }
}

/// The whole environment `cmd` gives its program: this process's, with the
/// command's changes (the commands here never clear it).
fn environment(cmd: &std::process::Command) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => env.insert(key.to_owned(), value.to_owned()),
            None => env.remove(key),
        };
    }
    env.into_iter().collect()
}

/// Spawns `cmd` below a keeper, its stdin `/dev/null` and its stdout and
/// stderr as `output` says, and reads the leader's pid from its report:
/// the keeper, the leader's pid and the report's read end.
fn start_below_keeper(
    mut cmd: Command,
    output: [Output; 2],
    cgroup: Option<&Cgroup>,
    activation: Option<Activation>,
) -> io::Result<(Keeper, Pid, File)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot make the pipe the service's keeper reports through: {e}"),
        )
    })?;
    let files = match cgroup {
        Some(cgroup) => Some(cgroup.files().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the service's cgroup {}: {e}",
                    cgroup.dir().display()
                ),
            )
        })?),
        None => None,
    };
    let explain = |e| keeper::explain(e, cgroup.map(Cgroup::dir));
    let std_cmd = cmd.as_std();
    let order = Order {
        program: std_cmd.get_program(),
        args: std_cmd.get_args().collect::<Vec<&OsStr>>(),
        env: environment(std_cmd),
        cwd: std_cmd.get_current_dir(),
        stdout: output[0],
        stderr: output[1],
        report: std::os::fd::AsFd::as_fd(&write),
        cgroup: files.as_ref(),
        activation: activation.as_ref(),
    };
    let keeper = match factory::start(&order) {
        Some(made) => {
            let made = made.map_err(explain)?;
            // The report ends when the keeper does.
            drop(write);
            Keeper::Made(made)
        }
        None => {
            cmd.stdin(Stdio::null())
                .stdout(output[0].stdio())
                .stderr(output[1].stdio());
            let plan = Plan {
                parent: nix::unistd::getpid(),
                report: write,
                cgroup: files,
                activation,
            };
            keeper::install(&mut cmd, plan);
            let child = reaper::spawn_owned(|| cmd.spawn(), Child::id).map_err(explain)?;
            // Our copy of the report's write end goes with the command, so
            // that the report ends when the keeper does.
            drop(cmd);
            let pid = child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw)
                .ok_or_else(|| io::Error::other("the keeper exited before its pid was read"))?;
            Keeper::Child { child, pid }
        }
    };
    let mut report = File::from(read);
    let mut first = [0u8; 4];
    // The leader's pid once its command runs; from a keeper the factory
    // made, why it did not start, negated.
    report
        .read_exact(&mut first)
        .map_err(|_| io::Error::other("the keeper ended before starting the command"))?;
    let first = i32::from_ne_bytes(first);
    if first <= 0 {
        return Err(explain(io::Error::from_raw_os_error(
            first.saturating_neg(),
        )));
    }
    Ok((keeper, Pid::from_raw(first), report))
}

/// How the leader ended, from the keeper's report once the keeper has ended
/// with `keeper` (its own status). A keeper killed from outside reported
/// nothing: its own end is all there is, and what it held is adopted by this
/// process, if by anyone, and killed here, unless it is in a cgroup.
fn leader_exit(report: &mut File, keeper: io::Result<ExitStatus>, in_cgroup: bool) -> Exit {
    let mut ended = [0u8; 4];
    if report.read_exact(&mut ended).is_ok() {
        return exit_of(ExitStatus::from_raw(i32::from_ne_bytes(ended)));
    }
    if !in_cgroup {
        reaper::kill_adopted();
    }
    match keeper {
        Ok(status) => exit_of(status),
        Err(_) => Exit::Signal(Signal::SIGKILL as i32),
    }
}

/// A command that runs to its end below a keeper of its own, without a cgroup
/// (a health check's): whatever it starts, `setsid` daemons included, is
/// killed when it exits, and all of it when this is dropped before the end.
#[derive(Debug)]
pub struct Kept {
    keeper: Keeper,
    report: File,
    ended: bool,
}

/// How much of a kept command's stderr is kept: its end.
pub const STDERR_TAIL: usize = 4096;

impl Kept {
    /// Starts `cmd` (which must lead a process group of its own) below a
    /// keeper, its stdout and stderr as `output` says. Dropping it tells the
    /// keeper to kill the tree, so the keeper itself is not killed on drop.
    pub fn spawn(mut cmd: Command, output: [Output; 2]) -> io::Result<Kept> {
        cmd.kill_on_drop(false);
        let (keeper, _leader, report) = start_below_keeper(cmd, output, None, None)?;
        Ok(Kept {
            keeper,
            report,
            ended: false,
        })
    }

    /// Waits for the command and everything it left to be gone; returns how
    /// it exited and the last [`STDERR_TAIL`] bytes of its stderr, if that
    /// was piped.
    pub async fn wait(&mut self) -> (Exit, Vec<u8>) {
        let stderr = self.keeper.stderr();
        let read_tail = async move {
            let mut tail = Vec::new();
            let Some(mut stderr) = stderr else {
                return tail;
            };
            let mut buf = [0u8; 4096];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stderr, &mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        };
        let (status, tail) = tokio::join!(self.keeper.wait(), read_tail);
        self.ended = true;
        self.keeper.disown();
        (leader_exit(&mut self.report, status, false), tail)
    }
}

impl Drop for Kept {
    /// A command still running is killed with everything it started: the
    /// keeper kills its tree and ends, and the runtime reaps it.
    fn drop(&mut self) {
        if !self.ended {
            self.keeper.signal(keeper::KILL_NOW);
            self.keeper.disown();
        }
    }
}

/// How a process ended, from its wait status.
pub fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

/// A signal name or number that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid signal {0:?} (expected e.g. TERM, INT, HUP, KILL)")]
pub struct SignalError(pub String);

/// Parses `TERM`, `SIGTERM`, `term` or a number.
pub fn parse_signal(text: &str) -> Result<Signal, SignalError> {
    let upper = text.trim().to_ascii_uppercase();
    let named = if upper.starts_with("SIG") {
        upper.clone()
    } else {
        format!("SIG{upper}")
    };
    if let Ok(signal) = named.parse::<Signal>() {
        return Ok(signal);
    }
    upper
        .parse::<i32>()
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .ok_or_else(|| SignalError(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keepers_report_of_the_leaders_status_reads_as_its_exit() {
        // The keeper sends waitpid's status as it is.
        let report =
            |raw: i32| exit_of(ExitStatus::from_raw(i32::from_ne_bytes(raw.to_ne_bytes())));
        assert_eq!(report(3 << 8), Exit::Code(3));
        assert_eq!(report(9), Exit::Signal(9));
    }

    const OUTPUT: [Output; 2] = [Output::Null, Output::Null];

    #[tokio::test]
    async fn a_command_that_cannot_join_its_cgroup_fails_with_the_cgroup_named() {
        // A directory that is no cgroup: starting the leader in it fails,
        // and so does joining it (it has no cgroup.procs).
        let dir = tempfile::tempdir().unwrap();
        let cgroup = Cgroup::at(dir.path().to_path_buf());
        let mut cmd = Command::new("true");
        cmd.process_group(0);
        let error =
            start_below_keeper(cmd, OUTPUT, Some(&cgroup), None).expect_err("the start fails");
        let expected = format!(
            "cannot move the service into its cgroup {}: No such file or directory",
            dir.path().display()
        );
        assert!(error.to_string().starts_with(&expected), "{error}");
        // A missing cgroup is named as well, before anything is started.
        let gone = Cgroup::at(dir.path().join("gone"));
        let mut cmd = Command::new("true");
        cmd.process_group(0);
        let error =
            start_below_keeper(cmd, OUTPUT, Some(&gone), None).expect_err("the start fails");
        assert!(
            error
                .to_string()
                .starts_with("cannot open the service's cgroup "),
            "{error}"
        );
        // The program itself, as ever.
        let mut cmd = Command::new("/nonexistent/program");
        cmd.process_group(0);
        let error = start_below_keeper(cmd, OUTPUT, None, None).expect_err("the start fails");
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
    }

    #[test]
    fn parses_signals_every_way() {
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGINT"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal("hup"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert!(parse_signal("NOPE").is_err());
    }
}
