//! The keeper factory: one small process, the seaport binary run afresh,
//! that forks every keeper of the process that started it.
//!
//! ```text
//! supervisor ── factory ── keeper ── leader (the command) ── ...
//! ```
//!
//! A keeper forked from the supervisor itself kept the supervisor's memory as
//! it was at the fork: each page the supervisor wrote afterwards was copied
//! for the keeper, which also had its own copy of the page tables; about
//! 0.9 MiB per service (docs/performance.md, "Keepers forked from a keeper
//! factory"). The factory holds only what a freshly started binary holds.
//! What it writes between two forks, each keeper keeps a copy of, and so
//! does each keeper of what it writes itself; so neither allocates for an
//! order nor runs the C library's fork handlers (which, for the allocator,
//! write to a dozen pages of its metadata). A keeper then has about 65 kB of
//! its own, and its page tables.
//!
//! The caller finds the program (as exec would, [`super::program`]) and
//! sends the factory an order: the program's path, the arguments, the whole
//! environment, the working directory, where the output goes, the cgroup,
//! whether a socket is passed; with the descriptors the command needs, in
//! one message over a `SOCK_SEQPACKET` socket pair. The factory forks at
//! once and answers with the child's pid and a pidfd. The child reads the
//! order where it lies (its strings end with NULs, for exec) and becomes the
//! command's keeper ([`keeper::run`]); the leader it forks sets up its
//! descriptors and directory and execs. The keeper's first report says
//! whether the command runs (the leader's pid) or why not (the errno).
//! Through the pidfd the caller learns when the keeper has ended and signals
//! it, with no risk of hitting another process that took its pid. The
//! factory reaps its keepers.
//!
//! The factory ends when its caller does: the caller's end of the socket
//! pair closes. Its keepers, whose parent it is, then kill their services,
//! as they did when their parent was the supervisor. The orphans of a keeper
//! killed from outside still go to the supervisor: the factory is no
//! subreaper, so the supervisor is the nearest one.
//!
//! Where no factory can run (a test program that is not the seaport binary;
//! a kernel without pidfds, before Linux 5.3; an order larger than a message),
//! the caller forks the keeper itself, as before, and `std` execs the command.
#![allow(unsafe_code)]

use crate::process::keeper::{self, Activation, CgroupFiles, Plan};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::borrow::Cow;
use std::ffi::{CStr, OsStr, OsString};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::process::{ChildStderr, ChildStdout};

/// The first argument that runs the binary as a factory.
const MODE: &str = "__keeper-factory";

/// The descriptor of the factory's end of the socket pair.
const SOCKET_FD: RawFd = 3;

/// The largest order: the socket's default send buffer takes it whole.
const MAX_ORDER: usize = 160 * 1024;

/// How long the caller waits for the factory to be ready, and for an
/// answer: the factory answers as soon as it has forked, within a
/// millisecond.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Set by the binary's `main` ([`run_if_asked`]): this program can run as a
/// factory.
static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// The running factory, started on the first order.
static FACTORY: Mutex<Option<Factory>> = Mutex::new(None);

/// Whether a start already fell back to forking here because no factory
/// could start (said once in the log).
static SAID_NO_FACTORY: AtomicBool = AtomicBool::new(false);

/// To be called first in the seaport binary's `main`: runs the factory and
/// returns its exit code when the binary was started as one; otherwise notes
/// that factories can be started, and returns `None`.
pub fn run_if_asked() -> Option<ExitCode> {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(MODE)) {
        return Some(serve());
    }
    AVAILABLE.store(true, Ordering::Relaxed);
    None
}

/// Where a command's stdout or stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Where the caller's goes.
    Inherit,
    /// To `/dev/null`.
    Null,
    /// Into a pipe whose read end the caller gets.
    Piped,
}

impl Output {
    fn code(self) -> u8 {
        match self {
            Output::Inherit => 0,
            Output::Null => 1,
            Output::Piped => 2,
        }
    }

    fn from_code(code: u8) -> io::Result<Output> {
        match code {
            0 => Ok(Output::Inherit),
            1 => Ok(Output::Null),
            2 => Ok(Output::Piped),
            _ => Err(malformed("an output")),
        }
    }

    /// As `std`'s setting.
    pub fn stdio(self) -> Stdio {
        match self {
            Output::Inherit => Stdio::inherit(),
            Output::Null => Stdio::null(),
            Output::Piped => Stdio::piped(),
        }
    }
}

