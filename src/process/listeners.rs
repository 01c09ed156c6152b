//! Who listens on a TCP port, read from `/proc`: the listening sockets of this
//! network namespace (`/proc/net/tcp`, `tcp6`) and the processes whose
//! descriptors hold them. A record is registered only when the service's own
//! processes hold its port's listening socket, so that it never points at
//! another process that happens to answer there.

use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};
use std::collections::HashSet;
use std::fmt;

/// A process that holds a listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), if it could be read.
    pub name: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "pid {} ({name})", self.pid),
            None => write!(f, "pid {}", self.pid),
        }
    }
}

/// Who holds a port's listening sockets, as far as this process can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortUse {
    /// Nothing listens on it.
    Free,
    /// Something listens: these processes, or, when none of them can be seen
    /// (another user's, without the rights to look), nobody named.
    Held(Vec<Holder>),
}

impl fmt::Display for PortUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortUse::Free => f.write_str("free"),
            PortUse::Held(holders) if holders.is_empty() => {
                f.write_str("held by a process this user cannot see")
            }
            PortUse::Held(holders) => {
                f.write_str("held by ")?;
                for (i, holder) in holders.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{holder}")?;
                }
                Ok(())
            }
        }
    }
}

/// The inodes of the sockets listening on `port`, on any address, IPv4 or
/// IPv6. A table that cannot be read (no IPv6) counts as empty.
pub fn listening(port: u16) -> HashSet<u64> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    tables
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .filter(|entry| listens_on(entry, port))
        .map(|entry| entry.inode)
        .collect()
}

fn listens_on(entry: &TcpNetEntry, port: u16) -> bool {
    entry.state == TcpState::Listen && entry.local_address.port() == port
}

/// How many connections wait, not yet accepted, on the listening socket
/// `inode` (the kernel's accept queue), if it is listening.
pub fn accept_queue(inode: u64) -> Option<u32> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    tables
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .find(|entry| entry.inode == inode && entry.state == TcpState::Listen)
        .map(|entry| entry.rx_queue)
}

/// Whether one of `pids` holds one of `sockets`.
pub fn held_by_any(sockets: &HashSet<u64>, pids: &[u32]) -> bool {
    !sockets.is_empty()
        && pids
            .iter()
            .any(|&pid| !socket_inodes(pid).is_disjoint(sockets))
}

/// Who listens on `port` now: every visible process holding one of its
/// listening sockets.
pub fn port_use(port: u16) -> PortUse {
    let sockets = listening(port);
    if sockets.is_empty() {
        return PortUse::Free;
    }
    let holders = procfs::process::all_processes()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|process| !socket_inodes_of(process).is_disjoint(&sockets))
        .map(|process| Holder {
            pid: process.pid.unsigned_abs(),
            name: process.stat().ok().map(|stat| stat.comm),
        })
        .collect();
    PortUse::Held(holders)
}

/// The socket inodes among process `pid`'s descriptors (none if it is gone or
/// cannot be looked at).
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    i32::try_from(pid)
        .ok()
        .and_then(|pid| Process::new(pid).ok())
        .map(|process| socket_inodes_of(&process))
        .unwrap_or_default()
}

fn socket_inodes_of(process: &Process) -> HashSet<u64> {
    let Ok(fds) = process.fd() else {
        return HashSet::new();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_seen_and_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sockets = listening(port);
        assert_eq!(sockets.len(), 1, "one listening socket on {port}");
        assert!(held_by_any(&sockets, &[std::process::id()]));
        assert!(
            !held_by_any(&sockets, &[1 << 22]),
            "not by a pid that is not there"
        );
        match port_use(port) {
            PortUse::Held(holders) => {
                let me = holders
                    .iter()
                    .find(|h| h.pid == std::process::id())
                    .expect("this process among the holders");
                assert!(me.to_string().starts_with(&format!("pid {} (", me.pid)));
            }
            PortUse::Free => panic!("port {port} is held"),
        }
        drop(listener);
        assert_eq!(port_use(port), PortUse::Free);
    }

    #[test]
    fn a_connection_waits_in_the_accept_queue_until_accepted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inode = *listening(port).iter().next().unwrap();
        assert_eq!(accept_queue(inode), Some(0));
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(accept_queue(inode), Some(1));
        let _accepted = listener.accept().unwrap();
        assert_eq!(accept_queue(inode), Some(0));
    }
}
