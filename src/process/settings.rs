//! How a service's processes are run: when one counts as ready, whether and how
//! fast it is restarted, and how it is stopped. One type of options, with one
//! set of defaults, serves both `seaport register`'s flags and the keys of a
//! services.d file, and both are parsed by [`RunOptions::resolve`].

use super::child::parse_signal;
use super::ready::Ready;
use super::restart::{Backoff, RestartPolicy};
use crate::human::{format_duration, parse_duration};
use nix::sys::signal::Signal;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// The defaults, as they are written; `--help` shows them.
pub mod defaults {
    /// When a service is ready.
    pub const READY: &str = "tcp";
    /// The restart policy.
    pub const RESTART: &str = "always";
    /// The delay before the second quick restart in a row.
    pub const RESTART_DELAY: &str = "100ms";
    /// The longest delay between restarts.
    pub const RESTART_DELAY_MAX: &str = "30s";
    /// How long a run must last to count as stable.
    pub const STABLE_AFTER: &str = "10s";
    /// Quick exits in a row before giving up.
    pub const GIVE_UP_AFTER: &str = "10";
    /// The signal that asks a service to stop.
    pub const STOP_SIGNAL: &str = "TERM";
    /// How long a service has to stop before SIGKILL.
    pub const STOP_TIMEOUT: &str = "10s";
    /// How long a started process has to become ready (and healthy).
    pub const START_TIMEOUT: &str = "90s";
    /// Whether the supervisor binds and holds the service's port.
    pub const SOCKET: &str = "false";
}

/// The settings as written: flags of `seaport register`, keys of a service
/// file. An absent one takes its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(default)]
pub struct RunOptions {
    /// When the service is ready: tcp (it accepts connections on its port),
    /// none, or a delay such as 2s.
    #[arg(long, value_name = "WHEN", default_value = defaults::READY)]
    #[serde(deserialize_with = "text")]
    pub ready: Option<String>,
    /// Restart policy: always, on-failure or never.
    #[arg(long, value_name = "POLICY", default_value = defaults::RESTART)]
    #[serde(deserialize_with = "text")]
    pub restart: Option<String>,
    /// Delay before the second quick restart in a row; it doubles each time after.
    #[arg(long, value_name = "DURATION", default_value = defaults::RESTART_DELAY)]
    #[serde(deserialize_with = "text")]
    pub restart_delay: Option<String>,
    /// Longest delay between restarts.
    #[arg(long, value_name = "DURATION", default_value = defaults::RESTART_DELAY_MAX)]
    #[serde(deserialize_with = "text")]
    pub restart_delay_max: Option<String>,
    /// A run ready this long resets the restart backoff.
    #[arg(long, value_name = "DURATION", default_value = defaults::STABLE_AFTER)]
    #[serde(deserialize_with = "text")]
    pub stable_after: Option<String>,
    /// Give up after this many quick exits in a row (0: never).
    #[arg(long, value_name = "N", default_value = defaults::GIVE_UP_AFTER)]
    #[serde(deserialize_with = "text")]
    pub give_up_after: Option<String>,
    /// Signal asking the service to stop.
    #[arg(long, value_name = "SIGNAL", default_value = defaults::STOP_SIGNAL)]
    #[serde(deserialize_with = "text")]
    pub stop_signal: Option<String>,
    /// How long to wait after the stop signal before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = defaults::STOP_TIMEOUT)]
    #[serde(deserialize_with = "text")]
    pub stop_timeout: Option<String>,
    /// How long a started process has to become ready (and pass a health
    /// check); then it is stopped and counts as a failed start (0: no limit).
    #[arg(long, value_name = "DURATION", default_value = defaults::START_TIMEOUT)]
    #[serde(deserialize_with = "text")]
    pub start_timeout: Option<String>,
    /// Bind the port here and pass the listening socket to the service as
    /// systemd's socket activation does (fd 3, LISTEN_FDS, LISTEN_PID,
    /// LISTEN_FDNAMES); it is held across restarts, so connections wait instead
    /// of being refused.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value = defaults::SOCKET
    )]
    #[serde(deserialize_with = "text")]
    pub socket: Option<String>,
}

