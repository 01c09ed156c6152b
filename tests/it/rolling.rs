//! Rolling restarts: `seaport restart SERVICE` replaces its instances one at a
//! time, each new process ready before the next old one stops; with
//! `socket = true` the new process starts on the held socket before the old
//! one stops, so the record never goes away.

use crate::harness::{Rows, wait_gone, wait_until};
use crate::supervisor::{Root, Sup, pid, row};
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn a_service_restarts_one_instance_at_a_time_and_never_has_none_registered() {
    let root = Root::new();
    root.service(
        "web",
        "web@1.0.0",
        &["--slow-start", "300"],
        "instances = 3",
    );
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2", "web.3"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let mut live: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();
    assert_eq!(live.len(), 3);

    let (ok, out, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "web.1 web.2 web.3");
    // Each instance is freed, then registered again, before the next one is
    // freed: never fewer than two of three records.
    let mut order = Vec::new();
    for _ in 0..3 {
        let freed = rows.next();
        assert_eq!(freed[0], "free", "{freed}");
        assert!(live.remove(&freed[1].to_string()));
        assert_eq!(live.len(), 2, "two records while one instance restarts");
        let back = rows.next();
        assert_eq!(back[0], "register", "{back}");
        assert_eq!(back[1], freed[1], "the same instance comes back first");
        live.insert(back[1].to_string());
        order.push(back[2]["port"].clone());
    }
    let expected: Vec<_> = ["web.1", "web.2", "web.3"]
        .iter()
        .map(|n| row(&before, n)["port"].clone())
        .collect();
    assert_eq!(order, expected, "in instance order, on their ports");
    let after = sup.wait_ps("all ready again", |rows| {
        rows.iter().all(|r| r["state"] == "ready")
    });
    for name in ["web.1", "web.2", "web.3"] {
        assert_ne!(
            row(&after, name)["pid"],
            row(&before, name)["pid"],
            "{name}"
        );
        wait_gone("an old process", pid(&row(&before, name)["pid"]));
    }
}

#[test]
fn with_a_held_socket_the_new_process_is_ready_before_the_old_stops_and_the_record_stays() {
    let root = Root::new();
    root.service(
        "web",
        "web@1.0.0",
        &["--slow-start", "200"],
        "instances = 2\nsocket = true",
    );
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    assert_eq!(dump.len(), 2);
    let (ok, _, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    let after = sup.wait_ps("both replaced", |rows| {
        ["web.1", "web.2"].iter().all(|n| {
            let r = row(rows, n);
            r["state"] == "ready" && r["pid"] != row(&before, n)["pid"]
        })
    });
    for name in ["web.1", "web.2"] {
        assert_eq!(row(&after, name)["port"], row(&before, name)["port"]);
        wait_gone("an old process", pid(&row(&before, name)["pid"]));
    }
    assert_eq!(
        rows.next_within(Duration::from_millis(500)),
        None,
        "no record was freed or changed"
    );
    let starts = root.starts("web");
    assert_eq!(starts.len(), 4, "{starts:#?}");
    let stderr = root.stderr();
    assert!(stderr.contains("on the held socket"), "{stderr}");
    assert!(stderr.contains("web: rolling restart done"), "{stderr}");
}

#[test]
fn a_changed_file_replaces_instances_one_at_a_time_each_ready_before_an_old_one_stops() {
    let root = Root::new();
    let file = root.service("web", "web@1.0.0", &[], "instances = 2");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let old_ids: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();
    assert_eq!(old_ids.len(), 2);

    // Version 2, whose processes take a while to accept connections.
    let text = std::fs::read_to_string(&file).expect("read");
    let text = text
        .replace("web@1.0.0", "web@2.0.0")
        .replace("\"--log\"", "\"--slow-start\", \"300\", \"--log\"");
    std::fs::write(&file, text).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);

    // register v2, free v1, register v2, free v1: never fewer than two.
    let mut live = old_ids.clone();
    let mut versions = Vec::new();
    for _ in 0..2 {
        let new = rows.next();
        assert_eq!(new[0], "register", "{new}");
        assert_eq!(new[2]["version"], "2.0.0", "{new}");
        live.insert(new[1].to_string());
        let gone = rows.next();
        assert_eq!(gone[0], "free", "{gone}");
        assert!(
            old_ids.contains(&gone[1].to_string()),
            "an old one is freed: {gone}"
        );
        live.remove(&gone[1].to_string());
        assert_eq!(live.len(), 2, "two records all along");
        versions.push(new[2]["version"].clone());
    }
    assert_eq!(versions, ["2.0.0", "2.0.0"]);
    let after = sup.wait_ps("both new ones ready, the old ones gone", |rows| {
        rows.len() == 2
            && rows
                .iter()
                .all(|r| r["state"] == "ready" && r["role"] == "web@2.0.0")
    });
    for name in ["web.1", "web.2"] {
        wait_gone("an old process", pid(&row(&before, name)["pid"]));
        assert_ne!(row(&after, name)["pid"], row(&before, name)["pid"]);
    }
    let stderr = root.stderr();
    assert!(
        stderr.contains("web: changed, replacing its instances one at a time"),
        "{stderr}"
    );
    assert!(stderr.contains("web: rolling reload done"), "{stderr}");
}

