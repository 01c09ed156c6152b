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
        self.triple()
            .cmp(&other.triple())
            // A release sorts after all of its prereleases.
            .then_with(|| self.pre.is_empty().cmp(&other.pre.is_empty()))
            .then_with(|| self.pre.cmp(&other.pre))
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
        parse_version(text).map_err(|reason| SemverError::new("version", text, reason))
    }
}

/// Why something failed to parse, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemverError {
    what: &'static str,
    input: String,
    reason: String,
}

impl SemverError {
    fn new(what: &'static str, input: &str, reason: String) -> Self {
        let input = input.to_string();
        SemverError {
            what,
            input,
            reason,
        }
    }
}

impl fmt::Display for SemverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.what, self.input, self.reason)
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
    let s = text.trim_matches(is_js_space);
    let s = s.strip_prefix('v').unwrap_or(s);
    // The main version has no `-` or `+`, and the prerelease has no `+`.
    let (rest, build) = split_off(s, '+');
    let (core, pre) = split_off(rest, '-');
    let numbers: Vec<&str> = core.split('.').collect();
    let pre = pre.map_or(Some(Vec::new()), |p| {
        p.split('.').map(parse_identifier).collect()
    });
    let build = build.map_or(Some(Vec::new()), |b| {
        b.split('.').map(parse_build_identifier).collect()
    });
    let (&[major, minor, patch], Some(pre), Some(build)) = (&numbers[..], pre, build) else {
        return Err(NOT_A_VERSION.to_string());
    };
    Ok(Version {
        major: parse_number(major, "major")?,
        minor: parse_number(minor, "minor")?,
        patch: parse_number(patch, "patch")?,
        pre,
        build,
    })
}

const NOT_A_VERSION: &str = "not a valid semantic version";

