//! The services directory: one service per `*.toml` or `*.json` file, validated
//! into instance specs. Every problem is reported with the file and the key at
//! fault, and a bad file never stops the good ones from loading.

use crate::process::instance::{InstanceSpec, PortChoice};
use crate::process::settings::RunOptions;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Keypair;
use crate::protocol::wire::Meta;
use crate::registry::ports::PortRange;
use crate::registry::record::split_role;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A service file as written.
#[derive(Debug, Deserialize)]
struct ServiceFile {
    role: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default)]
    meta: Meta,
    port: Option<u16>,
    range: Option<[u16; 2]>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    instances: Option<u32>,
    key: Option<PathBuf>,
    hub: Option<Vec<String>>,
    discover: Option<bool>,
    /// Readiness, restarts and stopping, as `seaport register` takes them.
    #[serde(flatten)]
    run: RunOptions,
    /// Keys nobody knows (serde cannot deny them alongside `flatten`).
    #[serde(flatten)]
    unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

/// A validated service: its instances and where it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// The service name: the file name without extension.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// One spec per instance (`web`, or `web.1`, `web.2`, ...).
    pub instances: Vec<InstanceSpec>,
    /// Hubs of its own, instead of the supervisor's.
    pub hubs: Option<Vec<HubAddr>>,
    /// Keypair for hubs that take writes only from authorized keys.
    pub key: Option<ServiceKey>,
    /// Whether its client fails over to hubs learned from `seaport` records;
    /// `None`: as the supervisor says.
    pub discover: Option<bool>,
}

/// A service's keypair and the file it came from. Two are equal when they are the
/// same file holding the same key, so a rotated key file counts as a change.
#[derive(Debug, Clone)]
pub struct ServiceKey {
    /// The keypair file.
    pub path: PathBuf,
    /// The keypair.
    pub pair: Arc<Keypair>,
}

impl PartialEq for ServiceKey {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.pair.fingerprint() == other.pair.fingerprint()
    }
}

/// What loading a directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Valid services, by name order.
    pub services: Vec<ServiceSpec>,
    /// One message per problem, each naming its file.
    pub errors: Vec<String>,
    /// Names of services whose file exists but is invalid.
    pub failed: std::collections::BTreeSet<String>,
}

/// Loads every `*.toml` and `*.json` file of `dir`.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            loaded
                .errors
                .push(format!("{}: cannot read directory: {e}", dir.display()));
            return loaded;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_service_file(p))
        .collect();
    files.sort();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in files {
        match load_file(&file) {
            Ok(spec) => {
                if let Some(first) = seen.get(&spec.name) {
                    loaded.errors.push(format!(
                        "{}: service {:?} is already defined by {}",
                        file.display(),
                        spec.name,
                        first.display()
                    ));
                    continue;
                }
                seen.insert(spec.name.clone(), file.clone());
                loaded.services.push(spec);
            }
            Err(errors) => {
                loaded.errors.extend(errors);
                if let Some(stem) = file.file_stem().and_then(|s| s.to_str()) {
                    loaded.failed.insert(stem.to_string());
                }
            }
        }
    }
    loaded
}

fn is_service_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && path.is_file() && matches!(ext, Some("toml" | "json"))
}

/// Loads and validates one service file.
pub fn load_file(file: &Path) -> Result<ServiceSpec, Vec<String>> {
    let at = file.display().to_string();
    let text =
        std::fs::read_to_string(file).map_err(|e| vec![format!("{at}: cannot read: {e}")])?;
    let parsed: ServiceFile = match file.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| {
            vec![format!(
                "{at}:{}:{}: {}",
                e.line(),
                e.column(),
                json_message(&e)
            )]
        })?,
        _ => toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|span| {
                1 + text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
            });
            match line {
                Some(line) => vec![format!("{at}:{line}: {}", e.message().trim())],
                None => vec![format!("{at}: {}", e.message().trim())],
            }
        })?,
    };
    let unknown: Vec<String> = parsed
        .unknown
        .keys()
        .map(|key| match line_of_key(&text, key) {
            Some(line) => format!("{at}:{line}: unknown field `{key}`"),
            None => format!("{at}: unknown field `{key}`"),
        })
        .collect();
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let base = file.parent().unwrap_or(Path::new("."));
    let checked = validate(name, file, base, parsed);
    let problems: Vec<String> = unknown
        .into_iter()
        .chain(
            checked
                .as_ref()
                .err()
                .into_iter()
                .flatten()
                .map(|p| format!("{at}: {p}")),
        )
        .collect();
    match checked {
        Ok(spec) if problems.is_empty() => Ok(spec),
        _ => Err(problems),
    }
}

