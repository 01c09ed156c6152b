//! Which service a request goes to: rules from a Host name (exact, or
//! `*.domain` for every name below a domain) to a `role@range`, and a default.
//! Host names are compared without case and without a port.

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
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
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

    /// The index of the target for a Host header's value (`Host: Api.Example.com:8080`
    /// is `api.example.com`), or the default's.
    pub fn lookup(&self, host: &str) -> Option<usize> {
        let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        if let Some(&index) = self.exact.get(&host) {
            return Some(index);
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|&(_, index)| index)
            .or(self.default)
    }
}

/// `host:port` and `[v6]:port` without the port.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(addr, _)| addr);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(r.lookup("stable"), Some(0));
        assert_eq!(r.lookup("UNSTABLE:5000"), Some(1));
        assert_eq!(r.lookup("other"), Some(2), "the default");
        assert_eq!(r.targets()[1].to_string(), "http@0.1.x");
        assert_eq!(routes(&["stable=http"], None).lookup("other"), None);
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
        assert_eq!(r.lookup("www.example.com"), Some(0));
        assert_eq!(r.lookup("v1.api.example.com"), Some(1));
        assert_eq!(r.lookup("example.com"), Some(2), "exact, not the wildcard");
        assert_eq!(r.lookup("badexample.com"), None);
        assert_eq!(r.lookup("[::1]:80"), None);
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
            r.lookup("a.dev.example.com")
                .map(|i| r.targets()[i].to_string()),
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