#[test]
fn with_a_held_socket_the_old_process_serves_until_the_new_one_itself_accepts() {
    let root = Root::new();
    let go = root.path("go").to_string_lossy().into_owned();
    std::fs::write(&go, "").expect("go");
    root.service("web", "web@1.0.0", &["--wait-for", &go], "socket = true");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web"]);
    let old = pid(&row(&before, "web")["pid"]);
    let (rows, _) = Rows::connect(&sup.hub);

    // The new process will not accept until `go` is back; the old one, which
    // shares the socket, must not count as the new one being ready.
    std::fs::remove_file(&go).expect("no go");
    let (ok, _, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    wait_until("the new process runs", || root.starts("web").len() == 2);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        crate::harness::pid_alive(old),
        "the old process was stopped before the new one accepted"
    );
    let port = row(&before, "web")["port"].as_u64().expect("port");
    let port = u16::try_from(port).expect("port");
    // The old process is never left paused: each connection is served at once.
    for _ in 0..5 {
        served_within(port, Duration::from_millis(500));
    }
    std::fs::write(&go, "").expect("go");
    wait_gone("the old process, once the new one accepts", old);
    let after = sup.wait_ready(&["web"]);
    assert_ne!(pid(&row(&after, "web")["pid"]), old);
    assert_eq!(
        rows.next_within(Duration::from_millis(300)),
        None,
        "the record stayed"
    );
}

#[test]
fn two_restarts_at_once_both_finish_and_the_supervisor_still_stops_at_once() {
    let root = Root::new();
    root.service(
        "web",
        "web@1.0.0",
        &["--slow-start", "200"],
        "instances = 2\nsocket = true",
    );
    let mut sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    for _ in 0..2 {
        let (ok, _, err) = sup.act("restart", "web");
        assert!(ok, "{err}");
    }
    wait_until("both rolling restarts are done", || {
        root.stderr().matches("web: rolling restart done").count() == 2
    });
    let after = sup.wait_ready(&["web.1", "web.2"]);
    for name in ["web.1", "web.2"] {
        assert_ne!(row(&after, name)["pid"], row(&before, name)["pid"]);
    }
    sup.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let began = std::time::Instant::now();
    assert!(sup.proc.wait().success(), "{}", root.stderr());
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        began.elapsed()
    );
}

#[test]
fn a_new_process_that_dies_while_replacing_leaves_the_old_one_serving_and_says_so() {
    // Exits at once with code 3 (`--exit` would always: a shell decides).
    a_failed_replacement_changes_nothing(
        "exit 3",
        "",
        "the new process exited with code 3 before it was ready",
    );
}

#[test]
fn a_new_process_never_ready_is_stopped_at_its_start_timeout_and_the_old_one_serves_on() {
    let fixture = crate::harness::fixture("service.py");
    a_failed_replacement_changes_nothing(
        &format!("exec python3 {fixture} --no-listen \"$@\""),
        "start_timeout = \"700ms\"\n",
        "not ready within its start timeout (700ms)",
    );
}

