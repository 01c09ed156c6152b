//! Judging a service file's values, key by key: their types and ranges, the
//! role as `name` or `name@version`, and the machine they will run on: the
//! command's program found as exec will find it, the `cwd` that must exist.
//! Every problem is collected, each starting with its key.

use super::spec::{ServiceKey, ServiceSpec};
use crate::process::health::{self, HealthCheck, Probe};
use crate::process::instance::{InstanceSpec, PortChoice};
use crate::process::program;
use crate::process::settings::RunOptions;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Keypair;
use crate::protocol::wire::Meta;
use crate::registry::ports::PortRange;
use crate::registry::record::check_role;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A service file as written. Values are kept as they are and judged by
/// [`validate`], so that a wrong type or an out-of-range number is a problem
/// naming its key rather than a parse error hiding the others.
#[derive(Debug, Deserialize)]
pub(super) struct ServiceFile {
    pub(super) role: Option<Value>,
    command: Option<Value>,
    meta: Option<Value>,
    port: Option<Value>,
    range: Option<Value>,
    env: Option<Value>,
    cwd: Option<Value>,
    instances: Option<Value>,
    key: Option<Value>,
    hub: Option<Value>,
    discover: Option<Value>,
    health: Option<Value>,
    route: Option<Value>,
    /// Readiness, restarts and stopping, as `seaport register` takes them.
    #[serde(flatten)]
    run: RunOptions,
    /// Keys nobody knows (serde cannot deny them alongside `flatten`).
    #[serde(flatten)]
    pub(super) unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

/// A value as a problem shows it: scalars as written, lists and tables by kind.
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "nothing".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a table".into(),
    }
}

/// Collects the problems of one file, each starting with its key.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }

    /// `value` as a boolean, or a problem.
    fn boolean(&mut self, key: &str, value: Option<Value>) -> Option<bool> {
        match value? {
            Value::Bool(b) => Some(b),
            other => {
                self.add(
                    key,
                    format!("expected true or false, got {}", shown(&other)),
                );
                None
            }
        }
    }

    /// `value` as a string, or a problem.
    fn string(&mut self, key: &str, value: Option<Value>) -> Option<String> {
        match value? {
            Value::String(s) => Some(s),
            other => {
                self.add(key, format!("expected a string, got {}", shown(&other)));
                None
            }
        }
    }

    /// `value` as a whole number from `min` to `max`, or a problem.
    fn whole(&mut self, key: &str, value: Option<Value>, min: i64, max: i64) -> Option<i64> {
        let value = value?;
        match value.as_i64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                let expected = if max >= i64::from(u32::MAX) {
                    format!("a whole number of at least {min}")
                } else {
                    format!("a whole number from {min} to {max}")
                };
                self.add(key, format!("must be {expected}, got {}", shown(&value)));
                None
            }
        }
    }

    /// `value` as a list of strings, or a problem.
    fn strings(&mut self, key: &str, value: Option<Value>, example: &str) -> Option<Vec<String>> {
        match value? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s),
                        other => {
                            self.add(
                                &format!("{key}[{i}]"),
                                format!("expected a string, got {}", shown(&other)),
                            );
                            return None;
                        }
                    }
                }
                Some(out)
            }
            other => {
                self.add(
                    key,
                    format!(
                        "expected a list of strings, e.g. {example}, got {}",
                        shown(&other)
                    ),
                );
                None
            }
        }
    }
}

/// Port numbers: from 1 to 65535.
const PORTS: (i64, i64) = (1, 65535);