/// The settings, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSettings {
    /// When a started process counts as ready.
    pub ready: Ready,
    /// Whether an exited process is started again.
    pub restart: RestartPolicy,
    /// How fast, and when to give up.
    pub backoff: Backoff,
    /// The signal that asks the process to stop.
    pub stop_signal: Signal,
    /// How long it has to stop before SIGKILL.
    pub stop_timeout: Duration,
    /// How long a started process has to become ready and healthy (`None`:
    /// no limit).
    pub start_timeout: Option<Duration>,
    /// Whether the port is bound here and passed to the service.
    pub socket: bool,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunOptions::default()
            .resolve()
            .expect("the default settings parse (a unit test checks them)")
    }
}

/// The shortest `restart_delay`: the delay after the second quick exit in a
/// row, from which the next ones double.
const MIN_RESTART_DELAY: Duration = Duration::from_millis(10);

/// A setting that does not parse: its key, as a service file names it, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    /// The key (`restart_delay`); the flag is the same with dashes.
    pub key: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl SettingError {
    /// The command-line flag of the key (`--restart-delay`).
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

impl RunOptions {
    /// Parses every setting, with the default for each absent one. Every
    /// problem is reported, not only the first.
    pub fn resolve(&self) -> Result<RunSettings, Vec<SettingError>> {
        let mut problems = Vec::new();
        let p = &mut problems;
        let ready = setting(p, "ready", &self.ready, defaults::READY, str::parse);
        let restart = setting(p, "restart", &self.restart, defaults::RESTART, str::parse);
        let initial = setting(
            p,
            "restart_delay",
            &self.restart_delay,
            defaults::RESTART_DELAY,
            |text| match parse_duration(text) {
                Ok(delay) if delay < MIN_RESTART_DELAY => Err(format!(
                    "{text:?} is under {}: a command that cannot start would be \
                     started again in a busy loop",
                    format_duration(MIN_RESTART_DELAY)
                )),
                parsed => parsed.map_err(|e| e.to_string()),
            },
        );
        let max = setting(
            p,
            "restart_delay_max",
            &self.restart_delay_max,
            defaults::RESTART_DELAY_MAX,
            parse_duration,
        );
        let stable_after = setting(
            p,
            "stable_after",
            &self.stable_after,
            defaults::STABLE_AFTER,
            parse_duration,
        );
        let give_up_after = setting(
            p,
            "give_up_after",
            &self.give_up_after,
            defaults::GIVE_UP_AFTER,
            |text| {
                text.parse::<u32>()
                    .map_err(|_| "expected a whole number of exits (0: never give up)")
            },
        );
        let stop_signal = setting(
            p,
            "stop_signal",
            &self.stop_signal,
            defaults::STOP_SIGNAL,
            parse_signal,
        );
        let stop_timeout = setting(
            p,
            "stop_timeout",
            &self.stop_timeout,
            defaults::STOP_TIMEOUT,
            parse_duration,
        );
        let start_timeout = setting(
            p,
            "start_timeout",
            &self.start_timeout,
            defaults::START_TIMEOUT,
            |text| parse_duration(text).map(|d| Some(d).filter(|d| !d.is_zero())),
        );
        let socket = setting(p, "socket", &self.socket, defaults::SOCKET, |text| {
            text.parse::<bool>().map_err(|_| "expected true or false")
        });
        let (
            Some(ready),
            Some(restart),
            Some(initial),
            Some(max),
            Some(stable_after),
            Some(give_up_after),
            Some(stop_signal),
            Some(stop_timeout),
            Some(start_timeout),
            Some(socket),
        ) = (
            ready,
            restart,
            initial,
            max,
            stable_after,
            give_up_after,
            stop_signal,
            stop_timeout,
            start_timeout,
            socket,
        )
        else {
            return Err(problems);
        };
        Ok(RunSettings {
            ready,
            restart,
            backoff: Backoff {
                initial,
                max,
                stable_after,
                give_up_after,
            },
            stop_signal,
            stop_timeout,
            start_timeout,
            socket,
        })
    }
}

/// Parses one setting, its default when absent; a problem is noted, naming the
/// key and the text.
fn setting<T, E: std::fmt::Display>(
    problems: &mut Vec<SettingError>,
    key: &'static str,
    value: &Option<String>,
    default: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Option<T> {
    let text = value.as_deref().unwrap_or(default).trim();
    match parse(text) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            let message = error.to_string();
            let message = if message.contains(&format!("{text:?}")) {
                message
            } else {
                format!("{message} (got {text:?})")
            };
            problems.push(SettingError { key, message });
            None
        }
    }
}

