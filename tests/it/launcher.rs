//! `seaport register`: runs a real command on a port, registers it while it is
//! ready, frees and restarts it when it exits, and stops every process it started.
//! The command is `tests/fixtures/service.py`, which logs what it was given.

use crate::harness::{
    HubProc, Proc, Rows, fixture, free_port, node, node_hub, pid_alive, seaport, show, wait_gone,
    wait_until,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a "nothing happens" check watches before believing it.
const QUIET: Duration = Duration::from_millis(700);

/// A `seaport register` run with its stderr going to a file in its own temp dir.
pub(crate) struct Launcher {
    pub(crate) proc: Proc,
    dir: TempDir,
}

impl Launcher {
    /// `seaport register HUB ROLE OPTIONS... -- python3 service.py --log LOG ARGS...`,
    /// where `{dir}` in ARGS stands for the launcher's temp dir.
    pub(crate) fn start(hub: &str, role: &str, options: &[&str], args: &[&str]) -> Launcher {
        let mut command = vec![
            "python3".to_string(),
            fixture("service.py"),
            "--log".to_string(),
            "{dir}/starts.log".to_string(),
        ];
        command.extend(args.iter().map(|a| a.to_string()));
        Launcher::start_command(hub, role, options, &command, &[])
    }

    /// `seaport register HUB ROLE OPTIONS... -- COMMAND...` with `env` added,
    /// where `{dir}` in COMMAND stands for the launcher's temp dir.
    pub(crate) fn start_command(
        hub: &str,
        role: &str,
        options: &[&str],
        command: &[String],
        env: &[(&str, &str)],
    ) -> Launcher {
        let dir = tempfile::tempdir().expect("temp dir");
        let at = dir.path().to_string_lossy().into_owned();
        let mut argv: Vec<String> = ["register", hub, role].map(String::from).to_vec();
        argv.extend(options.iter().map(|o| o.to_string()));
        argv.push("--".to_string());
        argv.extend(command.iter().map(|a| a.replace("{dir}", &at)));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd: Command = seaport(&argv);
        cmd.envs(env.iter().copied());
        let name = format!("seaport register {role}");
        Launcher {
            proc: Proc::spawn_logging_to(&name, cmd, &dir.path().join("stderr")),
            dir,
        }
    }

    /// The fixture's log of starts, one JSON object per start.
    pub(crate) fn starts(&self) -> Vec<Value> {
        starts(&self.dir.path().join("starts.log"))
    }

    /// Waits until the fixture was started at least `n` times; returns the starts.
    pub(crate) fn wait_starts(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("the service started {n} times"), || {
            self.starts().len() >= n
        });
        self.starts()
    }

    /// What the fixture's grandchildren recorded: `SIGNAME PID` lines.
    pub(crate) fn signals(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("starts.log.signals"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Launcher {
    /// Stops the launcher gracefully, so that no grandchild outlives a failed test.
    fn drop(&mut self) {
        let _ = self
            .proc
            .stop_within(Signal::SIGTERM, Duration::from_secs(10));
    }
}

/// Every line of a fixture log, parsed.
pub(crate) fn starts(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect()
}

pub(crate) fn pid_of(start: &Value, key: &str) -> u32 {
    start[key]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no {key} in {start}"))
}

/// The next row from the hub, which must be `kind` (`register` or `free`).
fn expect_row(rows: &Rows, kind: &str) -> Value {
    let row = rows.next();
    assert_eq!(row[0], kind, "expected a {kind} row, got {row}");
    row
}

#[test]
fn the_port_is_appended_as_the_last_argument_and_set_as_port() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let launcher = Launcher::start(
        &hub.addr(),
        "args@1.0.0",
        &["--range", "30000-39999"],
        &["first arg", "--second"],
    );
    let row = expect_row(&rows, "register");
    let start = launcher.wait_starts(1)[0].clone();
    let port = row[2]["port"].as_u64().expect("a port in the record");
    assert!(
        (30000..=39999).contains(&port),
        "port {port} outside --range"
    );
    let port = port.to_string();
    let argv = start["argv"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        argv[2..],
        [
            Value::from("first arg"),
            Value::from("--second"),
            Value::from(port.clone())
        ],
        "the arguments are passed unchanged, with the port last: {argv:?}"
    );
    assert_eq!(start["env_port"], port.as_str(), "$PORT is the same port");
    assert_eq!(row[2]["role"], "args");
    assert_eq!(row[2]["version"], "1.0.0");
    assert_eq!(row[2]["host"], "127.0.0.1");
}

#[test]
fn the_record_appears_only_once_the_service_accepts_connections() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let launcher = Launcher::start(&hub.addr(), "slow@1.0.0", &[], &["--wait-for", "{dir}/go"]);
    // The child runs but does not listen until `go` exists: no record yet.
    let start = launcher.wait_starts(1)[0].clone();
    assert!(pid_alive(pid_of(&start, "pid")));
    assert_eq!(
        rows.next_within(QUIET),
        None,
        "registered before the service listens"
    );
    assert_eq!(show(&hub.addr()), json!([]));
    std::fs::write(launcher.path("go"), "").expect("create the go file");
    let row = expect_row(&rows, "register");
    assert_eq!(row[2]["role"], "slow");
    assert_eq!(
        row[2]["port"].to_string(),
        start["env_port"].as_str().unwrap_or("?")
    );
    // Still the first process: becoming ready is not a restart.
    assert_eq!(launcher.starts().len(), 1);
}

#[test]
fn ready_none_registers_at_once_on_a_fixed_port() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let port = free_port().to_string();
    // The fixture never listens; with --ready none it is registered anyway.
    let launcher = Launcher::start(
        &hub.addr(),
        "idle@2.0.0",
        &["--ready", "none", "--port", &port],
        &["--no-listen"],
    );
    let row = expect_row(&rows, "register");
    let start = launcher.wait_starts(1)[0].clone();
    assert_eq!(row[2]["role"], "idle");
    assert_eq!(row[2]["version"], "2.0.0");
    assert_eq!(row[2]["port"].to_string(), port, "--port is used");
    assert_eq!(start["env_port"], port.as_str());
    assert!(pid_alive(pid_of(&start, "pid")));
}

