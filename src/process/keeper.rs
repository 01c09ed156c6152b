//! The keeper: a small process between the supervisor and each service that
//! holds the service's whole process tree and takes it down with it.
//!
//! ```text
//! supervisor ── keeper (child subreaper) ── leader (the command) ── ...
//! ```
//!
//! The keeper is forked just before the command starts. It
//! is a child subreaper, so every process the service starts and orphans (a
//! double fork, a `setsid` daemon) is re-parented to it and never leaves its
//! tree; it reaps them all. It ends, and only then, when the leader has exited
//! and nothing of its tree is left:
//!
//! - the leader exits on its own: the keeper kills what is left at once
//!   (leftovers must not hold the service's port across a restart);
//! - a stop is under way (SIGUSR1 from the supervisor): leftovers get the stop
//!   timeout to finish, until SIGUSR2 says "kill now";
//! - its parent dies, however (the keeper's parent-death signal): the keeper
//!   kills the whole tree and ends. Its parent is the keeper factory, which
//!   ends with the supervisor, or else the supervisor itself.
//!
//! Killing the tree is one write of `1` to `cgroup.kill` when the service has a
//! cgroup; otherwise SIGKILL to each of the keeper's children, round after round
//! as orphans come back to it, until none is left.
//!
//! The keeper reports to the supervisor through a pipe: the leader's pid once it
//! is started, then how the leader ended. It never execs: after the fork it may
//! make only async-signal-safe system calls, with everything it needs prepared
//! before the fork, and it allocates nothing. A keeper is forked from the
//! keeper factory ([`super::factory`]), a small process, where one can run;
//! else from the supervisor, and then it keeps a copy of the supervisor's
//! memory as it was at the fork. This file holds the crate's `unsafe` code
//! but for the allocator calls that give memory back (`hub::give_back`) and
//! the factory's system calls.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::fcntl::FdFlag;
use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::stat::Mode;
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid, setpgid};
use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::process::Command;

/// Asks the keeper to give leftovers the stop timeout: a stop is under way.
pub const STOPPING: Signal = Signal::SIGUSR1;
/// Asks the keeper to kill the whole tree now.
pub const KILL_NOW: Signal = Signal::SIGUSR2;
/// The keeper's parent-death signal. A SIGHUP while the supervisor is still its
/// parent (a thread of it ended, or someone sent one) is ignored.
const PARENT_DIED: Signal = Signal::SIGHUP;

/// The signals the keeper takes with `sigwait`; the others that could end it by
/// accident (a terminal's, a broken report pipe) are taken and ignored.
const SIGNALS: [Signal; 8] = [
    Signal::SIGCHLD,
    STOPPING,
    KILL_NOW,
    PARENT_DIED,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGPIPE,
];

/// The files of the service's cgroup, as C strings made before the fork
/// (owned, or borrowed from an order the keeper factory read).
#[derive(Debug)]
pub struct CgroupFiles<'a> {
    /// The cgroup's directory, open: clone3 starts the leader in it.
    pub dir_fd: OwnedFd,
    /// `cgroup.procs`: the leader writes `0` to it before it execs.
    pub procs: Cow<'a, CStr>,
    /// `cgroup.kill`.
    pub kill: Cow<'a, CStr>,
    /// The cgroup's directory, removed by the keeper once it is empty.
    pub dir: Cow<'a, CStr>,
    /// The directory of the supervisor's cgroups for services, which the last
    /// keeper of a supervisor that died removes.
    pub subtree: Cow<'a, CStr>,
}

/// What a keeper needs, all made before the fork.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The keeper's parent: the supervisor, or the keeper factory.
    pub parent: Pid,
    /// The write end of the report pipe (close-on-exec).
    pub report: OwnedFd,
    /// The service's cgroup, if it has one.
    pub cgroup: Option<CgroupFiles<'a>>,
    /// A listening socket to pass to the leader, and the exec that passes it.
    pub activation: Option<Activation>,
}

/// The descriptor a passed socket has in the service, as in systemd's socket
/// activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FD: RawFd = 3;