/// The line where `key` is set: `key =` in TOML, `"key":` in JSON.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let quoted = format!("\"{key}\"");
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            [key, quoted.as_str()].iter().any(|k| {
                line.strip_prefix(k)
                    .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
            }) || line.contains(&format!("{quoted}:"))
        })
        .map(|i| i + 1)
}

/// serde_json puts " at line L column C" at the end of its messages; we print
/// the position in front instead.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn validate(
    name: String,
    file: &Path,
    base: &Path,
    f: ServiceFile,
) -> Result<ServiceSpec, Vec<String>> {
    let mut problems = Vec::new();
    let mut check = |key: &str, result: Result<(), String>| {
        if let Err(e) = result {
            problems.push(format!("{key}: {e}"));
        }
    };
    let role = f.role.unwrap_or_default();
    let command = f.command.unwrap_or_default();
    check(
        "role",
        if role.is_empty() {
            Err("missing (expected name@version, e.g. \"web@1.0.0\")".into())
        } else if split_role(&role).0.is_empty() {
            Err(format!("{role:?} has no name (expected name@version)"))
        } else {
            Ok(())
        },
    );
    check(
        "command",
        if command.first().is_none_or(String::is_empty) {
            Err("must name a program, e.g. [\"python3\", \"-m\", \"http.server\"]".into())
        } else {
            Ok(())
        },
    );
    let instances = f.instances.unwrap_or(1);
    check(
        "instances",
        if instances == 0 {
            Err("must be at least 1".into())
        } else {
            Ok(())
        },
    );
    let mut port = PortChoice::Range(PortRange::default());
    match (f.port, f.range) {
        (Some(_), Some(_)) => check("port", Err("give either port or range, not both".into())),
        (Some(0), None) => check("port", Err("must be from 1 to 65535".into())),
        (Some(p), None) if instances > 1 => check(
            "port",
            Err(format!(
                "one fixed port ({p}) cannot serve {instances} instances; use range"
            )),
        ),
        (Some(p), None) => port = PortChoice::Fixed(p),
        (None, Some([a, b])) => match PortRange::new(a, b) {
            Ok(range) => port = PortChoice::Range(range),
            Err(e) => check("range", Err(e.to_string())),
        },
        (None, None) => {}
    }
    let run = match f.run.resolve() {
        Ok(run) => Some(run),
        Err(errors) => {
            problems.extend(errors.iter().map(ToString::to_string));
            None
        }
    };
    let hubs = match f.hub {
        Some(hubs) if hubs.is_empty() => {
            problems.push("hub: must list at least one HOST:PORT".into());
            None
        }
        Some(hubs) => {
            let parsed: Result<Vec<HubAddr>, _> = hubs.iter().map(|h| h.parse()).collect();
            match parsed {
                Ok(hubs) => Some(hubs),
                Err(e) => {
                    problems.push(format!("hub: {e}"));
                    None
                }
            }
        }
        None => None,
    };
    let key = match f.key.map(|k| base.join(k)) {
        Some(path) => match Keypair::load(&path) {
            Ok(pair) => Some(ServiceKey {
                path,
                pair: Arc::new(pair),
            }),
            Err(e) => {
                problems.push(format!("key: {e}"));
                None
            }
        },
        None => None,
    };
    let Some(run) = run.filter(|_| problems.is_empty()) else {
        return Err(problems);
    };
    let cwd = f.cwd.map(|c| base.join(c));
    let instances = (1..=instances)
        .map(|n| InstanceSpec {
            name: if instances == 1 {
                name.clone()
            } else {
                format!("{name}.{n}")
            },
            role: role.clone(),
            meta: f.meta.clone(),
            command: command.clone(),
            env: f.env.clone(),
            cwd: cwd.clone(),
            port,
            run,
            prefix_output: true,
        })
        .collect();
    Ok(ServiceSpec {
        name,
        file: file.to_path_buf(),
        instances,
        hubs,
        key,
        discover: f.discover,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ready::Ready;
    use crate::process::restart::RestartPolicy;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads_a_full_toml_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "web.toml",
            r#"
role = "web@1.2.3"
command = ["python3", "-m", "http.server"]
meta = { zone = "eu-1", tags = ["a"] }
range = [20000, 21000]
env = { MODE = "prod" }
cwd = "www"
instances = 2
restart = "on-failure"
ready = "2s"
stop_signal = "INT"
stop_timeout = "3s"
hub = ["10.0.0.5:9090"]
"#,
        );
        let spec = load_file(&file).unwrap();
        assert_eq!(spec.name, "web");
        assert_eq!(spec.instances.len(), 2);
        let one = &spec.instances[0];
        assert_eq!(one.name, "web.1");
        assert_eq!(spec.instances[1].name, "web.2");
        assert_eq!(
            one.port,
            PortChoice::Range(PortRange::new(20000, 21000).unwrap())
        );
        assert_eq!(one.meta["tags"], serde_json::json!(["a"]));
        assert_eq!(one.cwd.as_deref(), Some(dir.path().join("www").as_path()));
        assert_eq!(one.run.restart, RestartPolicy::OnFailure);
        assert_eq!(one.run.ready, Ready::Delay(Duration::from_secs(2)));
        assert_eq!(one.run.stop_signal, nix::sys::signal::Signal::SIGINT);
        assert_eq!(one.run.stop_timeout, Duration::from_secs(3));
        assert_eq!(spec.hubs, Some(vec![HubAddr::new("10.0.0.5", 9090)]));
    }

    #[test]
    fn json_files_take_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "api.json",
            r#"{"role":"api@2.0.0","command":["node","api.js"],"port":8080}"#,
        );
        let spec = load_file(&file).unwrap();
        assert_eq!(spec.instances[0].name, "api");
        assert_eq!(spec.instances[0].port, PortChoice::Fixed(8080));
    }

    #[test]
    fn every_problem_is_reported_with_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "bad.toml",
            r#"
