//! npm's semantic-versioning rules: versions, ranges and `satisfies`.
//!
//! This module owns version parsing and range matching for seaport patterns such
//! as `web@1.2.x`. It exists because Rust's `semver` crate follows Cargo's rules,
//! where a bare `1.2.3` means `^1.2.3`, while seaport users write npm ranges, where
//! a bare `1.2.3` is an exact match. The behaviour mirrors npm's `semver` package
//! (version 7.8.6, default options: not loose, prereleases excluded), including
//! its quirks, because registries written in JavaScript answer the same queries.
//!
//! Ranges are parsed the way npm parses them: a pipeline of text rewrites (strip
//! build metadata, expand hyphen ranges, glue operators to their versions, expand
//! `^`, `~` and x-ranges, drop stars) that ends in primitive comparators such as
//! `>=1.2.3` and `<2.0.0-0`. Keeping npm's steps, rather than a grammar of our
//! own, is what makes odd inputs behave the same in both implementations.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// npm rejects version strings longer than this (counted in UTF-16 units).
const MAX_LENGTH: usize = 256;
/// npm's regexes cap identifier runs at this length to avoid catastrophic backtracking.
const MAX_SAFE_BUILD_LENGTH: usize = MAX_LENGTH - 6;
/// npm stores numbers as JavaScript doubles, so bigger version numbers are invalid.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// One dot-separated prerelease identifier, ordered as semver 2.0 says:
/// numeric identifiers sort below alphanumeric ones.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identifier {
    /// Digits only (no leading zero), compared numerically.
    Numeric(u64),
    /// Letters, digits and hyphens with at least one non-digit, compared as ASCII.
    AlphaNumeric(String),
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identifier::Numeric(n) => write!(f, "{n}"),
            Identifier::AlphaNumeric(s) => f.write_str(s),
        }
    }
}

/// A semantic version such as `1.2.3-beta.1+build.5`.
///
/// Ordering and equality ignore build metadata, as npm's do.
#[derive(Debug, Clone)]
pub struct Version {
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Patch number.
    pub patch: u64,
    /// Prerelease identifiers (after `-`); empty for a release.
    pub pre: Vec<Identifier>,
    /// Build metadata identifiers (after `+`); never affect ordering.
    pub build: Vec<String>,
}