/// What starting a command was doing when it failed. std (and the keeper,
/// for the factory's commands) brings a failure before the exec back through
/// a pipe as an errno alone, so the stage rides in the bits above the errno
/// (errnos are below 4096); a failure of the exec itself (the program) comes
/// back as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Setting up the keeper, or forking the leader.
    Keeper = 1,
    /// Setting up the leader: its process group, signals, parent-death signal.
    Leader = 2,
    /// Moving the leader into its cgroup.
    Cgroup = 3,
    /// Putting the held socket at descriptor 3.
    Socket = 4,
}

/// Where the stage sits in a tagged errno.
const STAGE_SHIFT: u32 = 16;

impl Stage {
    /// `error` (from a system call), tagged with this stage. Allocates
    /// nothing: it runs after the fork.
    pub(crate) fn tag(self, error: impl Into<io::Error>) -> io::Error {
        let errno = error.into().raw_os_error().unwrap_or(libc::EINVAL);
        io::Error::from_raw_os_error(errno | ((self as i32) << STAGE_SHIFT))
    }
}

/// The error `spawn` returned for a command started through [`install`], with
/// the stage that failed named (`cgroup`: the leader's cgroup directory, if
/// it has one); a failure of the exec itself as it is.
pub fn explain(error: io::Error, cgroup: Option<&std::path::Path>) -> io::Error {
    let Some(code) = error.raw_os_error() else {
        return error;
    };
    let stage = match code >> STAGE_SHIFT {
        1 => Stage::Keeper,
        2 => Stage::Leader,
        3 => Stage::Cgroup,
        4 => Stage::Socket,
        _ => return error,
    };
    let cause = io::Error::from_raw_os_error(code & ((1 << STAGE_SHIFT) - 1));
    let what = match (stage, cgroup) {
        (Stage::Keeper, _) => "cannot set up the process that keeps the service".to_string(),
        (Stage::Leader, _) => "cannot set up the service's process before running it".to_string(),
        (Stage::Cgroup, Some(dir)) => {
            format!("cannot move the service into its cgroup {}", dir.display())
        }
        (Stage::Cgroup, None) => "cannot move the service into its cgroup".to_string(),
        (Stage::Socket, _) => "cannot pass the held socket to the service".to_string(),
    };
    io::Error::new(cause.kind(), format!("{what}: {cause}"))
}

/// How the leader execs when it is passed a listening socket: on its own, not
/// through std, because `LISTEN_PID` must hold the leader's pid, known only
/// after the fork. Everything is made before the fork; the leader only writes
/// its pid into a buffer kept for it and fills pointer arrays whose room is
/// reserved.
#[derive(Debug)]
pub struct Activation {
    socket: RawFd,
    program: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    /// `LISTEN_PID=` and room for the digits of any pid.
    pid_entry: [u8; 32],
    /// The argument and environment pointer arrays, as addresses.
    pointers: Vec<usize>,
}

impl Activation {
    /// Passes `socket` (a descriptor of this process that stays open until
    /// the command has started) as descriptor 3 to `program` (a path, found
    /// before), run with `args` (the program's name first) and `env` (without
    /// `LISTEN_PID`, which is added).
    pub fn new(socket: RawFd, program: CString, args: Vec<CString>, env: Vec<CString>) -> Self {
        let pointers = Vec::with_capacity(args.len() + env.len() + 3);
        Activation {
            socket,
            program,
            args,
            env,
            pid_entry: [0; 32],
            pointers,
        }
    }

    /// The socket passed.
    pub fn socket(&self) -> RawFd {
        self.socket
    }

    /// The program, found.
    pub fn program(&self) -> &CStr {
        &self.program
    }

    /// Its arguments, its name first.
    pub fn args(&self) -> &[CString] {
        &self.args
    }

    /// Its environment, as `KEY=value` entries, without `LISTEN_PID`.
    pub fn env(&self) -> &[CString] {
        &self.env
    }