/// A command to start below a keeper. Its stdin is `/dev/null` and it leads
/// a process group of its own, as every command started here.
#[derive(Debug)]
pub struct Order<'a> {
    /// The program as written: found on the `PATH` of `env` when it has no
    /// slash, else relative to `cwd`.
    pub program: &'a OsStr,
    /// Its arguments, the program's name not included.
    pub args: Vec<&'a OsStr>,
    /// Its whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Its working directory, if not the caller's.
    pub cwd: Option<&'a Path>,
    /// Where its stdout goes.
    pub stdout: Output,
    /// Where its stderr goes.
    pub stderr: Output,
    /// The write end of the keeper's report pipe.
    pub report: BorrowedFd<'a>,
    /// The service's cgroup, if it has one.
    pub cgroup: Option<&'a CgroupFiles<'static>>,
    /// The socket to pass, and how.
    pub activation: Option<&'a Activation>,
}

/// A keeper made by the factory: not a child of this process, so it is
/// waited for and signalled through its pidfd.
#[derive(Debug)]
pub struct Made {
    pidfd: AsyncFd<OwnedFd>,
    ended: bool,
    /// The pid of the keeper.
    pub pid: Pid,
    /// The read end of the command's stdout, when piped.
    pub stdout: Option<ChildStdout>,
    /// The read end of the command's stderr, when piped.
    pub stderr: Option<ChildStderr>,
}

impl Made {
    /// Waits until the keeper has ended. Safe to cancel and to call again.
    pub async fn ended(&mut self) {
        if !self.ended {
            // A pidfd is readable once its process has ended; an error
            // would mean the descriptor itself is broken: the end is
            // unknowable then, so take it as come.
            let _ = self.pidfd.readable().await;
            self.ended = true;
        }
    }

    /// Sends `signal` to the keeper while it runs.
    pub fn signal(&self, signal: Signal) {
        if !self.ended {
            let _ = pidfd_send_signal(self.pidfd.get_ref().as_fd(), signal);
        }
    }
}

/// Starts `order` through the factory, started here first if it is not
/// running. `None` when no factory can take it: the caller then forks the
/// keeper itself.
pub fn start(order: &Order<'_>) -> Option<io::Result<Made>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let (frame, fds, pipes) = match encode(order) {
        Ok(encoded) => encoded,
        Err(e) => return Some(Err(e)),
    };
    if frame.len() > MAX_ORDER {
        return None;
    }
    let mut factory = lock();
    // One retry: a factory that died since the last order is started again.
    for _ in 0..2 {
        if factory.is_none() {
            match Factory::start() {
                Ok(started) => *factory = Some(started),
                Err(e) => {
                    if !SAID_NO_FACTORY.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot start the keeper factory ({e}); keepers are forked from this process, each with a copy of its memory"
                        );
                    }
                    return None;
                }
            }
        }
        let running = factory.as_mut()?;
        let fd_list: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        match running.ask(&frame, &fd_list) {
            Ok(answer) => return Some(answer.and_then(|made| made.with_pipes(pipes))),
            Err(Lost::Dead) => *factory = None,
            Err(Lost::TooLarge) => return None,
            Err(Lost::Broken(e)) => {
                *factory = None;
                return Some(Err(e));
            }
        }
    }
    None
}

fn lock() -> MutexGuard<'static, Option<Factory>> {
    FACTORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The read ends of the command's output pipes, until the answer comes.
