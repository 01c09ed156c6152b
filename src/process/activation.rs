//! Socket activation: the supervisor binds a service's port itself, holds the
//! listening socket for the instance's whole life and passes it to each run of
//! the command the way systemd does (descriptor 3, `LISTEN_FDS=1`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`). The port is the service's from the start:
//! nobody can take it while the service restarts, and connections made in that
//! gap wait in the socket's backlog instead of being refused.

use crate::process::child::Tree;
use crate::process::keeper::Activation;
use crate::process::listeners::{self, PortUse};
use crate::process::program;
use crate::transport::accept::listen;
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// The variables of the convention; inherited ones are never passed on, since
/// they describe the supervisor's own sockets.
pub const VARIABLES: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// How often to look whether a probe connection was accepted.
const ACCEPT_POLL: Duration = Duration::from_millis(1);

/// How long one probe waits to be accepted (and, while a process is being
/// replaced, how long the old one is paused at most per probe).
const ACCEPT_WINDOW: Duration = Duration::from_millis(30);

/// The longest wait between two probes.
const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A listening socket the supervisor holds for a service.
#[derive(Debug)]
pub struct HeldSocket {
    listener: TcpListener,
    port: u16,
}

impl HeldSocket {
    /// Binds `port` on every address: IPv6 and IPv4 at once where the machine
    /// has IPv6 (whatever `net.ipv6.bindv6only` says), else IPv4. The backlog
    /// is as long as the kernel allows (`net.core.somaxconn`), since it is
    /// where connections wait while the service restarts. A port in use is
    /// refused with who holds it.
    pub fn bind(port: u16) -> io::Result<HeldSocket> {
        let bound =
            listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).or_else(|e| match e.kind() {
                io::ErrorKind::AddrInUse => Err(e),
                _ => listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
            });
        match bound {
            Ok(listener) => {
                let port = listener.local_addr()?.port();
                Ok(HeldSocket { listener, port })
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot bind port {port}: it is {}",
                    listeners::port_use(port)
                ),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot bind port {port}: {e}"),
            )),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The descriptor, in this process.
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The socket's inode, as `/proc/net/tcp` shows it.
    fn inode(&self) -> Option<u64> {
        std::fs::metadata(format!("/proc/self/fd/{}", self.fd()))
            .ok()
            .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
    }

    /// Returns once a process of the service accepts connections from the
    /// socket: a probe connection leaves the accept queue. With `others` (the
    /// process being replaced, which shares the socket), those are paused
    /// during each probe, so that the probe is accepted by the new process or
    /// not at all. Never fails; the caller races it against the process
    /// exiting.
    pub async fn wait_accepting(&self, name: &str, others: Option<&Tree>) {
        let Some(inode) = self.inode() else {
            return;
        };
        let started = Instant::now();
        let mut interval = Duration::from_millis(2);
        let mut warned = false;
        loop {
            let accepted = {
                let _paused = match others {
                    Some(tree) => Some(tree.pause().await),
                    None => None,
                };
                self.probe(inode).await
            };
            if accepted {
                return;
            }
            if !warned && started.elapsed() > Duration::from_secs(30) {
                warned = true;
                tracing::warn!(
                    "{name}: not accepting connections from its socket on port {} after 30s",
                    self.port
                );
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(MAX_PROBE_INTERVAL);
        }
    }

    /// Connects once and waits up to [`ACCEPT_WINDOW`] for the socket's
    /// accept queue to empty.
    async fn probe(&self, inode: u64) -> bool {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let end = Instant::now() + ACCEPT_WINDOW;
        // A full backlog would hold the connect for a SYN retry (a second
        // and more), with the replaced process paused: bounded too.
        let connect = tokio::net::TcpStream::connect(target);
        let Ok(Ok(_probe)) = tokio::time::timeout_at(end, connect).await else {
            return false;
        };
        loop {
            match listeners::accept_queue(inode) {
                Some(0) | None => return true,
                Some(_) if Instant::now() >= end => return false,
                Some(_) => tokio::time::sleep(ACCEPT_POLL).await,
            }
        }
    }

    /// How to exec `command` (with the port appended) so that it gets this
    /// socket: the program found as exec would find it, and the environment
    /// of this process with `env` and the convention's variables set.
    pub fn activation(
        &self,
        name: &str,
        command: &[String],
        env: &BTreeMap<OsString, OsString>,
        cwd: Option<&Path>,
    ) -> io::Result<Activation> {
        let (first, rest) = command
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let dir = match cwd {
            Some(dir) => dir.to_path_buf(),
            None => std::env::current_dir()?,
        };
        let mut vars: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(key, _)| !super::child::never_inherited().any(|v| key == OsStr::new(v)))
            .collect();
        vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        vars.insert("LISTEN_FDS".into(), "1".into());
        vars.insert("LISTEN_FDNAMES".into(), fd_name(name).into());
        vars.remove(OsStr::new("LISTEN_PID"));
        let found = program::find(
            first,
            vars.get(OsStr::new("PATH")).map(|p| p.as_os_str()),
            &dir,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
        let program = c_string(found.as_os_str().as_bytes())?;
        let mut args = vec![c_string(first.as_bytes())?];
        for arg in rest {
            args.push(c_string(arg.as_bytes())?);
        }
        args.push(c_string(self.port.to_string().as_bytes())?);
        let env = vars
            .iter()
            .map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Activation::new(self.fd(), program, args, env))
    }
}

/// A name for `LISTEN_FDNAMES`: the instance's, without the separator `:`.
fn fd_name(name: &str) -> String {
    name.chars()
        .map(|c| if c == ':' || c.is_control() { '_' } else { c })
        .collect()
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} holds a NUL byte", String::from_utf8_lossy(bytes)),
        )
    })
}

/// Whether `port` may be bound: free, or else who holds it.
pub fn check_free(port: u16) -> Result<(), PortUse> {
    match listeners::port_use(port) {
        PortUse::Free => Ok(()),
        held => Err(held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_cannot_be_bound_again_and_the_error_names_the_holder() {
        let held = HeldSocket::bind(0).unwrap();
        let port = held.port();
        assert_ne!(port, 0);
        let err = HeldSocket::bind(port).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot bind port {port}: it is held by pid {}",
                std::process::id()
            )),
            "{text}"
        );
        assert!(check_free(port).is_err());
    }

    #[test]
    fn a_held_socket_takes_ipv4_and_ipv6_and_waits_with_a_long_backlog() {
        let held = HeldSocket::bind(0).unwrap();
        let v4 = std::net::TcpStream::connect(("127.0.0.1", held.port()));
        assert!(v4.is_ok(), "IPv4: {v4:?}");
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(std::net::TcpStream::connect(("::1", held.port())).is_ok());
        }
        // Nobody accepts: as many connections wait as the kernel allows
        // (more than the 128 of std's listeners, on kernels since 5.4).
        let most: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(128);
        let waiting: Vec<_> = (0..most.min(300))
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", held.port())))
            .collect();
        assert!(waiting.iter().all(Result::is_ok));
    }

    #[test]
    fn names_never_hold_the_separator() {
        assert_eq!(fd_name("web.2"), "web.2");
        assert_eq!(fd_name("a:b"), "a_b");
    }
}
