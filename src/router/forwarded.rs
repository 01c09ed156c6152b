//! Who a request is from, told to the backend: the `X-Forwarded-*`,
//! `X-Real-IP` and `Forwarded` headers.
//!
//! The router is usually the edge: what a client says in these headers about
//! itself is whatever it chose to write, and a backend that logs or limits by
//! `X-Real-IP` would believe it. So by default the client's own are removed
//! and the router writes what it saw: the client's address, the Host it routed
//! by, `http`. Behind a load balancer or another proxy, whose addresses are
//! given as trusted (`--trust-forwarded`), the headers that proxy sent are
//! kept and the router appends its own hop to `X-Forwarded-For`, as nginx's
//! `$proxy_add_x_forwarded_for` and Traefik's `forwardedHeaders.trustedIPs` do.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The headers a client from outside the trusted ranges may not set: it says
/// nothing about where a request came from, the router does.
const SET_BY_THE_ROUTER: [HeaderName; 7] = [
    X_FORWARDED_FOR,
    X_FORWARDED_HOST,
    X_FORWARDED_PROTO,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-server"),
    X_REAL_IP,
    hyper::header::FORWARDED,
];

/// The address ranges of proxies in front of the router, whose forwarded
/// headers are kept. Empty (the default): every client is the edge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// A range given to `--trust-forwarded`: an address, or one in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRange(IpNet);

impl FromStr for ProxyRange {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/8`, or one address (`192.0.2.7`, `::1`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map(|net| ProxyRange(net.trunc()))
            .map_err(|_| {
                format!("{text:?} is not an address or a CIDR range (e.g. 10.0.0.0/8 or 192.0.2.7)")
            })
    }
}

impl fmt::Display for ProxyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TrustedProxies {
    /// Proxies in these ranges.
    pub fn new(ranges: impl IntoIterator<Item = ProxyRange>) -> TrustedProxies {
        TrustedProxies(ranges.into_iter().map(|ProxyRange(net)| net).collect())
    }

    /// Whether a connection from `peer` comes through a trusted proxy. An
    /// IPv4 client on a dual-stack socket (`::ffff:192.0.2.7`) is its IPv4
    /// address.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.0.iter().any(|net| net.contains(&peer))
    }

    /// Writes the headers for a request from `peer` routed by `host`: the
    /// client's own removed and the router's set, unless `peer` is trusted;
    /// then the proxy's are kept and the router's hop appended.
    pub fn apply(&self, headers: &mut HeaderMap, peer: SocketAddr, host: Option<&HeaderValue>) {
        let client = peer.ip().to_canonical().to_string();
        if !self.trusts(peer.ip()) {
            for name in &SET_BY_THE_ROUTER {
                headers.remove(name);
            }
        }
        let earlier: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let forwarded_for = if earlier.is_empty() {
            client.clone()
        } else {
            format!("{}, {client}", earlier.join(", "))
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(X_FORWARDED_FOR, value);
        }
        if !headers.contains_key(&X_REAL_IP)
            && let Ok(value) = HeaderValue::from_str(&client)
        {
            headers.insert(X_REAL_IP, value);
        }
        if !headers.contains_key(&X_FORWARDED_HOST)
            && let Some(host) = host
        {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn trusted(ranges: &[&str]) -> TrustedProxies {
        TrustedProxies::new(ranges.iter().map(|r| r.parse().unwrap()))
    }

    const FORGED: [(&str, &str); 6] = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-for", "198.51.100.1"),
        ("x-real-ip", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "admin.internal"),
    ];

    #[test]
    fn a_client_outside_the_trusted_ranges_cannot_say_where_it_is_from() {
        let mut headers = sent(&FORGED);
        let host = HeaderValue::from_static("www.example.com");
        let peer: SocketAddr = "[::ffff:192.0.2.7]:50000".parse().unwrap();
        trusted(&["10.0.0.0/8"]).apply(&mut headers, peer, Some(&host));
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(headers["x-real-ip"], "192.0.2.7");
        assert_eq!(headers["x-forwarded-host"], "www.example.com");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(!headers.contains_key("forwarded"));
        assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn a_trusted_proxys_headers_are_kept_and_the_hop_appended() {
        let mut headers = sent(&FORGED);
        let host = HeaderValue::from_static("www.example.com");
        let peer: SocketAddr = "10.1.2.3:50000".parse().unwrap();
        trusted(&["192.0.2.1", "10.0.0.0/8"]).apply(&mut headers, peer, Some(&host));
        assert_eq!(
            headers["x-forwarded-for"],
            "203.0.113.9, 198.51.100.1, 10.1.2.3"
        );
        assert_eq!(headers["x-real-ip"], "203.0.113.9");
        assert_eq!(headers["x-forwarded-host"], "admin.internal");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["forwarded"], "for=203.0.113.9");
        // A trusted proxy that sent none: the router's own.
        let mut headers = HeaderMap::new();
        trusted(&["10.0.0.0/8"]).apply(&mut headers, peer, Some(&host));
        assert_eq!(headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(headers["x-real-ip"], "10.1.2.3");
    }

    #[test]
    fn ranges_are_addresses_or_cidr_and_anything_else_says_so() {
        let range: ProxyRange = "10.9.8.7/8".parse().unwrap();
        assert_eq!(range.to_string(), "10.0.0.0/8");
        assert_eq!("::1".parse::<ProxyRange>().unwrap().to_string(), "::1/128");
        let proxies = trusted(&["192.0.2.7", "fd00::/8"]);
        assert!(proxies.trusts("192.0.2.7".parse().unwrap()));
        assert!(proxies.trusts("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!proxies.trusts("192.0.2.8".parse().unwrap()));
        assert!(proxies.trusts("fd12::1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0/8"] {
            let error = bad.parse::<ProxyRange>().unwrap_err();
            assert!(error.contains("not an address or a CIDR range"), "{error}");
        }
    }
}
