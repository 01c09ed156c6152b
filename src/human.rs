//! What people write and read: durations as in config files and status output
//! (`250ms`, `10s`, `2m`, `1h`, `1.5s`), counts of things (`1 problem`,
//! `2 problems`), and lines said on stdout.

use std::time::Duration;

/// Writes one line to stdout: an error, not a panic, when stdout is closed
/// or full.
pub fn say(line: impl std::fmt::Display) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

/// A duration that does not parse, or is longer than [`MAX_DURATION`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all.
    #[error("invalid duration {0:?} (expected e.g. 500ms, 10s, 2m, 1h)")]
    Invalid(String),
    /// A duration no timer of ours can wait for.
    #[error("duration {0:?} is longer than a year")]
    TooLong(String),
}

/// The longest duration accepted: beyond it, adding it to a point in time
/// could overflow, and no setting means that long.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Parses `N[ms|s|m|h]` (a bare number means seconds), at most a year.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || DurationError::Invalid(text.to_string());
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    let duration = Duration::try_from_secs_f64(seconds).map_err(|_| bad())?;
    if duration > MAX_DURATION {
        return Err(DurationError::TooLong(text.to_string()));
    }
    Ok(duration)
}

/// Formats a duration compactly: `350ms`, `12s`, `5m3s`, `2h10m`, `3d4h`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, mins, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, mins) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{mins}m"),
        (0, 0, _) => format!("{mins}m{s}s"),
        (0, _, _) => format!("{hours}h{mins}m"),
        _ => format!("{days}d{hours}h"),
    }
}

/// `n` things, with the noun in the singular for one: `count(1, "problem",
/// "problems")` is `1 problem`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "ten", "5 fortnights", "-1s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn durations_longer_than_a_year_are_refused_as_such() {
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        assert_eq!(
            parse_duration("10000000000000000000"),
            Err(DurationError::TooLong("10000000000000000000".into()))
        );
        assert_eq!(
            parse_duration("8761h").map_err(|e| e.to_string()),
            Err("duration \"8761h\" is longer than a year".into())
        );
    }

    #[test]
    fn counts_read_right_for_one() {
        assert_eq!(count(0, "problem", "problems"), "0 problems");
        assert_eq!(count(1, "problem", "problems"), "1 problem");
        assert_eq!(count(2, "instance", "instances"), "2 instances");
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_millis(350)), "350ms");
        assert_eq!(format_duration(Duration::from_secs(12)), "12s");
        assert_eq!(format_duration(Duration::from_secs(303)), "5m3s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(7800)), "2h10m");
        assert_eq!(format_duration(Duration::from_secs(273600)), "3d4h");
    }
}