impl Version {
    fn triple(&self) -> (u64, u64, u64) {
        (self.major, self.minor, self.patch)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.triple().cmp(&other.triple()).then_with(|| {
            // A release sorts after all of its prereleases.
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl Hash for Version {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Build metadata is left out to stay consistent with `Eq`.
        self.triple().hash(state);
        self.pre.hash(state);
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        for (i, id) in self.pre.iter().enumerate() {
            write!(f, "{}{id}", if i == 0 { '-' } else { '.' })?;
        }
        if !self.build.is_empty() {
            write!(f, "+{}", self.build.join("."))?;
        }
        Ok(())
    }
}

impl FromStr for Version {
    type Err = SemverError;

    /// npm's strict parse: surrounding whitespace is trimmed and one leading `v`
    /// is allowed (`=1.2.3` is rejected, as npm rejects it outside ranges).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_version(text).map_err(|reason| SemverError::new(Subject::Version, text, reason))
    }
}

/// Why something failed to parse, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemverError {
    subject: Subject,
    input: String,
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Version,
    Range,
}

impl SemverError {
    fn new(subject: Subject, input: &str, reason: String) -> Self {
        SemverError {
            subject,
            input: input.to_string(),
            reason,
        }
    }
}

impl fmt::Display for SemverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.subject {
            Subject::Version => "version",
            Subject::Range => "version range",
        };
        write!(f, "invalid {what} {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for SemverError {}

/// npm's whitespace: JavaScript's `\s`, which is Rust's set minus U+0085 plus U+FEFF.
fn is_js_space(c: char) -> bool {
    c == '\u{feff}' || (c.is_whitespace() && c != '\u{85}')
}

fn parse_version(text: &str) -> Result<Version, String> {
    if text.encode_utf16().count() > MAX_LENGTH {
        return Err(format!("longer than {MAX_LENGTH} characters"));
    }
    let bad = || "not a valid semantic version".to_string();
    let s = text.trim_matches(is_js_space);
    let s = s.strip_prefix('v').unwrap_or(s);
    // The main version has no `-` or `+`, and the prerelease has no `+`.
    let (rest, build) = s.split_once('+').map_or((s, None), |(r, b)| (r, Some(b)));
    let (core, pre) = rest
        .split_once('-')
        .map_or((rest, None), |(c, p)| (c, Some(p)));
    let numbers: Vec<&str> = core.split('.').collect();
    let [major, minor, patch] = numbers[..] else {
        return Err(bad());
    };
    let pre = match pre {
        Some(p) => p.split('.').map(parse_identifier).collect::<Option<_>>(),
        None => Some(Vec::new()),
    };
    let build = match build {
        Some(b) => b
            .split('.')
            .map(parse_build_identifier)
            .collect::<Option<_>>(),
        None => Some(Vec::new()),
    };
    let (Some(pre), Some(build)) = (pre, build) else {
        return Err(bad());
    };
    Ok(Version {
        major: parse_number(major, "major")?,
        minor: parse_number(minor, "minor")?,
        patch: parse_number(patch, "patch")?,
        pre,
        build,
    })
}

/// Digits without a leading zero (unless the number is `0` itself).
fn is_numeric_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

fn is_identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

fn parse_number(s: &str, which: &str) -> Result<u64, String> {
    if !is_numeric_identifier(s) {
        return Err("not a valid semantic version".to_string());
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_SAFE_INTEGER => Ok(n),
        _ => Err(format!("{which} version number is too large")),
    }
}

fn parse_identifier(s: &str) -> Option<Identifier> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        // Also rejects numbers that overflow u64 (npm would accept them).
        return is_numeric_identifier(s)
            .then(|| s.parse().ok().map(Identifier::Numeric))
            .flatten();
    }
    s.bytes()
        .all(is_identifier_byte)
        .then(|| Identifier::AlphaNumeric(s.to_string()))
}

fn parse_build_identifier(s: &str) -> Option<String> {
    (!s.is_empty() && s.bytes().all(is_identifier_byte)).then(|| s.to_string())
}

/// The primitive operators a range boils down to (`=` and no operator are `Eq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// One primitive comparator; `Any` is what npm writes as the empty comparator.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Comparator {
    Any,
    Cmp(Op, Version),
}