    /// In the leader: puts the socket at descriptor 3, sets `LISTEN_PID` and
    /// execs. Returns only if exec failed.
    fn exec(&mut self) -> io::Result<()> {
        pass_socket(self.socket, &mut self.pid_entry)?;
        // Within the reserved capacity: no allocation.
        self.pointers.clear();
        for arg in &self.args {
            self.pointers.push(arg.as_ptr() as usize);
        }
        self.pointers.push(0);
        let env_at = self.pointers.len();
        for var in &self.env {
            self.pointers.push(var.as_ptr() as usize);
        }
        self.pointers.push(self.pid_entry.as_ptr() as usize);
        self.pointers.push(0);
        let argv = self.pointers.as_ptr().cast::<*const libc::c_char>();
        // SAFETY: `usize` and pointers have the same size and alignment on
        // every target this builds for (Linux); both arrays end with a null and
        // point into C strings owned by `self`, which outlives the call. execve
        // is async-signal-safe.
        unsafe {
            libc::execve(self.program.as_ptr(), argv, argv.add(env_at));
        }
        Err(io::Error::last_os_error())
    }
}

/// In a leader about to exec: puts `socket` at descriptor 3, to survive the
/// exec, and writes `LISTEN_PID=` with this process's pid, NUL-terminated,
/// into `entry`, for the environment. Allocates nothing.
pub(crate) fn pass_socket(socket: RawFd, entry: &mut [u8; 32]) -> io::Result<()> {
    if socket == LISTEN_FD {
        // Already there: only make it survive the exec.
        nix::fcntl::fcntl(LISTEN_FD, nix::fcntl::FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| Stage::Socket.tag(e))?;
    } else {
        // dup2's copy is not close-on-exec.
        nix::unistd::dup2(socket, LISTEN_FD).map_err(|e| Stage::Socket.tag(e))?;
    }
    let prefix = b"LISTEN_PID=";
    entry[..prefix.len()].copy_from_slice(prefix);
    let end = write_decimal(&mut entry[prefix.len()..], getpid().as_raw().unsigned_abs());
    entry[prefix.len() + end] = 0;
    Ok(())
}

/// Writes `n` in decimal at the start of `buf`; returns how many digits.
fn write_decimal(buf: &mut [u8], mut n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, digit) in digits[..len].iter().rev().enumerate() {
        buf[i] = *digit;
    }
    len
}

/// Makes `cmd` start through a keeper: the process `cmd.spawn()` returns is the
/// keeper, and the command runs as its child. `cmd` must lead a new process
/// group (`process_group(0)`), so that no terminal signal reaches the keeper.
pub fn install(cmd: &mut Command, plan: Plan<'static>) {
    // SAFETY: the closure runs in the child forked by `spawn`, where only
    // async-signal-safe calls are allowed. It makes system calls through nix
    // (whose wrappers of calls on C strings and buffers allocate nothing),
    // forks, and from then on: the new child (the leader) makes system calls and
    // returns to std, which execs the command; the keeper never returns and ends
    // with `_exit`. Nothing allocates, takes a lock or unwinds.
    unsafe {
        let mut plan = plan;
        cmd.pre_exec(move || start(&mut plan));
    }
}

/// In the child forked by `spawn`: becomes the keeper and forks the leader.
fn start(plan: &mut Plan) -> io::Result<()> {
    let (signals, keeper) = prepare(plan)?;
    match fork_leader(plan).map_err(|e| Stage::Keeper.tag(e))? {
        Forked::Leader { in_cgroup } => leader(plan, keeper, in_cgroup),
        Forked::Keeper(leader) => keep(plan, &signals, leader, leader.as_raw()),
    }
}

/// Makes this process a keeper, before it forks the leader: the keeper's
/// signals blocked, death with its parent, child subreaper. Returns the
/// signals it waits for and its own pid.
fn prepare(plan: &Plan) -> io::Result<(SigSet, Pid)> {
    let mut signals = SigSet::empty();
    for signal in SIGNALS {
        signals.add(signal);
    }
    // Blocked before the leader exists, so that no SIGCHLD is lost: sigwait
    // takes them from the pending set.
    let keeping = |e: Errno| Stage::Keeper.tag(e);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).map_err(keeping)?;
    nix::sys::prctl::set_pdeathsig(PARENT_DIED).map_err(keeping)?;
    // The parent may have died between fork and prctl: nobody would send
    // the signal then, so give up now.
    if getppid() != plan.parent {
        return Err(keeping(Errno::ESRCH));
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(keeping)?;
    Ok((signals, getpid()))
}

