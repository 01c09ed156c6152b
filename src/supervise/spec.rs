//! The services directory: one service per `*.toml` or `*.json` file, validated
//! into instance specs. Every problem of every file is reported with the file
//! and the key at fault, and a bad file never stops the good ones from loading.
//! Besides the values themselves, a file is checked against the machine: its
//! command's program must be found as exec would find it, its `cwd` must exist
//! (see [`super::validate`]).

use super::validate::{ServiceFile, validate};
use crate::process::instance::InstanceSpec;
use crate::protocol::hub_addr::HubAddr;
use crate::protocol::keys::Keypair;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Host names the supervisor's router (`--route`) sends to this
    /// service's records (`route = ["api.example.com"]`).
    pub routes: Vec<String>,
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

/// A service file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The service it would define: the file name without extension.
    pub name: String,
    /// The file.
    pub file: PathBuf,
    /// Its `role`, when it has a readable one.
    pub role: Option<String>,
    /// Every problem, each naming the file.
    pub problems: Vec<String>,
}

/// What loading a directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Valid services, by name order.
    pub services: Vec<ServiceSpec>,
    /// Files that were not loaded, by file name order.
    pub rejected: Vec<Rejected>,
    /// Every problem: those of the rejected files, and the directory's own.
    pub errors: Vec<String>,
    /// What is odd but not wrong (an empty directory).
    pub warnings: Vec<String>,
}

impl Loaded {
    /// Whether the file of service `name` was rejected.
    pub fn rejects(&self, name: &str) -> bool {
        self.rejected.iter().any(|r| r.name == name)
    }
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
    if files.is_empty() {
        loaded.warnings.push(format!(
            "{}: no service files (*.toml or *.json): nothing to run",
            dir.display()
        ));
    }
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in files {
        let result = match load(&file) {
            Ok(spec) => match seen.get(&spec.name) {
                Some(first) => Err(Rejected {
                    name: spec.name.clone(),
                    file: file.clone(),
                    role: spec.instances.first().map(|i| i.role.clone()),
                    problems: vec![format!(
                        "{}: service {:?} is already defined by {}",
                        file.display(),
                        spec.name,
                        first.display()
                    )],
                }),
                None => Ok(spec),
            },
            Err(rejected) => Err(rejected),
        };
        match result {
            Ok(spec) => {
                seen.insert(spec.name.clone(), file.clone());
                loaded.services.push(spec);
            }
            Err(rejected) => {
                loaded.errors.extend(rejected.problems.iter().cloned());
                loaded.rejected.push(rejected);
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
    load(file).map_err(|rejected| rejected.problems)
}

/// Loads and validates one service file, saying what was rejected.
fn load(file: &Path) -> Result<ServiceSpec, Rejected> {
    let at = file.display().to_string();
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let reject = |role: Option<String>, problems: Vec<String>| Rejected {
        name: name.clone(),
        file: file.to_path_buf(),
        role,
        problems,
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| reject(None, vec![format!("{at}: cannot read: {e}")]))?;
    let parsed: ServiceFile = match file.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| {
            reject(
                None,
                vec![format!(
                    "{at}:{}:{}: {}",
                    e.line(),
                    e.column(),
                    json_message(&e)
                )],
            )
        })?,
        _ => toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|span| {
                1 + text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
            });
            let message = match line {
                Some(line) => format!("{at}:{line}: {}", e.message().trim()),
                None => format!("{at}: {}", e.message().trim()),
            };
            reject(None, vec![message])
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
    let role = parsed
        .role
        .as_ref()
        .and_then(Value::as_str)
        .map(String::from);
    let base = file.parent().unwrap_or(Path::new("."));
    let checked = validate(name.clone(), file, base, parsed);
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
        _ => Err(reject(role, problems)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::instance::PortChoice;
    use crate::process::ready::Ready;
    use crate::process::restart::RestartPolicy;
    use crate::registry::ports::PortRange;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads_a_full_toml_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("www")).unwrap();
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
            "{\"role\": \"x\",\n \"command\": [\"true\"] \"port\": 80}",
        );
        let errors = load_file(&json).unwrap_err();
        assert!(
            errors[0].starts_with(&format!("{}:2:", json.display())),
            "{errors:?}"
        );
    }

    #[test]
    fn an_empty_directory_is_a_warning_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "notes.txt", "not a service");
        let loaded = load_dir(dir.path());
        assert!(loaded.errors.is_empty() && loaded.services.is_empty());
        assert_eq!(
            loaded.warnings,
            [format!(
                "{}: no service files (*.toml or *.json): nothing to run",
                dir.path().display()
            )]
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
        assert!(loaded.warnings.is_empty());
        // Each rejected file, with its service's name, role and problems.
        let rejected: Vec<(&str, Option<&str>, usize)> = loaded
            .rejected
            .iter()
            .map(|r| (r.name.as_str(), r.role.as_deref(), r.problems.len()))
            .collect();
        assert_eq!(
            rejected,
            [("a", Some("a@1.0.0"), 1), ("b", Some("b@1.0.0"), 1)]
        );
        assert!(loaded.rejects("b") && !loaded.rejects("c"));
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
