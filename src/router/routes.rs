//! Which service a request goes to: rules from a Host name (exact, or
//! `*.domain` for every name below a domain) to a `role@range`, and a default.
//! Host names are compared without case, without a port or a final dot.

use crate::registry::pattern::Pattern;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// One rule: `HOST=ROLE[@RANGE]`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The host name, lower case: `api.example.com`, or `*.example.com`.
    pub host: String,
    /// Where its requests go.
    pub to: Pattern,
}

impl std::str::FromStr for Rule {
    type Err = String;

    /// Parses `HOST=ROLE[@RANGE]`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (host, to) = text.split_once('=').ok_or_else(|| {
            format!("{text:?}: expected HOST=ROLE[@RANGE], e.g. stable=http@0.0.x")
        })?;
        Rule::new(host, to)
    }
}

impl Rule {
    /// A rule from `host` to `to`, both checked.
    pub fn new(host: &str, to: &str) -> Result<Rule, String> {
        let host = host.trim().to_ascii_lowercase();
        let name = host.strip_prefix("*.").unwrap_or(&host);
        if !labels_of(name, b"-") {
            return Err(format!(
                "{host:?} is not a host name (expected e.g. api.example.com or *.example.com)"
            ));
        }
        let to = Pattern::parse(to.trim()).map_err(|e| format!("{to:?}: {e}"))?;
        Ok(Rule { host, to })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.host, self.to)
    }
}

/// Every rule and the default, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    exact: HashMap<String, usize>,
    /// `(".example.com", index)`, longest suffix first.
    wildcard: Vec<(String, usize)>,
    /// The targets, by index: the rules' in order, then the default's.
    targets: Vec<Pattern>,
    default: Option<usize>,
}

/// A routes file: `default = "http@0.0.x"` and `[routes]` from host to target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    default: Option<String>,
    #[serde(default)]
    routes: std::collections::BTreeMap<String, String>,
}

impl Routes {
    /// The routes of `rules` and `default`; a host given twice is an error.
    pub fn new(rules: Vec<Rule>, default: Option<Pattern>) -> Result<Routes, String> {
        let mut routes = Routes::default();
        for rule in rules {
            let index = routes.targets.len();
            let taken = match rule.host.strip_prefix('*') {
                Some(suffix) => {
                    let taken = routes.wildcard.iter().any(|(s, _)| s == suffix);
                    routes.wildcard.push((suffix.to_string(), index));
                    taken
                }
                None => routes.exact.insert(rule.host.clone(), index).is_some(),
            };
            if taken {
                return Err(format!("{:?} has two rules", rule.host));
            }
            routes.targets.push(rule.to);
        }
        routes
            .wildcard
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        if let Some(default) = default {
            routes.default = Some(routes.targets.len());
            routes.targets.push(default);
        }
        Ok(routes)
    }

    /// Reads a routes file (TOML): `default = "ROLE@RANGE"` and a `[routes]`
    /// table of `"HOST" = "ROLE@RANGE"`. Errors name the file.
    pub fn load(path: &Path) -> Result<Routes, String> {
        let at = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{at}: {e}"))?;
        let file: RoutesFile = toml::from_str(&text).map_err(|e| format!("{at}: {e}"))?;
        let rules = file
            .routes
            .iter()
            .map(|(host, to)| Rule::new(host, to).map_err(|e| format!("{at}: routes: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let default = file
            .default
            .map(|d| Pattern::parse(&d).map_err(|e| format!("{at}: default: {d:?}: {e}")))
            .transpose()?;
        Routes::new(rules, default).map_err(|e| format!("{at}: {e}"))
    }

    /// Every target, by index (what the backend table is built for).
    pub fn targets(&self) -> &[Pattern] {
        &self.targets
    }

    /// The index of the target for a request's host (`Host: Api.Example.com:8080`
    /// is `api.example.com`), or the default's; a request without a host (an
    /// HTTP/1.0 one may have none) goes to the default.
    pub fn lookup(&self, host: Option<&RequestHost>) -> Option<usize> {
        let Some(host) = host else {
            return self.default;
        };
        let name = host.name.as_str();
        if let Some(&index) = self.exact.get(name) {
            return Some(index);
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|&(_, index)| index)
            .or(self.default)
    }
}

/// A request's host, checked: `NAME[:PORT]` or `[IPv6][:PORT]` (RFC 3986
/// §3.2.2, without user information or percent-encoding), a name being
/// letters, digits and `-._~` in non-empty labels (a final dot allowed).
/// Anything else (a `/`, an `@`, a space) could make a wildcard rule match a
/// name it does not cover, or reach the backend as a Host it would misread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHost {
    /// As the request gave it, port included: what the backend is sent.
    text: String,
    /// What rules are matched against: lower case, without the port or a
    /// final dot (an IPv6 literal without its brackets).
    name: String,
}

impl RequestHost {
    /// `text` checked, or `None` if it is not a host with at most a port.
    pub fn parse(text: &str) -> Option<RequestHost> {
        let (name, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (literal, after) = rest.split_once(']')?;
                literal.parse::<std::net::Ipv6Addr>().ok()?;
                let port = match after {
                    "" => None,
                    after => Some(after.strip_prefix(':')?),
                };
                (literal, port)
            }
            None => {
                let (name, port) = match text.rsplit_once(':') {
                    Some((name, port)) => (name, Some(port)),
                    None => (text, None),
                };
                let name = name.strip_suffix('.').unwrap_or(name);
                if !labels_of(name, b"-_~") {
                    return None;
                }
                (name, port)
            }
        };
        if port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err())
        {
            return None;
        }
        Some(RequestHost {
            text: text.to_string(),
            name: name.to_ascii_lowercase(),
        })
    }