/// In a process the keeper factory has just forked (and which, like the
/// factory, has one thread): becomes the keeper and forks the leader, which
/// runs `exec` (set up its descriptors and directory, exec the command, and
/// return the error if that failed). The keeper's first report is the
/// leader's pid once the command runs, or else the error, negated: its
/// errno, with the stage that failed in the bits above. Never returns.
pub fn run(plan: &mut Plan, exec: &mut dyn FnMut() -> io::Error) -> ! {
    let (signals, keeper) = match prepare(plan) {
        Ok(prepared) => prepared,
        Err(e) => refuse(plan, e),
    };
    // Closed by the exec (close on exec), or written the exec's error.
    let (exec_read, exec_write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(e) => refuse(plan, Stage::Keeper.tag(e)),
    };
    let forked = match fork_leader(plan) {
        Ok(forked) => forked,
        Err(e) => refuse(plan, Stage::Keeper.tag(e)),
    };
    match forked {
        Forked::Leader { in_cgroup } => {
            drop(exec_read);
            let error = match leader(plan, keeper, in_cgroup) {
                Ok(()) => exec(),
                Err(e) => e,
            };
            let code = error.raw_os_error().unwrap_or(libc::EINVAL);
            let _ = nix::unistd::write(&exec_write, &code.to_ne_bytes());
            // SAFETY: as in `keep`.
            unsafe { libc::_exit(127) }
        }
        Forked::Keeper(leader) => {
            drop(exec_write);
            let mut code = [0u8; 4];
            let mut got = 0;
            while got < code.len() {
                match nix::unistd::read(exec_read.as_raw_fd(), &mut code[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(Errno::EINTR) => {}
                    Err(_) => break,
                }
            }
            drop(exec_read);
            let first = if got == code.len() {
                i32::from_ne_bytes(code).saturating_neg()
            } else {
                leader.as_raw()
            };
            keep(plan, &signals, leader, first)
        }
    }
}

/// Reports that the command of a keeper made by the factory did not start
/// (`error`'s errno, negated, EINVAL if it has none) and ends the process.
pub(crate) fn refuse(plan: &Plan, error: io::Error) -> ! {
    let code = error.raw_os_error().unwrap_or(libc::EINVAL);
    let _ = nix::unistd::write(&plan.report, &code.saturating_neg().to_ne_bytes());
    // SAFETY: as in `keep`.
    unsafe { libc::_exit(1) }
}

/// clone3's flag that starts the child in the cgroup given by a descriptor
/// (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args`, as far as Linux 5.7 (`CLONE_ARGS_SIZE_VER2`).
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Which side of the leader's fork this is.
enum Forked {
    /// The leader; `in_cgroup` if it was started in its cgroup.
    Leader { in_cgroup: bool },
    /// The keeper, with the leader's pid.
    Keeper(Pid),
}

/// Forks the leader: straight into the service's cgroup with clone3 where
/// the kernel can, else with fork, and the leader then joins its cgroup
/// itself. Joining is a migration, which waits for an RCU grace period
/// (14 ms per start, measured); starting in the cgroup does not.
fn fork_leader(plan: &Plan) -> io::Result<Forked> {
    if let Some(cgroup) = &plan.cgroup {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: Signal::SIGCHLD as u64,
            cgroup: u64::try_from(cgroup.dir_fd.as_raw_fd()).unwrap_or(0),
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack is fork: the
        // child gets a copy of this single-threaded process and returns here.
        // `args` outlives the call and its size is the one passed.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::from_ref(&args),
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match pid {
            0 => return Ok(Forked::Leader { in_cgroup: true }),
            pid if pid > 0 => {
                return Ok(Forked::Keeper(Pid::from_raw(
                    i32::try_from(pid).map_err(|_| Errno::EOVERFLOW)?,
                )));
            }
            // No clone3, or no CLONE_INTO_CGROUP: fork, below.
            _ => {}
        }
    }
    match fork_bare()? {
        ForkResult::Child => Ok(Forked::Leader { in_cgroup: false }),
        ForkResult::Parent { child } => Ok(Forked::Keeper(child)),
    }
}

/// fork without the C library's fork handlers. The allocator's lock all its
/// mutexes before a fork and unlock (or reset) them after, on both sides: a
/// write to a dozen pages of its metadata, which a keeper then keeps a copy
/// of, and which the keeper factory would write again for every keeper. For
/// a process with one thread, outside the allocator: no lock is held then.
/// The child must not rely on the C library's idea of its thread id
/// (`raise`, `abort`): it makes system calls, allocates at most, and ends
/// with exec or `_exit`.
pub(crate) fn fork_bare() -> io::Result<ForkResult> {
    // SAFETY: clone with no flags but the exit signal, and no new stack, is
    // fork: the child gets a copy of this single-threaded process and returns
    // here.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::from(Signal::SIGCHLD as u32),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        0 => Ok(ForkResult::Child),
        pid if pid > 0 => Ok(ForkResult::Parent {
            child: Pid::from_raw(i32::try_from(pid).map_err(|_| Errno::EOVERFLOW)?),
        }),
        _ => Err(io::Error::last_os_error()),
    }
}