#[test]
fn ready_delay_registers_after_the_delay() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let began = Instant::now();
    let launcher = Launcher::start(
        &hub.addr(),
        "later@1.0.0",
        &["--ready", "600ms"],
        &["--no-listen"],
    );
    let row = expect_row(&rows, "register");
    assert!(
        began.elapsed() >= Duration::from_millis(600),
        "registered {:?} after starting, before the 600ms delay",
        began.elapsed()
    );
    assert_eq!(row[2]["role"], "later");
    assert_eq!(launcher.wait_starts(1).len(), 1);
}

#[test]
fn a_killed_child_is_freed_then_restarted_with_the_same_id_and_port() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let launcher = Launcher::start(&hub.addr(), "web@1.0.0", &[], &[]);
    let first = expect_row(&rows, "register");
    let id = first[1].clone();
    let port = first[2]["port"].clone();
    let old = pid_of(&launcher.wait_starts(1)[0], "pid");

    kill(Pid::from_raw(old as i32), Signal::SIGKILL).expect("kill the child");
    let freed = expect_row(&rows, "free");
    assert_eq!(freed[1], id, "the killed instance's record is freed");
    let again = expect_row(&rows, "register");
    assert_eq!(again[1], id, "same id after the restart");
    assert_eq!(again[2]["port"], port, "same port after the restart");

    let starts = launcher.wait_starts(2);
    let new = pid_of(&starts[1], "pid");
    assert_ne!(new, old);
    assert_eq!(starts[1]["env_port"], starts[0]["env_port"]);
    assert!(pid_alive(new));
    assert!(!pid_alive(old));
    wait_until("the exit and the restart are logged", || {
        let err = launcher.stderr();
        err.contains("web: killed by SIGKILL") && err.contains("restarting now")
    });
}

#[test]
fn quick_failures_back_off_then_give_up_with_a_clear_error() {
    let hub = HubProc::start(&[]);
    let mut launcher = Launcher::start(
        &hub.addr(),
        "fail@1.0.0",
        &["--give-up-after", "3", "--restart-delay", "50ms"],
        &["--exit", "4"],
    );
    let began = Instant::now();
    let status = launcher.proc.wait();
    let took = began.elapsed();
    let stderr = launcher.stderr();
    assert_eq!(
        status.code(),
        Some(4),
        "giving up ends as the last run did (exit 4): {status:?}\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "3 quick failures with a 50ms delay took {took:?}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("seaport: fail: ") && last.contains("giving up"),
        "the last line must say why it gave up:\n{stderr}"
    );
    // Backoff: the first restart is immediate, the next one waits.
    assert!(stderr.contains("restarting now"), "{stderr}");
    assert!(stderr.contains("restarting in "), "{stderr}");
    // One log line per exit, each saying how it ended.
    let runs = launcher.starts().len();
    let exit_lines = stderr
        .lines()
        .filter(|l| !l.starts_with("seaport: ") && l.contains("fail: exited with code 4"))
        .count();
    assert_eq!(
        exit_lines, runs,
        "one stderr line per exit of the {runs} runs:\n{stderr}"
    );
    // `--give-up-after 3`: three quick failures in a row, then stop, and the
    // message counts them truly.
    assert!(
        last.contains(&format!("exited with code 4: {runs} quick exits in a row")),
        "the reason must name the exit and the true count ({runs} runs):\n{stderr}"
    );
    assert_eq!(
        runs, 3,
        "--give-up-after 3 must give up at the third quick failure in a row:\n{stderr}"
    );
    assert_eq!(show(&hub.addr()), json!([]));
}