pub(super) fn validate(
    name: String,
    file: &Path,
    base: &Path,
    f: ServiceFile,
) -> Result<ServiceSpec, Vec<String>> {
    let mut p = Problems::default();
    let missing = |p: &mut Problems| {
        p.add(
            "role",
            "missing (expected name@version, e.g. \"web@1.0.0\")",
        );
    };
    let role = match f.role {
        None | Some(Value::Null) => {
            missing(&mut p);
            None
        }
        // Not a string: `string` says so.
        some => p.string("role", some),
    };
    match &role {
        Some(role) if role.is_empty() => missing(&mut p),
        Some(role) => {
            if let Err(e) = check_role(role) {
                p.add("role", e);
            }
        }
        None => {}
    }
    let example = "[\"python3\", \"-m\", \"http.server\"]";
    let command = p.strings(
        "command",
        f.command.or(Some(Value::Array(Vec::new()))),
        example,
    );
    if command
        .as_ref()
        .is_some_and(|c| c.first().is_none_or(String::is_empty))
    {
        p.add("command", format!("must name a program, e.g. {example}"));
    }
    let meta = match f.meta {
        None => Some(Meta::new()),
        Some(Value::Object(meta)) => Some(meta),
        Some(other) => {
            p.add("meta", format!("expected a table, got {}", shown(&other)));
            None
        }
    };
    let instances = p.whole("instances", f.instances, 1, MAX_INSTANCES);
    let port = p.whole("port", f.port.clone(), PORTS.0, PORTS.1);
    let range = read_range(&mut p, f.range.clone());
    let count = instances.unwrap_or(1);
    let mut choice = PortChoice::Range(PortRange::default());
    match (f.port.is_some(), f.range.is_some()) {
        (true, true) => p.add("port", "give either port or range, not both"),
        (true, false) => match port.and_then(|n| u16::try_from(n).ok()) {
            Some(port) if count > 1 => p.add(
                "port",
                format!("one fixed port ({port}) cannot serve {count} instances; use range"),
            ),
            Some(port) => choice = PortChoice::Fixed(port),
            None => {}
        },
        (false, true) => {
            if let Some(range) = range {
                choice = PortChoice::Range(range);
            }
        }
        (false, false) => {}
    }
    let env = read_env(&mut p, f.env);
    let cwd = p.string("cwd", f.cwd).map(|c| base.join(c));
    let cwd_ok = match &cwd {
        Some(dir) if !dir.exists() => {
            p.add("cwd", format!("{} does not exist", dir.display()));
            false
        }
        Some(dir) if !dir.is_dir() => {
            p.add("cwd", format!("{} is not a directory", dir.display()));
            false
        }
        _ => true,
    };
    // The program, as exec will look for it: after the change of directory,
    // with the PATH the command gets.
    if cwd_ok
        && let (Some(program), Some(env)) = (command.as_ref().and_then(|c| c.first()), &env)
        && !program.is_empty()
    {
        check_program(&mut p, "command", program, cwd.as_deref(), Some(env));
    }
    let health = read_health(&mut p, f.health, cwd.as_deref(), env.as_ref());
    let run = match f.run.resolve() {
        Ok(run) => Some(run),
        Err(errors) => {
            p.0.extend(errors.iter().map(ToString::to_string));
            None
        }
    };
    if let (Some(Some(check)), Some(run)) = (&health, &run)
        && check.probe == Probe::Tcp
        && run.socket
    {
        p.add(
            "health.tcp",
            "cannot check a service with socket = true: the held socket takes connections even \
             when the service hangs; use http or exec",
        );
    }
    let hubs = match p.strings("hub", f.hub, "[\"10.0.0.5:9090\"]") {
        Some(hubs) if hubs.is_empty() => {
            p.add("hub", "must list at least one HOST:PORT");
            None
        }
        Some(hubs) => {
            let parsed: Result<Vec<HubAddr>, _> = hubs.iter().map(|h| h.parse()).collect();
            match parsed {
                Ok(hubs) => Some(hubs),
                Err(e) => {
                    p.add("hub", e);
                    None
                }
            }
        }
        None => None,
    };
    let discover = p.boolean("discover", f.discover);
    let routes = p
        .strings(
            "route",
            f.route,
            "[\"api.example.com\", \"*.api.example.com\"]",
        )
        .unwrap_or_default();
    for (i, host) in routes.iter().enumerate() {
        if let Err(e) = crate::router::routes::Rule::new(host, "x") {
            p.add(&format!("route[{i}]"), e);
        }
    }
    let key = match p.string("key", f.key).map(|k| base.join(k)) {
        Some(path) => match Keypair::load(&path) {
            Ok(pair) => Some(ServiceKey {
                path,
                pair: Arc::new(pair),
            }),
            Err(e) => {
                p.add("key", e);
                None
            }
        },
        None => None,
    };
    let problems = p.0;
    let (Some(role), Some(command), Some(meta), Some(env), Some(run), Some(health), true) =
        (role, command, meta, env, run, health, problems.is_empty())
    else {
        return Err(problems);
    };
    let instances = (1..=count)
        .map(|n| InstanceSpec {
            name: if count == 1 {
                name.clone()
            } else {
                format!("{name}.{n}")
            },
            role: role.clone(),
            meta: meta.clone(),
            command: command.clone(),
            env: env.clone(),
            cwd: cwd.clone(),
            port: choice,
            run,
            prefix_output: true,
            health: health.clone(),
        })
        .collect();
    Ok(ServiceSpec {
        name,
        file: file.to_path_buf(),
        instances,
        hubs,
        key,
        discover,
        routes: routes.iter().map(|h| h.to_ascii_lowercase()).collect(),
    })
}

