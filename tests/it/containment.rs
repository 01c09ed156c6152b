//! Nothing escapes: every process a service starts stops with it, on stop,
//! restart, reload and exit, and when the supervisor or the launcher itself is
//! killed with SIGKILL; both with a cgroup per service and with keepers alone
//! (`SEAPORT_CGROUP=off`). The escapees are a `setsid` daemon, a double fork and
//! a `bash -c '... & wait'` family, each holding a port of its own.
//!
//! The cgroup tests need a writable cgroup v2 hierarchy (root, or a delegated
//! subtree) and fail without one; the PID 1 test needs `unshare`.

use crate::harness::{
    DEADLINE, HubProc, KillOnDrop, Proc, fixture, pid_alive, seaport_bin, wait_gone, wait_until,
};
use crate::launcher::{Launcher, pid_of};
use crate::supervisor::{Root, Sup, names_of, pid, row};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// With a cgroup per service, or with keepers alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cgroup,
    Subreaper,
}

impl Mode {
    fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::Cgroup => &[("SEAPORT_CGROUP", "on")],
            Mode::Subreaper => &[("SEAPORT_CGROUP", "off")],
        }
    }
}

/// A process that must not outlive its service, and the port it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Escapee {
    pid: u32,
    port: u16,
}

/// The escapees recorded in a `.daemons` file.
fn escapees(path: &Path) -> Vec<Escapee> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Escapee {
            pid: pid(&v["pid"]),
            port: v["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("no port in {v}")),
        })
        .collect()
}

/// Waits until `path` records at least `n` escapees; returns them all.
fn wait_escapees(path: &Path, n: usize) -> Vec<Escapee> {
    wait_until(&format!("{} records {n} processes", path.display()), || {
        escapees(path).len() >= n
    });
    escapees(path)
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

fn assert_alive(what: &str, list: &[Escapee]) {
    for e in list {
        assert!(pid_alive(e.pid), "{what}: pid {} is not running", e.pid);
        assert!(listening(e.port), "{what}: port {} is not held", e.port);
    }
}

fn wait_all_gone(what: &str, list: &[Escapee]) {
    for e in list {
        wait_gone(what, e.pid);
        wait_until(&format!("{what}: port {} is free", e.port), || {
            !listening(e.port)
        });
    }
}

/// Process `pid`'s cgroup v2 path.
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    seaport::process::cgroup::own_cgroup(&text)
        .unwrap_or_default()
        .to_string()
}

/// The directory of cgroup `path`.
fn cgroup_dir(path: &str) -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let (mount, root) = seaport::process::cgroup::find_mount(&mountinfo)
        .expect("these tests need a cgroup v2 hierarchy");
    seaport::process::cgroup::cgroup_dir(&mount, &root, path).expect("a visible cgroup")
}

/// The cgroup directory a supervisor or launcher `pid` makes for its services
/// when it is not alone in its cgroup.
fn subtree_of(pid: u32) -> PathBuf {
    cgroup_dir(&cgroup_of(pid)).join(format!("seaport-{pid}"))
}

/// Checks that `list` runs as `mode` says, below supervisor or launcher `owner`.
fn assert_contained(mode: Mode, owner: u32, list: &[Escapee]) {
    let own = cgroup_of(owner);
    for e in list {
        let theirs = cgroup_of(e.pid);
        match mode {
            Mode::Cgroup => assert!(
                theirs.contains(&format!("/seaport-{owner}/")),
                "pid {} is in cgroup {theirs:?}, not in one of {owner}'s",
                e.pid
            ),
            Mode::Subreaper => assert_eq!(theirs, own, "pid {} has a cgroup of its own", e.pid),
        }
    }
}

/// `bash -c` starting two members and the fixture in the background, then
/// waiting for them: a family in one process group. The port arrives as `$0`.
fn family_command(log: &str) -> Vec<String> {
    let f = fixture("service.py");
    let member = format!("python3 '{f}' --as-member '{log}.daemons'");
    vec![
        "bash".into(),
        "-c".into(),
        format!("{member} & {member} & python3 '{f}' --log '{log}' \"$0\" & wait"),
    ]
}