role = "@1.0.0"
command = []
instances = 0
restart = "sometimes"
ready = "later"
stop_signal = "NOPE"
stop_timeout = "forever"
range = [30, 20]
hub = ["nowhere"]
"#,
        );
        let errors = load_file(&file).unwrap_err();
        let at = file.display().to_string();
        for key in [
            "role",
            "command",
            "instances",
            "restart",
            "ready",
            "stop_signal",
            "stop_timeout",
            "range",
            "hub",
        ] {
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&format!("{at}: {key}: "))),
                "no error for {key}: {errors:#?}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let typo = write(
            dir.path(),
            "typo.toml",
            "role = \"x@1.0.0\"\ncomand = [\"a\"]\n",
        );
        let errors = load_file(&typo).unwrap_err();
        let at = typo.display();
        assert_eq!(
            errors,
            [
                format!("{at}:2: unknown field `comand`"),
                format!(
                    "{at}: command: must name a program, e.g. [\"python3\", \"-m\", \"http.server\"]"
                )
            ]
        );
        let json = write(
            dir.path(),
            "j.json",
            "{\"role\": \"x\",\n \"command\": [\"a\"], \"port\": \"80\"}",
        );
        let errors = load_file(&json).unwrap_err();
        assert!(
            errors[0].starts_with(&format!("{}:2:", json.display())),
            "{errors:?}"
        );
    }

    #[test]
    fn a_directory_loads_the_good_files_and_reports_the_bad() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.toml",
            "role = \"a@1.0.0\"\ncommand = [\"true\"]\n",
        );
        write(dir.path(), "b.toml", "role = \"b@1.0.0\"\n");
        write(
            dir.path(),
            "a.json",
            r#"{"role":"a@2.0.0","command":["true"]}"#,
        );
        write(dir.path(), "notes.txt", "ignored");
        write(dir.path(), ".hidden.toml", "ignored");
        let loaded = load_dir(dir.path());
        let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(loaded.errors.len(), 2, "{:#?}", loaded.errors);
        assert!(
            loaded
                .errors
                .iter()
                .any(|e| e.contains("b.toml") && e.contains("command: must name a program"))
        );
        assert!(
            loaded
                .errors
                .iter()
                .any(|e| e.contains("a.toml") && e.contains("already defined"))
        );
        assert!(!load_dir(&dir.path().join("missing")).errors.is_empty());
    }
}
