//! Health checks: an instance failing its check has its record freed while it
//! is unhealthy and registered again when it recovers; after `failures` failed
//! checks in a row it is restarted; `ps` shows health; bad `health` tables are
//! refused by `--check` with the key at fault.

use crate::harness::{Rows, wait_until};
use crate::supervisor::{Root, Sup, check, row};

/// `services/web.toml`: the fixture answering HTTP, sick while ROOT/sick exists.
fn web(root: &Root, health: &str) {
    let sick = root.path("sick").to_string_lossy().into_owned();
    root.service(
        "web",
        "web@1.0.0",
        &["--http", "--sick-if", &sick],
        &format!("health = {health}"),
    );
}

#[test]
fn an_unhealthy_instance_is_freed_and_comes_back_when_it_recovers() {
    let root = Root::new();
    web(
        &root,
        r#"{ http = "/healthz", interval = "100ms", timeout = "1s", failures = 1000 }"#,
    );
    let sup = Sup::start(&root, &[]);
    let ready = sup.wait_ready(&["web"]);
    assert_eq!(row(&ready, "web")["health"], "healthy", "{ready:#?}");
    let (rows, dump) = Rows::connect(&sup.hub);
    assert_eq!(dump.len(), 1);
    let id = dump[0][1].clone();

    std::fs::write(root.path("sick"), "").expect("make it sick");
    let freed = rows.next();
    assert_eq!(freed[0], "free", "{freed}");
    assert_eq!(freed[1], id);
    let sick = sup.wait_ps("unhealthy in ps", |rows| {
        row(rows, "web")["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("unhealthy") && h.contains("GET /healthz answered 500"))
    });
    assert_eq!(
        row(&sick, "web")["pid"],
        row(&ready, "web")["pid"],
        "not restarted"
    );

    std::fs::remove_file(root.path("sick")).expect("make it well");
    let back = rows.next();
    assert_eq!(back[0], "register", "{back}");
    assert_eq!(back[1], id, "the same record comes back");
    let well = sup.wait_ps("healthy again", |rows| {
        row(rows, "web")["health"] == "healthy"
    });
    assert_eq!(row(&well, "web")["pid"], row(&ready, "web")["pid"]);
    let stderr = root.stderr();
    assert!(
        stderr.contains("its record is freed until one passes"),
        "{stderr}"
    );
    assert!(stderr.contains("web: healthy again"), "{stderr}");
}

#[test]
fn failures_in_a_row_restart_the_instance_and_it_registers_only_when_healthy() {
    let root = Root::new();
    web(
        &root,
        r#"{ http = "/healthz", interval = "100ms", timeout = "1s", failures = 2 }"#,
    );
    let sup = Sup::start(&root, &[]);
    let ready = sup.wait_ready(&["web"]);
    let (rows, _) = Rows::connect(&sup.hub);
    std::fs::write(root.path("sick"), "").expect("make it sick");
    assert_eq!(rows.next()[0], "free");
    let restarted = sup.wait_ps("restarted for its health", |rows| {
        row(rows, "web")["restarts"].as_u64() >= Some(2)
    });
    assert!(
        row(&restarted, "web")["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 failed health checks in a row")),
        "{restarted:#?}"
    );
    // While sick, the restarted processes are never registered.
    assert_eq!(
        rows.next_within(std::time::Duration::from_millis(500)),
        None
    );
    assert_ne!(row(&restarted, "web")["state"], "ready");
    std::fs::remove_file(root.path("sick")).expect("make it well");
    let back = rows.next();
    assert_eq!(back[0], "register", "{back}");
    let well = sup.wait_ready(&["web"]);
    assert_ne!(row(&well, "web")["pid"], row(&ready, "web")["pid"]);
    assert_eq!(row(&well, "web")["health"], "healthy");
    wait_until("the restart is logged", || {
        root.stderr()
            .contains("2 failed health checks in a row, the last: GET /healthz answered 500")
    });
}