#[test]
fn on_failure_does_not_restart_a_clean_exit() {
    let hub = HubProc::start(&[]);
    let mut launcher = Launcher::start(
        &hub.addr(),
        "once@1.0.0",
        &["--restart", "on-failure"],
        &["--exit", "0"],
    );
    let status = launcher.proc.wait();
    let stderr = launcher.stderr();
    assert!(
        status.success(),
        "a clean exit under on-failure ends with status 0: {status:?}\n{stderr}"
    );
    assert_eq!(launcher.starts().len(), 1, "not restarted:\n{stderr}");
    assert!(!stderr.contains("; restarting"), "{stderr}");
}

#[test]
fn a_failure_that_is_not_restarted_ends_the_launcher_with_an_error() {
    let hub = HubProc::start(&[]);
    let mut launcher = Launcher::start(
        &hub.addr(),
        "once@1.0.0",
        &["--restart", "never"],
        &["--exit", "3"],
    );
    let status = launcher.proc.wait();
    let stderr = launcher.stderr();
    assert_eq!(
        status.code(),
        Some(3),
        "the launcher ends as its command did:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("seaport: once: exited with code 3") && last.contains("not restarting"),
        "{stderr}"
    );
    assert_eq!(launcher.starts().len(), 1, "not restarted:\n{stderr}");
}

#[test]
fn a_command_killed_by_a_signal_ends_the_launcher_with_128_plus_the_signal() {
    let hub = HubProc::start(&[]);
    let command = ["sh", "-c", "kill -TERM $$"].map(String::from);
    let mut launcher = Launcher::start_command(
        &hub.addr(),
        "killed@1.0.0",
        &["--restart", "never"],
        &command,
        &[],
    );
    let status = launcher.proc.wait();
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}\n{stderr}");
    assert!(stderr.contains("killed by SIGTERM"), "{stderr}");
}

#[test]
fn a_command_that_cannot_start_ends_the_launcher_with_127() {
    let hub = HubProc::start(&[]);
    let command = ["no-such-program-anywhere".to_string()];
    let mut launcher = Launcher::start_command(
        &hub.addr(),
        "ghost@1.0.0",
        &["--restart", "never"],
        &command,
        &[],
    );
    let status = launcher.proc.wait();
    let stderr = launcher.stderr();
    assert_eq!(status.code(), Some(127), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("cannot start \"no-such-program-anywhere\""),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_the_whole_process_group_frees_the_record_and_exits_0() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let mut launcher = Launcher::start(&hub.addr(), "tree@1.0.0", &[], &["--grandchild"]);
    let registered = expect_row(&rows, "register");
    let start = launcher.wait_starts(1)[0].clone();
    let (child, grandchild) = (pid_of(&start, "pid"), pid_of(&start, "grandchild"));
    assert!(pid_alive(child) && pid_alive(grandchild));

    launcher.proc.signal(Signal::SIGTERM);
    let status = launcher.proc.wait();
    assert!(
        status.success(),
        "SIGTERM ends with status 0: {status:?}\n{}",
        launcher.stderr()
    );
    assert!(!pid_alive(child), "the child outlived the launcher");
    wait_gone("the grandchild", grandchild);
    assert_eq!(
        launcher.signals(),
        [format!("SIGTERM {grandchild}")],
        "the stop signal reaches every process of the service"
    );
    let freed = expect_row(&rows, "free");
    assert_eq!(freed[1], registered[1]);
    assert_eq!(show(&hub.addr()), json!([]));
    assert_eq!(launcher.starts().len(), 1, "a stop is not a restart");
}

#[test]
fn a_child_ignoring_the_stop_signal_is_killed_after_the_stop_timeout() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let mut launcher = Launcher::start(
        &hub.addr(),
        "stubborn@1.0.0",
        &["--stop-timeout", "500ms"],
        &["--ignore-term"],
    );
    expect_row(&rows, "register");
    let child = pid_of(&launcher.wait_starts(1)[0], "pid");
    let began = Instant::now();
    launcher.proc.signal(Signal::SIGTERM);
    let status = launcher.proc.wait();
    let took = began.elapsed();
    let stderr = launcher.stderr();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(!pid_alive(child), "the child ignoring SIGTERM survived");
    assert!(
        took >= Duration::from_millis(450),
        "SIGKILL came before the 500ms stop timeout ({took:?})"
    );
    assert!(
        took < Duration::from_secs(5),
        "--stop-timeout 500ms was not honoured: stopping took {took:?}"
    );
    assert!(stderr.contains("SIGKILL"), "the kill is logged:\n{stderr}");
    expect_row(&rows, "free");
}

