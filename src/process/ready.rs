//! When a started service counts as ready, so that its record tells the truth.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Probe intervals start short, so a fast service is registered within
/// milliseconds, and grow to this, so a slow one costs little.
const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ready {
    /// When something accepts TCP connections on the port (the default).
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

/// Returns once the service on `port` is ready by `ready`'s rule. Never fails: the
/// caller races it against the process exiting.
pub async fn wait_ready(ready: Ready, port: u16, name: &str) {
    match ready {
        Ready::None => {}
        Ready::Delay(delay) => tokio::time::sleep(delay).await,
        Ready::Tcp => wait_tcp(port, name).await,
    }
}

async fn wait_tcp(port: u16, name: &str) {
    let targets = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut interval = Duration::from_millis(2);
    let started = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        for target in targets {
            if TcpStream::connect(target).await.is_ok() {
                return;
            }
        }
        if !warned && started.elapsed() > Duration::from_secs(30) {
            warned = true;
            tracing::warn!("{name}: not accepting connections on port {port} after 30s");
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
    async fn tcp_readiness_waits_for_a_listener() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let probe = tokio::spawn(wait_ready(Ready::Tcp, port, "t"));
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
