//! Child processes that die with their owner.
//!
//! Each child leads its own process group, so a stop signal reaches its whole tree
//! (grandchildren included) through `killpg`. Each child also asks the kernel for
//! SIGKILL when its parent dies, so a supervisor killed with SIGKILL leaves no
//! direct child behind. "No such process" from a signal means already gone, not an
//! error. The only `unsafe` code of the crate lives here.

use crate::process::restart::Exit;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch<'a> {
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
}

/// A running child process group.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pgid: Pid,
    started: Instant,
    exit: Option<Exit>,
}

impl Running {
    /// Starts the command in a new process group with a parent-death signal.
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
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = launch.cwd {
            cmd.current_dir(cwd);
        }
        if launch.capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
        Ok(Running {
            child,
            pgid: Pid::from_raw(pid),
            started: Instant::now(),
            exit: None,
        })
    }

    /// The process id of the group leader.
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw().unsigned_abs()
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Takes the captured stdout.
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the captured stderr.
    pub fn stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Waits for the leader to exit and reaps it, then kills whatever is left of
    /// its group: a service's leftovers must not hold its port across a restart.
    /// Safe to call again after it returned.
    pub async fn wait(&mut self) -> Exit {
        let exit = self.wait_leader().await;
        self.signal_group(Signal::SIGKILL);
        exit
    }

    async fn wait_leader(&mut self) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = match self.child.wait().await {
            Ok(status) => exit_of(status),
            Err(_) => Exit::Signal(Signal::SIGKILL as i32),
        };
        self.exit = Some(exit);
        exit
    }

    /// Whether any process of the group is still there.
    fn group_alive(&self) -> bool {
        killpg(self.pgid, None).is_ok()
    }

    /// Sends `signal` to the whole group; a group already gone is not an error.
    pub fn signal_group(&self, signal: Signal) {
        let _ = killpg(self.pgid, signal);
    }

    /// Stops the group: `signal` to every process, then SIGKILL to whatever is
    /// still running when `timeout` has passed (the leader and grandchildren alike
    /// get the whole timeout to finish), and reaps the leader.
    pub async fn stop(&mut self, signal: Signal, timeout: Duration) -> Exit {
        if let Some(exit) = self.exit {
            self.signal_group(Signal::SIGKILL);
            return exit;
        }
        let deadline = Instant::now() + timeout;
        self.signal_group(signal);
        let exit = match tokio::time::timeout_at(deadline, self.wait_leader()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid(),
                    "still running {} after {signal}; sending SIGKILL",
                    crate::human::format_duration(timeout)
                );
                self.signal_group(Signal::SIGKILL);
                self.wait_leader().await
            }
        };
        // The leader is gone; let the rest of its group finish in the time left.
        // This polls only while a stop is under way.
        while self.group_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.signal_group(Signal::SIGKILL);
        exit
    }
}

impl Drop for Running {
    /// A child whose owner goes away without stopping it is killed with its
    /// group, and so is what is left of the group of one whose leader has
    /// exited (a stop cut short still leaves nothing running).
    fn drop(&mut self) {
        self.signal_group(Signal::SIGKILL);
    }
}

fn exit_of(status: ExitStatus) -> Exit {
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

/// Makes the child receive SIGKILL when this process dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two system calls (prctl and
    // getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died between fork and prctl: then nobody will
            // send the signal, so give up now.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("parent exited while starting"));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signals_every_way() {
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGINT"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal("hup"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert!(parse_signal("NOPE").is_err());
    }
}