/// In the leader, before std execs the command: its own process group, an
/// empty signal mask, death with the keeper, and its cgroup; with a socket to
/// pass, the leader execs here instead.
fn leader(plan: &mut Plan, keeper: Pid, in_cgroup: bool) -> io::Result<()> {
    let leading = |e: Errno| Stage::Leader.tag(e);
    setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(leading)?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).map_err(leading)?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(leading)?;
    if getppid() != keeper {
        return Err(leading(Errno::ESRCH));
    }
    if let Some(cgroup) = &plan.cgroup
        && !in_cgroup
    {
        write_file(&cgroup.procs, b"0").map_err(|e| Stage::Cgroup.tag(e))?;
    }
    match &mut plan.activation {
        Some(activation) => activation.exec(),
        None => Ok(()),
    }
}

/// The keeper's life: report `first` (the leader's pid, or why its command
/// did not start), wait for signals, reap, kill when it must, and end once
/// nothing is left.
fn keep(plan: &Plan, signals: &SigSet, leader: Pid, first: i32) -> ! {
    let report = plan.report.as_fd();
    let _ = nix::unistd::write(report, &first.to_ne_bytes());
    // Every other descriptor is the supervisor's: its sockets, the pipes of
    // other children, std's exec-error pipe (closing it lets `spawn` return).
    close_all_but(report.as_raw_fd());
    let mut status = None;
    let mut stopping = false;
    let mut killing = false;
    let mut orphaned = false;
    loop {
        match signals.wait() {
            Ok(STOPPING) => stopping = true,
            Ok(KILL_NOW) => killing = true,
            Ok(PARENT_DIED) if getppid() != plan.parent => {
                orphaned = true;
                killing = true;
            }
            _ => {}
        }
        if reap(leader, &mut status) {
            break;
        }
        // Once killing, every round: the orphans of the killed come back to
        // the keeper as its children, and a SIGCHLD wakes it for them.
        if killing || (status.is_some() && !stopping) {
            kill_tree(plan, leader);
        }
    }
    if let Some(cgroup) = &plan.cgroup {
        let _ = remove_dir(&cgroup.dir);
        if orphaned {
            // Fails but for the last keeper of the dead supervisor.
            let _ = remove_dir(&cgroup.subtree);
        }
    }
    if !orphaned && let Some(status) = status {
        let _ = nix::unistd::write(report, &status.to_ne_bytes());
    }
    // SAFETY: `_exit` ends the process without running anything of the
    // supervisor's (atexit handlers, destructors), as a forked child must.
    unsafe { libc::_exit(0) }
}

/// Reaps every child that has ended, noting the leader's status; true once the
/// keeper has no child left (the leader is then reaped too).
fn reap(leader: Pid, status: &mut Option<i32>) -> bool {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes the status to a local integer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        match pid {
            0 => return false,
            -1 => match Errno::last() {
                Errno::EINTR => continue,
                Errno::ECHILD => return true,
                _ => return false,
            },
            pid if pid == leader.as_raw() => *status = Some(raw),
            _ => {}
        }
    }
}