#[derive(Debug, Default)]
struct Pipes {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// The answer to an order, before the pipes are attached.
struct Answer {
    pid: Pid,
    pidfd: OwnedFd,
}

impl Answer {
    /// The keeper, waited for through the runtime, with the read ends of its
    /// command's output. If that fails, the keeper is told to kill the
    /// command: nothing may run that nobody watches.
    fn with_pipes(self, pipes: Pipes) -> io::Result<Made> {
        let outputs = (|| {
            let stdout = match pipes.stdout {
                Some(fd) => Some(ChildStdout::from_std(std::process::ChildStdout::from(fd))?),
                None => None,
            };
            let stderr = match pipes.stderr {
                Some(fd) => Some(ChildStderr::from_std(std::process::ChildStderr::from(fd))?),
                None => None,
            };
            Ok::<_, io::Error>((stdout, stderr))
        })();
        let (stdout, stderr) = match outputs {
            Ok(outputs) => outputs,
            Err(e) => {
                let _ = pidfd_send_signal(self.pidfd.as_fd(), keeper::KILL_NOW);
                return Err(e);
            }
        };
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the
        // same until the AsyncFd is dropped.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.pidfd, tokio::io::Interest::READABLE) };
        let pidfd = match registered {
            Ok(pidfd) => pidfd,
            Err(e) => {
                let (pidfd, e) = e.into_parts();
                let _ = pidfd_send_signal(pidfd.as_fd(), keeper::KILL_NOW);
                return Err(e);
            }
        };
        Ok(Made {
            pidfd,
            ended: false,
            pid: self.pid,
            stdout,
            stderr,
        })
    }
}

/// Why an order got no answer.
enum Lost {
    /// The factory had ended before the order was sent; another may take it.
    Dead,
    /// The order is larger than the socket takes in one message.
    TooLarge,
    /// The factory took the order and gave no answer: it ended, or did not
    /// answer in time and was killed.
    Broken(io::Error),
}

/// A running factory, seen from the process that started it.
struct Factory {
    socket: OwnedFd,
    process: tokio::process::Child,
}

impl Factory {
    /// Starts the binary as a factory, in a process group of its own (away
    /// from the terminal's signals), its socket at descriptor 3.
    fn start() -> io::Result<Factory> {
        // A pidfd of this process tells whether the kernel has them.
        pidfd_open(Pid::this())?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let timeout =
            nix::sys::time::TimeVal::new(i64::try_from(ANSWER_WITHIN.as_secs()).unwrap_or(30), 0);
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg0("seaport")
            .arg(MODE)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            // The factory forks and allocates little: no allocator thread.
            .env("_RJEM_MALLOC_CONF", "background_thread:false");
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and
        // makes one async-signal-safe system call; dup2's copy survives the
        // exec, and `theirs` stays open in this process until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                if theirs_fd == SOCKET_FD {
                    nix::fcntl::fcntl(
                        SOCKET_FD,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                } else {
                    nix::unistd::dup2(theirs_fd, SOCKET_FD)?;
                }
                Ok(())
            });
        }
        let process = super::reaper::spawn_owned(|| cmd.spawn(), tokio::process::Child::id)?;
        drop(theirs);
        let factory = Factory {
            socket: ours,
            process,
        };
        // Ready once it says so: a binary that cannot serve (not this one,
        // or one that fails to set up) ends instead, and the caller forks
        // its keepers itself.
        let mut buf = [0u8; 16];
        match receive(factory.socket.as_fd(), &mut buf) {
            Ok((1, _, false)) if buf[0] == READY => Ok(factory),
            Ok(_) => Err(io::Error::other("it ended without saying it was ready")),
            Err(e) => Err(e),
        }
    }

    /// Sends an order and waits for its answer.
    fn ask(&mut self, frame: &[u8], fds: &[RawFd]) -> Result<io::Result<Answer>, Lost> {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        match sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(frame)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => {}
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(Lost::Dead),
            Err(Errno::EMSGSIZE) => return Err(Lost::TooLarge),
            Err(e) => return Ok(Err(e.into())),
        }
        let mut buf = [0u8; 4096];
        let (n, fds, cut) = match receive(self.socket.as_fd(), &mut buf) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = self.process.start_kill();
                return Err(Lost::Broken(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the keeper factory did not answer within {} s; it was killed",
                        ANSWER_WITHIN.as_secs()
                    ),
                )));
            }
            Err(e) => return Err(Lost::Broken(e)),
        };
        if n == 0 {
            return Err(Lost::Broken(io::Error::other(
                "the keeper factory ended while starting the command",
            )));
        }
        if cut {
            // The pidfd could not be taken (this process is out of
            // descriptors): the keeper, the factory's unreaped child, is
            // told by its pid to kill the command, which nobody could watch.
            let mut reader = Reader(&buf[..n]);
            if let (Ok(0), Ok(pid)) = (reader.byte(), reader.count()) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), keeper::KILL_NOW);
                }
            }
            return Ok(Err(io::Error::other(
                "cannot take the keeper's pidfd from the keeper factory (out of descriptors?)",
            )));
        }
        Ok(decode_answer(&buf[..n], fds))
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        if let Some(pid) = self.process.id() {
            super::reaper::disown(pid);
        }
    }
}

