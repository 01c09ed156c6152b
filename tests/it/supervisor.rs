//! `seaport supervise`: a directory of real services (`tests/fixtures/service.py`)
//! with a built-in hub, prefixed output, the control socket (`ps`, `start`,
//! `stop`, `restart`), SIGHUP reloads, bad files, `--check`, shutdown on SIGTERM,
//! the parent-death signal on SIGKILL, and systemd notifications.

use crate::harness::{
    DEADLINE, KillOnDrop, Proc, Rows, fixture, pid_alive, seaport, wait_gone, wait_until,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A test's scratch space: `services/` (the directory supervised), `ctl.sock`,
/// the supervisor's stderr and the fixture logs.
pub(crate) struct Root {
    dir: TempDir,
}

impl Root {
    pub(crate) fn new() -> Root {
        let root = Root {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        std::fs::create_dir(root.services()).expect("services dir");
        root
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` in the root, executable.
    pub(crate) fn executable(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        std::fs::write(&path, text).expect("write the script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    pub(crate) fn services(&self) -> PathBuf {
        self.path("services")
    }

    pub(crate) fn ctl(&self) -> String {
        self.path("ctl.sock").to_string_lossy().into_owned()
    }

    /// The fixture log of service `name` (every instance appends to it).
    pub(crate) fn log(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.log"))
    }

    /// Writes `services/NAME.toml` running the fixture with `args` (after its
    /// `--log`), plus `extra` TOML lines.
    pub(crate) fn service(&self, name: &str, role: &str, args: &[&str], extra: &str) -> PathBuf {
        let log = self.log(name).to_string_lossy().into_owned();
        let mut command = vec!["python3".to_string(), fixture("service.py")];
        command.extend(["--log".to_string(), log]);
        command.extend(args.iter().map(|a| a.to_string()));
        let text = format!(
            "role = {}\ncommand = {}\n{extra}\n",
            json!(role),
            json!(command)
        );
        self.write(&format!("{name}.toml"), &text)
    }

    /// Writes `services/FILE` as is.
    pub(crate) fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.services().join(file);
        std::fs::write(&path, text).expect("write a service file");
        path
    }

    /// The fixture's starts for service `name`.
    pub(crate) fn starts(&self, name: &str) -> Vec<Value> {
        std::fs::read_to_string(self.log(name))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with('}'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }
}

/// A running `seaport supervise ROOT/services --listen 0 --control ROOT/ctl.sock`.
pub(crate) struct Sup {
    pub(crate) proc: Proc,
    pub(crate) hub: String,
    pub(crate) ctl: String,
}

impl Sup {
    /// With a built-in hub on a free port.
    pub(crate) fn start(root: &Root, env: &[(&str, &str)]) -> Sup {
        let proc = Sup::spawn(root, &["--listen", "0"], env);
        let first = proc.line();
        let port: u16 = first
            .strip_prefix("seaport listening on :")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from supervise: {first:?}"));
        Sup {
            proc,
            hub: format!("127.0.0.1:{port}"),
            ctl: root.ctl(),
        }
    }

    /// With the remote hub `hub` instead of a built-in one.
    pub(crate) fn start_with_hub(root: &Root, hub: &str) -> Sup {
        Sup {
            proc: Sup::spawn(root, &["--hub", hub], &[]),
            hub: hub.to_string(),
            ctl: root.ctl(),
        }
    }

    /// `seaport supervise ROOT/services --control ROOT/ctl.sock ARGS...`, stderr
    /// to `ROOT/stderr`.
    pub(crate) fn spawn(root: &Root, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let services = root.services().to_string_lossy().into_owned();
        let ctl = root.ctl();
        let mut argv = vec!["supervise", &services, "--control", &ctl];
        argv.extend_from_slice(args);
        let mut cmd = seaport(&argv);
        cmd.envs(env.iter().copied());
        Proc::spawn_logging_to("seaport supervise", cmd, &root.path("stderr"))
    }

    /// `seaport ps --json` rows, or `None` while the control socket does not answer.
    pub(crate) fn ps(&self) -> Option<Vec<Value>> {
        let out = seaport(&["ps", "--json", "--control", &self.ctl])
            .output()
            .expect("run ps");
        if !out.status.success() {
            return None;
        }
        let rows: Value = serde_json::from_slice(&out.stdout).expect("ps --json prints JSON");
        rows.as_array().cloned()
    }

    /// Polls `ps` until `cond` holds for its rows; returns them.
    pub(crate) fn wait_ps(&self, what: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut last = None;
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(rows) = self.ps() {
                if cond(&rows) {
                    return rows;
                }
                last = Some(rows);
            }
            assert!(
                Instant::now() < end,
                "timed out waiting until {what}; last ps: {last:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the instance `name` has failed; returns its row.
    pub(crate) fn wait_failed(&self, name: &str) -> Value {
        let rows = self.wait_ps(&format!("{name} has failed"), |rows| {
            rows.iter()
                .any(|r| r["name"] == name && r["state"] == "failed")
        });
        row(&rows, name).clone()
    }

    /// Waits until exactly `names` are listed (rejected files aside), all
    /// ready; returns their rows.
    pub(crate) fn wait_ready(&self, names: &[&str]) -> Vec<Value> {
        let instances = |rows: &[Value]| -> Vec<Value> {
            rows.iter()
                .filter(|r| r["state"] != "rejected")
                .cloned()
                .collect()
        };
        let rows = self.wait_ps(&format!("{names:?} are all ready"), |rows| {
            let rows = instances(rows);
            names_of(&rows) == names && rows.iter().all(|r| r["state"] == "ready")
        });
        instances(&rows)
    }

    /// The rejected files `ps` lists: (name, message).
    pub(crate) fn rejected(&self) -> Vec<(String, String)> {
        self.ps()
            .unwrap_or_default()
            .iter()
            .filter(|r| r["state"] == "rejected")
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_string(),
                    r["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// `seaport ACTION NAME --control CTL`: (success, stdout, stderr).
    pub(crate) fn act(&self, action: &str, name: &str) -> (bool, String, String) {
        let out = seaport(&[action, name, "--control", &self.ctl])
            .output()
            .expect("run a control command");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Reads stdout until every line of `want` was seen (in any order).
    pub(crate) fn expect_lines(&self, want: &[&str]) {
        let mut missing: BTreeSet<&str> = want.iter().copied().collect();
        let mut seen = Vec::new();
        let end = Instant::now() + DEADLINE;
        while !missing.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            let Some(line) = self.proc.line_within(left) else {
                panic!("no lines {missing:?} on stdout within {DEADLINE:?}; saw {seen:#?}");
            };
            missing.remove(line.as_str());
            seen.push(line);
        }
    }
}

impl Drop for Sup {
    /// Stops the services gracefully, so that no grandchild outlives a failed test.
    fn drop(&mut self) {
        let _ = self
            .proc
            .stop_within(Signal::SIGTERM, Duration::from_secs(10));
    }
}

pub(crate) fn names_of(rows: &[Value]) -> Vec<&str> {
    rows.iter().filter_map(|r| r["name"].as_str()).collect()
}

pub(crate) fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in ps: {rows:#?}"))
}

pub(crate) fn pid(value: &Value) -> u32 {
    value
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("not a pid: {value}"))
}

/// `seaport show HUB` as JSON records.
fn show(hub: &str) -> Vec<Value> {
    crate::harness::show(hub)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The sorted roles of the hub's records.
fn roles(hub: &str) -> Vec<String> {
    let mut roles: Vec<String> = show(hub)
        .iter()
        .filter_map(|r| r["role"].as_str().map(String::from))
        .collect();
    roles.sort();
    roles
}

/// Waits until `text()` contains every one of `needles`.
fn wait_text(what: &str, text: impl Fn() -> String, needles: &[&str]) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let last = text();
        if needles.iter().all(|n| last.contains(n)) {
            return last;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what} to contain {needles:?}:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_every_service_and_instance_registers_them_and_prefixes_their_output() {
    let root = Root::new();
    root.service(
        "web",
        "web@1.0.0",
        &["--say", "hello from web", "--say-err", "warn from web"],
        "instances = 2\nmeta = { zone = \"eu\" }\n\
         env = { SEAPORT_TEST_VALUE = \"from-env\" }\ncwd = \"../work\"",
    );
    std::fs::create_dir(root.path("work")).expect("work dir");
    let api_log = root.log("api").to_string_lossy().into_owned();
    root.write(
        "api.json",
        &json!({
            "role": "api@2.0.0",
            "command": ["python3", fixture("service.py"), "--log", api_log, "--say", "hello from api"],
            "range": [30000, 39999],
        })
        .to_string(),
    );
    let sup = Sup::start(&root, &[]);
    let rows = sup.wait_ready(&["api", "web.1", "web.2"]);

    let keys: Vec<&str> = rows[0]
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        [
            "name",
            "role",
            "state",
            "pid",
            "port",
            "restarts",
            "uptime_ms",
            "message"
        ],
        "ps --json fields"
    );
    assert!(rows.iter().all(|r| r["uptime_ms"].is_u64()), "{rows:#?}");
    // Every instance runs, with its own port, and is registered on the built-in hub.
    let mut ports = BTreeSet::new();
    for r in &rows {
        assert!(pid_alive(pid(&r["pid"])), "{r}");
        assert!(r["port"].is_u64(), "{r}");
        ports.insert(r["port"].to_string());
    }
    assert_eq!(ports.len(), 3, "each instance has its own port: {rows:#?}");
    assert_eq!(row(&rows, "web.1")["role"], "web@1.0.0");
    assert_eq!(row(&rows, "api")["role"], "api@2.0.0");
    let api_port = row(&rows, "api")["port"].as_u64().unwrap_or(0);
    assert!(
        (30000..=39999).contains(&api_port),
        "range ignored: {api_port}"
    );
    let records = show(&sup.hub);
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &rows {
        let record = records
            .iter()
            .find(|rec| rec["port"] == r["port"])
            .unwrap_or_else(|| panic!("no record for {r} in {records:#?}"));
        assert_eq!(record["host"], "127.0.0.1");
        let role = r["role"].as_str().unwrap_or("");
        assert_eq!(
            format!(
                "{}@{}",
                record["role"].as_str().unwrap_or(""),
                record["version"].as_str().unwrap_or("")
            ),
            role
        );
    }
    assert!(
        records
            .iter()
            .filter(|r| r["role"] == "web")
            .all(|r| r["zone"] == "eu")
    );
    // The fixture saw the same pids and ports.
    let mut logged: Vec<(u32, String)> = root
        .starts("web")
        .iter()
        .chain(root.starts("api").iter())
        .map(|s| {
            (
                pid(&s["pid"]),
                s["env_port"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    logged.sort();
    let mut listed: Vec<(u32, String)> = rows
        .iter()
        .map(|r| (pid(&r["pid"]), r["port"].to_string()))
        .collect();
    listed.sort();
    assert_eq!(logged, listed);
    // env and cwd (relative to the service file) are honoured.
    let work = root.path("work").canonicalize().expect("work dir");
    for start in root.starts("web") {
        assert_eq!(start["env_extra"], "from-env", "{start}");
        let cwd = PathBuf::from(start["cwd"].as_str().unwrap_or(""));
        assert_eq!(cwd.canonicalize().ok(), Some(work.clone()), "{start}");
    }

    // Output lines carry the instance name.
    sup.expect_lines(&[
        "web.1 | hello from web",
        "web.2 | hello from web",
        "api | hello from api",
    ]);
    wait_text(
        "the supervisor's stderr",
        || root.stderr(),
        &["web.1 | warn from web", "web.2 | warn from web"],
    );

    // The ps table.
    let out = seaport(&["ps", "--control", &sup.ctl])
        .output()
        .expect("ps");
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME", "STATE", "HEALTH", "PID", "PORT", "RESTARTS", "UPTIME", "ROLE"
        ],
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");
    for (cells, r) in lines[1..].iter().zip(&rows) {
        assert_eq!(cells.len(), 8, "{table}");
        assert_eq!(cells[0], r["name"].as_str().unwrap_or(""), "{table}");
        assert_eq!(cells[1], "ready", "{table}");
        assert_eq!(cells[2], "-", "no health check: {table}");
        assert_eq!(cells[3], r["pid"].to_string(), "{table}");
        assert_eq!(cells[4], r["port"].to_string(), "{table}");
        assert_eq!(cells[5], "0", "{table}");
        assert_eq!(cells[7], r["role"].as_str().unwrap_or(""), "{table}");
    }
}

#[test]
fn stop_start_and_restart_act_on_a_service_or_one_instance() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "instances = 2");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    assert_eq!(dump.len(), 2, "{dump:#?}");
    let ids: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();

    // stop: both instances stopped, their records freed, their processes gone.
    let (ok, out, err) = sup.act("stop", "web");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "web.1 web.2");
    let stopped = sup.wait_ps("web is stopped", |rows| {
        rows.iter().all(|r| r["state"] == "stopped")
    });
    for r in &stopped {
        assert!(r["pid"].is_null(), "a stopped instance has no pid: {r}");
    }
    let freed: BTreeSet<String> = [rows.next(), rows.next()]
        .iter()
        .map(|r| {
            assert_eq!(r[0], "free", "{r}");
            r[1].to_string()
        })
        .collect();
    assert_eq!(freed, ids);
    assert!(show(&sup.hub).is_empty());
    for r in &before {
        wait_gone("a stopped instance", pid(&r["pid"]));
    }

    // start: back on the same ports with the same ids.
    let (ok, out, err) = sup.act("start", "web");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "web.1 web.2");
    let started = sup.wait_ready(&["web.1", "web.2"]);
    for (old, new) in before.iter().zip(&started) {
        assert_eq!(old["port"], new["port"], "same port after start");
        assert_ne!(old["pid"], new["pid"], "a new process after start");
    }
    let back: BTreeSet<String> = [rows.next(), rows.next()]
        .iter()
        .map(|r| {
            assert_eq!(r[0], "register", "{r}");
            r[1].to_string()
        })
        .collect();
    assert_eq!(back, ids, "the same ids come back");

    // restart one instance: a new pid on the same port; the other is untouched.
    let (ok, out, err) = sup.act("restart", "web.2");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "web.2");
    let old2 = pid(&row(&started, "web.2")["pid"]);
    let restarted = sup.wait_ps("web.2 is restarted", |rows| {
        let r = row(rows, "web.2");
        r["state"] == "ready" && r["pid"].as_u64() != Some(u64::from(old2))
    });
    assert_eq!(
        row(&restarted, "web.2")["port"],
        row(&started, "web.2")["port"]
    );
    assert_eq!(
        row(&restarted, "web.1")["pid"],
        row(&started, "web.1")["pid"]
    );
    assert!(
        row(&restarted, "web.2")["restarts"].as_u64() > row(&started, "web.2")["restarts"].as_u64()
    );
    wait_gone("the restarted instance's old process", old2);

    // An unknown name is an error.
    let (ok, _, err) = sup.act("stop", "nope");
    assert!(!ok);
    assert!(
        err.contains("no service or instance named \"nope\""),
        "{err}"
    );
}

#[test]
fn sighup_starts_new_files_stops_removed_ones_restarts_changed_ones_only() {
    let root = Root::new();
    root.service("keep", "keep@1.0.0", &[], "");
    let gone = root.service("gone", "gone@1.0.0", &[], "");
    root.service("change", "change@1.0.0", &[], "meta = { v = 1 }");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["change", "gone", "keep"]);

    root.service("new", "new@1.0.0", &[], "");
    std::fs::remove_file(&gone).expect("remove gone.toml");
    root.service("change", "change@1.0.0", &[], "meta = { v = 2 }");
    sup.proc.signal(Signal::SIGHUP);

    let old_change = pid(&row(&before, "change")["pid"]);
    let after = sup.wait_ps("the reload is applied", |rows| {
        names_of(rows) == ["change", "keep", "new"]
            && rows.iter().all(|r| r["state"] == "ready")
            && row(rows, "change")["pid"].as_u64() != Some(u64::from(old_change))
    });
    assert_eq!(
        row(&after, "keep")["pid"],
        row(&before, "keep")["pid"],
        "an unchanged service keeps its process"
    );
    wait_gone("the removed service", pid(&row(&before, "gone")["pid"]));
    wait_gone("the changed service's old process", old_change);
    wait_until("the hub holds change, keep and new", || {
        roles(&sup.hub) == ["change", "keep", "new"]
    });
    let records = show(&sup.hub);
    let change = records
        .iter()
        .find(|r| r["role"] == "change")
        .expect("change record");
    assert_eq!(change["v"], 2, "the changed file's metadata is used");
}

#[test]
fn a_file_made_invalid_keeps_its_running_version() {
    let root = Root::new();
    let file = root.service("svc", "svc@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["svc"]);

    std::fs::write(&file, "role = \"svc@1.0.0\"\ncomand = [\"python3\"]\n").expect("rewrite");
    root.service("marker", "marker@1.0.0", &[], "");
    sup.proc.signal(Signal::SIGHUP);
    // Once the new file runs, the reload has been applied.
    let after = sup.wait_ready(&["marker", "svc"]);
    assert_eq!(
        row(&after, "svc")["pid"],
        row(&before, "svc")["pid"],
        "the running version must be kept"
    );
    assert_eq!(row(&after, "svc")["port"], row(&before, "svc")["port"]);
    let at = file.to_string_lossy().into_owned();
    wait_text(
        "the supervisor's stderr",
        || root.stderr(),
        &[&at, "unknown field `comand`"],
    );
    assert_eq!(roles(&sup.hub), ["marker", "svc"]);
    // `ps` lists the file beside the running version, with why.
    let rejected = sup.rejected();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "svc");
    assert!(
        rejected[0]
            .1
            .contains(&format!("{at}:2: unknown field `comand`")),
        "{rejected:?}"
    );
}

/// Writes the bad files used by the next two tests; returns their paths.
fn write_bad_files(root: &Root) -> [String; 3] {
    let typo = root.write(
        "typo.toml",
        "role = \"typo@1.0.0\"\ncomand = [\"python3\"]\n",
    );
    let missing = root.write("nocommand.toml", "role = \"nocommand@1.0.0\"\n");
    let range = root.write(
        "badrange.json",
        &json!({"role": "badrange@1.0.0", "command": ["python3"], "range": [30000, 20000]})
            .to_string(),
    );
    [typo, missing, range].map(|p| p.to_string_lossy().into_owned())
}

#[test]
fn bad_files_at_start_are_reported_with_file_and_key_and_the_good_ones_run() {
    let root = Root::new();
    root.service("good", "good@1.0.0", &[], "");
    let [typo, missing, range] = write_bad_files(&root);
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["good"]);
    assert_eq!(roles(&sup.hub), ["good"]);
    let stderr = wait_text(
        "the supervisor's stderr",
        || root.stderr(),
        &[
            "unknown field `comand`",
            "command: must name a program",
            "range: ",
        ],
    );
    let line_with = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{stderr}"))
            .to_string()
    };
    let typo_line = line_with("unknown field `comand`");
    assert!(
        typo_line.contains(&format!("{typo}:2:")),
        "the file and line of the unknown key: {typo_line}"
    );
    let missing_line = line_with("command: must name a program");
    assert!(missing_line.contains(&missing), "the file: {missing_line}");
    line_with(&format!("{range}: range: "));

    // `ps` lists each rejected file after the instances, with its errors.
    let rows = sup.ps().expect("ps");
    let listed: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("good", "ready", "good@1.0.0"),
            ("badrange", "rejected", "badrange@1.0.0"),
            ("nocommand", "rejected", "nocommand@1.0.0"),
            ("typo", "rejected", "typo@1.0.0"),
        ]
    );
    let typo_row = row(&rows, "typo");
    assert!(
        typo_row["pid"].is_null() && typo_row["port"].is_null(),
        "{typo_row}"
    );
    let message = typo_row["message"].as_str().unwrap_or("");
    assert!(
        message.contains("unknown field `comand`")
            && message.contains("; ")
            && message.contains("command: must name a program"),
        "both of typo.toml's problems: {message}"
    );
    let out = seaport(&["ps", "--control", &sup.ctl])
        .output()
        .expect("ps");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["typo", "rejected", "-", "-", "-", "-", "-", "typo@1.0.0"]),
        "{table}"
    );
    assert!(table.contains(&format!("typo: {message}")), "{table}");
}

#[test]
fn the_checks_run_at_reload_a_failing_file_is_rejected_and_the_others_run() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["web"]);
    assert!(sup.rejected().is_empty());
    // A new file whose program is nowhere and whose cwd does not exist, and a
    // good one.
    let bad = root.write(
        "ghost.toml",
        "role = \"ghost@1.0.0\"\ncommand = [\"no-such-program-anywhere\"]\ncwd = \"nowhere\"\nport = 70000\n",
    );
    root.service("api", "api@1.0.0", &[], "");
    sup.proc.signal(Signal::SIGHUP);
    sup.wait_ready(&["api", "web"]);
    let rejected = sup.rejected();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let (name, message) = &rejected[0];
    assert_eq!(name, "ghost");
    let at = bad.to_string_lossy().into_owned();
    for part in [
        format!("{at}: port: must be a whole number from 1 to 65535, got 70000"),
        format!("{at}: cwd: "),
    ] {
        assert!(message.contains(&part), "{part:?} in {message}");
    }
    wait_text(
        "the supervisor's stderr",
        || root.stderr(),
        &["ghost.toml: cwd: ", "does not exist"],
    );
    // Fixed, it runs at the next reload, and ps no longer lists it as rejected.
    root.service("ghost", "ghost@1.0.0", &[], "");
    sup.proc.signal(Signal::SIGHUP);
    sup.wait_ready(&["api", "ghost", "web"]);
    assert!(sup.rejected().is_empty());
}

#[test]
fn a_second_supervisor_on_the_same_control_socket_is_refused() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["web"]);
    let services = root.services().to_string_lossy().into_owned();
    let out = seaport(&[
        "supervise",
        &services,
        "--listen",
        "0",
        "--control",
        &sup.ctl,
    ])
    .output()
    .expect("run a second supervisor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another supervisor is running"), "{err}");
    // The first one still answers and still runs its service.
    sup.wait_ready(&["web"]);
    assert_eq!(
        root.starts("web").len(),
        1,
        "the second one started nothing"
    );
}

#[test]
fn check_validates_a_directory_without_running_anything() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "instances = 2");
    root.service("api", "api@1.0.0", &[], "");
    let services = root.services().to_string_lossy().into_owned();
    let check = || {
        let out = seaport(&["supervise", "--check", &services, "--control", &root.ctl()])
            .output()
            .expect("run --check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = check();
    assert!(ok, "a good directory passes: {out}{err}");
    assert_eq!(
        out.trim(),
        format!("{services}: 2 services (3 instances) valid, 0 problems")
    );

    let [typo, missing, range] = write_bad_files(&root);
    let (ok, out, err) = check();
    assert!(!ok, "a bad directory fails: {out}{err}");
    assert_eq!(
        out.trim(),
        format!("{services}: 2 services (3 instances) valid, 4 problems")
    );
    assert!(
        err.contains(&format!("{typo}:2: unknown field `comand`")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with(&missing) && l.contains("command: must name a program")),
        "{err}"
    );
    assert!(err.contains(&format!("{range}: range: ")), "{err}");
    assert!(err.contains("has 4 problems"), "{err}");
    // Nothing was started, and no control socket was made.
    assert!(root.starts("web").is_empty() && root.starts("api").is_empty());
    assert!(!Path::new(&root.ctl()).exists());
}

/// `seaport supervise --check DIR`: (success, stdout, stderr).
pub(crate) fn check(dir: &Path) -> (bool, String, String) {
    let out = seaport(&["supervise", "--check", &dir.to_string_lossy()])
        .output()
        .expect("run --check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_every_problem_of_every_file_in_words_that_count_right() {
    let root = Root::new();
    let services = root.services();
    let dir = services.to_string_lossy().into_owned();
    root.service("web", "web@1.0.0", &[], "");
    let (ok, out, err) = check(&services);
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!("{dir}: 1 service (1 instance) valid, 0 problems")
    );

    // Every kind of problem, several to a file.
    let ghost = root.write(
        "ghost.toml",
        "role = \"ghost@notaversion\"\ncommand = [\"no-such-program-anywhere\"]\nport = 70000\n",
    );
    let lost = root.write(
        "lost.json",
        &json!({
            "role": "@1.0.0",
            "command": ["./run.sh"],
            "cwd": "../nowhere",
            "range": [0, 70000],
            "instances": 0,
        })
        .to_string(),
    );
    std::fs::create_dir(root.path("bin")).expect("bin");
    let plain = root.path("bin").join("plain");
    std::fs::write(&plain, "#!/bin/sh\n").expect("write a script");
    let blocked = root.write(
        "blocked.toml",
        "role = \"blocked\"\ncommand = [\"./plain\"]\ncwd = \"../bin\"\n",
    );
    let (ok, out, err) = check(&services);
    assert!(!ok, "{out}{err}");
    let [ghost, lost, blocked] = [ghost, lost, blocked].map(|p| p.to_string_lossy().into_owned());
    let want = [
        format!("{ghost}: role: \"ghost@notaversion\" is not name or name@version: "),
        format!("{ghost}: command: \"no-such-program-anywhere\" is not on PATH ("),
        format!("{ghost}: port: must be a whole number from 1 to 65535, got 70000"),
        format!("{lost}: role: \"@1.0.0\" has no name"),
        format!("{lost}: instances: must be a whole number from 1 to 1024, got 0"),
        format!(
            "{lost}: range: expected two ports [FIRST, LAST], each from 1 to 65535, got [0, 70000]"
        ),
        format!(
            "{lost}: cwd: {} does not exist",
            services.join("../nowhere").display()
        ),
        format!(
            "{blocked}: command: {} is not an executable file",
            services.join("../bin").join("./plain").display()
        ),
    ];
    for line in &want {
        assert!(
            err.lines().any(|l| l.starts_with(line.as_str())),
            "no line {line:?} in:\n{err}"
        );
    }
    assert_eq!(err.lines().count(), want.len() + 1, "{err}");
    assert_eq!(
        out.trim(),
        format!("{dir}: 1 service (1 instance) valid, 8 problems")
    );
    assert!(
        err.ends_with(&format!("seaport: {dir} has 8 problems\n")),
        "{err}"
    );

    // One problem reads as one.
    for file in [&ghost, &lost] {
        std::fs::remove_file(file).expect("remove");
    }
    let (ok, out, err) = check(&services);
    assert!(!ok, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!("{dir}: 1 service (1 instance) valid, 1 problem")
    );
    assert!(
        err.ends_with(&format!("seaport: {dir} has 1 problem\n")),
        "{err}"
    );
}

#[test]
fn check_warns_about_an_empty_directory_and_passes() {
    let root = Root::new();
    let services = root.services();
    let dir = services.to_string_lossy().into_owned();
    let (ok, out, err) = check(&services);
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!("{dir}: 0 services (0 instances) valid, 0 problems")
    );
    assert_eq!(
        err.trim(),
        format!("warning: {dir}: no service files (*.toml or *.json): nothing to run")
    );
}

#[test]
fn sigterm_stops_every_child_and_grandchild_and_exits_0() {
    let root = Root::new();
    root.service("tree", "tree@1.0.0", &["--grandchild"], "instances = 2");
    root.service("plain", "plain@1.0.0", &[], "");
    let mut sup = Sup::start(&root, &[]);
    let rows = sup.wait_ready(&["plain", "tree.1", "tree.2"]);
    let mut pids: Vec<u32> = rows.iter().map(|r| pid(&r["pid"])).collect();
    let grandchildren: Vec<u32> = root
        .starts("tree")
        .iter()
        .map(|s| pid(&s["grandchild"]))
        .collect();
    assert_eq!(grandchildren.len(), 2);
    pids.extend(&grandchildren);
    for &p in &pids {
        assert!(pid_alive(p), "pid {p} is not running");
    }

    sup.proc.signal(Signal::SIGTERM);
    let status = sup.proc.wait();
    assert!(status.success(), "{status:?}\n{}", root.stderr());
    for &p in &pids {
        wait_gone("a service process", p);
    }
    let mut signals: Vec<String> = std::fs::read_to_string(root.path("tree.log.signals"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    signals.sort();
    let mut want: Vec<String> = grandchildren
        .iter()
        .map(|p| format!("SIGTERM {p}"))
        .collect();
    want.sort();
    assert_eq!(signals, want, "each process group gets the stop signal");
    assert!(
        !Path::new(&sup.ctl).exists(),
        "the control socket is removed on the way out"
    );
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_direct_child_alive() {
    let root = Root::new();
    // Children that ignore SIGTERM: only the parent-death SIGKILL can end them.
    root.service(
        "web",
        "web@1.0.0",
        &["--ignore-term"],
        "instances = 2\nstop_timeout = \"200ms\"",
    );
    let mut sup = Sup::start(&root, &[]);
    let first = sup.wait_ready(&["web.1", "web.2"]);
    // web.2 is started a second time, later, by a control request.
    let (ok, _, err) = sup.act("restart", "web.2");
    assert!(ok, "{err}");
    let rows = sup.wait_ps("web.2 restarted", |rows| {
        names_of(rows) == ["web.1", "web.2"]
            && rows.iter().all(|r| r["state"] == "ready")
            && row(rows, "web.2")["pid"] != row(&first, "web.2")["pid"]
    });
    let pids: Vec<u32> = rows.iter().map(|r| pid(&r["pid"])).collect();
    let _cleanup = KillOnDrop::new(pids.iter().copied());
    sup.proc.signal(Signal::SIGKILL);
    sup.proc.wait();
    for p in pids {
        wait_gone("a child of the killed supervisor", p);
    }
}

#[test]
fn notify_socket_receives_ready_reloading_and_stopping() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    root.service("slow", "slow@1.0.0", &[], "stop_timeout = \"75s\"");
    let path = root.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let recv = || {
        let mut buf = [0u8; 256];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {DEADLINE:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut sup = Sup::start(&root, &[("NOTIFY_SOCKET", &path.to_string_lossy())]);
    assert_eq!(recv(), "READY=1");
    // READY=1 comes after the services were started.
    let rows = sup.ps().expect("ps answers once READY=1 is sent");
    assert_eq!(names_of(&rows), ["slow", "web"]);
    sup.proc.signal(Signal::SIGHUP);
    assert_eq!(recv(), "RELOADING=1");
    assert_eq!(recv(), "READY=1");
    sup.wait_ready(&["slow", "web"]);
    sup.proc.signal(Signal::SIGTERM);
    assert_eq!(recv(), "STOPPING=1");
    // systemd is told the stop may take the longest stop_timeout, and 5 s.
    assert_eq!(recv(), "EXTEND_TIMEOUT_USEC=80000000");
    assert!(sup.proc.wait().success());
}

#[test]
fn services_and_their_checks_never_inherit_the_supervisors_notify_socket_or_watchdog() {
    let root = Root::new();
    // Its start-up check passes only without the variables; it says on
    // stdout what it got.
    let script = "echo \"env: ${NOTIFY_SOCKET:-none} ${WATCHDOG_USEC:-none} ${WATCHDOG_PID:-none}\"; \
                  exec sleep 600";
    let check = "test -z \"$NOTIFY_SOCKET$WATCHDOG_USEC$WATCHDOG_PID\"";
    root.write(
        "quiet.toml",
        &format!(
            "role = \"quiet@1.0.0\"\ncommand = {}\nready = \"none\"\n\
             health = {{ exec = {}, interval = \"1s\" }}\n",
            json!(["sh", "-c", script]),
            json!(["sh", "-c", check])
        ),
    );
    let path = root.path("notify.sock");
    let _socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
    let notify = path.to_string_lossy().into_owned();
    let sup = Sup::start(
        &root,
        &[
            ("NOTIFY_SOCKET", &notify),
            ("WATCHDOG_USEC", "30000000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    assert_eq!(sup.proc.line(), "quiet | env: none none none");
    sup.wait_ready(&["quiet"]);
}

#[test]
fn a_service_is_starting_and_unregistered_until_it_accepts_connections() {
    let root = Root::new();
    let go = root.path("go").to_string_lossy().into_owned();
    root.service("slow", "slow@1.0.0", &["--wait-for", &go], "");
    let sup = Sup::start(&root, &[]);
    let (rows, dump) = Rows::connect(&sup.hub);
    assert!(dump.is_empty(), "{dump:#?}");
    wait_until("the slow service runs", || !root.starts("slow").is_empty());
    assert_eq!(
        rows.next_within(Duration::from_millis(700)),
        None,
        "registered before it listens"
    );
    let listed = sup.ps().expect("ps");
    assert_eq!(row(&listed, "slow")["state"], "starting");
    assert_eq!(
        row(&listed, "slow")["pid"],
        root.starts("slow")[0]["pid"],
        "a starting instance shows its pid"
    );
    std::fs::write(&go, "").expect("create the go file");
    let ready = sup.wait_ready(&["slow"]);
    let registered = rows.next();
    assert_eq!(registered[0], "register");
    assert_eq!(registered[2]["port"], row(&ready, "slow")["port"]);
}

#[test]
fn a_program_gone_after_its_first_run_is_given_up_on_and_the_supervisor_goes_on() {
    let root = Root::new();
    // It removes itself and exits: every start after the first fails to
    // spawn. Even with every run counted as stable (`stable_after = "0s"`),
    // a run that never became ready is a quick exit.
    let script = root.executable("gone.sh", "#!/bin/sh\nrm -f \"$0\"\nexit 1\n");
    root.write(
        "gone.toml",
        &format!(
            "role = \"gone@1.0.0\"\ncommand = {}\nstable_after = \"0s\"\n\
             give_up_after = 4\nrestart_delay = \"20ms\"\n",
            json!([script.to_string_lossy()])
        ),
    );
    root.service("steady", "steady@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    let gone = sup.wait_failed("gone");
    assert_eq!(gone["last_exit"], "could not be started", "{gone}");
    let message = gone["message"].as_str().unwrap_or("");
    assert!(message.contains("4 quick exits in a row"), "{gone}");
    // The supervisor and its other service go on.
    sup.wait_ps("steady is ready", |rows| {
        row(rows, "steady")["state"] == "ready"
    });
    assert_eq!(roles(&sup.hub), ["steady"]);
}

#[test]
fn a_script_without_an_interpreter_line_runs_with_sh() {
    let root = Root::new();
    // No `#!`: exec refuses it (ENOEXEC), and it runs with /bin/sh, as
    // execvp runs such a file.
    let text = format!(
        "exec python3 '{}' \"$@\"\n",
        crate::harness::fixture("service.py")
    );
    let script = root.executable("plain.sh", &text);
    root.write(
        "plain.toml",
        &format!(
            "role = \"plain@1.0.0\"\ncommand = {}\n",
            json!([script.to_string_lossy()])
        ),
    );
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["plain"]);
    assert_eq!(roles(&sup.hub), ["plain"]);
}

#[test]
fn an_exec_that_fails_after_the_checks_is_named_and_leaves_no_keeper() {
    let root = Root::new();
    // The file is there and executable, so the service file's checks pass;
    // its interpreter is not, so the exec itself fails (ENOENT), in the
    // started process, after the fork.
    let script = root.executable("orphan.sh", "#!/nonexistent/interpreter\n");
    root.write(
        "orphan.toml",
        &format!(
            "role = \"orphan@1.0.0\"\ncommand = {}\ngive_up_after = 2\nrestart_delay = \"20ms\"\n",
            json!([script.to_string_lossy()])
        ),
    );
    root.service("steady", "steady@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    let failed = sup.wait_failed("orphan");
    assert_eq!(failed["last_exit"], "could not be started", "{failed}");
    let says = format!(
        "orphan: cannot start {:?}: No such file or directory",
        script.to_string_lossy()
    );
    wait_text("the failed exec is named", || root.stderr(), &[&says]);
    // The supervisor and its other service go on, and the failed starts'
    // keepers are gone: the only processes left below the supervisor are
    // the keeper factory and steady's keeper.
    let rows = sup.wait_ps("steady is ready", |rows| {
        row(rows, "steady")["state"] == "ready"
    });
    let steady = pid(&row(&rows, "steady")["pid"]);
    wait_until("only steady's keeper is left", || {
        let below: Vec<u32> = seaport::process::reaper::descendants(sup.proc.pid());
        below.len() == 3 && below.contains(&steady)
    });
}

#[test]
fn a_cwd_removed_after_load_is_named_when_the_service_cannot_start_again() {
    let root = Root::new();
    let work = root.path("work");
    std::fs::create_dir(&work).expect("work dir");
    root.service(
        "web",
        "web@1.0.0",
        &[],
        &format!(
            "cwd = {}\ngive_up_after = 2\nrestart_delay = \"20ms\"",
            json!(work.to_string_lossy())
        ),
    );
    let sup = Sup::start(&root, &[]);
    let rows = sup.wait_ready(&["web"]);
    std::fs::remove_dir(&work).expect("remove the work dir");
    let pid = pid(&row(&rows, "web")["pid"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill the service");
    let says = format!(
        "web: cannot start \"python3\": its cwd {} is no longer a directory",
        work.display()
    );
    wait_text("the start fails for its cwd", || root.stderr(), &[&says]);
}

#[test]
fn a_process_never_ready_gives_up_even_when_it_takes_longer_than_a_stable_run() {
    let root = Root::new();
    root.service(
        "mute",
        "mute@1.0.0",
        &["--no-listen"],
        // Each run fails at 1 s, past `stable_after`: still never a stable run.
        "start_timeout = \"1s\"\nstable_after = \"300ms\"\ngive_up_after = 2\n\
         restart_delay = \"20ms\"",
    );
    let sup = Sup::start(&root, &[]);
    let mute = sup.wait_failed("mute");
    assert!(
        mute["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 quick exits in a row")),
        "{mute}"
    );
}

/// `seaport ps --json` on `ctl`, or `None` if it fails or takes over 10 s.
fn ps_within(ctl: &str) -> Option<Vec<Value>> {
    let mut ps = seaport(&["ps", "--json", "--control", ctl])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ps");
    let end = Instant::now() + Duration::from_secs(10);
    while ps.try_wait().expect("wait for ps").is_none() {
        if Instant::now() > end {
            let _ = ps.kill();
            let _ = ps.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ps.wait_with_output().expect("ps output");
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()?
        .as_array()
        .cloned()
}

#[test]
fn a_stdout_nobody_reads_holds_up_neither_the_supervisor_nor_its_services() {
    use std::io::{BufRead, BufReader};
    let root = Root::new();
    // Four services printing 1 KB lines at about 1 MB/s each, more than a
    // pipe nobody reads holds within the first second.
    let chatter = "import sys, time\nwhile True:\n    print('x' * 1000, flush=True)\n    \
                   time.sleep(0.001)\n";
    for n in 0..4 {
        root.write(
            &format!("chatty{n}.toml"),
            &format!(
                "role = \"chatty{n}@1.0.0\"\ncommand = {}\nready = \"none\"\n",
                json!(["python3", "-c", chatter])
            ),
        );
    }
    root.service("steady", "steady@1.0.0", &[], "");
    let services = root.services().to_string_lossy().into_owned();
    let ctl = root.ctl();
    let stderr = std::fs::File::create(root.path("stderr")).expect("stderr file");
    let mut sup = seaport(&["supervise", &services, "--control", &ctl, "--listen", "0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start the supervisor");
    let _kill = KillOnDrop::new([sup.id()]);
    // Nobody reads its stdout for now.
    let stdout = sup.stdout.take().expect("piped stdout");
    let mut pids = Vec::new();
    wait_until(
        "every service runs, and their output has filled the pipe",
        || {
            let Some(rows) = ps_within(&ctl) else {
                return false;
            };
            pids = rows.iter().filter_map(|r| r["pid"].as_u64()).collect();
            rows.len() == 5
                && rows.iter().all(|r| r["state"] == "ready")
                && rows.iter().any(|r| r["uptime_ms"].as_u64() > Some(2000))
        },
    );
    // The control socket answers, again and again, with stdout stalled.
    for _ in 0..5 {
        assert!(
            ps_within(&ctl).is_some(),
            "ps got no answer while stdout was not read; stderr: {}",
            root.stderr()
        );
    }
    // Read again, stdout says how much was dropped meanwhile.
    let mut lines = BufReader::new(stdout).lines();
    let notice = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("seaport: ") && l.contains("of output dropped"));
    assert!(
        notice
            .as_deref()
            .is_some_and(|n| n.ends_with("stdout was not read fast enough")),
        "{notice:?}"
    );
    std::thread::spawn(move || lines.for_each(drop));
    // And it stops on SIGTERM, with every service.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(sup.id()).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let end = Instant::now() + DEADLINE;
    while sup.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < end,
            "the supervisor did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        wait_gone("a service process", u32::try_from(pid).expect("pid"));
    }
}

#[test]
fn a_service_that_keeps_failing_is_marked_failed_with_its_reason() {
    let root = Root::new();
    root.service(
        "crash",
        "crash@1.0.0",
        &["--exit", "3"],
        "give_up_after = 2\nrestart_delay = \"20ms\"",
    );
    let sup = Sup::start(&root, &[]);
    let crash = sup.wait_failed("crash");
    assert!(crash["pid"].is_null(), "{crash}");
    assert!(crash["uptime_ms"].is_null(), "{crash}");
    let message = crash["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("exited with code 3") && message.contains("giving up"),
        "{crash}"
    );
    let out = seaport(&["ps", "--control", &sup.ctl])
        .output()
        .expect("ps");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    // Below the table, named once.
    assert!(table.contains(&format!("\ncrash: {message}\n")), "{table}");
    assert!(!table.contains("crash: crash:"), "{table}");
    assert!(show(&sup.hub).is_empty());

    // `start` tries again from a fresh backoff, and it fails again.
    let runs = root.starts("crash").len();
    let (ok, _, err) = sup.act("start", "crash");
    assert!(ok, "{err}");
    sup.wait_ps("crash ran and failed again", |rows| {
        root.starts("crash").len() >= runs + 2 && row(rows, "crash")["state"] == "failed"
    });
}

#[test]
fn services_register_on_the_hubs_their_files_name() {
    let remote = crate::harness::HubProc::start(&[]);
    let root = Root::new();
    root.service("local", "local@1.0.0", &[], "");
    root.service(
        "far",
        "far@1.0.0",
        &[],
        &format!("hub = [{}]", json!(remote.addr())),
    );
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["far", "local"]);
    wait_until("each record is on its own hub", || {
        roles(&sup.hub) == ["local"] && roles(&remote.addr()) == ["far"]
    });
}

#[test]
fn with_hub_it_uses_the_remote_hub_and_runs_none_of_its_own() {
    let remote = crate::harness::HubProc::start(&[]);
    let root = Root::new();
    root.service("web", "web@1.0.0", &["--say", "up"], "");
    let sup = Sup::start_with_hub(&root, &remote.addr());
    assert_eq!(
        sup.proc.line(),
        "web | up",
        "no `seaport listening` line without a built-in hub"
    );
    let rows = sup.wait_ready(&["web"]);
    wait_until("the record reaches the remote hub", || {
        roles(&remote.addr()) == ["web"]
    });
    assert_eq!(show(&remote.addr())[0]["port"], row(&rows, "web")["port"]);
}

#[test]
fn a_killed_instance_is_freed_and_restarted_on_its_port_and_counted() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    assert_eq!(dump.len(), 1);
    let old = pid(&row(&before, "web")["pid"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGKILL)
        .expect("kill the instance");
    let freed = rows.next();
    assert_eq!(freed[0], "free", "{freed}");
    assert_eq!(freed[1], dump[0][1]);
    let back = rows.next();
    assert_eq!(back[0], "register", "{back}");
    assert_eq!(back[1], dump[0][1], "same id");
    assert_eq!(back[2]["port"], dump[0][2]["port"], "same port");
    let after = sup.wait_ps("web is back", |rows| {
        row(rows, "web")["state"] == "ready" && row(rows, "web")["restarts"] == 1
    });
    assert_ne!(row(&after, "web")["pid"], row(&before, "web")["pid"]);
    assert_eq!(row(&after, "web")["port"], row(&before, "web")["port"]);
    wait_text(
        "the supervisor's stderr",
        || root.stderr(),
        &["web: killed by SIGKILL", "restarting"],
    );
}

#[test]
fn notify_socket_may_be_abstract() {
    use std::os::linux::net::SocketAddrExt;
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    // Unique across parallel tests and test runs: the temp dir's random name.
    let unique = root
        .dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let name = format!("seaport-test-notify-{}", unique.unwrap_or_default());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind abstract");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let _sup = Sup::start(&root, &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    let mut buf = [0u8; 64];
    let n = socket
        .recv(&mut buf)
        .expect("READY=1 on the abstract socket");
    assert_eq!(&buf[..n], b"READY=1");
}

/// `ps` through the library, as the CLI asks it.
fn ps_in(rt: &tokio::runtime::Runtime, ctl: &str) -> Vec<seaport::supervise::control::ServiceRow> {
    use seaport::supervise::control::{self, ControlRequest, ControlResponse};
    match rt.block_on(control::call(Path::new(ctl), &ControlRequest::Ps)) {
        Ok(ControlResponse::Services(rows)) => rows,
        other => panic!("ps: {other:?}"),
    }
}

#[test]
fn in_process_a_reload_never_waits_for_a_slow_stop_and_a_second_stop_kills() {
    use seaport::process::instance::State;
    use seaport::supervise::{Order, SuperviseOptions};
    let root = Root::new();
    // `slow` ignores SIGTERM: stopping it takes its whole stop_timeout. Its
    // port is fixed, so its new version can start only once the old one has
    // stopped (a service on a range is replaced one instance at a time; see
    // tests/it/rolling.rs).
    let slow = root.service(
        "slow",
        "slow@1.0.0",
        &["--ignore-term"],
        &format!(
            "stop_timeout = \"4s\"\nport = {}",
            crate::harness::free_port()
        ),
    );
    root.service("quick", "quick@1.0.0", &[], "");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (orders, rx) = tokio::sync::mpsc::channel(4);
    let options = SuperviseOptions {
        dir: root.services(),
        hubs: Vec::new(),
        listen: 0,
        listen_host: Some("127.0.0.1".parse().expect("address")),
        hub_config: seaport::HubConfig::with_heartbeat(Duration::from_millis(200)),
        key_files: seaport::hub::KeyFiles::default(),
        discover: true,
        control: root.path("ctl.sock"),
        route: None,
        trust_forwarded: Default::default(),
    };
    let supervisor = rt.spawn(seaport::supervise::run(options, rx));
    let ctl = root.ctl();
    let ready = |rows: &[seaport::supervise::control::ServiceRow]| {
        rows.len() == 2 && rows.iter().all(|r| r.state == State::Ready)
    };
    wait_until("both services are ready", || {
        Path::new(&ctl).exists() && ready(&ps_in(&rt, &ctl))
    });
    let old_pid = ps_in(&rt, &ctl)
        .iter()
        .find(|r| r.name == "slow")
        .and_then(|r| r.pid)
        .expect("slow's pid");

    // A changed file: the old slow one takes 4 s to go, and meanwhile the
    // supervisor answers at once, showing it on its way down.
    let text = std::fs::read_to_string(&slow).expect("read") + "meta = { v = 2 }\n";
    std::fs::write(&slow, text).expect("write");
    rt.block_on(orders.send(Order::Reload)).expect("reload");
    let asked = Instant::now();
    wait_until("slow shows as stopping", || {
        ps_in(&rt, &ctl)
            .iter()
            .any(|r| r.name == "slow" && r.state == State::Stopping)
    });
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "ps waited for the stop: {:?}",
        asked.elapsed()
    );
    assert!(pid_alive(old_pid), "the old process has its stop timeout");
    wait_until("the new slow one is ready", || {
        ps_in(&rt, &ctl)
            .iter()
            .any(|r| r.name == "slow" && r.state == State::Ready && r.pid != Some(old_pid))
    });
    assert!(
        asked.elapsed() >= Duration::from_secs(4),
        "the new version started before the old one had stopped"
    );
    assert!(!pid_alive(old_pid));

    // Stop, and a second stop: the slow one is killed without its 4 s.
    let pids: Vec<u32> = ps_in(&rt, &ctl).iter().filter_map(|r| r.pid).collect();
    rt.block_on(orders.send(Order::Stop)).expect("stop");
    wait_until("slow is stopping", || {
        ps_in(&rt, &ctl)
            .iter()
            .any(|r| r.name == "slow" && r.state == State::Stopping)
    });
    let second = Instant::now();
    rt.block_on(orders.send(Order::Stop)).expect("second stop");
    let ended = rt
        .block_on(async { tokio::time::timeout(DEADLINE, supervisor).await })
        .expect("the supervisor returns")
        .expect("its task")
        .map_err(|e| e.to_string());
    assert_eq!(ended, Ok(()));
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "a second stop waited {:?}",
        second.elapsed()
    );
    for pid in pids {
        wait_gone("a service process", pid);
    }
    assert!(!Path::new(&ctl).exists(), "the control socket is removed");
}

#[test]
fn a_process_never_ready_is_stopped_at_its_start_timeout_and_counts_as_a_failed_start() {
    let root = Root::new();
    root.service(
        "mute",
        "mute@1.0.0",
        &["--no-listen"],
        // Long enough for Python to start and log on a loaded machine.
        "start_timeout = \"1s\"\ngive_up_after = 2\nrestart_delay = \"20ms\"",
    );
    let sup = Sup::start(&root, &[]);
    let mute = sup.wait_failed("mute");
    assert_eq!(
        mute["last_exit"], "stopped for not becoming ready in time",
        "{mute}"
    );
    let message = mute["message"].as_str().unwrap_or("");
    assert!(message.contains("giving up"), "{mute}");
    assert!(
        root.stderr()
            .contains("mute: not ready within its start timeout (1s); stopping it"),
        "{}",
        root.stderr()
    );
    // Started, stopped at the timeout, started again: never registered.
    assert!(root.starts("mute").len() >= 2);
    assert!(show(&sup.hub).is_empty());
}
