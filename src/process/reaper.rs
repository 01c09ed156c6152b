//! The process tree as `/proc` shows it, and the reaping of adopted orphans.
//!
//! Without a cgroup, "every process of a service" is every descendant of its
//! keeper ([`descendants`]). A supervisor that is a child subreaper, or PID 1,
//! also adopts orphans that are nobody's child any more (those of a keeper that
//! was itself killed, or in a container anything at all); [`reap_adopted`]
//! reaps them when they end. It never reaps a child this process started
//! itself through [`spawn_owned`], whose exit status a task is waiting for, nor
//! one started elsewhere in the process: the reaper runs only in the `seaport`
//! command (see [`super::containment`]), which starts children only that way.

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One process in `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    /// Its id.
    pub pid: u32,
    /// Its parent's id.
    pub ppid: u32,
    /// Whether it has ended and waits to be reaped.
    pub zombie: bool,
}

/// Parses `/proc/PID/stat`: `pid (comm) state ppid ...`, where comm may hold
/// spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<Proc> {
    let (head, tail) = stat.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = tail.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        zombie: state == "Z",
    })
}

/// Every process in `/proc` now.
pub fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| parse_stat(&stat))
        .collect()
}

/// The descendants of `root` in `table` (not `root` itself), parents first.
pub fn descendants_in(table: &[Proc], root: u32) -> Vec<Proc> {
    let mut children: HashMap<u32, Vec<Proc>> = HashMap::new();
    for p in table {
        children.entry(p.ppid).or_default().push(*p);
    }
    let mut out = Vec::new();
    let mut next = vec![root];
    let mut seen = HashSet::from([root]);
    while let Some(pid) = next.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child.pid) {
                out.push(*child);
                next.push(child.pid);
            }
        }
    }
    out
}

/// The live descendants of process `root` now.
pub fn descendants(root: u32) -> Vec<u32> {
    descendants_in(&processes(), root)
        .into_iter()
        .filter(|p| !p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// Sends `signal` to every live descendant of `root`.
pub fn signal_descendants(root: u32, signal: Signal) {
    for pid in descendants(root) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// The children this process started and waits for itself.
static OWNED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

fn owned() -> MutexGuard<'static, Option<HashSet<u32>>> {
    // A panic while holding the lock leaves a set that is still right.
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a child with `spawn` and marks it as one the reaper leaves alone.
/// The lock is held across the start, so the reaper cannot take the child for
/// an orphan between its start and its marking. `id` gives a child's pid.
pub fn spawn_owned<T, E>(
    spawn: impl FnOnce() -> Result<T, E>,
    id: impl Fn(&T) -> Option<u32>,
) -> Result<T, E> {
    let mut owned = owned();
    let child = spawn()?;
    if let Some(pid) = id(&child) {
        owned.get_or_insert_with(HashSet::new).insert(pid);
    }
    Ok(child)
}

/// Forgets a child once it has been reaped (its pid may be used again).
pub fn disown(pid: u32) {
    if let Some(set) = owned().as_mut() {
        set.remove(&pid);
    }
}

/// Reaps every ended child of this process that it did not start through
/// [`spawn_owned`].
pub fn reap_adopted() {
    let owned = owned();
    let me = std::process::id();
    for p in processes() {
        let ours = owned.as_ref().is_some_and(|set| set.contains(&p.pid));
        if p.ppid != me || !p.zombie || ours {
            continue;
        }
        let Ok(pid) = i32::try_from(p.pid) else {
            continue;
        };
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Whether this process adopts orphans and reaps them ([`start`] was called).
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// Reaps adopted orphans whenever a child ends, for the rest of the process's
/// life (a task on the current runtime). For a process that adopts orphans:
/// a child subreaper, or PID 1.
pub fn start() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut children = signal(SignalKind::child())?;
    ADOPTING.store(true, Ordering::Relaxed);
    tokio::spawn(async move {
        loop {
            reap_adopted();
            if children.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Kills every descendant of this process but the children it started itself
/// and theirs (those are stopped by their owners): what a keeper killed from
/// outside left to this subreaper. Does nothing in a process that does not
/// adopt orphans (its other children are someone else's).
pub fn kill_adopted() {
    if !ADOPTING.load(Ordering::Relaxed) {
        return;
    }
    let owned = owned();
    let me = std::process::id();
    let table = processes();
    for p in table.iter().filter(|p| p.ppid == me && !p.zombie) {
        if owned.as_ref().is_some_and(|set| set.contains(&p.pid)) {
            continue;
        }
        for pid in std::iter::once(p.pid).chain(descendants_in(&table, p.pid).iter().map(|d| d.pid))
        {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_odd_command_names() {
        assert_eq!(
            parse_stat("42 (python3) S 7 42 42 0 -1"),
            Some(Proc {
                pid: 42,
                ppid: 7,
                zombie: false
            })
        );
        assert_eq!(
            parse_stat("43 (a (b) c) Z 42 1 1"),
            Some(Proc {
                pid: 43,
                ppid: 42,
                zombie: true
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn finds_descendants_across_generations() {
        let p = |pid, ppid| Proc {
            pid,
            ppid,
            zombie: false,
        };
        let table = [p(1, 0), p(10, 1), p(11, 10), p(12, 11), p(20, 1), p(13, 10)];
        let mut below: Vec<u32> = descendants_in(&table, 10).iter().map(|p| p.pid).collect();
        below.sort_unstable();
        assert_eq!(below, [11, 12, 13]);
        assert!(descendants_in(&table, 12).is_empty());
    }

    #[test]
    fn this_process_is_found_below_its_parent() {
        let me = std::process::id();
        let parent = nix::unistd::getppid().as_raw().unsigned_abs();
        assert!(descendants(parent).contains(&me));
    }
}