/// The services: a `setsid` daemon, a double fork and a family, with how many
/// escapees each start makes.
const SERVICES: [(&str, usize); 3] = [("double", 1), ("family", 2), ("setsid", 1)];

fn write_services(root: &Root) {
    root.service("setsid", "setsid@1.0.0", &["--daemon", "setsid"], "");
    root.service("double", "double@1.0.0", &["--daemon", "double-fork"], "");
    let log = root.log("family").to_string_lossy().into_owned();
    let text = format!(
        "role = \"family@1.0.0\"\ncommand = {}\n",
        serde_json::json!(family_command(&log))
    );
    root.write("family.toml", &text);
}

fn daemons_file(root: &Root, name: &str) -> PathBuf {
    root.path(&format!("{name}.log.daemons"))
}

/// A supervisor running the three services in `mode`, and their escapees.
fn supervised(mode: Mode) -> (Root, Sup, BTreeMap<&'static str, Vec<Escapee>>) {
    let root = Root::new();
    write_services(&root);
    let sup = Sup::start(&root, mode.env());
    sup.wait_ready(&["double", "family", "setsid"]);
    let found: BTreeMap<&str, Vec<Escapee>> = SERVICES
        .iter()
        .map(|&(name, n)| (name, wait_escapees(&daemons_file(&root, name), n)))
        .collect();
    for (name, list) in &found {
        assert_alive(name, list);
        assert_contained(mode, sup.proc.pid(), list);
    }
    (root, sup, found)
}

fn all(found: &BTreeMap<&str, Vec<Escapee>>) -> Vec<Escapee> {
    found.values().flatten().copied().collect()
}

fn guard(list: &[Escapee]) -> KillOnDrop {
    KillOnDrop::new(list.iter().map(|e| e.pid))
}

fn stop_leaves_nothing(mode: Mode) {
    let (_root, sup, found) = supervised(mode);
    let _cleanup = guard(&all(&found));
    for (name, _) in SERVICES {
        let (ok, _, err) = sup.act("stop", name);
        assert!(ok, "{err}");
    }
    sup.wait_ps("every service is stopped", |rows| {
        rows.iter().all(|r| r["state"] == "stopped")
    });
    wait_all_gone("an escapee of a stopped service", &all(&found));
    if mode == Mode::Cgroup {
        let subtree = subtree_of(sup.proc.pid());
        wait_until("the services' cgroups are removed", || {
            std::fs::read_dir(&subtree)
                .is_ok_and(|d| d.filter_map(Result::ok).all(|e| !e.path().is_dir()))
        });
    }
}

#[test]
fn stop_leaves_nothing_with_cgroups() {
    stop_leaves_nothing(Mode::Cgroup);
}

#[test]
fn stop_leaves_nothing_with_keepers_alone() {
    stop_leaves_nothing(Mode::Subreaper);
}

fn restart_leaves_nothing(mode: Mode) {
    let (root, sup, before) = supervised(mode);
    let _cleanup = guard(&all(&before));
    let pids: BTreeMap<String, Value> = sup
        .wait_ready(&["double", "family", "setsid"])
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["pid"].clone(),
            )
        })
        .collect();
    for (name, _) in SERVICES {
        let (ok, _, err) = sup.act("restart", name);
        assert!(ok, "{err}");
    }
    sup.wait_ps("every service is back", |rows| {
        rows.iter()
            .all(|r| r["state"] == "ready" && pids[r["name"].as_str().unwrap_or("")] != r["pid"])
    });
    let mut after = Vec::new();
    for (name, n) in SERVICES {
        let list = wait_escapees(&daemons_file(&root, name), 2 * n);
        after.extend_from_slice(&list[n..]);
    }
    let _cleanup_new = guard(&after);
    wait_all_gone("an escapee of a restarted service", &all(&before));
    assert_alive("the new escapees", &after);
    assert_contained(mode, sup.proc.pid(), &after);
}

#[test]
fn restart_leaves_nothing_with_cgroups() {
    restart_leaves_nothing(Mode::Cgroup);
}

#[test]
fn restart_leaves_nothing_with_keepers_alone() {
    restart_leaves_nothing(Mode::Subreaper);
}