/// The order as a message, the descriptors to send with it, and the read
/// ends of the pipes made for its output. Every string ends with a NUL, so
/// that the factory's child can pass it to exec where it lies: the program
/// (found here, as exec would find it), the arguments (its name first), the
/// environment (`KEY=value`), the working directory; then the outputs, the
/// cgroup's paths and whether a socket is passed.
fn encode(order: &Order<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>, Pipes)> {
    // The caller's own directory when the order names none: the factory's
    // is the caller's as it was when the factory started.
    let cwd = order
        .cwd
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok());
    let mut out = Frame::default();
    match order.activation {
        Some(activation) => {
            out.c_str(activation.program().to_bytes());
            out.count(activation.args().len());
            for arg in activation.args() {
                out.c_str(arg.to_bytes());
            }
            out.count(activation.env().len());
            for var in activation.env() {
                out.c_str(var.to_bytes());
            }
        }
        None => {
            let path = order
                .env
                .iter()
                .find(|(key, _)| key == "PATH")
                .map(|(_, value)| value.as_os_str());
            let name = order.program.to_str().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{:?} is not a UTF-8 program name", order.program),
                )
            })?;
            let dir = cwd.clone().unwrap_or_else(|| Path::new("/").to_path_buf());
            let found = super::program::find(name, path, &dir).map_err(|e| {
                let kind = match e {
                    super::program::ProgramError::NotExecutable(_) => {
                        io::ErrorKind::PermissionDenied
                    }
                    _ => io::ErrorKind::NotFound,
                };
                io::Error::new(kind, e.to_string())
            })?;
            out.checked_c_str(found.as_os_str().as_bytes())?;
            out.count(order.args.len() + 1);
            out.checked_c_str(order.program.as_bytes())?;
            for arg in &order.args {
                out.checked_c_str(arg.as_bytes())?;
            }
            out.count(order.env.len());
            let mut var = Vec::new();
            for (key, value) in &order.env {
                var.clear();
                var.extend_from_slice(key.as_bytes());
                var.push(b'=');
                var.extend_from_slice(value.as_bytes());
                out.checked_c_str(&var)?;
            }
        }
    }
    out.flag(cwd.is_some());
    if let Some(cwd) = &cwd {
        out.checked_c_str(cwd.as_os_str().as_bytes())?;
    }
    out.byte(order.stdout.code());
    out.byte(order.stderr.code());
    let mut fds = vec![order.report.try_clone_to_owned()?];
    let mut pipes = Pipes::default();
    for (output, read_end, own) in [
        (order.stdout, &mut pipes.stdout, std::io::stdout().as_fd()),
        (order.stderr, &mut pipes.stderr, std::io::stderr().as_fd()),
    ] {
        match output {
            Output::Piped => {
                let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                *read_end = Some(read);
                fds.push(write);
            }
            // This process's own, as it is now.
            Output::Inherit => fds.push(own.try_clone_to_owned()?),
            Output::Null => {}
        }
    }
    out.flag(order.cgroup.is_some());
    if let Some(cgroup) = order.cgroup {
        for path in [&cgroup.procs, &cgroup.kill, &cgroup.dir, &cgroup.subtree] {
            out.c_str(path.to_bytes());
        }
        fds.push(cgroup.dir_fd.try_clone()?);
    }
    out.flag(order.activation.is_some());
    if let Some(activation) = order.activation {
        // SAFETY: the activation's socket stays open while the order is
        // made and answered (its owner holds it until the command starts).
        let socket = unsafe { BorrowedFd::borrow_raw(activation.socket()) };
        fds.push(socket.try_clone_to_owned()?);
    }
    Ok((out.0, fds, pipes))
}

/// A message being written: byte strings with their lengths before them.
#[derive(Default)]
struct Frame(Vec<u8>);

impl Frame {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }

    fn flag(&mut self, on: bool) {
        self.byte(u8::from(on));
    }

    fn count(&mut self, n: usize) {
        self.0
            .extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    /// `bytes` and a NUL after them.
    fn c_str(&mut self, bytes: &[u8]) {
        self.count(bytes.len() + 1);
        self.0.extend_from_slice(bytes);
        self.0.push(0);
    }

    /// `bytes` and a NUL after them; a NUL within is refused, as `std`
    /// refuses it in a command.
    fn checked_c_str(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nul byte found in provided data",
            ));
        }
        self.c_str(bytes);
        Ok(())
    }
}