impl Comparator {
    fn test(&self, v: &Version) -> bool {
        let Comparator::Cmp(op, bound) = self else {
            return true;
        };
        let ord = v.cmp(bound);
        match op {
            Op::Eq => ord == Ordering::Equal,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }

    /// npm's "null set" `<0.0.0-0`, which nothing satisfies.
    fn is_null_set(&self) -> bool {
        match self {
            Comparator::Cmp(Op::Lt, v) => {
                v.triple() == (0, 0, 0) && v.pre == [Identifier::Numeric(0)]
            }
            _ => false,
        }
    }

    /// The prerelease version this comparator explicitly names, if any.
    fn prerelease_bound(&self) -> Option<&Version> {
        match self {
            Comparator::Cmp(_, v) if !v.pre.is_empty() => Some(v),
            _ => None,
        }
    }
}

/// An npm version range: comparator sets joined by `||`, each set an intersection.
#[derive(Debug, Clone)]
pub struct Range {
    raw: String,
    sets: Vec<Vec<Comparator>>,
}

impl Range {
    /// Whether `v` satisfies the range, with npm's prerelease rule: a prerelease
    /// only matches a set that names a prerelease of the same `major.minor.patch`.
    pub fn satisfies(&self, v: &Version) -> bool {
        self.sets.iter().any(|set| test_set(set, v))
    }
}

fn test_set(set: &[Comparator], v: &Version) -> bool {
    if !set.iter().all(|c| c.test(v)) {
        return false;
    }
    // `^1.2.3-beta.2` should admit `1.2.3-beta.4` but not `1.2.4-alpha`, which
    // the comparators alone would let through.
    v.pre.is_empty()
        || set
            .iter()
            .filter_map(Comparator::prerelease_bound)
            .any(|bound| bound.triple() == v.triple())
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for Range {
    type Err = SemverError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| SemverError::new(Subject::Range, text, reason);
        // npm collapses whitespace first so every later step sees single spaces.
        let raw = text
            .split(is_js_space)
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let mut sets = Vec::new();
        for part in raw.split("||") {
            sets.push(parse_set(part.trim_matches(' ')).map_err(error)?);
        }
        drop_redundant_sets(&mut sets);
        Ok(Range {
            raw: text.to_string(),
            sets,
        })
    }
}

/// npm's post-processing of the `||` alternatives. Dropping null sets is harmless,
/// but collapsing to a lone `*` set is observable: `* || 1.2.3-beta` then rejects
/// `1.2.3-beta`, because `*` never admits prereleases.
fn drop_redundant_sets(sets: &mut Vec<Vec<Comparator>>) {
    if sets.len() < 2 {
        return;
    }
    let first = sets[0].clone();
    sets.retain(|set| !set.first().is_some_and(Comparator::is_null_set));
    if sets.is_empty() {
        sets.push(first);
    } else if let Some(any) = sets.iter().find(|set| set.as_slice() == [Comparator::Any]) {
        *sets = vec![any.clone()];
    }
}

/// One `||` alternative, run through npm's rewriting steps in npm's order.
fn parse_set(part: &str) -> Result<Vec<Comparator>, String> {
    let text = strip_build_metadata(part);
    let text = expand_hyphen(&text)?.unwrap_or(text);
    let text = glue_comparator_operators(&text);
    let text = glue_prefix_operator(&text, '~');
    let text = glue_prefix_operator(&text, '^');
    let words = text
        .split(' ')
        .map(desugar)
        .collect::<Result<Vec<_>, _>>()?;
    // npm treats `>=0.0.0` as `*`, and parses every comparator (so any bad one is an
    // error) before looking for the null set.
    let comparators = words
        .join(" ")
        .split(' ')
        .map(|word| parse_comparator(if word == ">=0.0.0" { "" } else { word }))
        .collect::<Result<Vec<_>, _>>()?;
    let mut set = Vec::new();
    for comparator in comparators {
        if comparator.is_null_set() {
            return Ok(vec![comparator]);
        }
        if !set.contains(&comparator) {
            set.push(comparator);
        }
    }
    if set.len() > 1 {
        set.retain(|c| *c != Comparator::Any);
    }
    Ok(set)
}

/// A primitive comparator: `^((?:<|>)?=?)(FULL VERSION)$`, or empty for "any".
fn parse_comparator(word: &str) -> Result<Comparator, String> {
    if word.is_empty() {
        return Ok(Comparator::Any);
    }
    let op_len = operator_len(word);
    let op = match &word[..op_len] {
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        _ => Op::Eq,
    };
    match parse_version(&word[op_len..]) {
        Ok(v) => Ok(Comparator::Cmp(op, v)),
        Err(_) => Err(format!("invalid comparator {word:?}")),
    }
}

/// Length of npm's greedy operator prefix `(?:<|>)?=?`.
fn operator_len(word: &str) -> usize {
    let b = word.as_bytes();
    let lt_gt = usize::from(matches!(b.first(), Some(b'<' | b'>')));
    lt_gt + usize::from(b.get(lt_gt) == Some(&b'='))
}

/// Removes every `+build.meta` run; npm does this before anything else.
fn strip_build_metadata(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i) = (0, 0);
    while i < b.len() {
        let end = build_end(b, i, usize::MAX);
        if end > i {
            out.push_str(&text[copied..i]);
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// A partial version as npm's XRANGEPLAIN captures it: `[v= ]*M(.m(.p(-pre)?(+build)?)?)?`
/// where each of M, m, p may be a number or one of `x`, `X`, `*`.
struct Partial<'a> {
    major: &'a str,
    minor: Option<&'a str>,
    patch: Option<&'a str>,
    pre: Option<&'a str>,
}

/// Whether a captured component is a wildcard (absent counts as one).
fn is_x(part: Option<&str>) -> bool {
    part.is_none_or(|p| matches!(p, "x" | "X" | "*"))
}

impl<'a> Partial<'a> {
    /// The numbers before the first wildcard; npm ignores whatever follows one
    /// in carets, tildes and hyphen ranges (`^1.x.3` is `^1`).
    fn numbers(&self) -> [Option<&'a str>; 3] {
        let mut numbers = [Some(self.major), self.minor, self.patch];
        if let Some(first_x) = numbers.iter().position(|n| is_x(*n)) {
            numbers[first_x..].fill(None);
        }
        numbers
    }
}

/// Matches the whole of `text` as a partial version, or returns `None`.
fn parse_partial(text: &str) -> Option<Partial<'_>> {
    let b = text.as_bytes();
    let mut end = b
        .iter()
        .take_while(|&&c| matches!(c, b'v' | b'=' | b' '))
        .count();
    let mut parts = [None; 3];
    for (n, slot) in parts.iter_mut().enumerate() {
        let start = match n {
            0 => end,
            _ if at(b, end) == b'.' => end + 1,
            _ => break,
        };
        let part_end = component_end(b, start);
        if part_end == start {
            break;
        }
        *slot = Some(&text[start..part_end]);
        end = part_end;
    }
    let mut pre = None;
    if parts[2].is_some() {
        let pre_end = prerelease_end(b, end, false);
        if pre_end > end {
            pre = Some(&text[end + 1..pre_end]);
        }
        end = build_end(b, pre_end, MAX_SAFE_BUILD_LENGTH);
    }
    let [major, minor, patch] = parts;
    Some(Partial {
        major: major?,
        minor,
        patch,
        pre,
    })
    .filter(|_| end == b.len())
}

/// npm's `+M + 1`; a number too big to increment makes the range invalid anyway,
/// since npm would then build a comparator beyond its largest safe integer.
fn inc(number: &str) -> Result<u64, String> {
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| format!("version number {number} is too large"))
}