fn sigkill_leaves_nothing(mode: Mode) {
    let (_root, mut sup, found) = supervised(mode);
    let _cleanup = guard(&all(&found));
    let leaders: Vec<u32> = sup
        .ps()
        .expect("ps")
        .iter()
        .map(|r| pid(&r["pid"]))
        .collect();
    let subtree = subtree_of(sup.proc.pid());
    let factory = factory_of(sup.proc.pid());
    sup.proc.signal(Signal::SIGKILL);
    sup.proc.wait();
    wait_gone("the killed supervisor's keeper factory", factory);
    for p in leaders {
        wait_gone("a service of the killed supervisor", p);
    }
    wait_all_gone("an escapee of the killed supervisor", &all(&found));
    if mode == Mode::Cgroup {
        wait_until("the last keeper removed the cgroups", || !subtree.exists());
    }
}

#[test]
fn sigkill_of_the_supervisor_leaves_nothing_with_cgroups() {
    sigkill_leaves_nothing(Mode::Cgroup);
}

#[test]
fn sigkill_of_the_supervisor_leaves_nothing_with_keepers_alone() {
    sigkill_leaves_nothing(Mode::Subreaper);
}

/// A field of `/proc/PID/stat` after the command name (0 is the state).
fn stat_field(pid: u32, n: usize) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n)?.parse().ok()
}

/// The parent of `pid`.
fn parent_of(pid: u32) -> u32 {
    stat_field(pid, 1).unwrap_or_else(|| panic!("no parent for {pid}: it is gone"))
}

/// The children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_field(p, 1) == Some(pid))
        .collect()
}

/// The keeper factory started by `supervisor`: its child that runs
/// `seaport __keeper-factory`, once there is one.
fn factory_of(supervisor: u32) -> u32 {
    let mut found = None;
    wait_until("the supervisor has a keeper factory", || {
        found = children_of(supervisor).into_iter().find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"__keeper-factory"))
        });
        found.is_some()
    });
    found.unwrap_or_default()
}

/// A line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {key} for {pid}"))
}

/// How many times a keeper's anonymous memory fits at least in the
/// supervisor's. A keeper forked from the supervisor has the supervisor's
/// anonymous memory of the moment (measured in a test build: 4.6 MiB, the
/// supervisor's 4.8 MiB); one forked from the factory has the factory's
/// (1.5 MiB, 0.6 MiB in a release build).
const SUPERVISOR_OVER_KEEPER: u64 = 2;

fn keepers_come_from_a_small_factory(mode: Mode) {
    let (_root, sup, found) = supervised(mode);
    let _cleanup = guard(&all(&found));
    let supervisor = sup.proc.pid();
    let factory = factory_of(supervisor);
    let rows = sup.ps().expect("ps");
    assert_eq!(rows.len(), SERVICES.len());
    for row in &rows {
        let leader = pid(&row["pid"]);
        let keeper = parent_of(leader);
        assert_eq!(
            parent_of(keeper),
            factory,
            "the keeper {keeper} of {} is not the factory's child",
            row["name"]
        );
        let (anon, supervisor_anon) = (
            status_kib(keeper, "RssAnon"),
            status_kib(supervisor, "RssAnon"),
        );
        assert!(
            anon * SUPERVISOR_OVER_KEEPER <= supervisor_anon,
            "the keeper {keeper} has {anon} KiB of anonymous memory, the supervisor {supervisor_anon} KiB"
        );
    }
}

#[test]
fn keepers_come_from_a_small_factory_with_cgroups() {
    keepers_come_from_a_small_factory(Mode::Cgroup);
}

#[test]
fn keepers_come_from_a_small_factory_with_keepers_alone() {
    keepers_come_from_a_small_factory(Mode::Subreaper);
}

