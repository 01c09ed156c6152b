//! When a started service counts as ready, so that its record tells the truth.

use crate::process::activation::HeldSocket;
use crate::process::child::Tree;
use crate::process::listeners::{self, PortUse};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Probe intervals start short, so a fast service is registered within
/// milliseconds, and grow to this, so a slow one costs little.
const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ready {
    /// When the service's own processes listen on its port, or, when the
    /// supervisor holds the port's socket, when they accept from it (the
    /// default).
    #[default]
    Tcp,
    /// At once.
    None,
    /// After a fixed delay.
    Delay(Duration),
}

impl FromStr for Ready {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "tcp" => Ok(Ready::Tcp),
            "none" => Ok(Ready::None),
            other => crate::human::parse_duration(other)
                .map(Ready::Delay)
                .map_err(|_| {
                    format!("invalid readiness {s:?} (expected tcp, none or a delay such as 2s)")
                }),
        }
    }
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ready::Tcp => f.write_str("tcp"),
            Ready::None => f.write_str("none"),
            Ready::Delay(d) => f.write_str(&crate::human::format_duration(*d)),
        }
    }
}

/// Where a service listens, for the `tcp` rule.
#[derive(Debug)]
pub enum Listening<'a> {
    /// On a socket the supervisor holds: ready once a process accepts from it.
    Held(&'a HeldSocket),
    /// On a socket the supervisor holds, shared with the process being
    /// replaced (`old`): ready once a new process accepts from it.
    Replacing {
        /// The socket.
        socket: &'a HeldSocket,
        /// The processes being replaced, paused while probing.
        old: &'a Tree,
    },
    /// On a port it binds itself: ready once one of the processes this returns
    /// (the service's own) holds a socket listening on the port.
    Own {
        /// The port.
        port: u16,
        /// The service's processes now.
        tree: &'a Tree,
    },
}

/// Returns once the service is ready by `ready`'s rule. Never fails: the
/// caller races it against the process exiting.
pub async fn wait_ready(ready: Ready, listening: Listening<'_>, name: &str) {
    match (ready, listening) {
        (Ready::None, _) => {}
        (Ready::Delay(delay), _) => tokio::time::sleep(delay).await,
        (Ready::Tcp, Listening::Held(socket)) => socket.wait_accepting(name, None).await,
        (Ready::Tcp, Listening::Replacing { socket, old }) => {
            socket.wait_accepting(name, Some(old)).await;
        }
        (Ready::Tcp, Listening::Own { port, tree }) => {
            wait_listening(port, || tree.pids(), name).await
        }
    }
}

/// Waits until one of `pids()` listens on `port`. Anyone else listening there
/// does not count: the record must point at the service itself.
async fn wait_listening(port: u16, pids: impl Fn() -> Vec<u32>, name: &str) {
    let mut interval = Duration::from_millis(2);
    let started = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        let sockets = listeners::listening(port);
        if listeners::held_by_any(&sockets, &pids()) {
            return;
        }
        if !warned && started.elapsed() > Duration::from_secs(30) {
            warned = true;
            match listeners::port_use(port) {
                PortUse::Free => {
                    tracing::warn!("{name}: not listening on port {port} after 30s");
                }
                held => tracing::warn!(
                    "{name}: not listening on port {port} after 30s; the port is {held}"
                ),
            }
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(MAX_PROBE_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!("tcp".parse(), Ok(Ready::Tcp));
        assert_eq!("none".parse(), Ok(Ready::None));
        assert_eq!("2s".parse(), Ok(Ready::Delay(Duration::from_secs(2))));
        assert!("soon".parse::<Ready>().is_err());
    }

    #[tokio::test]
    async fn tcp_readiness_waits_for_a_listener_of_the_service_itself() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let me = std::process::id();
        // Another process's listener does not count: "the service" here is a
        // process that is not there.
        let other = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let nobody = tokio::spawn(wait_listening(port, || vec![1 << 22], "t"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!nobody.is_finished(), "ready on someone else's listener");
        nobody.abort();
        drop(other);
        let probe = tokio::spawn(wait_listening(port, move || vec![me], "t"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!probe.is_finished());
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .expect("ready once listening")
            .unwrap();
    }
}