/// `A - B` with either side partial: `1.2 - 2.3` is `>=1.2.0 <2.4.0-0`.
fn expand_hyphen(text: &str) -> Result<Option<String>, String> {
    // npm's regex allows one space at either end (left after stripping builds).
    let text = text.strip_prefix(' ').unwrap_or(text);
    let text = text.strip_suffix(' ').unwrap_or(text);
    let Some((from_text, to_text)) = text.split_once(" - ") else {
        return Ok(None);
    };
    let (Some(from), Some(to)) = (parse_partial(from_text), parse_partial(to_text)) else {
        return Ok(None);
    };
    let lower = match from.numbers() {
        [None, ..] => String::new(),
        [Some(major), None, _] => format!(">={major}.0.0"),
        [Some(major), Some(minor), None] => format!(">={major}.{minor}.0"),
        // npm keeps the original text here, prefix and all (`>=v1.2.3`).
        [Some(_), Some(_), Some(_)] => format!(">={from_text}"),
    };
    let upper = match (to.numbers(), to.pre) {
        ([None, ..], _) => String::new(),
        ([Some(major), None, _], _) => format!("<{}.0.0-0", inc(major)?),
        ([Some(major), Some(minor), None], _) => format!("<{major}.{}.0-0", inc(minor)?),
        ([Some(major), Some(minor), Some(patch)], Some(pre)) => {
            format!("<={major}.{minor}.{patch}-{pre}")
        }
        ([Some(_), Some(_), Some(_)], None) => format!("<={to_text}"),
    };
    Ok(Some(
        format!("{lower} {upper}").trim_matches(' ').to_string(),
    ))
}