/// A factory killed from outside takes its services with it (their keepers
/// kill them, as when the supervisor dies), and the supervisor starts them
/// again through a new factory.
fn a_killed_factory_takes_its_services_and_they_start_again(mode: Mode) {
    let (root, sup, before) = supervised(mode);
    let _cleanup = guard(&all(&before));
    let leaders: BTreeMap<String, u32> = sup
        .ps()
        .expect("ps")
        .iter()
        .map(|r| (r["name"].as_str().unwrap_or("").to_string(), pid(&r["pid"])))
        .collect();
    let factory = factory_of(sup.proc.pid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(factory as i32), Signal::SIGKILL)
        .expect("kill the factory");
    wait_all_gone(
        "an escapee of a service of the killed factory",
        &all(&before),
    );
    for (name, leader) in &leaders {
        wait_gone(&format!("{name}'s leader"), *leader);
    }
    sup.wait_ps("every service is back", |rows| {
        rows.len() == leaders.len()
            && rows.iter().all(|r| {
                r["state"] == "ready" && leaders[r["name"].as_str().unwrap_or("")] != pid(&r["pid"])
            })
    });
    let mut after = Vec::new();
    for (name, n) in SERVICES {
        let list = wait_escapees(&daemons_file(&root, name), 2 * n);
        after.extend_from_slice(&list[n..]);
    }
    let _cleanup_new = guard(&after);
    assert_alive("the new escapees", &after);
    assert_contained(mode, sup.proc.pid(), &after);
    let new_factory = factory_of(sup.proc.pid());
    assert_ne!(new_factory, factory);
    assert!(pid_alive(sup.proc.pid()), "{}", root.stderr());
}

#[test]
fn a_killed_factory_takes_its_services_and_they_start_again_with_cgroups() {
    a_killed_factory_takes_its_services_and_they_start_again(Mode::Cgroup);
}

#[test]
fn a_killed_factory_takes_its_services_and_they_start_again_with_keepers_alone() {
    a_killed_factory_takes_its_services_and_they_start_again(Mode::Subreaper);
}

fn reload_and_exit_leave_nothing(mode: Mode) {
    let (root, mut sup, before) = supervised(mode);
    let _cleanup = guard(&all(&before));
    let file = root.services().join("setsid.toml");
    let text = std::fs::read_to_string(&file).expect("read") + "meta = { v = 2 }\n";
    std::fs::write(&file, text).expect("write");
    sup.proc.signal(Signal::SIGHUP);
    let renewed = wait_escapees(&daemons_file(&root, "setsid"), 2);
    let _cleanup_new = guard(&renewed);
    wait_all_gone("the daemon of the changed service", &before["setsid"]);
    assert_alive("the untouched services", &before["double"]);
    assert_alive("the untouched services", &before["family"]);
    assert_alive("the changed service's new daemon", &renewed[1..]);

    let subtree = subtree_of(sup.proc.pid());
    sup.proc.signal(Signal::SIGTERM);
    assert!(sup.proc.wait().success(), "{}", root.stderr());
    let mut rest = all(&before);
    rest.extend_from_slice(&renewed[1..]);
    wait_all_gone("an escapee after the supervisor's exit", &rest);
    assert!(!subtree.exists(), "{} is left", subtree.display());
}

#[test]
fn reload_and_exit_leave_nothing_with_cgroups() {
    reload_and_exit_leave_nothing(Mode::Cgroup);
}

#[test]
fn reload_and_exit_leave_nothing_with_keepers_alone() {
    reload_and_exit_leave_nothing(Mode::Subreaper);
}

fn a_daemonizer_leaves_no_daemon_per_restart(mode: Mode) {
    let root = Root::new();
    root.service(
        "daemonizer",
        "daemonizer@1.0.0",
        &["--daemon", "double-fork", "--exit", "0"],
        "ready = \"none\"\nrestart_delay = \"20ms\"\nrestart_delay_max = \"50ms\"\ngive_up_after = 0",
    );
    let mut sup = Sup::start(&root, mode.env());
    let path = daemons_file(&root, "daemonizer");
    let list = wait_escapees(&path, 4);
    let _cleanup = guard(&list);
    // Each run ended, its daemon with it, before the next one started.
    let daemons = escapees(&path);
    let _cleanup_all = guard(&daemons);
    let (last, earlier) = daemons.split_last().expect("daemons");
    wait_all_gone("the daemon of an earlier run", earlier);
    let alive = daemons.iter().filter(|d| pid_alive(d.pid)).count();
    assert!(alive <= 1, "{alive} daemons alive at once: {daemons:?}");
    sup.proc.signal(Signal::SIGTERM);
    assert!(sup.proc.wait().success(), "{}", root.stderr());
    wait_all_gone("the last daemon", &[*last]);
    wait_all_gone("every daemon", &escapees(&path));
}