/// A problem under `key` unless `program` is found as exec will find it:
/// after the change to `cwd`, with the PATH the command gets (`env`'s, else
/// this process's).
fn check_program(
    p: &mut Problems,
    key: &str,
    program: &str,
    cwd: Option<&Path>,
    env: Option<&BTreeMap<String, String>>,
) {
    let path = env
        .and_then(|e| e.get("PATH"))
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let dir = cwd
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok());
    if let Some(dir) = dir
        && let Err(e) = program::find(program, path.as_deref(), &dir)
    {
        p.add(key, e);
    }
}

/// `health = { http = "/healthz" }`, or `tcp = true`, or `exec = [...]`, with
/// `interval`, `timeout` and `failures`. `Some(None)`: no check.
fn read_health(
    p: &mut Problems,
    value: Option<Value>,
    cwd: Option<&Path>,
    env: Option<&BTreeMap<String, String>>,
) -> Option<Option<HealthCheck>> {
    let table = match value {
        None => return Some(None),
        Some(Value::Object(table)) => table,
        Some(other) => {
            p.add(
                "health",
                format!(
                    "expected a table such as {{ http = \"/healthz\" }}, got {}",
                    shown(&other)
                ),
            );
            return None;
        }
    };
    let before = p.0.len();
    let mut probes = Vec::new();
    let (mut interval, mut timeout, mut failures) = (None, None, None);
    for (key, value) in table {
        let at = format!("health.{key}");
        match key.as_str() {
            "http" => match p.string(&at, Some(value)) {
                Some(path) if path.starts_with('/') => probes.push(Probe::Http { path }),
                Some(path) => p.add(
                    &at,
                    format!("expected a path starting with /, got {path:?}"),
                ),
                None => {}
            },
            "tcp" => match p.boolean(&at, Some(value)) {
                Some(true) => probes.push(Probe::Tcp),
                Some(false) => {}
                None => {}
            },
            "exec" => {
                if let Some(command) =
                    p.strings(&at, Some(value), "[\"curl\", \"-f\", \"localhost\"]")
                {
                    match command.first() {
                        Some(program) if !program.is_empty() => {
                            check_program(p, &at, program, cwd, env);
                            probes.push(Probe::Exec { command });
                        }
                        _ => p.add(&at, "must name a program"),
                    }
                }
            }
            "interval" => interval = duration(p, &at, value),
            "timeout" => timeout = duration(p, &at, value),
            "failures" => failures = p.whole(&at, Some(value), 1, i64::from(u32::MAX)),
            _ => p.add(
                &at,
                "unknown key (expected http, tcp, exec, interval, timeout, failures)",
            ),
        }
    }
    if probes.len() != 1 && p.0.len() == before {
        p.add(
            "health",
            format!(
                "give exactly one of http, tcp = true or exec, got {}",
                probes.len()
            ),
        );
    }
    if p.0.len() > before {
        return None;
    }
    let default = |text: &str| crate::human::parse_duration(text).unwrap_or(Duration::from_secs(5));
    Some(probes.pop().map(|probe| {
        HealthCheck {
            probe,
            interval: interval.unwrap_or_else(|| default(health::defaults::INTERVAL)),
            timeout: timeout.unwrap_or_else(|| default(health::defaults::TIMEOUT)),
            failures: failures
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(health::defaults::FAILURES),
        }
    }))
}

/// The most instances one file may ask for: each is a process with a port
/// of its own, and each is planned (its spec made) when the file is read.
const MAX_INSTANCES: i64 = 1024;