/// Splits `s` at the first `sep`, if any.
fn split_off(s: &str, sep: char) -> (&str, Option<&str>) {
    s.split_once(sep).map_or((s, None), |(a, b)| (a, Some(b)))
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
        return Err(NOT_A_VERSION.to_string());
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
            Op::Eq => ord.is_eq(),
            Op::Lt => ord.is_lt(),
            Op::Le => ord.is_le(),
            Op::Gt => ord.is_gt(),
            Op::Ge => ord.is_ge(),
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
        let error = |reason| SemverError::new("version range", text, reason);
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
    if let Some(null) = comparators.iter().find(|c| c.is_null_set()) {
        return Ok(vec![null.clone()]);
    }
    // `*` is dropped when anything else is present. (npm also drops duplicates,
    // which cannot change what matches; skipping that keeps parsing linear.)
    let mut set: Vec<_> = comparators
        .into_iter()
        .filter(|c| *c != Comparator::Any)
        .collect();
    if set.is_empty() {
        set.push(Comparator::Any);
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
    let prefix = b
        .iter()
        .take_while(|&&c| matches!(c, b'v' | b'=' | b' '))
        .count();
    let (parts, pre, end) = scan_partial(b, prefix);
    if end != b.len() {
        return None;
    }
    let slice = |span: Option<Span>| span.map(|(from, to)| &text[from..to]);
    Some(Partial {
        major: slice(parts[0])?,
        minor: slice(parts[1]),
        patch: slice(parts[2]),
        pre: slice(pre),
    })
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
    // Walk back over `(<|>)?=?\s?`, the part of the match before the star.
    let mut start = star;
    for allowed in [" ", "=", "<>"] {
        if start > 0 && allowed.as_bytes().contains(&text.as_bytes()[start - 1]) {
            start -= 1;
        }
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

/// The end of a run of at most `limit` bytes from `start` that satisfy `class`.
fn run_end(b: &[u8], start: usize, limit: usize, class: fn(u8) -> bool) -> usize {
    let run = b.get(start..).unwrap_or_default();
    start + run.iter().take(limit).take_while(|&&c| class(c)).count()
}

fn digits_end(b: &[u8], start: usize, limit: usize) -> usize {
    run_end(b, start, limit, |c| c.is_ascii_digit())
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
        return run_end(b, digits + 1, MAX_SAFE_BUILD_LENGTH, is_identifier_byte);
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
    let id_end = |i| run_end(b, i, limit, is_identifier_byte);
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
            return scan_partial(b, start).2;
        }
        end = next + usize::from(n < 2);
    }
    build_end(b, prerelease_end(b, end, true), MAX_SAFE_BUILD_LENGTH)
}

/// A byte range `(start, end)` within the scanned text.
type Span = (usize, usize);

/// npm's XRANGEPLAIN after its prefix: up to three components, then (only after
/// the third) a prerelease and build. Returns the component and prerelease spans
/// and where the match ends.
fn scan_partial(b: &[u8], start: usize) -> ([Option<Span>; 3], Option<Span>, usize) {
    let mut parts = [None; 3];
    let mut end = start;
    for (n, slot) in parts.iter_mut().enumerate() {
        let from = match n {
            0 => end,
            _ if at(b, end) == b'.' => end + 1,
            _ => break,
        };
        let to = component_end(b, from);
        if to == from {
            break;
        }
        *slot = Some((from, to));
        end = to;
    }
    let mut pre = None;
    if parts[2].is_some() {
        let pre_end = prerelease_end(b, end, false);
        pre = (pre_end > end).then_some((end + 1, pre_end));
        end = build_end(b, pre_end, MAX_SAFE_BUILD_LENGTH);
    }
    (parts, pre, end)
}

/// npm's `satisfies(version, range)`: false when either fails to parse.
pub fn satisfies(version: &str, range: &str) -> bool {
    match (version.parse::<Version>(), range.parse::<Range>()) {
        (Ok(v), Ok(r)) => r.satisfies(&v),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `(version, range, expected)` triples, reporting every failure at once.
    fn check(cases: &[(&str, &str, bool)]) {
        let failures: Vec<String> = cases
            .iter()
            .filter(|(v, r, want)| satisfies(v, r) != *want)
            .map(|(v, r, want)| format!("satisfies({v:?}, {r:?}) should be {want}"))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    fn version(text: &str) -> Version {
        text.parse().unwrap()
    }

    #[test]
    fn parses_versions_strictly() {
        let v = version(" v1.2.3-beta.4+build.5 ");
        assert_eq!((v.major, v.minor, v.patch), (1, 2, 3));
        assert_eq!(
            v.pre,
            [
                Identifier::AlphaNumeric("beta".into()),
                Identifier::Numeric(4)
            ]
        );
        assert_eq!(v.build, ["build", "5"]);
        assert_eq!(v.to_string(), "1.2.3-beta.4+build.5");
        assert_eq!(version("0.0.0").to_string(), "0.0.0");
        assert!(version("1.2.3-0a.-.--").pre.len() == 3);
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "=1.2.3",
            "V1.2.3",
            "vv1.2.3",
            "01.2.3",
            "1.02.3",
            "1.2.03",
            "1.2.3-",
            "1.2.3-01",
            "1.2.3-a..b",
            "1.2.3+",
            "1.2.3+a..b",
            "1.2.3-a_b",
            "a.b.c",
            "-1.2.3",
            "1.2.3 4",
            ">=1.2.3",
            "1.2.x",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn rejects_numbers_that_do_not_fit() {
        assert_eq!(version("9007199254740991.0.0").major, MAX_SAFE_INTEGER);
        for bad in [
            "9007199254740992.0.0",
            "1.99999999999999999999.0",
            "1.2.3-99999999999999999999",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} should not parse");
        }
        let long = format!("1.2.3-{}", "a".repeat(251));
        assert!(long.parse::<Version>().is_err());
        assert!(long[..256].parse::<Version>().is_ok());
    }

    #[test]
    fn orders_versions_as_semver_2_0_ignoring_build() {
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.1.0",
            "2.0.0",
        ];
        for pair in chain.windows(2) {
            assert!(
                version(pair[0]) < version(pair[1]),
                "{} < {}",
                pair[0],
                pair[1]
            );
        }
        assert_eq!(version("1.2.3+a"), version("1.2.3+b"));
        assert_ne!(version("1.2.3-a"), version("1.2.3"));
    }

    #[test]
    fn a_bare_version_is_an_exact_match_unlike_cargo() {
        check(&[
            ("1.2.3", "1.2.3", true),
            ("1.2.4", "1.2.3", false),
            ("1.3.0", "1.2.3", false),
            ("1.2.3", "=1.2.3", true),
            ("1.2.3", "v1.2.3", true),
            ("1.2.3+build", "1.2.3", true),
            ("1.2.3", "1.2.3+build", true),
        ]);
    }

    #[test]
    fn primitive_comparators() {
        check(&[
            ("1.2.3", ">1.2.2", true),
            ("1.2.3", ">1.2.3", false),
            ("1.2.3", ">=1.2.3", true),
            ("1.2.2", ">=1.2.3", false),
            ("1.2.2", "<1.2.3", true),
            ("1.2.3", "<1.2.3", false),
            ("1.2.3", "<=1.2.3", true),
            ("1.2.4", "<=1.2.3", false),
            ("1.2.3", ">= 1.2.3", true),
            ("1.2.3", "<  1.2.4", true),
            ("1.2.3", "\t>=1.2.3\n", true),
            ("1.2.3", ">=v1.2.3", true),
        ]);
    }

    #[test]
    fn intersections_and_unions() {
        check(&[
            ("1.5.0", ">=1.0.0 <2.0.0", true),
            ("2.0.0", ">=1.0.0 <2.0.0", false),
            ("0.9.9", ">=1.0.0   <2.0.0", false),
            ("1.5.0", ">= 1.0.0 < 2.0.0", true),
            ("2.0.0", "1.2.3 || 2.0.0", true),
            ("3.0.0", "1.2.3 || 2.0.0", false),
            ("1.5.0", "<1.0.0 || >=1.5.0 <1.6.0", true),
            ("1.2.3", "1.2.3||", true),
        ]);
    }

    #[test]
    fn x_ranges() {
        check(&[
            ("1.0.0", "", true),
            ("1.0.0", "*", true),
            ("0.0.0", "x", true),
            ("1.2.3", "X", true),
            ("1.9.9", "1.x", true),
            ("2.0.0", "1.x", false),
            ("1.2.9", "1.2.x", true),
            ("1.3.0", "1.2.x", false),
            ("1.2.0", "1.2", true),
            ("1.9.0", "1", true),
            ("2.0.0", "1", false),
            ("1.2.3", "1.*.*", true),
            ("1.2.3", "1.2.*", true),
            ("2.0.0", ">1", true),
            ("1.9.9", ">1", false),
            ("1.3.0", ">1.2", true),
            ("1.2.9", "<=1.2", true),
            ("1.3.0", "<=1.2", false),
            ("0.9.0", "<1", true),
            ("1.0.0", "<1", false),
            ("1.0.0", ">*", false),
            ("1.0.0", ">=*", true),
            ("1.0.0-beta", "*", false),
            ("1.0.0-beta", "", false),
        ]);
    }

    #[test]
    fn tilde_ranges() {
        check(&[
            ("1.2.3", "~1.2.3", true),
            ("1.2.9", "~1.2.3", true),
            ("1.3.0", "~1.2.3", false),
            ("1.2.2", "~1.2.3", false),
            ("1.2.0", "~1.2", true),
            ("1.3.0", "~1.2", false),
            ("1.9.0", "~1", true),
            ("2.0.0", "~1", false),
            ("1.2.5", "~>1.2", true),
            ("1.2.5", "~>1.2.3", true),
            ("1.2.5", "~ 1.2.3", true),
            ("1.2.5", "~> 1.2.3", true),
            ("0.0.5", "~0.0.1", true),
            ("0.1.0", "~0.0.1", false),
            ("1.2.3-beta.3", "~1.2.3-beta.2", true),
            ("1.2.4-beta", "~1.2.3-beta.2", false),
        ]);
    }

    #[test]
    fn caret_ranges() {
        check(&[
            ("1.2.3", "^1.2.3", true),
            ("1.9.9", "^1.2.3", true),
            ("2.0.0", "^1.2.3", false),
            ("1.2.2", "^1.2.3", false),
            ("0.2.3", "^0.2.3", true),
            ("0.2.9", "^0.2.3", true),
            ("0.3.0", "^0.2.3", false),
            ("0.0.3", "^0.0.3", true),
            ("0.0.4", "^0.0.3", false),
            ("1.2.0", "^1.2.x", true),
            ("1.9.0", "^1.2.x", true),
            ("2.0.0", "^1.2.x", false),
            ("0.0.9", "^0.0.x", true),
            ("0.1.0", "^0.0.x", false),
            ("0.9.0", "^0.x", true),
            ("1.0.0", "^0.x", false),
            ("1.2.3", "^ 1.2.3", true),
            ("1.2.3", "^*", true),
        ]);
    }

    #[test]
    fn prereleases_need_an_explicit_opt_in_on_the_same_tuple() {
        check(&[
            ("1.2.3-alpha.7", ">1.2.3-alpha.3", true),
            ("3.4.5-alpha.9", ">1.2.3-alpha.3", false),
            ("3.4.5", ">1.2.3-alpha.3", true),
            ("1.2.4-beta", "^1.2.3", false),
            ("2.0.0-beta", "^1.2.3", false),
            ("1.2.3-beta.4", "^1.2.3-beta.2", true),
            ("1.2.3-beta.1", "^1.2.3-beta.2", false),
            ("1.2.4-beta", "^1.2.3-beta.2", false),
            ("0.0.3-beta.3", "^0.0.3-beta", true),
            ("1.2.3-beta", "1.2.3", false),
            ("1.2.3-beta", "<1.2.3", false),
            ("1.2.3-beta", ">=1.2.3-alpha <1.2.3", true),
            ("1.2.3-alpha.10", ">1.2.3-alpha.9", true),
            ("1.0.0-rc.1", "1.0.0-rc.1 || 2.x", true),
            // npm collapses a union containing a bare `*` to just `*`.
            ("1.0.0-rc.1", "* || 1.0.0-rc.1", false),
            ("1.0.0-rc.1", ">=0.0.0 || 1.0.0-rc.1", false),
        ]);
    }

    #[test]
    fn hyphen_ranges_with_partial_versions() {
        check(&[
            ("1.2.3", "1.2.3 - 2.3.4", true),
            ("2.3.4", "1.2.3 - 2.3.4", true),
            ("2.3.5", "1.2.3 - 2.3.4", false),
            ("1.2.2", "1.2.3 - 2.3.4", false),
            ("1.2.0", "1.2 - 2.3", true),
            ("1.1.9", "1.2 - 2.3", false),
            ("2.3.9", "1.2 - 2.3", true),
            ("2.4.0", "1.2 - 2.3", false),
            ("2.9.9", "1 - 2", true),
            ("3.0.0", "1 - 2", false),
            ("2.3.9", "1.2.3 - 2.3", true),
            ("0.0.1", "* - 2", true),
            ("9.0.0", "1.2.3 - x", true),
            ("2.3.4-beta", "1.2.3 - 2.3.4-beta", true),
            ("2.3.4", "1.2.3 - 2.3.4-beta", false),
            ("1.2.3", "v1.2.3 - v2.3.4", true),
            ("1.2.3", "1.2.3  -\t2.3.4", true),
        ]);
        let range: Range = "1.2 - 2.3".parse().unwrap();
        assert!(range.satisfies(&version("2.3.99")));
        assert!(!range.satisfies(&version("2.4.0-0")));
    }

    #[test]
    fn invalid_ranges_are_errors_not_panics() {
        for bad in [
            "1.2.3.4",
            ">=abc",
            "~",
            "^",
            "garbage",
            "1.2.3 garbage",
            ">=1.2.3 <",
            "01.2.3",
            "1.2.3-01",
            "1.2.3 || foo",
            "=>1.2.3",
            ">>1.2.3",
            "1.x.3",
            "x.2",
            "1.2.3 - ",
            "1.2.3 -2.3.4",
            "1.2.3 - 2.3.4 - 3.4.5",
            "=1.2.3 - 2",
            "9007199254740992.0.0",
            "^9007199254740991.0.0",
            "~1.99999999999999999999999",
            ">",
            "-",
            "||y",
        ] {
            assert!(bad.parse::<Range>().is_err(), "{bad:?} should not parse");
            assert!(!satisfies("1.2.3", bad), "{bad:?}");
        }
        assert!(!satisfies("1.2.3.4", "*"));
        assert!(!satisfies("", ""));
    }

    #[test]
    fn errors_say_what_was_wrong_with_which_text() {
        let err = "1.2.3 - ".parse::<Range>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid version range "1.2.3 - ": invalid comparator "-""#
        );
        let err = "1.2.3.4".parse::<Version>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid version "1.2.3.4": not a valid semantic version"#
        );
        let err = "1.2.9007199254740992".parse::<Version>().unwrap_err();
        assert!(
            err.to_string()
                .contains("patch version number is too large")
        );
    }

    #[test]
    fn npm_quirks_are_kept() {
        check(&[
            // Build metadata is stripped from ranges before anything else.
            ("1.0.0", "+build", true),
            ("1.2.3", "1.2.3 - 2.3.4+build", true),
            // The first star is removed along with its operator.
            ("1.2.3", "1.2.3*", true),
            ("1.2.4", "1.2.3 *", false),
            // Wildcards after a number only matter in x-ranges.
            ("1.5.0", "~1.x.3", true),
            ("1.5.0", "^x.2", true),
            // A lone `=` prefix is fine in a range but not in a version.
            ("=1.2.3", "1.2.3", false),
        ]);
    }

    #[test]
    fn displays_the_original_range_text() {
        let range: Range = " ^1.2.3  || 2.x ".parse().unwrap();
        assert_eq!(range.to_string(), " ^1.2.3  || 2.x ");
    }

    #[test]
    fn odd_input_never_panics() {
        let pieces = [
            "",
            " ",
            "1",
            ".",
            "-",
            "+",
            "*",
            "x",
            "v",
            "=",
            "<",
            ">",
            "~",
            "^",
            "|",
            "||",
            " - ",
            "a",
            "0",
            "\u{3000}",
            "é",
            "9007199254740992",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let text = format!("{a}{b}{c}{a}");
                    let _ = satisfies(&text, &text);
                    let _ = satisfies("1.2.3", &text);
                }
            }
        }
    }

    #[test]
    fn long_ranges_parse_in_linear_time() {
        let range = ">=1.2.3 ".repeat(100_000);
        assert!(satisfies("1.2.4", &range));
    }
}