#[test]
fn a_daemonizer_exiting_0_leaves_no_daemon_per_restart_with_cgroups() {
    a_daemonizer_leaves_no_daemon_per_restart(Mode::Cgroup);
}

#[test]
fn a_daemonizer_exiting_0_leaves_no_daemon_per_restart_with_keepers_alone() {
    a_daemonizer_leaves_no_daemon_per_restart(Mode::Subreaper);
}

fn a_daemon_ignoring_the_stop_signal_gets_sigkill_at_the_timeout(mode: Mode) {
    let root = Root::new();
    root.service(
        "stubborn",
        "stubborn@1.0.0",
        &["--daemon", "double-fork", "--ignore-term"],
        "stop_timeout = \"500ms\"",
    );
    let sup = Sup::start(&root, mode.env());
    sup.wait_ready(&["stubborn"]);
    let daemon = wait_escapees(&daemons_file(&root, "stubborn"), 1);
    let _cleanup = guard(&daemon);
    let began = Instant::now();
    let (ok, _, err) = sup.act("stop", "stubborn");
    assert!(ok, "{err}");
    sup.wait_ps("stubborn is stopped", |rows| {
        row(rows, "stubborn")["state"] == "stopped"
    });
    let took = began.elapsed();
    wait_all_gone("the daemon ignoring SIGTERM", &daemon);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "stopping took {took:?} with a 500ms stop timeout"
    );
}

#[test]
fn a_daemon_ignoring_the_stop_signal_gets_sigkill_at_the_timeout_with_cgroups() {
    a_daemon_ignoring_the_stop_signal_gets_sigkill_at_the_timeout(Mode::Cgroup);
}

#[test]
fn a_daemon_ignoring_the_stop_signal_gets_sigkill_at_the_timeout_with_keepers_alone() {
    a_daemon_ignoring_the_stop_signal_gets_sigkill_at_the_timeout(Mode::Subreaper);
}

fn leftovers_get_the_stop_timeout_to_finish(mode: Mode) {
    let root = Root::new();
    // The fixture exits at once on SIGTERM; its daemon takes 300 ms.
    root.service(
        "slowdaemon",
        "slowdaemon@1.0.0",
        &["--daemon", "setsid", "--daemon-linger", "300"],
        "stop_timeout = \"5s\"",
    );
    let sup = Sup::start(&root, mode.env());
    sup.wait_ready(&["slowdaemon"]);
    let daemon = wait_escapees(&daemons_file(&root, "slowdaemon"), 1);
    let _cleanup = guard(&daemon);
    let (ok, _, err) = sup.act("stop", "slowdaemon");
    assert!(ok, "{err}");
    sup.wait_ps("slowdaemon is stopped", |rows| {
        row(rows, "slowdaemon")["state"] == "stopped"
    });
    wait_all_gone("the daemon", &daemon);
    let stopped = root.path("slowdaemon.log.daemons.stopped");
    assert_eq!(
        std::fs::read_to_string(&stopped).unwrap_or_default(),
        format!("stopped {}\n", daemon[0].pid),
        "the daemon was killed before it could finish"
    );
}

#[test]
fn leftovers_get_the_stop_timeout_to_finish_with_cgroups() {
    leftovers_get_the_stop_timeout_to_finish(Mode::Cgroup);
}

#[test]
fn leftovers_get_the_stop_timeout_to_finish_with_keepers_alone() {
    leftovers_get_the_stop_timeout_to_finish(Mode::Subreaper);
}

/// One launcher per kind of escapee.
struct Launched {
    kind: &'static str,
    launcher: Launcher,
    per_start: usize,
}

impl Launched {
    fn daemons(&self) -> PathBuf {
        self.launcher.path("starts.log.daemons")
    }