/// The longest `interval` or `timeout` of a health check.
const MAX_CHECK_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A duration written as text (`"2s"`) or a number of seconds.
fn duration(p: &mut Problems, key: &str, value: Value) -> Option<Duration> {
    let text = match &value {
        Value::String(s) => s.clone(),
        Value::Number(n) => format!("{n}s"),
        other => {
            p.add(
                key,
                format!("expected a duration such as \"2s\", got {}", shown(other)),
            );
            return None;
        }
    };
    match crate::human::parse_duration(&text) {
        Ok(d) if d > MAX_CHECK_DURATION => {
            p.add(key, "must be at most a day");
            None
        }
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            p.add(key, "must be longer than 0");
            None
        }
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

/// `range = [FIRST, LAST]`: two ports, the first no greater than the last.
fn read_range(p: &mut Problems, value: Option<Value>) -> Option<PortRange> {
    let value = value?;
    let pair = match &value {
        Value::Array(items) if items.len() == 2 => {
            let port = |v: &Value| v.as_i64().filter(|n| (PORTS.0..=PORTS.1).contains(n));
            port(&items[0]).zip(port(&items[1]))
        }
        _ => None,
    };
    let Some((first, last)) =
        pair.and_then(|(a, b)| u16::try_from(a).ok().zip(u16::try_from(b).ok()))
    else {
        let got = match &value {
            Value::Array(items) => format!(
                "[{}]",
                items.iter().map(shown).collect::<Vec<_>>().join(", ")
            ),
            other => shown(other),
        };
        p.add(
            "range",
            format!("expected two ports [FIRST, LAST], each from 1 to 65535, got {got}"),
        );
        return None;
    };
    match PortRange::new(first, last) {
        Ok(range) => Some(range),
        Err(e) => {
            p.add("range", e);
            None
        }
    }
}

/// `env = { NAME = "value" }`: numbers and true/false are taken as text.
fn read_env(p: &mut Problems, value: Option<Value>) -> Option<BTreeMap<String, String>> {
    let table = match value {
        None => return Some(BTreeMap::new()),
        Some(Value::Object(table)) => table,
        Some(other) => {
            p.add("env", format!("expected a table, got {}", shown(&other)));
            return None;
        }
    };
    let mut env = BTreeMap::new();
    let mut ok = true;
    for (name, value) in table {
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                p.add(
                    &format!("env.{name}"),
                    format!("expected a string, got {}", shown(&other)),
                );
                ok = false;
                continue;
            }
        };
        env.insert(name, text);
    }
    ok.then_some(env)
}

#[cfg(test)]
mod tests {
    use super::super::spec::load_file;
    use std::path::{Path, PathBuf};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A file of `dir` holding `text`, loaded: its problems, each without the
    /// file's name in front.
    fn problems(dir: &Path, text: &str) -> Vec<String> {
        let file = write(dir, "svc.toml", text);
        let at = format!("{}: ", file.display());
        match load_file(&file) {
            Ok(_) => Vec::new(),
            Err(errors) => errors
                .iter()
                .map(|e| e.strip_prefix(&at).unwrap_or(e).to_string())
                .collect(),
        }
    }

