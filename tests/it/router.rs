//! `seaport route`: the seed's "http router" example as a reverse proxy.
//! Backends are `tests/fixtures/http_echo.py` run by our launcher; requests
//! are written by hand, so that every byte on the wire is the test's.

use crate::harness::{HubProc, Proc, Raw, fixture, free_port, node_hub, seaport, wait_until};
use crate::launcher::Launcher;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A running `seaport route 0 --hub HUB ARGS...`.
struct Route {
    proc: Proc,
    port: u16,
}

impl Route {
    fn start(hub: &str, args: &[&str]) -> Route {
        let mut argv = vec!["route", "0", "--hub", hub, "--host", "127.0.0.1"];
        argv.extend_from_slice(args);
        let proc = Proc::spawn("seaport route", seaport(&argv));
        let first = proc.line();
        let port = first
            .strip_prefix("seaport route listening on :")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from route: {first:?}"));
        Route { proc, port }
    }

    fn connect(&self) -> Http {
        Http::connect(self.port)
    }
}

/// One client connection, HTTP/1.1 written and read by hand.
struct Http {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A response: status, lower-case headers, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

impl Http {
    fn connect(port: u16) -> Http {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the router");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Http {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    fn get(&mut self, host: &str, path: &str) -> Answer {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.writer.write_all(request.as_bytes()).expect("send");
        self.read()
    }

    fn read(&mut self) -> Answer {
        // The headers are read to find the body's length.
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .expect("a content-length");
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// `seaport register HUB http@VERSION -- python3 http_echo.py VERSION`.
fn backend(hub: &str, version: &str) -> Launcher {
    let command = [
        "python3".to_string(),
        fixture("http_echo.py"),
        version.to_string(),
    ];
    Launcher::start_command(hub, &format!("http@{version}"), &[], &command, &[])
}

/// Waits until a request for `host` is answered by a backend of `version`.
fn wait_routed(route: &Route, host: &str, version: &str) {
    wait_until(&format!("{host} reaches version {version}"), || {
        let answer = route.connect().get(host, "/");
        answer.status == 200 && answer.json()["version"] == version
    });
}

#[test]
fn the_seeds_example_routes_stable_and_unstable_by_host() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let _v1 = backend(&hub.addr(), "0.1.0");
    let route = Route::start(
        &hub.addr(),
        &[
            "--rule",
            "stable=http@0.0.x",
            "--rule",
            "unstable=http@0.1.x",
            "--default",
            "http@0.0.x",
        ],
    );
    wait_routed(&route, "stable", "0.0.0");
    wait_routed(&route, "unstable", "0.1.0");
    // On one keep-alive connection, each request goes by its own Host.
    let mut http = route.connect();
    for (host, version) in [
        ("stable", "0.0.0"),
        ("UNSTABLE:80", "0.1.0"),
        ("other.example", "0.0.0"),
        ("unstable", "0.1.0"),
    ] {
        let answer = http.get(host, "/some/path?q=1");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let json = answer.json();
        assert_eq!(json["version"], version, "{host}: {json}");
        assert_eq!(json["path"], "/some/path?q=1");
        assert_eq!(json["headers"]["host"], host, "the Host is kept");
        assert_eq!(json["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(json["headers"]["x-forwarded-host"], host);
        assert_eq!(json["headers"]["x-forwarded-proto"], "http");
    }
}

#[test]
fn no_backend_is_503_service_not_available() {
    let hub = HubProc::start(&[]);
    let route = Route::start(&hub.addr(), &["--rule", "stable=http@0.0.x"]);
    for host in ["stable", "unknown"] {
        let answer = route.connect().get(host, "/");
        assert_eq!(answer.status, 503, "{host}: {answer:?}");
        assert_eq!(answer.body, "service not available\n");
    }
    // The router goes on: a backend that registers takes requests at once.
    let _v0 = backend(&hub.addr(), "0.0.0");
    wait_routed(&route, "stable", "0.0.0");
}

#[test]
fn a_dead_backend_that_was_never_freed_is_skipped_without_an_error() {
    let hub = HubProc::start(&[]);
    let _live = backend(&hub.addr(), "0.0.0");
    let route = Route::start(&hub.addr(), &["--default", "http"]);
    wait_routed(&route, "any", "0.0.0");
    // A record of a backend that is gone: nothing listens on its port.
    let dead = free_port();
    let mut raw = Raw::connect(&hub.addr());
    raw.send(&format!(
        r#"["register","dead",{{"role":"http","version":"0.0.1","host":"127.0.0.1","port":{dead}}}]"#
    ));
    wait_until("the hub has the dead record", || {
        crate::harness::show(&hub.addr())
            .to_string()
            .contains(&format!(":{dead}"))
            || crate::harness::show(&hub.addr())
                .to_string()
                .contains(&format!("\"port\":{dead}"))
    });
    for _ in 0..50 {
        let answer = route.connect().get("any", "/");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["version"], "0.0.0");
    }
    // It was tried, and skipped.
    wait_until("the router says it skipped the dead backend", || {
        route
            .proc
            .stderr()
            .contains(&format!("cannot connect to 127.0.0.1:{dead}"))
    });
}

#[test]
fn works_against_a_node_hub() {
    let (_node, port) = node_hub();
    let hub = format!("127.0.0.1:{port}");
    let _v1 = backend(&hub, "0.1.0");
    let route = Route::start(&hub, &["--rule", "unstable=http@0.1.x"]);
    wait_routed(&route, "unstable", "0.1.0");
}

#[test]
fn bad_rules_are_refused_with_what_is_wrong() {
    let out = seaport(&["route", "0", "--hub", "9", "--rule", "stable"])
        .output()
        .expect("run seaport route");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected HOST=ROLE[@RANGE]"), "{err}");
    let out = seaport(&["route", "0", "--hub", "9"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to route"));
}