    /// The leader: the fixture itself, or the `bash` running the family.
    fn leader(&self, start: &Value) -> u32 {
        let service = pid_of(start, "pid");
        if self.kind != "family" {
            return service;
        }
        let stat = std::fs::read_to_string(format!("/proc/{service}/stat")).expect("stat");
        seaport::process::reaper::parse_stat(&stat)
            .expect("a stat line")
            .ppid
    }
}

fn launched(mode: Mode, hub: &HubProc) -> Vec<Launched> {
    let fixture_with = |kind: &str| {
        vec![
            "python3".to_string(),
            fixture("service.py"),
            "--log".into(),
            "{dir}/starts.log".into(),
            "--daemon".into(),
            kind.into(),
        ]
    };
    let runs = [
        ("setsid", fixture_with("setsid"), 1),
        ("double", fixture_with("double-fork"), 1),
        ("family", family_command("{dir}/starts.log"), 2),
    ];
    let all: Vec<Launched> = runs
        .into_iter()
        .map(|(kind, command, per_start)| Launched {
            kind,
            launcher: Launcher::start_command(
                &hub.addr(),
                &format!("{kind}@1.0.0"),
                &[],
                &command,
                mode.env(),
            ),
            per_start,
        })
        .collect();
    for l in &all {
        l.launcher.wait_starts(1);
        let list = wait_escapees(&l.daemons(), l.per_start);
        assert_alive(l.kind, &list);
        assert_contained(mode, l.launcher.proc.pid(), &list);
    }
    all
}

fn launcher_escapees(all: &[Launched]) -> Vec<Escapee> {
    all.iter().flat_map(|l| escapees(&l.daemons())).collect()
}

fn launcher_stop_leaves_nothing(mode: Mode) {
    let hub = HubProc::start(&[]);
    let mut all = launched(mode, &hub);
    let found = launcher_escapees(&all);
    let _cleanup = guard(&found);
    for l in &all {
        l.launcher.proc.signal(Signal::SIGTERM);
    }
    for l in &mut all {
        let status = l.launcher.proc.wait();
        assert!(
            status.success(),
            "{}: {status:?}\n{}",
            l.kind,
            l.launcher.stderr()
        );
    }
    wait_all_gone("an escapee of a stopped launcher", &found);
}

#[test]
fn launcher_stop_leaves_nothing_with_cgroups() {
    launcher_stop_leaves_nothing(Mode::Cgroup);
}

#[test]
fn launcher_stop_leaves_nothing_with_keepers_alone() {
    launcher_stop_leaves_nothing(Mode::Subreaper);
}

fn launcher_restart_leaves_nothing(mode: Mode) {
    let hub = HubProc::start(&[]);
    let all = launched(mode, &hub);
    let before = launcher_escapees(&all);
    let _cleanup = guard(&before);
    for l in &all {
        let leader = l.leader(&l.launcher.starts()[0]);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(leader as i32), Signal::SIGKILL)
            .expect("kill the leader");
    }
    let mut after = Vec::new();
    for l in &all {
        l.launcher.wait_starts(2);
        let list = wait_escapees(&l.daemons(), 2 * l.per_start);
        after.extend_from_slice(&list[l.per_start..]);
    }
    let _cleanup_new = guard(&after);
    wait_all_gone("an escapee of the killed leader", &before);
    assert_alive("the escapees of the restarted service", &after);
}

#[test]
fn launcher_restart_leaves_nothing_with_cgroups() {
    launcher_restart_leaves_nothing(Mode::Cgroup);
}

#[test]
fn launcher_restart_leaves_nothing_with_keepers_alone() {
    launcher_restart_leaves_nothing(Mode::Subreaper);
}

fn sigkill_of_the_launcher_leaves_nothing(mode: Mode) {
    let hub = HubProc::start(&[]);
    let mut all = launched(mode, &hub);
    let found = launcher_escapees(&all);
    let _cleanup = guard(&found);
    let leaders: Vec<u32> = all
        .iter()
        .map(|l| l.leader(&l.launcher.starts()[0]))
        .collect();
    for l in &mut all {
        l.launcher.proc.signal(Signal::SIGKILL);
        l.launcher.proc.wait();
    }
    for p in leaders {
        wait_gone("the command of a killed launcher", p);
    }
    wait_all_gone("an escapee of a killed launcher", &found);
}