/// A value written as a string or a number (`stop_timeout = 5`,
/// `give_up_after = 3`), kept as text for [`RunOptions::resolve`] to judge.
fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Whole(i64),
        Number(f64),
        Flag(bool),
        Absent(()),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Written::deserialize(deserializer)? {
        Written::Text(text) => Some(text),
        Written::Whole(n) => Some(n.to_string()),
        Written::Number(n) => Some(n.to_string()),
        Written::Flag(b) => Some(b.to_string()),
        // `"stop_timeout": null` in JSON: the default.
        Written::Absent(()) => None,
        // A list or a table: the parser says what it expected.
        Written::Other(_) => Some("a list or table".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_parse_and_are_what_the_documentation_says() {
        let settings = RunSettings::default();
        assert_eq!(settings.ready, Ready::Tcp);
        assert_eq!(settings.restart, RestartPolicy::Always);
        assert_eq!(
            settings.backoff,
            Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
                stable_after: Duration::from_secs(10),
                give_up_after: 10,
            }
        );
        assert_eq!(settings.stop_signal, Signal::SIGTERM);
        assert_eq!(settings.stop_timeout, Duration::from_secs(10));
        assert!(!settings.socket);
    }

    #[test]
    fn a_restart_delay_under_10ms_is_refused() {
        for (text, ok) in [("0", false), ("9ms", false), ("10ms", true), ("1s", true)] {
            let options = RunOptions {
                restart_delay: Some(text.into()),
                ..RunOptions::default()
            };
            match options.resolve() {
                Ok(settings) => assert!(ok, "{text} was taken: {settings:?}"),
                Err(problems) => {
                    assert!(!ok, "{text} was refused: {problems:?}");
                    assert_eq!(problems[0].key, "restart_delay");
                    assert!(problems[0].message.contains("busy loop"), "{problems:?}");
                }
            }
        }
    }

    #[test]
    fn every_bad_setting_is_reported_with_its_key() {
        let options = RunOptions {
            ready: Some("later".into()),
            restart: Some("sometimes".into()),
            restart_delay: Some("soon".into()),
            give_up_after: Some("-1".into()),
            stop_signal: Some("NOPE".into()),
            stop_timeout: Some("2s".into()),
            ..RunOptions::default()
        };
        let problems = options.resolve().unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "ready",
                "restart",
                "restart_delay",
                "give_up_after",
                "stop_signal"
            ]
        );
        assert_eq!(problems[2].flag(), "--restart-delay");
        assert!(
            problems[3].to_string().contains("\"-1\""),
            "{}",
            problems[3]
        );
    }

    #[test]
    fn numbers_in_a_file_are_read_as_text() {
        let options: RunOptions = toml::from_str("stop_timeout = 5\ngive_up_after = 3\n").unwrap();
        assert_eq!(options.give_up_after.as_deref(), Some("3"));
        let settings = options.resolve().unwrap();
        assert_eq!(settings.stop_timeout, Duration::from_secs(5));
        assert_eq!(settings.backoff.give_up_after, 3);
        // JSON's null is the default; a list is a problem naming its key.
        let options: RunOptions =
            serde_json::from_str(r#"{"stop_timeout": null, "restart_delay": [1]}"#).unwrap();
        assert_eq!(options.stop_timeout, None);
        let problems = options.resolve().unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "restart_delay");
    }
}