/// Two instances of a socket service run; then, with the new processes
/// doing `instead` (a shell command), a restart halts at the first instance
/// and logs `says`, and nothing changed: both old processes serve, neither
/// record moved. `extra` is added to the service file.
fn a_failed_replacement_changes_nothing(instead: &str, extra: &str, says: &str) {
    let root = Root::new();
    let go = root.path("go").to_string_lossy().into_owned();
    std::fs::write(&go, "").expect("go");
    let fixture = crate::harness::fixture("service.py");
    let log = root.log("web").to_string_lossy().into_owned();
    let script = format!("test -e {go} || {instead}; exec python3 {fixture} --log {log} \"$@\"");
    root.write(
        "web.toml",
        &format!(
            "role = \"web@1.0.0\"\ncommand = [\"sh\", \"-c\", {}, \"web\"]\ninstances = 2\nsocket = true\n{extra}",
            serde_json::json!(script)
        ),
    );
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, _) = Rows::connect(&sup.hub);
    std::fs::remove_file(&go).expect("no go");
    let (ok, _, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    wait_until("the rollout halts at web.1", || {
        root.stderr().contains("web: rolling restart halted: web.1")
    });
    let stderr = root.stderr();
    assert!(stderr.contains(says), "{stderr}");
    let now = sup.wait_ready(&["web.1", "web.2"]);
    for name in ["web.1", "web.2"] {
        assert_eq!(row(&now, name)["pid"], row(&before, name)["pid"], "{name}");
        let port = u16::try_from(row(&now, name)["port"].as_u64().expect("port")).expect("port");
        served_within(port, Duration::from_millis(500));
    }
    assert_eq!(rows.next_within(Duration::from_millis(300)), None);
}

/// A connection to `port` is accepted and closed by the service within `within`.
fn served_within(port: u16, within: Duration) {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(within)).expect("timeout");
    let read = std::io::Read::read(&mut conn, &mut [0u8; 1]);
    assert!(
        matches!(read, Ok(0)),
        "not served within {within:?}: {read:?}"
    );
}

#[test]
fn stopping_a_service_mid_rollout_stops_its_old_instances_too() {
    let root = Root::new();
    let file = root.service("web", "web@1.0.0", &[], "instances = 2");
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    // Version 2 never accepts: the rollout waits at its first instance.
    let text = std::fs::read_to_string(&file).expect("read");
    let text = text
        .replace("web@1.0.0", "web@2.0.0")
        .replace("\"--log\"", "\"--no-listen\", \"--log\"");
    std::fs::write(&file, text).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the new web.1 runs", || {
        root.starts("web")
            .iter()
            .any(|s| s["argv"].to_string().contains("--no-listen"))
    });
    let (ok, _, err) = sup.act("stop", "web");
    assert!(ok, "{err}");
    for name in ["web.1", "web.2"] {
        wait_gone("an old instance", pid(&row(&before, name)["pid"]));
    }
    // The frees were sent before the stop signals; the hub takes them from
    // the supervisor's client in its own time.
    wait_until("no record is left", || Rows::connect(&sup.hub).1.is_empty());
}

#[test]
fn a_changed_file_of_a_socket_service_is_taken_up_on_the_same_port_refusing_nothing() {
    let root = Root::new();
    let file = root.service(
        "web",
        "web@1.0.0",
        &["--slow-start", "200"],
        "socket = true\ninstances = 2",
    );
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let ids: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();
    let port = |rows: &[serde_json::Value], n: &str| {
        u16::try_from(row(rows, n)["port"].as_u64().expect("port")).expect("port")
    };
    let hammers = [
        crate::ports::Hammer::start(port(&before, "web.1")),
        crate::ports::Hammer::start(port(&before, "web.2")),
    ];
    wait_until("both serve", || hammers.iter().all(|h| h.served() > 10));

    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("web@1.0.0", "web@2.0.0")).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    // Each record is registered again as version 2, same id, same port.
    for _ in 0..2 {
        let row = rows.next();
        assert_eq!(row[0], "register", "{row}");
        assert_eq!(row[2]["version"], "2.0.0", "{row}");
        assert!(ids.contains(&row[1].to_string()), "same id: {row}");
    }
    let after = sup.wait_ps("both run version 2", |rows| {
        ["web.1", "web.2"].iter().all(|n| {
            let r = row(rows, n);
            r["state"] == "ready" && r["role"] == "web@2.0.0" && r["pid"] != row(&before, n)["pid"]
        })
    });
    for name in ["web.1", "web.2"] {
        assert_eq!(
            port(&after, name),
            port(&before, name),
            "{name} keeps its port"
        );
        wait_gone("an old process", pid(&row(&before, name)["pid"]));
    }
    for hammer in hammers {
        let before = hammer.served();
        wait_until("served after the reload", || hammer.served() > before + 10);
        let (refused, served) = hammer.finish();
        assert_eq!(refused, 0, "refused during the reload ({served} served)");
    }
    assert!(
        root.stderr()
            .contains("web: reloaded, one instance at a time"),
        "{}",
        root.stderr()
    );
}

