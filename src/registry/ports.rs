//! Choosing a port that is really free: unused by any record on this host in the
//! registry, and bindable on this machine right now.

use crate::registry::Registry;
use rand::Rng;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::str::FromStr;
use thiserror::Error;

/// An inclusive range of ports to choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub start: u16,
    /// Highest port, included.
    pub end: u16,
}

impl Default for PortRange {
    /// 10000–65535, as in the Node package.
    fn default() -> Self {
        PortRange {
            start: 10000,
            end: 65535,
        }
    }
}

impl PortRange {
    /// A range from `start` to `end`, both included; refuses an empty or port-0 range.
    pub fn new(start: u16, end: u16) -> Result<Self, PortError> {
        if start == 0 || start > end {
            return Err(PortError::BadRange(format!("{start}-{end}")));
        }
        Ok(PortRange { start, end })
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// Always false: a valid range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = PortError;
    /// Parses `A-B`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PortError::BadRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let a = a.trim().parse().map_err(|_| bad())?;
        let b = b.trim().parse().map_err(|_| bad())?;
        PortRange::new(a, b)
    }
}

/// Why no port could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortError {
    /// Every port in the range is taken or cannot be bound.
    #[error("no free port in range {range} on host {host}: all are registered or in use")]
    Exhausted {
        /// The range searched.
        range: PortRange,
        /// The host searched for.
        host: String,
    },
    /// The text is not a valid range.
    #[error("invalid port range {0:?} (expected A-B with 1 <= A <= B <= 65535)")]
    BadRange(String),
}

/// Whether `port` can be bound on every local address right now.
pub fn bindable(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
    // A machine without IPv6 cannot conflict on it; only an in-use error counts.
    let v6 = match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
    };
    v4 && v6
}

/// Picks a port in `range` that no record on `host` uses, that `reserved` does
/// not hold back, and that can be bound here.
///
/// Starts at a random offset and walks the range once, so a crowded range costs at
/// most one pass and an exhausted range is an error rather than a loop.
pub fn pick_port(
    registry: &Registry,
    host: &str,
    range: PortRange,
    reserved: impl Fn(u16) -> bool,
) -> Result<u16, PortError> {
    let len = range.len();
    let offset = rand::rng().random_range(0..len);
    (0..len)
        .map(|i| {
            let port = u32::from(range.start) + (offset + i) % len;
            u16::try_from(port).unwrap_or(range.end)
        })
        .find(|&port| !registry.port_taken(host, port) && !reserved(port) && bindable(port))
        .ok_or_else(|| PortError::Exhausted {
            range,
            host: host.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::{Meta, meta_of};
    use crate::registry::Owner;
    use serde_json::json;

    fn holding(host: &str, port: u16) -> Meta {
        meta_of(json!({"role":"x","host":host,"port":port}))
    }

    #[test]
    fn parses_ranges() {
        assert_eq!("20000-20010".parse(), PortRange::new(20000, 20010));
        assert!("20010-20000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn skips_ports_registered_on_the_same_host() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = listener.local_addr().unwrap().port();
        drop(listener);
        let mut reg = Registry::new();
        let range = PortRange::new(p, p).unwrap();
        assert_eq!(pick_port(&reg, "h", range, |_| false), Ok(p));
        reg.register("a", holding("h", p), Owner(1));
        assert!(matches!(
            pick_port(&reg, "h", range, |_| false),
            Err(PortError::Exhausted { .. })
        ));
        assert_eq!(pick_port(&reg, "other", range, |_| false), Ok(p));
        assert!(pick_port(&reg, "other", range, |port| port == p).is_err());
    }

    #[test]
    fn skips_ports_in_use_on_this_machine() {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let p = listener.local_addr().unwrap().port();
        let reg = Registry::new();
        let err = pick_port(&reg, "h", PortRange::new(p, p).unwrap(), |_| false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no free port in range {p}-{p} on host h: all are registered or in use")
        );
    }
}
