//! The `seaport` command line: show, query, watch, help and errors.

use crate::harness::{HubProc, Proc, Raw, refused, seaport, wait_until};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Runs a `seaport` command to completion; returns (status ok, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = seaport(args).output().expect("run seaport");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A hub holding two web records and one db record, registered over a raw
/// connection kept open for the hub's lifetime.
fn hub_with_records() -> (HubProc, Raw) {
    let hub = HubProc::start(&[]);
    let (mut owner, _, _) = Raw::connect_synced(&hub.addr());
    owner.send(r#"["register","W1",{"role":"web","version":"1.2.3","port":4001,"host":"127.0.0.1","meta":{"zone":"eu"}}]"#);
    owner.send(
        r#"["register","W2",{"role":"web","version":"2.0.0","port":4002,"host":"127.0.0.1"}]"#,
    );
    owner.send(
        r#"["register","D1",{"role":"db","version":"9.6.0","port":5432,"host":"127.0.0.1"}]"#,
    );
    let (_probe, _, dump) = Raw::connect_synced(&hub.addr());
    if dump.len() < 3 {
        crate::harness::wait_until("three records are registered", || {
            Raw::connect_synced(&hub.addr()).2.len() == 3
        });
    }
    (hub, owner)
}

#[test]
fn show_prints_every_record_as_a_pretty_json_array() {
    let (hub, _owner) = hub_with_records();
    let (ok, stdout, stderr) = run(&["show", &hub.addr()]);
    assert!(ok, "show failed: {stderr}");
    let records: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(records.as_array().map(Vec::len), Some(3));
    assert_eq!(records[0]["id"], "W1");
    assert_eq!(records[0]["meta"], json!({"zone":"eu"}));
    assert!(
        stdout.starts_with("[\n  {\n    \"role\": \"web\",\n"),
        "not 2-space pretty JSON:\n{stdout}"
    );
    // A bare port means localhost.
    let (ok, by_port, _) = run(&["show", &hub.port.to_string()]);
    assert!(ok);
    assert_eq!(by_port, stdout);
}

#[test]
fn query_filters_by_range_and_drills_into_fields() {
    let (hub, _owner) = hub_with_records();
    let (ok, stdout, stderr) = run(&["query", &hub.addr(), "web@1.x", "port"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "[\n  4001\n]\n");
    let (_, stdout, _) = run(&["query", &hub.addr(), "web", "meta", "zone"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).ok(),
        Some(json!(["eu", null]))
    );
    let (_, stdout, _) = run(&["query", &hub.addr(), "nothing"]);
    assert_eq!(stdout, "[]\n");
    let (_, stdout, _) = run(&["query", &hub.addr()]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len)),
        Some(3)
    );
}

#[test]
fn query_refuses_an_invalid_range_clearly() {
    let (ok, _, stderr) = run(&["query", "127.0.0.1:1", "web@>=banana"]);
    assert!(!ok);
    assert!(stderr.contains("banana"), "{stderr}");
}

#[test]
fn watch_prints_register_and_free_lines() {
    let (hub, owner) = hub_with_records();
    let watch = Proc::spawn("seaport watch", seaport(&["watch", &hub.addr()]));
    assert_eq!(watch.line(), "REGISTER web@1.2.3 127.0.0.1:4001 [W1]");
    assert_eq!(watch.line(), "REGISTER web@2.0.0 127.0.0.1:4002 [W2]");
    assert_eq!(watch.line(), "REGISTER db@9.6.0 127.0.0.1:5432 [D1]");
    let (mut other, _, _) = Raw::connect_synced(&hub.addr());
    other.send(r#"["register","N1",{"role":"cache","port":6379}]"#);
    assert_eq!(watch.line(), "REGISTER cache 127.0.0.1:6379 [N1]");
    drop(owner);
    let mut frees = vec![watch.line(), watch.line(), watch.line()];
    frees.sort();
    assert_eq!(
        frees,
        [
            "FREE db@9.6.0 127.0.0.1:5432 [D1]",
            "FREE web@1.2.3 127.0.0.1:4001 [W1]",
            "FREE web@2.0.0 127.0.0.1:4002 [W2]",
        ]
    );
}

#[test]
fn watch_ends_quietly_when_its_reader_goes() {
    let (hub, _owner) = hub_with_records();
    let mut watch = seaport(&["watch", &hub.addr()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let stdout = watch.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first).expect("a line");
    assert!(first.starts_with("REGISTER "), "{first:?}");
    // `seaport watch | head -1`: the reader goes, then news comes.
    drop(lines);
    let (mut other, _, _) = Raw::connect_synced(&hub.addr());
    for n in 0..20 {
        other.send(&format!(
            r#"["register","N{n}",{{"role":"cache","port":{}}}]"#,
            7000 + n
        ));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch went on without a reader"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn watch_verbose_adds_the_record_as_indented_json() {
    let hub = HubProc::start(&[]);
    let watch = Proc::spawn("seaport watch -v", seaport(&["watch", &hub.addr(), "-v"]));
    let (mut other, _, _) = Raw::connect_synced(&hub.addr());
    other.send(r#"["register","N1",{"role":"cache","port":6379,"host":"10.0.0.1"}]"#);
    assert_eq!(watch.line(), "REGISTER cache 10.0.0.1:6379 [N1]");
    let block: Vec<String> = (0..6).map(|_| watch.line()).collect();
    assert_eq!(
        block,
        [
            "  {",
            "    \"role\": \"cache\",",
            "    \"port\": 6379,",
            "    \"host\": \"10.0.0.1\",",
            "    \"id\": \"N1\"",
            "  }",
        ]
    );
}

#[test]
fn version_help_and_help_on_every_command() {
    let (ok, stdout, _) = run(&["--version"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        format!("seaport {}", env!("CARGO_PKG_VERSION"))
    );
    let (ok, stdout, _) = run(&["help"]);
    assert!(ok);
    for command in ["listen", "show", "query", "watch"] {
        assert!(stdout.contains(command), "help does not list {command}");
        let (ok, stdout, _) = run(&[command, "--help"]);
        assert!(ok, "{command} --help failed");
        assert!(
            stdout.contains("Usage: seaport "),
            "{command} --help: {stdout}"
        );
    }
}

#[test]
fn bad_hub_addresses_and_unreachable_hubs_are_clear_errors() {
    let (ok, _, stderr) = run(&["show", "not a hub"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid hub address \"not a hub\""),
        "{stderr}"
    );
    let port = crate::harness::free_port().to_string();
    let (ok, _, stderr) = run(&["show", &format!("127.0.0.1:{port}"), "--wait", "0.5"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot reach the hub at 127.0.0.1:{port}")),
        "{stderr}"
    );
    let stderr = refused(&["free", &format!("127.0.0.1:{port}"), "ABC"]);
    assert!(
        stderr.contains(&format!("cannot reach the hub at 127.0.0.1:{port}")),
        "{stderr}"
    );
    let stderr = refused(&["show", "1", "--wait", "nan"]);
    assert!(
        stderr.contains("expected seconds from 0 to 3600"),
        "{stderr}"
    );
    // A hub that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let (ok, _, stderr) = run(&["query", &addr, "web", "--wait", "0.5"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("no answer from the hub at {addr} within 0.5 s")),
        "{stderr}"
    );
}

#[test]
fn listen_prints_the_real_port_and_stops_cleanly_on_sigterm() {
    let mut hub = HubProc::start(&[]);
    assert_ne!(hub.port, 0);
    hub.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(hub.proc.wait().success(), "listen must exit 0 on SIGTERM");
}

#[test]
fn a_stopping_hub_refuses_new_connections_before_it_closes_its_clients() {
    let mut hub = HubProc::start(&[]);
    let (raw, _, _) = Raw::connect_synced(&hub.addr());
    let closed = raw.closed_at();
    hub.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        if std::net::TcpStream::connect(hub.addr()).is_err() {
            break std::time::Instant::now();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stopping hub still accepts"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let closed = closed.join().expect("reader thread");
    assert!(
        refused < closed,
        "the hub closed its client {:?} before it refused new connections",
        refused - closed
    );
    assert!(hub.proc.wait().success(), "listen must exit 0 on SIGTERM");
}

/// An argument that is not UTF-8 text is named in a usage error, not a
/// panic.
#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"web@1.0.0\xff");
    let out = seaport(&["query", "127.0.0.1:1"])
        .arg(bad)
        .output()
        .expect("run seaport");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("seaport: argument 3 is not UTF-8 text: \"web@1.0.0\u{fffd}\""),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn register_refuses_a_role_or_port_nobody_could_find_before_running_anything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ran = dir.path().join("ran");
    let command = format!("touch {}", ran.display());
    for (role, says) in [
        ("@1.0.0", "role: \"@1.0.0\" has no name"),
        (
            "web@notsemver",
            "role: \"web@notsemver\" is not name or name@version",
        ),
        ("web@1.0.0@x", "role: \"web@1.0.0@x\" has more than one @"),
    ] {
        let stderr = refused(&["register", "1", role, "--", "sh", "-c", &command]);
        assert!(stderr.contains(says), "{role}: {stderr}");
    }
    let stderr = refused(&[
        "register",
        "1",
        "web@1.0.0",
        "--port",
        "0",
        "--",
        "sh",
        "-c",
        &command,
    ]);
    assert!(stderr.contains("--port"), "{stderr}");
    assert!(!ran.exists(), "a refused launcher ran its command");
}

#[test]
fn listen_refuses_a_line_limit_that_leaves_no_room_for_a_record() {
    let stderr = refused(&["listen", "0", "--max-line", "100"]);
    assert!(
        stderr.contains("--max-line 100 leaves no room for a record"),
        "{stderr}"
    );
}

/// A client that cannot reach its hub says so, and why, once: `watch` does
/// not sit silent.
#[test]
fn watch_says_why_it_cannot_reach_the_hub() {
    let port = crate::harness::free_port();
    let watch = Proc::spawn("watch", seaport(&["watch", &format!("127.0.0.1:{port}")]));
    let said = format!("cannot connect to the hub at 127.0.0.1:{port}: Connection refused");
    wait_until("watch says it cannot connect", || {
        watch.stderr().contains(&said)
    });
}

/// A hub that closes the connection right after its dump (here: the row sent
/// is longer than its lines) is tried again a second later, not at once.
#[test]
fn a_hub_that_drops_the_client_right_after_syncing_is_not_hammered() {
    let hub = HubProc::start(&["--max-line", "600"]);
    let pad = "x".repeat(700);
    let launcher = Proc::spawn(
        "register",
        seaport(&[
            "register",
            &hub.addr(),
            "big@1.0.0",
            &format!("--meta.pad={pad}"),
            "--ready",
            "none",
            "--",
            "sleep",
            "60",
        ]),
    );
    let closed = || {
        hub.proc
            .stderr()
            .matches("received a line longer than")
            .count()
    };
    wait_until("the hub closes the connection once", || closed() >= 1);
    let first = Instant::now();
    // One retry at once, then one a second.
    wait_until("the hub closes it three more times", || closed() >= 4);
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "four connections in {:?}",
        first.elapsed()
    );
    drop(launcher);
}