#[test]
fn sigkill_of_the_launcher_leaves_nothing_with_cgroups() {
    sigkill_of_the_launcher_leaves_nothing(Mode::Cgroup);
}

#[test]
fn sigkill_of_the_launcher_leaves_nothing_with_keepers_alone() {
    sigkill_of_the_launcher_leaves_nothing(Mode::Subreaper);
}

/// The zombie children of process `parent`.
fn zombies_of(parent: u32) -> Vec<u32> {
    seaport::process::reaper::processes()
        .into_iter()
        .filter(|p| p.ppid == parent && p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// The keeper of the service whose leader is `leader`: its parent.
fn keeper_of(leader: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{leader}/stat")).expect("stat");
    seaport::process::reaper::parse_stat(&stat)
        .expect("a stat line")
        .ppid
}

#[test]
fn a_subreaper_supervisor_kills_and_reaps_what_a_killed_keeper_left() {
    let root = Root::new();
    write_services(&root);
    let sup = Sup::start(&root, Mode::Subreaper.env());
    let rows = sup.wait_ready(&["double", "family", "setsid"]);
    let members = wait_escapees(&daemons_file(&root, "family"), 2);
    let _cleanup = guard(&members);
    let bash = pid(&row(&rows, "family")["pid"]);
    let keeper = keeper_of(bash);
    assert_eq!(
        keeper_of(keeper),
        factory_of(sup.proc.pid()),
        "the keeper is the keeper factory's child"
    );
    // Killed from outside, the keeper cannot clean up: bash dies with it, and
    // its children are the supervisor's to kill and reap (the nearest
    // subreaper: the factory is none).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper as i32), Signal::SIGKILL)
        .expect("kill the keeper");
    wait_all_gone("a member of the killed keeper's family", &members);
    wait_until("the supervisor has reaped every orphan", || {
        zombies_of(sup.proc.pid()).is_empty()
    });
    // And the service comes back.
    sup.wait_ps("the family is back", |rows| {
        names_of(rows) == ["double", "family", "setsid"]
            && row(rows, "family")["state"] == "ready"
            && row(rows, "family")["pid"] != bash
    });
}

#[test]
fn as_pid_1_the_supervisor_reaps_every_orphan() {
    let root = Root::new();
    write_services(&root);
    let services = root.services().to_string_lossy().into_owned();
    let ctl = root.ctl();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--kill-child", "--mount-proc", seaport_bin()])
        .args(["supervise", &services, "--control", &ctl, "--listen", "0"])
        .env("SEAPORT_LOG", "info");
    let proc = Proc::spawn_logging_to("unshare seaport supervise", cmd, &root.path("stderr"));
    let first = proc.line();
    let port = first
        .strip_prefix("seaport listening on :")
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}\n{}", root.stderr()));
    let sup = Sup {
        proc,
        hub: format!("127.0.0.1:{port}"),
        ctl: ctl.clone(),
    };
    sup.wait_ready(&["double", "family", "setsid"]);
    assert!(
        root.stderr().contains("running as PID 1"),
        "{}",
        root.stderr()
    );
    // The supervisor is unshare's child; in its namespace it is PID 1.
    let unshare = sup.proc.pid();
    let supervisor = seaport::process::reaper::processes()
        .into_iter()
        .find(|p| p.ppid == unshare)
        .map(|p| p.pid)
        .expect("the supervisor below unshare");
    // Pids as the namespace shows them (the fixtures' records, ps), and as
    // seen from here.
    let host_pid = |in_ns: u32| {
        seaport::process::reaper::descendants(supervisor)
            .into_iter()
            .find(|&p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.starts_with("NSpid:")
                            && l.split_whitespace().last() == Some(&in_ns.to_string())
                    })
            })
            .unwrap_or_else(|| panic!("no process {in_ns} in the namespace"))
    };
    let members: Vec<Escapee> = wait_escapees(&daemons_file(&root, "family"), 2)
        .into_iter()
        .map(|e| Escapee {
            pid: host_pid(e.pid),
            port: e.port,
        })
        .collect();
    let _cleanup = guard(&members);
    let bash = host_pid(pid(&row(&sup.ps().expect("ps"), "family")["pid"]));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper_of(bash) as i32),
        Signal::SIGKILL,
    )
    .expect("kill the keeper");
    wait_all_gone("a member of the killed keeper's family", &members);
    wait_until("PID 1 has reaped every orphan", || {
        zombies_of(supervisor).is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        Signal::SIGTERM,
    )
    .expect("stop the supervisor");
    let end = Instant::now() + DEADLINE;
    while pid_alive(supervisor) {
        assert!(Instant::now() < end, "the supervisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Their pids were the namespace's, which is gone: their ports tell.
    for (name, _) in SERVICES {
        for e in escapees(&daemons_file(&root, name)) {
            wait_until(&format!("port {} is free", e.port), || !listening(e.port));
        }
    }
}

/// A cgroup made for a test and removed with whatever runs in it.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let end = Instant::now() + Duration::from_secs(5);
        let remove = |dir: &Path| {
            let subs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            for sub in subs {
                let _ = std::fs::remove_dir(sub);
            }
            std::fs::remove_dir(dir)
        };
        while remove(&self.0).is_err() && self.0.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn alone_in_a_delegated_cgroup_the_supervisor_moves_into_a_leaf() {
    let root = Root::new();
    root.service("web", "web@1.0.0", &["--daemon", "setsid"], "");
    let unique = root
        .path("")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unit = cgroup_dir(&cgroup_of(std::process::id())).join(format!("seaport-test-{unique}"));
    std::fs::create_dir(&unit).unwrap_or_else(|e| panic!("cannot make {}: {e}", unit.display()));
    let _unit = TestCgroup(unit.clone());
    // As systemd starts a unit with Delegate=yes: alone in a cgroup of its own.
    let services = root.services().to_string_lossy().into_owned();
    let ctl = root.ctl();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
        "sh",
        &unit.to_string_lossy(),
        seaport_bin(),
        "supervise",
        &services,
        "--control",
        &ctl,
        "--listen",
        "0",
    ])
    .env("SEAPORT_CGROUP", "on");
    let proc = Proc::spawn_logging_to("seaport supervise (delegated)", cmd, &root.path("stderr"));
    let first = proc.line();
    let port = first
        .strip_prefix("seaport listening on :")
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}\n{}", root.stderr()));
    let mut sup = Sup {
        proc,
        hub: format!("127.0.0.1:{port}"),
        ctl,
    };
    let rows = sup.wait_ready(&["web"]);
    let unit_path = cgroup_of(sup.proc.pid());
    assert!(
        unit_path.ends_with(&format!("/seaport-test-{unique}/supervisor")),
        "{unit_path}"
    );
    let daemon = wait_escapees(&daemons_file(&root, "web"), 1);
    let _cleanup = guard(&daemon);
    let base = unit_path.trim_end_matches("/supervisor");
    for p in [pid(&row(&rows, "web")["pid"]), daemon[0].pid] {
        let theirs = cgroup_of(p);
        assert!(
            theirs.starts_with(&format!("{base}/services/web.")),
            "{theirs}"
        );
    }
    sup.proc.signal(Signal::SIGTERM);
    assert!(sup.proc.wait().success(), "{}", root.stderr());
    wait_all_gone("the daemon", &daemon);
    assert!(
        !unit.join("services").exists(),
        "the services' cgroups are removed"
    );
}

#[test]
fn cgroup_on_fails_clearly_where_none_can_be_made() {
    // As nobody, the root of the cgroup hierarchy is not writable.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            seaport_bin(),
        ])
        .args(["register", "127.0.0.1:1", "web@1.0.0", "--", "true"])
        .env("SEAPORT_CGROUP", "on")
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("seaport: SEAPORT_CGROUP=on, but no cgroup can be made: "),
        "{err}"
    );
    // And as that user it runs with keepers alone by default.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            seaport_bin(),
        ])
        .args([
            "register",
            "127.0.0.1:1",
            "web@1.0.0",
            "--port",
            "1234",
            "--restart",
            "never",
            "--ready",
            "none",
        ])
        .args(["--", "true"])
        .env("SEAPORT_LOG", "info")
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services are contained by their keepers only"),
        "{err}"
    );
}
