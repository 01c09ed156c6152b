//! Hub addresses as users write them: `host:port`, `[v6]:port`, or a bare port.

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Where a hub listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubAddr {
    /// Host name or IP address (no brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// A hub address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid hub address {0:?} (expected HOST:PORT or PORT)")]
pub struct HubAddrError(pub String);

impl HubAddr {
    /// A hub at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        HubAddr {
            host: host.into(),
            port,
        }
    }
}

impl FromStr for HubAddr {
    type Err = HubAddrError;

    /// `9090` means `localhost:9090`, as in the Node package.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HubAddrError(s.to_string());
        let s = s.trim();
        if let Ok(port) = s.parse::<u16>() {
            return Ok(HubAddr::new("localhost", port));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(HubAddr::new(host, port))
    }
}

impl fmt::Display for HubAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("9090".parse(), Ok(HubAddr::new("localhost", 9090)));
        assert_eq!("10.0.0.5:9090".parse(), Ok(HubAddr::new("10.0.0.5", 9090)));
        assert_eq!("hub.lan:1".parse(), Ok(HubAddr::new("hub.lan", 1)));
        assert_eq!("[::1]:9090".parse(), Ok(HubAddr::new("::1", 9090)));
        assert_eq!(HubAddr::new("::1", 9).to_string(), "[::1]:9");
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "host", "host:", ":90", "host:99999", "a b:1", "-1"] {
            assert!(bad.parse::<HubAddr>().is_err(), "{bad:?} parsed");
        }
    }
}