/// Kills everything below the keeper: the whole cgroup at once, else each
/// child (the orphans of those come back to the keeper and go next round),
/// else, without /proc's children lists, the leader's process group.
fn kill_tree(plan: &Plan, leader: Pid) {
    if let Some(cgroup) = &plan.cgroup
        && write_file(&cgroup.kill, b"1").is_ok()
    {
        return;
    }
    if !kill_children() {
        let _ = killpg(leader, Signal::SIGKILL);
    }
}

/// SIGKILL to each child listed in `/proc/thread-self/children` (the keeper
/// has one thread, so these are all its children); false if it cannot be read.
fn kill_children() -> bool {
    let Ok(fd) = open(
        c"/proc/thread-self/children",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = [0u8; 1024];
    let mut pid: i32 = 0;
    let mut digits = false;
    loop {
        let n = match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        };
        for &b in &buf[..n] {
            if b.is_ascii_digit() {
                pid = pid.saturating_mul(10).saturating_add(i32::from(b - b'0'));
                digits = true;
            } else if digits {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                (pid, digits) = (0, false);
            }
        }
    }
    if digits {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    true
}

fn remove_dir(path: &CStr) -> nix::Result<()> {
    nix::unistd::unlinkat(None, path, nix::unistd::UnlinkatFlags::RemoveDir)
}

/// Writes `bytes` to the file at `path`.
fn write_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::write(&fd, bytes)?;
    Ok(())
}

/// Closes every descriptor but `keep`.
fn close_all_but(keep: RawFd) {
    let keep = u32::try_from(keep).unwrap_or(0);
    if keep > 0 {
        close_range(0, keep - 1);
    }
    close_range(keep.saturating_add(1), u32::MAX);
}

/// Closes the descriptors from `first` to `last`.
fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes descriptors; this process owns them all
    // and uses none of them after this.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if closed == 0 {
        return;
    }
    // Kernels before 5.9 have no close_range: one by one, up to the limit.
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft.min(1 << 20));
    let last = u64::from(last).min(limit.saturating_sub(1));
    for fd in u64::from(first)..=last {
        if let Ok(fd) = RawFd::try_from(fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Whether a child of this process can be moved into the cgroup whose
/// `cgroup.procs` is `procs`: a probe child tries, then exits.
pub fn probe_join(procs: &CStr) -> io::Result<()> {
    // SAFETY: the child only opens and writes a file (async-signal-safe system
    // calls on a C string made before the fork) and ends with `_exit`.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let code = match write_file(procs, b"0") {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            };
            // SAFETY: as in `keep`.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => return Ok(()),
                Ok(nix::sys::wait::WaitStatus::Exited(_, errno)) => {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                Ok(_) => return Err(io::Error::other("the probe process was killed")),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_stage_is_named_with_its_cause_and_an_exec_error_is_left_alone() {
        let dir = std::path::Path::new("/sys/fs/cgroup/seaport/web.1");
        let tagged = Stage::Cgroup.tag(Errno::EACCES);
        let explained = explain(tagged, Some(dir));
        assert_eq!(explained.kind(), io::ErrorKind::PermissionDenied);
        let text = explained.to_string();
        assert!(
            text.starts_with("cannot move the service into its cgroup /sys/fs/cgroup/seaport/web.1: Permission denied"),
            "{text}"
        );
        let socket = explain(Stage::Socket.tag(Errno::EBADF), None).to_string();
        assert!(
            socket.starts_with("cannot pass the held socket to the service: Bad file descriptor"),
            "{socket}"
        );
        let keeper = explain(Stage::Keeper.tag(Errno::EAGAIN), None).to_string();
        assert!(
            keeper.starts_with("cannot set up the process that keeps the service"),
            "{keeper}"
        );
        // The program itself: as std reports it.
        let missing = explain(io::Error::from_raw_os_error(libc::ENOENT), Some(dir));
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        let other = explain(io::Error::other("no errno"), None);
        assert_eq!(other.to_string(), "no errno");
    }

    #[test]
    fn pids_are_written_in_decimal_without_allocating() {
        let mut buf = [0u8; 12];
        for (n, text) in [
            (0, "0"),
            (7, "7"),
            (4_194_304, "4194304"),
            (u32::MAX, "4294967295"),
        ] {
            let len = write_decimal(&mut buf, n);
            assert_eq!(&buf[..len], text.as_bytes());
        }
    }
}