#[test]
fn the_stop_signal_option_chooses_the_signal_sent_to_the_group() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    // The child ignores SIGTERM: had TERM been sent, stopping would wait for the
    // default 10s stop timeout.
    let mut launcher = Launcher::start(
        &hub.addr(),
        "int@1.0.0",
        &["--stop-signal", "INT"],
        &["--ignore-term", "--grandchild"],
    );
    expect_row(&rows, "register");
    let start = launcher.wait_starts(1)[0].clone();
    let (child, grandchild) = (pid_of(&start, "pid"), pid_of(&start, "grandchild"));
    let began = Instant::now();
    // SIGINT stops the launcher as SIGTERM does.
    launcher.proc.signal(Signal::SIGINT);
    let status = launcher.proc.wait();
    let took = began.elapsed();
    assert!(status.success(), "{status:?}\n{}", launcher.stderr());
    assert!(
        took < Duration::from_secs(5),
        "SIGINT should have stopped the child at once; took {took:?}"
    );
    assert!(!pid_alive(child));
    wait_gone("the grandchild", grandchild);
    assert_eq!(launcher.signals(), [format!("SIGINT {grandchild}")]);
}

#[test]
fn meta_options_land_in_the_record_with_json_values() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let _launcher = Launcher::start(
        &hub.addr(),
        "api@3.1.4",
        &[
            "--meta.zone=eu",
            "--meta.weight=5",
            "--meta",
            r#"{"tags":["a","b"]}"#,
        ],
        &[],
    );
    let row = expect_row(&rows, "register");
    assert_eq!(row[2]["zone"], "eu");
    assert_eq!(row[2]["weight"], 5, "a JSON value stays a number");
    assert_eq!(row[2]["tags"], json!(["a", "b"]));
    let shown = show(&hub.addr());
    assert_eq!(shown.as_array().map(Vec::len), Some(1));
    assert_eq!(shown[0]["zone"], "eu");
    assert_eq!(shown[0]["weight"], 5);
    assert_eq!(shown[0]["role"], "api");
    assert_eq!(shown[0]["version"], "3.1.4");
    assert_eq!(shown[0]["id"], row[1]);
}

#[test]
fn a_node_client_sees_a_service_registered_on_a_node_hub() {
    let (_hub, port) = node_hub();
    let addr = format!("127.0.0.1:{port}");
    let launcher = Launcher::start(&addr, "web@1.2.3", &["--meta.zone=eu"], &[]);
    let get = node("client.js", &["get", &addr, "web@1.2.x"]);
    let found = node_json(&get, "found");
    let record = &found["records"][0];
    let start = launcher.wait_starts(1)[0].clone();
    assert_eq!(record["host"], "127.0.0.1");
    assert_eq!(
        record["port"].to_string(),
        start["env_port"].as_str().unwrap_or("?")
    );
    assert_eq!(record["role"], "web");
    assert_eq!(record["version"], "1.2.3");
    assert_eq!(record["zone"], "eu");
    let query = node("client.js", &["query", &addr, "web"]);
    let answer = node_json(&query, "query");
    assert_eq!(answer["records"].as_array().map(Vec::len), Some(1));
    assert_eq!(answer["records"][0]["id"], record["id"]);
}

/// The Node script's next JSON line whose `event` is `event`.
fn node_json(proc: &Proc, event: &str) -> Value {
    let line = proc.line_where(&format!("with event {event:?}"), |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event)
    });
    serde_json::from_str(&line).expect("JSON from node")
}