#[test]
fn tcp_and_exec_checks_pass_for_a_listening_service() {
    let root = Root::new();
    root.service(
        "a",
        "a@1.0.0",
        &[],
        r#"health = { tcp = true, interval = "100ms" }"#,
    );
    root.service(
        "b",
        "b@1.0.0",
        &[],
        r#"health = { exec = ["sh", "-c", "test -n \"$PORT\""], interval = 1 }"#,
    );
    let sup = Sup::start(&root, &[]);
    let ready = sup.wait_ready(&["a", "b"]);
    assert_eq!(row(&ready, "a")["health"], "healthy");
    assert_eq!(row(&ready, "b")["health"], "healthy");
}

#[test]
fn check_refuses_bad_health_tables_naming_the_key() {
    let root = Root::new();
    let cases = [
        (
            "a",
            r#"health = { http = "healthz" }"#,
            "health.http: expected a path starting with /, got \"healthz\"",
        ),
        (
            "b",
            r#"health = { http = "/x", tcp = true }"#,
            "health: give exactly one of http, tcp = true or exec, got 2",
        ),
        (
            "c",
            r#"health = { exec = ["no-such-program-anywhere"] }"#,
            "health.exec: \"no-such-program-anywhere\" is not on PATH",
        ),
        (
            "d",
            r#"health = { tcp = true, interval = "soon" }"#,
            "health.interval:",
        ),
        (
            "e",
            r#"health = { tcp = true, failures = 0 }"#,
            "health.failures: must be a whole number of at least 1, got 0",
        ),
        (
            "f",
            r#"health = { tcp = true, every = "1s" }"#,
            "health.every: unknown key",
        ),
        ("g", r#"health = "/healthz""#, "health: expected a table"),
    ];
    for (name, health, _) in cases {
        root.service(name, &format!("{name}@1.0.0"), &[], health);
    }
    let (ok, _, err) = check(&root.services());
    assert!(!ok, "{err}");
    for (name, _, expected) in cases {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{name}.toml")) && l.contains(expected)),
            "{name}: {expected}\n{err}"
        );
    }
}

#[test]
fn a_restart_brings_back_the_record_a_failed_check_freed() {
    let root = Root::new();
    web(
        &root,
        r#"{ http = "/healthz", interval = "100ms", timeout = "1s", failures = 1000 }
socket = true"#,
    );
    let sup = Sup::start(&root, &[]);
    sup.wait_ready(&["web"]);
    let (rows, dump) = Rows::connect(&sup.hub);
    let id = dump[0][1].clone();
    std::fs::write(root.path("sick"), "").expect("make it sick");
    assert_eq!(rows.next()[0], "free");
    std::fs::remove_file(root.path("sick")).expect("well again");
    // A restart before the next check: the new process is healthy, and its
    // record must come back with it.
    let (ok, _, err) = sup.act("restart", "web");
    assert!(ok, "{err}");
    let back = rows.next();
    assert_eq!(back[0], "register", "{back}");
    assert_eq!(back[1], id);
}

#[test]
fn tcp_checks_are_refused_for_a_held_socket() {
    let root = Root::new();
    root.service(
        "a",
        "a@1.0.0",
        &[],
        "health = { tcp = true }\nsocket = true",
    );
    let (ok, _, err) = check(&root.services());
    assert!(!ok);
    assert!(
        err.contains("health.tcp: cannot check a service with socket = true"),
        "{err}"
    );
}

/// A supervisor that reaps adopted orphans (a child subreaper without
/// cgroups, or PID 1) must not take its own exec checks for orphans: a
/// check reaped by the orphan reaper would fail with "No child processes"
/// and free a healthy instance's record.
#[test]
fn exec_checks_pass_while_the_supervisor_reaps_orphans() {
    let root = Root::new();
    let names = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"];
    for name in names {
        root.service(
            name,
            &format!("{name}@1.0.0"),
            &[],
            r#"health = { exec = ["true"], interval = "20ms", failures = 1 }"#,
        );
    }
    let sup = Sup::start(&root, &[("SEAPORT_CGROUP", "off")]);
    let ready = sup.wait_ready(&names);
    for name in names {
        assert_eq!(row(&ready, name)["health"], "healthy");
    }
    // About 1,500 checks.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < end {
        let stderr = root.stderr();
        assert!(
            !stderr.contains("health check failed"),
            "a check failed:\n{stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