/// npm's comparator trim: `> 1.2.3` becomes `>1.2.3`. A port of npm's
/// `trim-comparator-whitespace.js`, which reproduces a global regex replace, so
/// the scan skips whole versions exactly where that regex would.
fn glue_comparator_operators(text: &str) -> String {
    let b = text.as_bytes();
    let is_prefix = |c: u8| matches!(c, b'v' | b'=' | b' ');
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut cursor) = (0, 0);
    while cursor < b.len() {
        let start = cursor;
        if matches!(b[cursor], b'<' | b'>') {
            cursor += 1;
        } else if !is_prefix(b[cursor]) && !is_component_start(b[cursor]) {
            cursor += 1;
            continue;
        }
        while cursor < b.len() && is_prefix(b[cursor]) {
            cursor += 1;
        }
        if !is_component_start(at(b, cursor)) {
            continue;
        }
        // The space to drop sits right after an optional space and operator.
        let mut pos = start + usize::from(at(b, start) == b' ');
        pos += usize::from(matches!(at(b, pos), b'<' | b'>'));
        pos += usize::from(at(b, pos) == b'=');
        if at(b, pos) == b' ' {
            out.push_str(&text[copied..pos]);
            copied = pos + 1;
        }
        cursor = version_end(b, cursor);
    }
    out.push_str(&text[copied..]);
    out
}

/// npm's tilde and caret trims: `~ 1`, `~> 1` and `^ 1` become `~1`, `~1`, `^1`.
fn glue_prefix_operator(text: &str, op: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(op) {
        out.push_str(&rest[..=i]);
        let after = &rest[i + 1..];
        rest = match after.strip_prefix(if op == '~' { "> " } else { " " }) {
            Some(r) => r,
            None => after.strip_prefix(' ').unwrap_or(after),
        };
    }
    out.push_str(rest);
    out
}

/// Rewrites one space-free word into primitive comparators, space-separated.
fn desugar(word: &str) -> Result<String, String> {
    let expanded = match word.as_bytes().first() {
        Some(b'^') => expand_caret(&word[1..])?,
        Some(b'~') => expand_tilde(word.strip_prefix("~>").unwrap_or(&word[1..]))?,
        _ => expand_xrange(word)?,
    };
    Ok(remove_first_star(expanded.as_deref().unwrap_or(word)))
}

/// `^1.2.3` is `>=1.2.3 <2.0.0-0`; below 1.0.0 the first non-zero part is fixed.
fn expand_caret(text: &str) -> Result<Option<String>, String> {
    let Some(v) = parse_partial(text) else {
        return Ok(None);
    };
    Ok(Some(match v.numbers() {
        [None, ..] => String::new(),
        [Some(major), None, _] => format!(">={major}.0.0 <{}.0.0-0", inc(major)?),
        [Some("0"), Some(minor), None] => format!(">=0.{minor}.0 <0.{}.0-0", inc(minor)?),
        [Some(major), Some(minor), None] => format!(">={major}.{minor}.0 <{}.0.0-0", inc(major)?),
        [Some(major), Some(minor), Some(patch)] => {
            let upper = match (major, minor) {
                ("0", "0") => format!("<0.0.{}-0", inc(patch)?),
                ("0", _) => format!("<0.{}.0-0", inc(minor)?),
                _ => format!("<{}.0.0-0", inc(major)?),
            };
            format!(
                ">={major}.{minor}.{patch}{} {upper}",
                prerelease_suffix(v.pre)
            )
        }
    }))
}

