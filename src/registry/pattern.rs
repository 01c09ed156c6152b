//! Query patterns: `name`, `name@RANGE` (npm semver rules), plus metadata equality.

use crate::registry::npm_semver::{Range, SemverError, Version};
use crate::registry::record::{Record, split_role};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// What a query looks for.
///
/// `web` matches every record of role `web`, whatever its version (or none);
/// `web@1.2.x` matches records of role `web` whose version satisfies the npm range
/// `1.2.x`; a record without a valid version never satisfies a range. An empty
/// pattern matches everything.
#[derive(Debug, Clone, Default)]
pub struct Pattern {
    text: String,
    role: Option<String>,
    range: Option<Range>,
    equal: Vec<(String, Value)>,
}

impl Pattern {
    /// The pattern that matches every record.
    pub fn all() -> Self {
        Pattern::default()
    }

    /// Every record of `role`, whatever its version.
    pub fn all_of_role(role: &str) -> Self {
        Pattern {
            text: role.to_string(),
            role: Some(role.to_string()),
            ..Pattern::default()
        }
    }

    /// Parses `name` or `name@range`.
    pub fn parse(text: &str) -> Result<Self, SemverError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Pattern::all());
        }
        let (role, range) = split_role(text);
        let range = range.map(Range::from_str).transpose()?;
        Ok(Pattern {
            text: text.to_string(),
            role: Some(role.to_string()),
            range,
            equal: Vec::new(),
        })
    }

    /// Also requires metadata `key` to equal `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.equal.push((key.into(), value.into()));
        self
    }

    /// The role this pattern is restricted to, if any.
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref()
    }

    /// Whether `record` matches, parsing its version as needed.
    pub fn matches(&self, record: &Record) -> bool {
        let version = match &self.range {
            Some(_) => record.version().and_then(|v| v.parse().ok()),
            None => None,
        };
        self.matches_parsed(record, version.as_ref())
    }

    /// Whether `record` matches, given its version already parsed (for indexes that
    /// parse each record's version once).
    pub fn matches_parsed(&self, record: &Record, version: Option<&Version>) -> bool {
        self.matches_fields(record.role(), version) && self.matches_meta(record)
    }

    /// Whether a record's role and parsed version match the pattern's name and
    /// range (without its `key=value` conditions).
    pub fn matches_fields(&self, role: Option<&str>, version: Option<&Version>) -> bool {
        if let Some(want) = &self.role
            && role != Some(want.as_str())
        {
            return false;
        }
        match (&self.range, version) {
            (None, _) => true,
            (Some(range), Some(v)) => range.satisfies(v),
            (Some(_), None) => false,
        }
    }

    /// Whether a record satisfies the pattern's `key=value` conditions.
    pub fn matches_meta(&self, record: &Record) -> bool {
        self.equal
            .iter()
            .all(|(key, value)| record.get(key) == Some(value))
    }
}

impl FromStr for Pattern {
    type Err = SemverError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::wire::Meta;
    use serde_json::json;

    fn rec(role: &str, version: Option<&str>) -> Record {
        let mut m = Meta::new();
        m.insert("role".into(), json!(role));
        if let Some(v) = version {
            m.insert("version".into(), json!(v));
        }
        m.insert("zone".into(), json!("eu"));
        Record::new("ID", m)
    }

    fn matches(p: &str, r: &Record) -> bool {
        Pattern::parse(p).map(|p| p.matches(r)).unwrap_or(false)
    }

    #[test]
    fn a_bare_name_matches_every_version_and_none() {
        assert!(matches("web", &rec("web", Some("1.2.3"))));
        assert!(matches("web", &rec("web", None)));
        assert!(!matches("web", &rec("db", Some("1.2.3"))));
        assert!(matches("", &rec("db", None)));
    }

    #[test]
    fn a_version_is_an_npm_range() {
        let r = rec("web", Some("1.2.3"));
        assert!(matches("web@1.2.3", &r));
        assert!(!matches("web@1.2.4", &r));
        // As the Node package reads it: the range ends at a second `@`.
        assert!(matches("web@1.x@anything", &r));
        assert!(matches("web@1.2.x", &r));
        assert!(matches("web@^1.0.0", &r));
        assert!(!matches("web@1.2.2", &r), "a bare version is exact, not ^");
    }

    #[test]
    fn a_record_without_a_version_never_satisfies_a_range() {
        assert!(!matches("web@*", &rec("web", None)));
        assert!(!matches("web@*", &rec("web", Some("not-semver"))));
    }

    #[test]
    fn metadata_equality_narrows() {
        let r = rec("web", Some("1.0.0"));
        let p = Pattern::all().with("zone", "eu");
        assert!(p.matches(&r));
        assert!(!Pattern::all().with("zone", "us").matches(&r));
    }

    #[test]
    fn an_invalid_range_is_an_error() {
        assert!(Pattern::parse("web@>=banana").is_err());
    }
}