/// A message being read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> io::Result<u8> {
        let (&first, rest) = self.0.split_first().ok_or_else(|| malformed("a byte"))?;
        self.0 = rest;
        Ok(first)
    }

    fn flag(&mut self) -> io::Result<bool> {
        Ok(self.byte()? != 0)
    }

    fn count(&mut self) -> io::Result<usize> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or_else(|| malformed("a length"))?;
        self.0 = rest;
        usize::try_from(u32::from_le_bytes(*head)).map_err(|_| malformed("a length"))
    }

    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.count()?;
        if n > self.0.len() {
            return Err(malformed("a string"));
        }
        let (bytes, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(bytes)
    }

    fn c_str(&mut self) -> io::Result<&'a CStr> {
        CStr::from_bytes_with_nul(self.bytes()?).map_err(|_| malformed("a C string"))
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed keeper factory message: {what} is missing or wrong"),
    )
}

/// The answer to an order: `0`, the keeper's pid and its pidfd; or `1`, the
/// start's errno (0 if it had none) and its message.
fn decode_answer(frame: &[u8], mut fds: Vec<OwnedFd>) -> io::Result<Answer> {
    let mut reader = Reader(frame);
    match reader.byte()? {
        0 => {
            let pid = reader.count()?;
            let pid = i32::try_from(pid).map_err(|_| malformed("a pid"))?;
            let pidfd = fds.pop().ok_or_else(|| malformed("a pidfd"))?;
            Ok(Answer {
                pid: Pid::from_raw(pid),
                pidfd,
            })
        }
        _ => {
            let errno = reader.count()?;
            let message = String::from_utf8_lossy(reader.bytes()?).into_owned();
            match i32::try_from(errno) {
                Ok(errno) if errno != 0 => Err(io::Error::from_raw_os_error(errno)),
                _ => Err(io::Error::new(io::ErrorKind::InvalidInput, message)),
            }
        }
    }
}

/// Receives one message into `buf`, with the descriptors it carries (close
/// on exec), and whether it was cut short (its bytes, or its descriptors).
fn receive(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for this message; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let cut = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    Ok((msg.bytes, fds, cut))
}

/// The factory's life: take orders until the caller's end closes, and reap
/// the keepers as they end.
fn serve() -> ExitCode {
    match serving() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "seaport: {MODE} is started by seaport itself, with its socket at descriptor {SOCKET_FD}: {e}"
            );
            ExitCode::from(2)
        }
    }
}