/// `~1.2.3` is `>=1.2.3 <1.3.0-0`; `~1` is `>=1.0.0 <2.0.0-0`.
fn expand_tilde(text: &str) -> Result<Option<String>, String> {
    let Some(v) = parse_partial(text) else {
        return Ok(None);
    };
    Ok(Some(match v.numbers() {
        [None, ..] => String::new(),
        [Some(major), None, _] => format!(">={major}.0.0 <{}.0.0-0", inc(major)?),
        [Some(major), Some(minor), None] => {
            format!(">={major}.{minor}.0 <{major}.{}.0-0", inc(minor)?)
        }
        [Some(major), Some(minor), Some(patch)] => format!(
            ">={major}.{minor}.{patch}{} <{major}.{}.0-0",
            prerelease_suffix(v.pre),
            inc(minor)?
        ),
    }))
}

fn prerelease_suffix(pre: Option<&str>) -> String {
    pre.map(|pre| format!("-{pre}")).unwrap_or_default()
}

/// X-ranges with an optional operator: `1.x`, `1.2`, `*`, `>1.2`, `<=1.x`.
/// Words without wildcards come back unchanged (`None`).
fn expand_xrange(word: &str) -> Result<Option<String>, String> {
    let op_len = operator_len(word);
    let Some(v) = parse_partial(&word[op_len..]) else {
        return Ok(None);
    };
    // npm leaves a wildcard followed by a number (`1.x.3`, `x.1`) unchanged, i.e. invalid.
    if (is_x(Some(v.major)) && !is_x(v.minor))
        || (is_x(v.minor) && v.patch.is_some() && !is_x(v.patch))
    {
        return Ok(None);
    }
    let op = match &word[..op_len] {
        "=" => "",
        op => op,
    };
    Ok(Some(match (op, v.numbers()) {
        (_, [_, _, Some(_)]) => return Ok(None),
        // Nothing is below or above every version; anything else with `*` is any.
        (">" | "<", [None, ..]) => "<0.0.0-0".to_string(),
        (_, [None, ..]) => "*".to_string(),
        // `>1` means `>=2.0.0` and `<=1` means `<2.0.0-0`; likewise for minors.
        (">", [Some(major), None, _]) => format!(">={}.0.0", inc(major)?),
        (">", [Some(major), Some(minor), _]) => format!(">={major}.{}.0", inc(minor)?),
        ("<=", [Some(major), None, _]) => format!("<{}.0.0-0", inc(major)?),
        ("<=", [Some(major), Some(minor), _]) => format!("<{major}.{}.0-0", inc(minor)?),
        ("<", [Some(major), minor, _]) => format!("<{major}.{}.0-0", minor.unwrap_or("0")),
        (">=", [Some(major), minor, _]) => format!(">={major}.{}.0", minor.unwrap_or("0")),
        (_, [Some(major), None, _]) => format!(">={major}.0.0 <{}.0.0-0", inc(major)?),
        (_, [Some(major), Some(minor), _]) => {
            format!(">={major}.{minor}.0 <{major}.{}.0-0", inc(minor)?)
        }
    }))
}

/// npm's `replaceStars`: drops the first `*` with any operator right before it,
/// so `*` and `>=*` become "any" (and, quirkily, `1.2.3*` becomes `1.2.3`).
fn remove_first_star(text: &str) -> String {
    let text = text.trim_matches(' ');
    let Some(star) = text.find('*') else {
        return text.to_string();
    };
    let b = text.as_bytes();
    let mut start = star;
    if start > 0 && b[start - 1] == b' ' {
        start -= 1;
    }
    if start > 0 && b[start - 1] == b'=' {
        start -= 1;
    }
    if start > 0 && matches!(b[start - 1], b'<' | b'>') {
        start -= 1;
    }
    format!("{}{}", &text[..start], &text[star + 1..])
}

// Scanners mirroring the pieces of npm's regexes. Each takes the text as bytes
// and a start index, and returns where the match ends (the start when nothing
// matches). Indexes past the end read as byte 0, which no class contains.

fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn is_component_start(c: u8) -> bool {
    c.is_ascii_digit() || matches!(c, b'x' | b'X' | b'*')
}

fn digits_end(b: &[u8], start: usize, limit: usize) -> usize {
    start
        + b[start.min(b.len())..]
            .iter()
            .take(limit)
            .take_while(|c| c.is_ascii_digit())
            .count()
}