    #[test]
    fn every_problem_of_a_file_names_its_key_types_and_ranges_included() {
        let dir = tempfile::tempdir().unwrap();
        let found = problems(
            dir.path(),
            r#"
role = "web@notaversion"
command = ["true", 5]
meta = 5
port = 70000
instances = -1
env = { A = 1, B = [1] }
cwd = 7
key = false
hub = "10.0.0.5:9090"
stop_timeout = "forever"
"#,
        );
        let want = [
            "role: \"web@notaversion\" is not name or name@version: invalid version \"notaversion\"",
            "command[1]: expected a string, got 5",
            "meta: expected a table, got 5",
            "instances: must be a whole number from 1 to 1024, got -1",
            "port: must be a whole number from 1 to 65535, got 70000",
            "env.B: expected a string, got a list",
            "cwd: expected a string, got 7",
            "stop_timeout: ",
            "hub: expected a list of strings, e.g. [\"10.0.0.5:9090\"], got \"10.0.0.5:9090\"",
            "key: expected a string, got false",
        ];
        for start in want {
            assert!(
                found.iter().any(|p| p.starts_with(start)),
                "no problem starting {start:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), want.len(), "{found:#?}");
    }

    #[test]
    fn counts_and_durations_too_large_to_plan_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let found = problems(
            dir.path(),
            "role = \"web\"\ncommand = [\"true\"]\ninstances = 40000000\nstop_timeout = \"10000000000000000000\"\n",
        );
        assert_eq!(
            found,
            [
                "instances: must be a whole number from 1 to 1024, got 40000000",
                "stop_timeout: duration \"10000000000000000000\" is longer than a year",
            ],
        );
    }

    #[test]
    fn roles_are_a_name_or_name_at_a_semver_version() {
        let dir = tempfile::tempdir().unwrap();
        let role = |role: &str| {
            problems(
                dir.path(),
                &format!("role = {role}\ncommand = [\"true\"]\n"),
            )
        };
        assert!(role("\"web\"").is_empty());
        assert!(role("\"web@1.2.3-beta.1\"").is_empty());
        assert!(role("\"web@v2.0.0\"").is_empty());
        for bad in [
            "\"web@notaversion\"",
            "\"web@1.2\"",
            "\"web@\"",
            "\"@1.0.0\"",
        ] {
            let found = role(bad);
            assert!(
                found.len() == 1 && found[0].starts_with("role: "),
                "{bad}: {found:?}"
            );
        }
        assert_eq!(
            role("\"\""),
            ["role: missing (expected name@version, e.g. \"web@1.0.0\")"]
        );
        assert_eq!(role("5"), ["role: expected a string, got 5"]);
    }

    #[test]
    fn port_and_range_are_checked_as_ports_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let with = |line: &str| {
            problems(
                dir.path(),
                &format!("role = \"web\"\ncommand = [\"true\"]\n{line}\n"),
            )
        };
        assert_eq!(
            with("port = 0"),
            ["port: must be a whole number from 1 to 65535, got 0"]
        );
        assert_eq!(
            with("port = 8080.5"),
            ["port: must be a whole number from 1 to 65535, got 8080.5"]
        );
        assert_eq!(
            with("range = [0, 70000]"),
            ["range: expected two ports [FIRST, LAST], each from 1 to 65535, got [0, 70000]"]
        );
        assert_eq!(
            with("range = 5"),
            ["range: expected two ports [FIRST, LAST], each from 1 to 65535, got 5"]
        );
        assert!(with("range = [30000, 20000]")[0].starts_with("range: "));
        assert!(with("port = 8080").is_empty());
        assert!(with("range = [20000, 20010]").is_empty());
    }

    #[test]
    fn the_program_is_found_as_exec_finds_it_and_cwd_must_exist() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = |name: &str, mode: u32| {
            let file = bin.join(name);
            std::fs::write(&file, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        script("run.sh", 0o755);
        script("plain", 0o644);
        let with = |lines: &str| problems(dir.path(), &format!("role = \"web\"\n{lines}\n"));
        // Relative to cwd, as exec resolves it after changing directory.
        assert!(with("command = [\"./run.sh\"]\ncwd = \"bin\"").is_empty());
        let found = with("command = [\"bin/run.sh\"]\ncwd = \"bin\"");
        assert_eq!(
            found,
            [format!(
                "command: {} does not exist",
                bin.join("bin/run.sh").display()
            )]
        );
        assert_eq!(
            with("command = [\"./plain\"]\ncwd = \"bin\""),
            [format!(
                "command: {} is not an executable file",
                bin.join("./plain").display()
            )]
        );
        // On PATH: the service's own PATH when it sets one.
        let found = with("command = [\"no-such-program-anywhere\"]");
        assert!(
            found.len() == 1
                && found[0].starts_with("command: \"no-such-program-anywhere\" is not on PATH ("),
            "{found:?}"
        );
        let path = format!("env = {{ PATH = {:?} }}", bin.display().to_string());
        assert!(with(&format!("command = [\"run.sh\"]\n{path}")).is_empty());
        assert!(with(&format!("command = [\"sh\"]\n{path}"))[0].contains("is not on PATH"));
        // A missing cwd is one problem; the program is not looked for there.
        assert_eq!(
            with("command = [\"./run.sh\"]\ncwd = \"nowhere\""),
            [format!(
                "cwd: {} does not exist",
                dir.path().join("nowhere").display()
            )]
        );
        assert_eq!(
            with("command = [\"true\"]\ncwd = \"bin/run.sh\""),
            [format!(
                "cwd: {} is not a directory",
                bin.join("run.sh").display()
            )]
        );
    }
}
