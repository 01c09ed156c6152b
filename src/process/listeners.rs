//! Who listens on a TCP port: the listening sockets of this network
//! namespace, asked of the kernel with sock_diag netlink (as `ss -lt` does;
//! the kernel sends listening sockets only, so the cost does not grow with the
//! machine's connections, unlike reading `/proc/net/tcp`), and the processes
//! whose descriptors hold them, from `/proc`. A record is registered only when
//! the service's own processes hold its port's listening socket, so that it
//! never points at another process that happens to answer there.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use procfs::process::{FDTarget, Process};
use std::collections::HashSet;
use std::fmt;
use std::io;

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

/// A listening TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Its port.
    pub port: u16,
    /// Its inode, as `/proc/PID/fd` links name it (`socket:[INODE]`).
    pub inode: u64,
    /// Connections waiting in its accept queue.
    pub queued: u32,
}

/// Every listening TCP socket of this network namespace, IPv4 and IPv6:
/// from sock_diag, or where that cannot be used (a sandbox without it), from
/// `/proc/net/tcp` and `tcp6`.
pub fn listeners() -> io::Result<Vec<Listener>> {
    match from_sock_diag() {
        Ok(found) => Ok(found),
        Err(diag) => from_proc().map_err(|proc| {
            io::Error::other(format!(
                "cannot list listening sockets: sock_diag: {diag}; /proc/net/tcp: {proc}"
            ))
        }),
    }
}

/// The listening sockets, from `/proc/net/tcp` and `tcp6` (a table that
/// cannot be read, as without IPv6, counts as empty; both, as an error).
fn from_proc() -> io::Result<Vec<Listener>> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    if let [Err(e), Err(_)] = &tables {
        return Err(io::Error::other(e.to_string()));
    }
    Ok(tables
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .filter(|entry| entry.state == procfs::net::TcpState::Listen)
        .map(|entry| Listener {
            port: entry.local_address.port(),
            inode: entry.inode,
            queued: entry.rx_queue,
        })
        .collect())
}

/// The listening sockets, from the kernel's sock_diag netlink interface.
fn from_sock_diag() -> io::Result<Vec<Listener>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut found = Vec::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        dump(&socket, family, socket_id, &mut found)?;
    }
    Ok(found)
}

/// Asks for the listening sockets of `family` and adds them to `found`.
fn dump(
    socket: &Socket,
    family: u8,
    socket_id: SocketId,
    found: &mut Vec<Listener>,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::LISTEN,
        socket_id,
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut received = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    found.push(listener(&response.header));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    // No IPv6 on this machine: no IPv6 listeners.
                    return match e.to_io().raw_os_error() {
                        Some(code) if family == AF_INET6 && code == nix::libc::ENOENT => Ok(()),
                        _ => Err(e.to_io()),
                    };
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
        if size == 0 {
            return Ok(());
        }
    }
}

fn listener(header: &InetResponseHeader) -> Listener {
    Listener {
        port: header.socket_id.source_port,
        inode: u64::from(header.inode),
        queued: header.recv_queue,
    }
}

/// The inodes of the sockets listening on `port`, on any address, IPv4 or
/// IPv6. If the sockets cannot be listed at all, none, and a warning (once).
pub fn listening(port: u16) -> HashSet<u64> {
    listeners()
        .unwrap_or_else(|e| {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("{e}; no service can be seen listening"));
            Vec::new()
        })
        .into_iter()
        .filter(|l| l.port == port)
        .map(|l| l.inode)
        .collect()
}

/// How many connections wait, not yet accepted, on the listening socket
/// `inode` (the kernel's accept queue), if it is listening.
pub fn accept_queue(inode: u64) -> Option<u32> {
    listeners()
        .ok()?
        .into_iter()
        .find(|l| l.inode == inode)
        .map(|l| l.queued)
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
    fn proc_net_tcp_lists_the_same_listeners() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let diag: Vec<Listener> = from_sock_diag()
            .unwrap()
            .into_iter()
            .filter(|l| l.port == port)
            .collect();
        let proc: Vec<Listener> = from_proc()
            .unwrap()
            .into_iter()
            .filter(|l| l.port == port)
            .collect();
        assert_eq!(diag.len(), 1);
        assert_eq!(diag, proc);
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