fn serving() -> io::Result<()> {
    // SAFETY: descriptor 3 was put there for this process by its starter;
    // the check below refuses anything but a socket pair's end.
    let socket = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
    let kind = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::SockType)?;
    if kind != SockType::SeqPacket {
        return Err(io::Error::other("descriptor 3 is no SOCK_SEQPACKET socket"));
    }
    nix::fcntl::fcntl(
        socket.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // Blocked, not ignored: keepers and commands start with a clean mask
    // (std's spawn clears it), while a mask of ignored signals would pass
    // through exec. The termination signals are the supervisor's to act on.
    let mut blocked = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        blocked.add(signal);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None)?;
    let mut children = SigSet::empty();
    children.add(Signal::SIGCHLD);
    let ended = SignalFd::with_flags(&children, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut buf = vec![0u8; MAX_ORDER + 1];
    // Room for the argument and environment pointers of any order (each
    // string takes at least five bytes of it), reserved before any fork.
    let mut pointers: Vec<usize> = Vec::with_capacity(MAX_ORDER / 5 + 4);
    let me = Pid::this();
    send(socket.as_fd(), &[READY], None)?;
    loop {
        let mut polled = [
            nix::poll::PollFd::new(socket.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(ended.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut polled, nix::poll::PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        let order_waits = polled[0].any().unwrap_or(true);
        if polled[1].any().unwrap_or(false) {
            while let Ok(Some(_)) = ended.read_signal() {}
            reap();
        }
        if !order_waits {
            continue;
        }
        let (n, fds, cut) = receive(socket.as_fd(), &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let order = if cut { None } else { buf.get(..n) };
        let answer = match order {
            // The keeper is forked before anything of the order is read or
            // allocated: what this process writes between two forks, each
            // keeper keeps a copy of.
            // This process has one thread and is outside the allocator; the
            // child reads the order, makes system calls and ends with exec
            // or `_exit`.
            Some(frame) => match keeper::fork_bare() {
                Ok(nix::unistd::ForkResult::Child) => keep_order(frame, fds, me, &mut pointers),
                Ok(nix::unistd::ForkResult::Parent { child }) => {
                    drop(fds);
                    pidfd_open(child)
                        .map(|pidfd| (child, pidfd))
                        .inspect_err(|_| {
                            // Not watched, it must not run: it is this
                            // process's child, not yet reaped.
                            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        })
                }
                Err(e) => Err(e),
            },
            None => Err(malformed("the end of the message")),
        };
        let mut frame = Frame::default();
        let sent = match &answer {
            Ok((pid, fd)) => {
                frame.byte(0);
                frame.count(pid.as_raw().unsigned_abs() as usize);
                let sent = send(socket.as_fd(), &frame.0, Some(fd.as_fd()));
                if sent.is_err() {
                    let _ = nix::sys::signal::kill(*pid, Signal::SIGKILL);
                }
                sent
            }
            Err(e) => send(socket.as_fd(), &refusal(e, &e.to_string()).0, None),
        };
        match sent {
            Ok(()) => {}
            // The caller has ended.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EPIPE | nix::libc::ECONNRESET)
                ) =>
            {
                return Ok(());
            }
            // This order's answer is lost (its keeper killed): say so, and
            // go on with the next.
            Err(e) => {
                let frame = refusal(&e, "the keeper factory could not answer");
                send(socket.as_fd(), &frame.0, None)?;
            }
        }
    }
}

/// The answer that refuses an order: `1`, `error`'s errno (0 if it has
/// none) and `message`.
fn refusal(error: &io::Error, message: &str) -> Frame {
    let mut frame = Frame::default();
    frame.byte(1);
    frame.count(
        error
            .raw_os_error()
            .map_or(0, |n| n.unsigned_abs() as usize),
    );
    frame.bytes(message.as_bytes());
    frame
}

/// What the factory says first, once it is ready for orders.
const READY: u8 = 0xaa;

/// Sends one message, with `fd` if there is one.
fn send(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let rights = fds.as_ref().map(|fds| [ControlMessage::ScmRights(fds)]);
    let cmsgs: &[ControlMessage<'_>] = rights.as_ref().map_or(&[], |r| r);
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reaps every keeper that has ended.
fn reap() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// In the child forked for an order: reads the order where it lies and
/// becomes its keeper ([`keeper::run`]). Never returns.
fn keep_order(frame: &[u8], fds: Vec<OwnedFd>, factory: Pid, pointers: &mut Vec<usize>) -> ! {
    let mut fds = fds.into_iter();
    let Some(report) = fds.next() else {
        // SAFETY: `_exit` ends this forked child without running anything
        // of the factory's.
        unsafe { nix::libc::_exit(2) }
    };
    // The keeper leads a process group of its own, as when `std` starts it.
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let mut plan = Plan {
        parent: factory,
        report,
        cgroup: None,
        activation: None,
    };
    let read = read_order(frame, &mut fds, pointers, &mut plan);
    match read {
        Ok(mut launch) => keeper::run(&mut plan, &mut || launch.exec()),
        Err(e) => keeper::refuse(&plan, keeper::Stage::Keeper.tag(e)),
    }
}

/// What the leader of an order needs to exec, read from the order: the
/// strings point into it.
struct Launch<'a> {
    program: &'a CStr,
    /// The arguments, a null, the environment, a place for `LISTEN_PID`
    /// when a socket is passed, and a null.
    pointers: &'a mut Vec<usize>,
    env_at: usize,
    cwd: Option<&'a CStr>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    socket: Option<OwnedFd>,
    /// `LISTEN_PID=` and room for the digits of any pid.
    pid_entry: [u8; 32],
}

/// Reads an order (see [`encode`]); the cgroup goes into `plan`.
fn read_order<'a>(
    frame: &'a [u8],
    fds: &mut impl Iterator<Item = OwnedFd>,
    pointers: &'a mut Vec<usize>,
    plan: &mut Plan<'a>,
) -> io::Result<Launch<'a>> {
    let mut next_fd = || fds.next().ok_or_else(|| malformed("a descriptor"));
    let mut reader = Reader(frame);
    let program = reader.c_str()?;
    pointers.clear();
    let room = pointers.capacity();
    let push = |pointers: &mut Vec<usize>, at: usize| {
        if pointers.len() == room {
            return Err(malformed("room for the pointers"));
        }
        pointers.push(at);
        Ok(())
    };
    for _ in 0..reader.count()? {
        push(pointers, reader.c_str()?.as_ptr() as usize)?;
    }
    push(pointers, 0)?;
    let env_at = pointers.len();
    for _ in 0..reader.count()? {
        push(pointers, reader.c_str()?.as_ptr() as usize)?;
    }
    let cwd = if reader.flag()? {
        Some(reader.c_str()?)
    } else {
        None
    };
    let stdout = match Output::from_code(reader.byte()?)? {
        Output::Null => None,
        _ => Some(next_fd()?),
    };
    let stderr = match Output::from_code(reader.byte()?)? {
        Output::Null => None,
        _ => Some(next_fd()?),
    };
    if reader.flag()? {
        // Borrowed: an allocation here would write to pages of the
        // allocator's that this keeper would then keep a copy of.
        let (procs, kill, dir, subtree) = (
            Cow::Borrowed(reader.c_str()?),
            Cow::Borrowed(reader.c_str()?),
            Cow::Borrowed(reader.c_str()?),
            Cow::Borrowed(reader.c_str()?),
        );
        plan.cgroup = Some(CgroupFiles {
            dir_fd: next_fd()?,
            procs,
            kill,
            dir,
            subtree,
        });
    }
    let socket = if reader.flag()? {
        Some(next_fd()?)
    } else {
        None
    };
    if socket.is_some() {
        push(pointers, 0)?;
    }
    push(pointers, 0)?;
    Ok(Launch {
        program,
        pointers,
        env_at,
        cwd,
        stdout,
        stderr,
        socket,
        pid_entry: [0; 32],
    })
}

impl Launch<'_> {
    /// In the leader: stdin from `/dev/null`, stdout and stderr, the passed
    /// socket at descriptor 3 with `LISTEN_PID`, the working directory, the
    /// default action for SIGPIPE (which Rust programs ignore, and an ignored
    /// signal stays ignored through exec), then exec. Returns the error if
    /// any step fails. Allocates nothing.
    fn exec(&mut self) -> io::Error {
        match self.exec_steps() {
            Ok(()) => io::Error::last_os_error(),
            Err(e) => e,
        }
    }

    fn exec_steps(&mut self) -> io::Result<()> {
        use nix::fcntl::{OFlag, open};
        use nix::sys::stat::Mode;
        let leading = |e: Errno| keeper::Stage::Leader.tag(e);
        let null = open(
            c"/dev/null",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(leading)?;
        nix::unistd::dup2(null, 0).map_err(leading)?;
        for (fd, target) in [(&self.stdout, 1), (&self.stderr, 2)] {
            let from = fd.as_ref().map_or(null, AsRawFd::as_raw_fd);
            nix::unistd::dup2(from, target).map_err(leading)?;
        }
        if let Some(socket) = &self.socket {
            keeper::pass_socket(socket.as_raw_fd(), &mut self.pid_entry)?;
            let slot = self.pointers.len() - 2;
            self.pointers[slot] = self.pid_entry.as_ptr() as usize;
        }
        // SAFETY: resetting a signal's action to the default is
        // async-signal-safe and installs no handler.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(leading)?;
        if let Some(cwd) = self.cwd {
            nix::unistd::chdir(cwd)?;
        }
        let argv = self.pointers.as_ptr().cast::<*const nix::libc::c_char>();
        // SAFETY: `usize` and pointers have the same size and alignment on
        // every target this builds for (Linux); both arrays end with a null
        // and point into C strings of the order (or `pid_entry`), which
        // outlive the call. With a slash in the program, execvpe does not
        // search; it execs, and a file it cannot exec (ENOEXEC: a script
        // without `#!`) it runs with /bin/sh, as std's exec does.
        unsafe {
            nix::libc::execvpe(self.program.as_ptr(), argv, argv.add(self.env_at));
        }
        Ok(())
    }
}

/// A pidfd of `pid` (close on exec).
fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd =
        RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd_open returned no descriptor"))?;
    // SAFETY: the kernel just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process of `pidfd`.
fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a descriptor, a signal number, a null
    // siginfo and flags.
    let done = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as nix::libc::c_int,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0u32,
        )
    };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_and_a_short_one_is_refused() {
        let mut frame = Frame::default();
        frame.byte(1);
        frame.count(2);
        frame.bytes(b"No such file or directory");
        let error = decode_answer(&frame.0, Vec::new()).err().map(|e| e.kind());
        assert_eq!(error, Some(io::ErrorKind::NotFound));
        let mut frame = Frame::default();
        frame.byte(1);
        frame.count(0);
        frame.bytes(b"nul byte found in provided data");
        let error = decode_answer(&frame.0, Vec::new())
            .err()
            .map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("nul byte found in provided data"));
        // An answer of success without its pidfd, and one cut short.
        let mut frame = Frame::default();
        frame.byte(0);
        frame.count(1234);
        assert!(decode_answer(&frame.0, Vec::new()).is_err());
        assert!(decode_answer(&frame.0[..3], Vec::new()).is_err());
    }

    /// The C strings an array of pointers written by [`read_order`] points
    /// to, up to its null.
    fn strings(pointers: &[usize]) -> Vec<String> {
        pointers
            .iter()
            .take_while(|&&p| p != 0)
            // SAFETY: each points into the order, alive for the test, at a
            // string that ends with a NUL.
            .map(|&p| unsafe { CStr::from_ptr(p as *const nix::libc::c_char) })
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn an_order_reads_back_where_it_lies_and_a_cut_one_is_refused() {
        let (_read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let order = Order {
            program: OsStr::new("sh"),
            args: vec![OsStr::new("-c"), OsStr::new("exit 3")],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("PORT".into(), "8080".into()),
            ],
            cwd: Some(dir.path()),
            stdout: Output::Null,
            stderr: Output::Piped,
            report: write.as_fd(),
            cgroup: None,
            activation: None,
        };
        let (frame, fds, pipes) = encode(&order).unwrap();
        assert_eq!(fds.len(), 2, "the report and the stderr pipe");
        assert!(pipes.stderr.is_some() && pipes.stdout.is_none());
        let mut pointers = Vec::with_capacity(16);
        let mut plan = Plan {
            parent: Pid::this(),
            report: write.try_clone().unwrap(),
            cgroup: None,
            activation: None,
        };
        let mut fds = fds.into_iter();
        let launch = read_order(&frame, &mut fds, &mut pointers, &mut plan).unwrap();
        let found = launch.program.to_string_lossy().into_owned();
        assert!(found.ends_with("/sh"), "{found}");
        assert_eq!(strings(&launch.pointers[..]), ["sh", "-c", "exit 3"]);
        let env_at = launch.env_at;
        assert_eq!(
            strings(&launch.pointers[env_at..]),
            ["PATH=/usr/bin:/bin", "PORT=8080"]
        );
        assert_eq!(
            launch.cwd.map(|c| c.to_string_lossy().into_owned()),
            Some(dir.path().to_string_lossy().into_owned())
        );
        assert!(launch.stdout.is_none() && launch.stderr.is_some());
        assert!(plan.cgroup.is_none() && launch.socket.is_none());
        drop(launch);
        // Every prefix of the order is refused, none is read as another one;
        // and so are more strings than the room reserved.
        let cut = (0..frame.len()).map(|end| (end, 16));
        for (end, room) in cut.chain([(frame.len(), 2)]) {
            let (_, fds, _) = encode(&order).unwrap();
            let mut fds = fds.into_iter();
            let mut pointers = Vec::with_capacity(room);
            let mut plan = Plan {
                parent: Pid::this(),
                report: write.try_clone().unwrap(),
                cgroup: None,
                activation: None,
            };
            let read = read_order(&frame[..end], &mut fds, &mut pointers, &mut plan);
            assert!(read.is_err(), "read {end} of {} bytes", frame.len());
        }
    }

    #[test]
    fn a_program_that_cannot_be_found_is_refused_before_any_order() {
        let (_read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let order = Order {
            program: OsStr::new("no-such-program-anywhere"),
            args: Vec::new(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            stdout: Output::Inherit,
            stderr: Output::Inherit,
            report: write.as_fd(),
            cgroup: None,
            activation: None,
        };
        let error = encode(&order).err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(error.to_string().contains("is not on PATH"), "{error}");
    }

    #[test]
    fn a_string_longer_than_its_message_is_refused() {
        let mut frame = Frame::default();
        frame.count(100);
        frame.0.extend_from_slice(b"short");
        let mut reader = Reader(&frame.0);
        let error = reader.bytes().err().map(|e| e.to_string());
        assert!(
            error.is_some_and(|e| e.contains("malformed keeper factory message")),
            "refused"
        );
    }
}
