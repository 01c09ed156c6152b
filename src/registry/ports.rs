//! Choosing a port that is really free: unused by any record on this host in the
//! registry, and bindable on this machine right now. Ports outside the
//! kernel's ephemeral range come first: inside it, any outgoing connection or
//! `bind` to port 0 on the machine (the service's own, before it listens)
//! may take the port between the choice and the service's bind, and keep it
//! for as long as the connection lives.

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

/// Linux's own default for [`ephemeral_ports`].
const LINUX_EPHEMERAL: PortRange = PortRange {
    start: 32768,
    end: 60999,
};

/// The ports the kernel gives outgoing connections and `bind` to port 0
/// (`net.ipv4.ip_local_port_range`; Linux's default when it cannot be read).
pub fn ephemeral_ports() -> PortRange {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut ends = text.split_whitespace().map(str::parse::<u16>);
            PortRange::new(ends.next()?.ok()?, ends.next()?.ok()?).ok()
        })
        .unwrap_or(LINUX_EPHEMERAL)
}

/// The order in which the ports of `range` are tried: those outside
/// `ephemeral` first, then those inside it, each group walked once from a
/// place `offset` picks, wrapping round. (Walking the whole range from a
/// random place and skipping the ephemeral ports would start most walks at
/// the first port above them.)
fn candidates(range: PortRange, ephemeral: PortRange, offset: u32) -> impl Iterator<Item = u16> {
    let (start, end) = (u32::from(range.start), u32::from(range.end));
    let (low, high) = (u32::from(ephemeral.start), u32::from(ephemeral.end));
    // Inside: the range's part of the ephemeral ports; outside: what is
    // below them, then what is above.
    let size = |(a, b): (u32, u32)| if a <= b { b - a + 1 } else { 0 };
    let inside = (start.max(low), end.min(high));
    let below = (start, end.min(low.saturating_sub(1)));
    let above = (start.max(high + 1), end);
    let (below_len, outside_len, inside_len) =
        (size(below), size(below) + size(above), size(inside));
    let place = move |i: u32, len: u32| (offset % len + i) % len;
    let outside = (0..outside_len).map(move |i| match place(i, outside_len) {
        n if n < below_len => below.0 + n,
        n => above.0 + (n - below_len),
    });
    let inside = (0..inside_len).map(move |i| inside.0 + place(i, inside_len));
    outside
        .chain(inside)
        .filter_map(|port| u16::try_from(port).ok())
}

/// Picks a port in `range` that no record on `host` uses, that `reserved` does
/// not hold back, and that can be bound here; outside the kernel's ephemeral
/// range when the range has such a port free.
///
/// Starts at a random offset and walks the range once, so a crowded range costs at
/// most one pass and an exhausted range is an error rather than a loop.
pub fn pick_port(
    registry: &Registry,
    host: &str,
    range: PortRange,
    reserved: impl Fn(u16) -> bool,
) -> Result<u16, PortError> {
    let offset = rand::rng().random_range(0..range.len());
    candidates(range, ephemeral_ports(), offset)
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
    fn ports_outside_the_ephemeral_range_come_first_and_the_rest_after() {
        let ephemeral = PortRange::new(32768, 60999).unwrap();
        let order =
            |range: PortRange, offset| candidates(range, ephemeral, offset).collect::<Vec<u16>>();
        // Below, then inside; each group from its own place.
        let across = PortRange::new(32765, 32770).unwrap();
        assert_eq!(order(across, 4), [32766, 32767, 32765, 32769, 32770, 32768]);
        // Below and above: one group, walked across the gap.
        let both = PortRange::new(32766, 61001).unwrap();
        let walked = order(both, 3);
        assert_eq!(walked[..4], [61001, 32766, 32767, 61000]);
        assert_eq!(walked.len(), 61001 - 32766 + 1);
        assert!(walked[4..].iter().all(|p| (32768..=60999).contains(p)));
        // Wholly inside, or wholly outside.
        let inside = PortRange::new(40000, 40002).unwrap();
        assert_eq!(order(inside, 1), [40001, 40002, 40000]);
        let outside = PortRange::new(20000, 20002).unwrap();
        assert_eq!(order(outside, 5), [20002, 20000, 20001]);
        // Every port of the whole range, once; the first is spread evenly
        // over the ports outside.
        let full = PortRange::new(1, 65535).unwrap();
        let mut all = order(full, 7);
        assert_eq!(all[0], 8);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 65535);
        let firsts: std::collections::HashSet<u16> = (0..1000u32)
            .map(|n| {
                order(PortRange::default(), n * 97)
                    .first()
                    .copied()
                    .unwrap()
            })
            .collect();
        assert!(firsts.iter().all(|p| !(32768..=60999).contains(p)));
        assert!(firsts.len() > 900, "{} distinct first ports", firsts.len());
    }

    #[test]
    fn the_kernels_ephemeral_range_is_read_or_linuxs_default() {
        let range = ephemeral_ports();
        assert!(range.start <= range.end);
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("the kernel's range");
        let ends: Vec<u16> = text
            .split_whitespace()
            .map(|n| n.parse().expect("a port"))
            .collect();
        assert_eq!([range.start, range.end], ends[..]);
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