/// Strict `0|[1-9]\d{0,256}`, or loose `\d{1,256}`.
fn number_end(b: &[u8], start: usize, loose: bool) -> usize {
    if !loose && at(b, start) == b'0' {
        return start + 1;
    }
    digits_end(b, start, if loose { MAX_LENGTH } else { MAX_LENGTH + 1 })
}

/// One prerelease identifier; the alphanumeric form is tried first, as in npm.
fn pre_identifier_end(b: &[u8], start: usize, loose: bool) -> usize {
    let digits = digits_end(b, start, MAX_LENGTH);
    if at(b, digits).is_ascii_alphabetic() || at(b, digits) == b'-' {
        let rest = &b[digits + 1..];
        return digits
            + 1
            + rest
                .iter()
                .take(MAX_SAFE_BUILD_LENGTH)
                .take_while(|&&c| is_identifier_byte(c))
                .count();
    }
    number_end(b, start, loose)
}

/// `-id(.id)*`; loose mode also allows the hyphen to be missing.
fn prerelease_end(b: &[u8], start: usize, loose: bool) -> usize {
    let hyphen = at(b, start) == b'-';
    if !loose && !hyphen {
        return start;
    }
    let id_start = start + usize::from(hyphen);
    let mut end = pre_identifier_end(b, id_start, loose);
    if end == id_start {
        if !loose || !hyphen {
            return start;
        }
        // A lone hyphen is itself an alphanumeric identifier.
        end = pre_identifier_end(b, start, loose);
    }
    dotted_end(b, end, |i| pre_identifier_end(b, i, loose))
}

/// `+id(.id)*`, each identifier capped at `limit` characters.
fn build_end(b: &[u8], start: usize, limit: usize) -> usize {
    let id_end = |i: usize| {
        i + b[i.min(b.len())..]
            .iter()
            .take(limit)
            .take_while(|&&c| is_identifier_byte(c))
            .count()
    };
    if at(b, start) != b'+' || id_end(start + 1) == start + 1 {
        return start;
    }
    dotted_end(b, id_end(start + 1), id_end)
}

/// Extends `end` over `.identifier` repetitions.
fn dotted_end(b: &[u8], mut end: usize, id_end: impl Fn(usize) -> usize) -> usize {
    while at(b, end) == b'.' {
        let next = id_end(end + 1);
        if next == end + 1 {
            break;
        }
        end = next;
    }
    end
}

/// One partial-version component: a strict number or a single wildcard.
fn component_end(b: &[u8], start: usize) -> usize {
    match at(b, start) {
        c if c.is_ascii_digit() => number_end(b, start, false),
        c if is_component_start(c) => start + 1,
        _ => start,
    }
}

/// Where a version-like run ends: a loose full version, else a partial one.
fn version_end(b: &[u8], start: usize) -> usize {
    let mut end = start;
    for n in 0..3 {
        let next = number_end(b, end, true);
        if next == end || (n < 2 && at(b, next) != b'.') {
            return partial_end(b, start);
        }
        end = next + usize::from(n < 2);
    }
    build_end(b, prerelease_end(b, end, true), MAX_SAFE_BUILD_LENGTH)
}

fn partial_end(b: &[u8], start: usize) -> usize {
    let mut end = component_end(b, start);
    for _ in 0..2 {
        if at(b, end) != b'.' || component_end(b, end + 1) == end + 1 {
            return end;
        }
        end = component_end(b, end + 1);
    }
    build_end(b, prerelease_end(b, end, false), MAX_SAFE_BUILD_LENGTH)
}

/// npm's `satisfies(version, range)`: false when either fails to parse.
pub fn satisfies(version: &str, range: &str) -> bool {
    match (version.parse::<Version>(), range.parse::<Range>()) {
        (Ok(v), Ok(r)) => r.satisfies(&v),
        _ => false,
    }
}