    /// The host as the request gave it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// True if `name` is non-empty dot-separated labels, each non-empty and of
/// ASCII letters, digits and the bytes of `extra`.
fn labels_of(name: &str, extra: &[u8]) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The target of a Host header's value.
    fn to(routes: &Routes, host: &str) -> Option<usize> {
        routes.lookup(Some(&RequestHost::parse(host).unwrap()))
    }

    fn routes(rules: &[&str], default: Option<&str>) -> Routes {
        let rules = rules.iter().map(|r| r.parse().unwrap()).collect();
        Routes::new(rules, default.map(|d| Pattern::parse(d).unwrap())).unwrap()
    }

    #[test]
    fn the_seeds_rules_send_each_host_to_its_range() {
        let r = routes(
            &["stable=http@0.0.x", "unstable=http@0.1.x"],
            Some("http@0.0.x"),
        );
        assert_eq!(to(&r, "stable"), Some(0));
        assert_eq!(to(&r, "UNSTABLE:5000"), Some(1));
        assert_eq!(to(&r, "other"), Some(2), "the default");
        assert_eq!(r.lookup(None), Some(2), "no host: the default");
        assert_eq!(r.targets()[1].to_string(), "http@0.1.x");
        assert_eq!(to(&routes(&["stable=http"], None), "other"), None);
    }

    #[test]
    fn wildcards_match_names_below_their_domain_longest_first() {
        let r = routes(
            &[
                "*.example.com=web",
                "*.api.example.com=api",
                "example.com=home",
            ],
            None,
        );
        assert_eq!(to(&r, "www.example.com"), Some(0));
        assert_eq!(to(&r, "v1.api.example.com"), Some(1));
        assert_eq!(to(&r, "example.com"), Some(2), "exact, not the wildcard");
        assert_eq!(to(&r, "badexample.com"), None);
        assert_eq!(to(&r, "[::1]:80"), None);
    }

    #[test]
    fn a_host_is_a_name_or_ip_literal_with_at_most_a_port() {
        for good in [
            "stable",
            "Api.Example.com:8080",
            "www.example.com.",
            "my_service-1.local",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:5000",
        ] {
            let host = RequestHost::parse(good).unwrap();
            assert_eq!(host.as_str(), good);
        }
        assert_eq!(
            RequestHost::parse("Api.Example.COM.:80").unwrap().name,
            "api.example.com"
        );
        assert_eq!(RequestHost::parse("[::1]:80").unwrap().name, "::1");
        for bad in [
            "",
            "evil.com/.example.com",
            "user@stable",
            "stable:",
            "stable:99999",
            "stable:+80",
            "a..example.com",
            ".example.com",
            "exa mple.com",
            "[::1",
            "[::1]x",
            "[example.com]",
            "stable:80:80",
        ] {
            assert_eq!(RequestHost::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        assert!(
            "stable"
                .parse::<Rule>()
                .unwrap_err()
                .contains("expected HOST=ROLE")
        );
        assert!(
            "a b=http"
                .parse::<Rule>()
                .unwrap_err()
                .contains("not a host name")
        );
        assert!("a=http@notarange!".parse::<Rule>().is_err());
        let twice = vec!["a=x".parse().unwrap(), "A=y".parse().unwrap()];
        assert!(Routes::new(twice, None).unwrap_err().contains("two rules"));
    }

    #[test]
    fn a_routes_file_reads_as_the_flags_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(
            &path,
            "default = \"http@0.0.x\"\n[routes]\nstable = \"http@0.0.x\"\n\"*.dev.example.com\" = \"http@0.1.x\"\n",
        )
        .unwrap();
        let r = Routes::load(&path).unwrap();
        assert_eq!(
            to(&r, "a.dev.example.com").map(|i| r.targets()[i].to_string()),
            Some("http@0.1.x".into())
        );
        std::fs::write(&path, "[routes]\nstable = 5\n").unwrap();
        assert!(
            Routes::load(&path)
                .unwrap_err()
                .starts_with(&path.display().to_string())
        );
    }
}