/// `services/web.toml` for a socket service of `instances` whose process
/// exits at once (code 3) while ROOT/broken exists, else runs the fixture.
fn breakable(root: &Root, role: &str, instances: u32) -> std::path::PathBuf {
    let broken = root.path("broken").to_string_lossy().into_owned();
    let fixture = crate::harness::fixture("service.py");
    let log = root.log("web").to_string_lossy().into_owned();
    let script = format!(
        "test -e {broken} && exit 3; exec python3 {fixture} --slow-start 100 --log {log} \"$@\""
    );
    root.write(
        "web.toml",
        &format!(
            "role = \"{role}\"\ncommand = [\"sh\", \"-c\", {}, \"web\"]\ninstances = {instances}\nsocket = true\n",
            serde_json::json!(script)
        ),
    )
}

/// The versions of the register rows until both `ids` were registered as `version`.
fn until_registered(rows: &Rows, ids: &BTreeSet<String>, version: &str) {
    let mut seen = BTreeSet::new();
    while seen != *ids {
        let row = rows.next();
        if row[0] == "register" && row[2]["version"] == version {
            seen.insert(row[1].to_string());
        }
    }
}

#[test]
fn reloads_that_overlap_a_restart_or_each_other_end_on_the_last_file() {
    let root = Root::new();
    let file = breakable(&root, "web@1.0.0", 2);
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let ids: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();
    // A restart under way, then two changes of the file close together.
    let (ok, _, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("web@1.0.0", "web@2.0.0")).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the first reload is seen", || {
        root.stderr()
            .contains("web: changed, replacing its processes")
    });
    std::fs::write(&file, text.replace("web@1.0.0", "web@3.0.0")).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    until_registered(&rows, &ids, "3.0.0");
    wait_until("the last reload is done", || {
        root.stderr()
            .contains("web: reloaded, one instance at a time")
    });
    // Nothing still runs or registers an older version.
    assert_eq!(rows.next_within(Duration::from_millis(500)), None);
    let (_, dump) = Rows::connect(&sup.hub);
    assert!(dump.iter().all(|r| r[2]["version"] == "3.0.0"), "{dump:#?}");
}

#[test]
fn a_reload_that_failed_is_tried_again_by_the_next_one() {
    let root = Root::new();
    let file = breakable(&root, "web@1.0.0", 2);
    let sup = Sup::start(&root, &[]);
    let before = sup.wait_ready(&["web.1", "web.2"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let ids: BTreeSet<String> = dump.iter().map(|r| r[1].to_string()).collect();
    std::fs::write(root.path("broken"), "").expect("break it");
    let text = std::fs::read_to_string(&file).expect("read");
    std::fs::write(&file, text.replace("web@1.0.0", "web@2.0.0")).expect("write");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the reload halts at web.1", || {
        root.stderr().contains("web: reload halted at web.1")
    });
    // The old processes go on, and their records did not change.
    let now = sup.wait_ready(&["web.1", "web.2"]);
    for name in ["web.1", "web.2"] {
        assert_eq!(row(&now, name)["pid"], row(&before, name)["pid"], "{name}");
    }
    assert_eq!(rows.next_within(Duration::from_millis(300)), None);
    // Fixed outside the file: the same file, reloaded again, goes through.
    std::fs::remove_file(root.path("broken")).expect("fix it");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    until_registered(&rows, &ids, "2.0.0");
    wait_until("the reload is done", || {
        root.stderr()
            .contains("web: reloaded, one instance at a time")
    });
}
