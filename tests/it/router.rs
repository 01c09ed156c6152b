//! `seaport route`: the seed's "http router" example as a reverse proxy.
//! Backends are `tests/fixtures/http_echo.py` run by our launcher; requests
//! are written by hand, so that every byte on the wire is the test's.

use crate::harness::{
    HubProc, Proc, Raw, fixture, free_port, node_hub, refused, seaport, wait_until,
};
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
        self.get_with(host, path, "")
    }

    /// A GET with more header lines (`extra`, each ending in CRLF).
    fn get_with(&mut self, host: &str, path: &str, extra: &str) -> Answer {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
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
    the_seeds_example_on("2");
}

#[test]
fn the_seeds_example_routes_on_the_callers_runtime_with_one_worker() {
    the_seeds_example_on("1");
}

/// The seed's router, with `workers` threads serving connections.
fn the_seeds_example_on(workers: &str) {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let _v1 = backend(&hub.addr(), "0.1.0");
    let route = Route::start(
        &hub.addr(),
        &[
            "--workers",
            workers,
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
    // It was tried, and skipped, and said so without flooding the log:
    // a backend's failures are logged at most once per 5 s.
    let needle = format!("127.0.0.1:{dead}: cannot connect");
    wait_until("the router says it skipped the dead backend", || {
        route.proc.stderr().contains(&needle)
    });
    let said = route.proc.stderr().matches(&needle).count();
    assert!(said <= 3, "{said} warnings for one dead backend");
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
    let err = refused(&["route", "0", "--hub", "9", "--rule", "stable"]);
    assert!(err.contains("expected HOST=ROLE[@RANGE]"), "{err}");
    let err = refused(&["route", "0", "--hub", "9"]);
    assert!(err.contains("nothing to route"), "{err}");
    let err = refused(&[
        "route",
        "0",
        "--hub",
        "9",
        "--default",
        "http",
        "--workers",
        "0",
    ]);
    assert!(
        err.contains("--workers") && err.contains("0 is not in 1..=1024"),
        "{err}"
    );
    let err = refused(&[
        "route",
        "0",
        "--hub",
        "9",
        "--default",
        "http",
        "--trust-forwarded",
        "10.0.0.0/33",
    ]);
    assert!(
        err.contains("--trust-forwarded") && err.contains("not an address or a CIDR range"),
        "{err}"
    );
}

/// Headers a client sends to pass for another: its address, its scheme, its
/// host.
const FORGED: &str = "X-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\n\
    Forwarded: for=203.0.113.9;proto=https\r\nX-Forwarded-Proto: https\r\n\
    X-Forwarded-Host: admin.internal\r\n";

#[test]
fn forwarded_headers_a_client_sends_are_replaced_unless_it_is_a_trusted_proxy() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    // The test connects from 127.0.0.1: outside 10.0.0.0/8, inside 127.0.0.0/8.
    let edge = Route::start(
        &hub.addr(),
        &["--default", "http", "--trust-forwarded", "10.0.0.0/8"],
    );
    let behind = Route::start(
        &hub.addr(),
        &["--default", "http", "--trust-forwarded", "127.0.0.0/8"],
    );
    wait_routed(&edge, "www.example.com", "0.0.0");
    wait_routed(&behind, "www.example.com", "0.0.0");

    let answer = edge.connect().get_with("www.example.com", "/", FORGED);
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-real-ip"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(seen["x-forwarded-host"], "www.example.com", "{seen}");
    assert!(seen.get("forwarded").is_none(), "{seen}");

    let answer = behind.connect().get_with("www.example.com", "/", FORGED);
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{seen}");
    assert_eq!(seen["x-real-ip"], "203.0.113.9", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
    assert_eq!(seen["x-forwarded-host"], "admin.internal", "{seen}");
    assert_eq!(seen["forwarded"], "for=203.0.113.9;proto=https", "{seen}");
}

/// Reads until the end of a response head; returns it.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the head ended early ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn an_upgrade_passes_through_and_bytes_flow_both_ways() {
    let hub = HubProc::start(&[]);
    let command = ["python3".to_string(), fixture("upgrade_echo.py")];
    let _echo = Launcher::start_command(&hub.addr(), "ws@1.0.0", &[], &command, &[]);
    let route = Route::start(&hub.addr(), &["--rule", "ws=ws"]);
    wait_until("the echo backend is routed", || {
        route.connect().get("ws", "/").status == 400
    });
    let mut stream = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .expect("send");
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    for message in ["hello", "through the router", &"x".repeat(100_000)] {
        stream.write_all(message.as_bytes()).expect("write");
        let mut back = vec![0; message.len()];
        stream.read_exact(&mut back).expect("echo");
        assert_eq!(back, message.as_bytes());
    }
}

#[test]
fn a_large_upload_streams_through_without_being_held() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let route = Route::start(&hub.addr(), &["--default", "http"]);
    wait_routed(&route, "any", "0.0.0");
    let size: usize = 256 << 20;
    let mut http = route.connect();
    let head = format!("POST /upload HTTP/1.1\r\nHost: any\r\nContent-Length: {size}\r\n\r\n");
    http.writer.write_all(head.as_bytes()).expect("head");
    let chunk = vec![b'z'; 1 << 20];
    let pid = route.proc.pid();
    let mut peak = 0;
    for _ in 0..(size >> 20) {
        http.writer.write_all(&chunk).expect("body");
        peak = peak.max(rss_kib(pid));
    }
    let answer = http.read();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["body_bytes"], size);
    assert!(
        peak < 64 * 1024,
        "the router held {peak} KiB for a {size}-byte upload"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn bad_requests_get_400_431_or_are_dropped_and_others_go_on() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let route = Route::start(
        &hub.addr(),
        &["--default", "http", "--header-timeout", "500ms"],
    );
    wait_routed(&route, "any", "0.0.0");
    let raw = |bytes: &[u8]| {
        let mut stream = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = stream.write_all(bytes);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let answer = raw(b"NOT HTTP AT ALL\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A Host is needed, and only one.
    let answer = raw(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(
        answer.ends_with("a request needs a Host header\n"),
        "{answer:?}"
    );
    // HTTP/1.0 has no Host to require: such a request takes the default route.
    let answer = raw(b"GET / HTTP/1.0\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer:?}");
    let answer = raw(b"GET / HTTP/1.1\r\nHost: any\r\nHost: other\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A Host is a name or an IP literal, with at most a port: what would let
    // `*.example.com` match another name, or the backend misread it, is 400.
    for host in ["evil.com/.example.com", "a b", "any:99999", "[::1"] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer:?}");
        assert!(
            answer.ends_with("the Host header is not a host name and port\n"),
            "{answer:?}"
        );
    }
    let answer = raw(b"GET http://user@any/ HTTP/1.1\r\nHost: any\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    for host in ["[::1]:80", "127.0.0.1", "any."] {
        let answer = route.connect().get(host, "/");
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
    }
    // The router forwards requests; it opens no tunnels to where a client says.
    let answer = raw(b"CONNECT any:443 HTTP/1.1\r\nHost: any:443\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nallow: get, "),
        "{answer:?}"
    );
    // An Upgrade that its Connection does not name is not one: the backend
    // does not get it.
    let answer = route
        .connect()
        .get_with("any", "/", "Upgrade: websocket\r\n");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.json()["headers"].get("upgrade").is_none(),
        "{answer:?}"
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: any\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let answer = raw(huge.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Headers that never end: the connection is closed after the timeout.
    let began = std::time::Instant::now();
    let answer = raw(b"GET / HTTP/1.1\r\nHost: any\r\n");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(!answer.contains("200 OK"), "{answer:?}");
    // Everyone else is served all along.
    assert_eq!(route.connect().get("any", "/").status, 200);
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_exits() {
    let hub = HubProc::start(&[]);
    // A backend that answers after a second; it counts the requests it has read.
    let slow = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let slow_port = slow.local_addr().expect("addr").port();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = received.clone();
    std::thread::spawn(move || {
        for conn in slow.incoming() {
            let Ok(mut conn) = conn else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = read_head(&mut conn);
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow");
            });
        }
    });
    let mut raw = Raw::connect(&hub.addr());
    raw.send(&format!(
        r#"["register","slow",{{"role":"slow","version":"1.0.0","host":"127.0.0.1","port":{slow_port}}}]"#
    ));
    let mut route = Route::start(&hub.addr(), &["--default", "slow"]);
    wait_until("the slow backend is routed", || {
        route.connect().get("any", "/").body == "slow"
    });
    let before = received.load(std::sync::atomic::Ordering::SeqCst);
    let mut http = route.connect();
    http.writer
        .write_all(b"GET / HTTP/1.1\r\nHost: any\r\n\r\n")
        .expect("send");
    // The request is in flight once the backend has it.
    wait_until("the request reaches the backend", || {
        received.load(std::sync::atomic::Ordering::SeqCst) > before
    });
    route.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let answer = http.read();
    assert_eq!((answer.status, answer.body.as_str()), (200, "slow"));
    assert!(route.proc.wait().success());
    assert!(
        TcpStream::connect(("127.0.0.1", route.port)).is_err(),
        "still accepting"
    );
}

#[test]
fn a_freed_backend_finishes_its_request_in_flight_and_gets_no_new_ones() {
    let hub = HubProc::start(&[]);
    let _other = backend(&hub.addr(), "0.0.0");
    // A backend of ours that answers after half a second.
    let slow = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let slow_port = slow.local_addr().expect("addr").port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in slow.incoming() {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = read_head(&mut conn);
                std::thread::sleep(Duration::from_millis(500));
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow");
            });
        }
    });
    let mut raw = Raw::connect(&hub.addr());
    raw.send(&format!(
        r#"["register","slow",{{"role":"http","version":"0.0.1","host":"127.0.0.1","port":{slow_port}}}]"#
    ));
    let route = Route::start(&hub.addr(), &["--default", "http"]);
    wait_until("the slow backend takes a request", || {
        route.connect().get("any", "/").body == "slow"
    });
    // One request in flight to it, then its record is freed.
    let mut http = route.connect();
    let before = served.load(std::sync::atomic::Ordering::SeqCst);
    let mut in_flight = None;
    for _ in 0..50 {
        http.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: any\r\n\r\n")
            .expect("send");
        std::thread::sleep(Duration::from_millis(50));
        if served.load(std::sync::atomic::Ordering::SeqCst) > before {
            in_flight = Some(());
            break;
        }
        let _ = http.read();
    }
    assert!(in_flight.is_some(), "no request reached the slow backend");
    raw.send(r#"["free","slow"]"#);
    wait_until("the hub freed it", || {
        !crate::harness::show(&hub.addr())
            .to_string()
            .contains("\"slow\"")
    });
    assert_eq!(http.read().body, "slow", "the request in flight finished");
    // Once the router has heard of the free, it sends it nothing more.
    wait_until("the router stops choosing it", || {
        (0..10).all(|_| route.connect().get("any", "/").body != "slow")
    });
    let after = served.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        let answer = route.connect().get("any", "/");
        assert_eq!(answer.json()["version"], "0.0.0", "{answer:?}");
    }
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        after,
        "no new request reached it"
    );
}

#[test]
fn the_supervisor_routes_the_hosts_its_service_files_name() {
    use crate::supervisor::{Root, Sup, check};
    let root = Root::new();
    let service = |file: &str, role: &str, version: &str, routes: &str| {
        let command = serde_json::json!(["python3", fixture("http_echo.py"), version]);
        root.write(
            file,
            &format!("role = \"{role}\"\ncommand = {command}\nroute = {routes}\n"),
        );
    };
    service("api.toml", "api@1.0.0", "1.0.0", r#"["api.example.com"]"#);
    service(
        "beta.toml",
        "beta@2.0.0",
        "2.0.0",
        r#"["*.beta.example.com"]"#,
    );
    let proc = Sup::spawn(&root, &["--listen", "0", "--route", "0"], &[]);
    let hub = proc.line();
    assert!(hub.starts_with("seaport listening on :"), "{hub}");
    let line = proc.line();
    let port: u16 = line
        .strip_prefix("seaport route listening on :")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    let get = |host: &str| Http::connect(port).get(host, "/");
    wait_until("both services are routed", || {
        get("api.example.com").status == 200 && get("x.beta.example.com").status == 200
    });
    assert_eq!(get("API.example.com:8080").json()["version"], "1.0.0");
    assert_eq!(get("x.beta.example.com").json()["version"], "2.0.0");
    assert_eq!(
        get("beta.example.com").status,
        503,
        "the wildcard is below the domain only"
    );
    // A reload takes the changed routes.
    service(
        "beta.toml",
        "beta@2.0.0",
        "2.0.0",
        r#"["beta.example.com"]"#,
    );
    proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the changed route is taken", || {
        get("beta.example.com").status == 200
    });
    // A host that is not a host name is refused by the checks.
    service("bad.toml", "bad@1.0.0", "1.0.0", r#"["not a host"]"#);
    let (ok, _, err) = check(&root.services());
    assert!(!ok);
    assert!(
        err.contains("route[0]: \"not a host\" is not a host name"),
        "{err}"
    );
}

/// A record registered again as another version on the same host and port
/// (a process replaced on its held socket) is a new backend: the router's
/// kept-alive connections to the old process serve only the old record.
#[test]
fn a_record_registered_again_as_another_version_gets_fresh_connections() {
    let hub = HubProc::start(&[]);
    // Answers each request with the port its connection comes from: the
    // same answer, the same connection.
    let port = raw_backend(|_, conn| {
        let body = match conn.peer_addr() {
            Ok(peer) => format!("conn {}", peer.port()),
            Err(_) => return false,
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).is_ok()
    });
    let mut raw = Raw::connect(&hub.addr());
    let register = |version: &str| {
        format!(
            r#"["register","r1",{{"role":"web","version":"{version}","host":"127.0.0.1","port":{port}}}]"#
        )
    };
    raw.send(&register("1.0.0"));
    // One worker: each worker keeps its own idle connections, so with
    // more, a request may find none on its worker and open another.
    let route = Route::start(
        &hub.addr(),
        &[
            "--rule",
            "stable=web@1.x",
            "--rule",
            "unstable=web@2.x",
            "--workers",
            "1",
        ],
    );
    wait_until("stable is routed", || {
        route.connect().get("stable", "/").status == 200
    });
    // Kept alive: the router's next requests take the same connection.
    let first = route.connect().get("stable", "/").body;
    assert_eq!(route.connect().get("stable", "/").body, first);
    raw.send(&register("2.0.0"));
    wait_until("unstable is routed", || {
        route.connect().get("unstable", "/").status == 200
    });
    let answer = route.connect().get("unstable", "/");
    assert_ne!(
        answer.body, first,
        "the old version's connection was reused"
    );
    assert_eq!(route.connect().get("stable", "/").status, 503);
}

/// A change of a service file's routes alone is taken on reload without
/// touching the service's processes, on a held socket or not.
#[test]
fn a_reload_that_changes_only_routes_keeps_the_processes() {
    use crate::supervisor::{Root, Sup, pid, row};
    let root = Root::new();
    let service = |name: &str, routes: &str, extra: &str| {
        root.service(
            name,
            &format!("{name}@1.0.0"),
            &["--http"],
            &format!("route = {routes}\n{extra}"),
        );
    };
    service("held", r#"["held.example.com"]"#, "socket = true");
    service("plain", r#"["plain.example.com"]"#, "");
    let proc = Sup::spawn(&root, &["--listen", "0", "--route", "0"], &[]);
    let hub = proc.line();
    let hub = hub
        .strip_prefix("seaport listening on :")
        .map(|p| format!("127.0.0.1:{p}"))
        .unwrap_or_else(|| panic!("unexpected line {hub:?}"));
    let line = proc.line();
    let port: u16 = line
        .strip_prefix("seaport route listening on :")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    let sup = Sup {
        proc,
        hub,
        ctl: root.ctl(),
    };
    let before = sup.wait_ready(&["held", "plain"]);
    let status = |host: &str| Http::connect(port).get(host, "/").status;
    wait_until("both services are routed", || {
        status("held.example.com") == 200 && status("plain.example.com") == 200
    });
    service("held", r#"["held2.example.com"]"#, "socket = true");
    service("plain", r#"["plain2.example.com"]"#, "");
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the changed routes are taken", || {
        status("held2.example.com") == 200 && status("plain2.example.com") == 200
    });
    assert_eq!(status("held.example.com"), 503);
    assert_eq!(status("plain.example.com"), 503);
    // Twice: a second reload of the same files changes nothing either.
    sup.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the supervisor reloaded twice", || {
        root.stderr().matches("its routes changed").count() == 2
            && root.stderr().matches("reloading").count() >= 2
    });
    let after = sup.wait_ready(&["held", "plain"]);
    for name in ["held", "plain"] {
        assert_eq!(
            pid(&row(&before, name)["pid"]),
            pid(&row(&after, name)["pid"]),
            "{name} was restarted"
        );
    }
    assert_eq!(root.starts("held").len(), 1);
    assert_eq!(root.starts("plain").len(), 1);
}

#[test]
fn connections_are_capped_and_silent_ones_give_their_place_back() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let route = Route::start(
        &hub.addr(),
        &[
            "--default",
            "http",
            "--max-connections",
            "2",
            "--header-timeout",
            "700ms",
            // The cap is the router's, not each worker's.
            "--workers",
            "2",
        ],
    );
    wait_routed(&route, "any", "0.0.0");
    // Two clients that connect and say nothing take both places. No wait is
    // needed for that: the router takes a place before it accepts, and it
    // accepts in the order of connection, so the request below is accepted
    // only once a silent one gives its place back. The wait is timed from
    // their connecting, before which their header timeout cannot start.
    let began = std::time::Instant::now();
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", route.port)).expect("connect"))
        .collect();
    let answer = route.connect().get("any", "/");
    let waited = began.elapsed();
    assert_eq!(answer.status, 200, "{answer:?}");
    // Served once a silent one was dropped at its header timeout (700 ms
    // from its accept, so from `began`), not before.
    assert!(
        waited >= Duration::from_millis(600),
        "served at once: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    drop(silent);
}

#[test]
fn a_backend_that_resets_after_the_request_is_retried_for_a_get() {
    let hub = HubProc::start(&[]);
    let _live = backend(&hub.addr(), "0.0.0");
    // Reads each request, then resets the connection without a byte of answer.
    let reset = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let reset_port = reset.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = hits.clone();
    std::thread::spawn(move || {
        for conn in reset.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = read_head(&mut conn);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
            drop(conn);
        }
    });
    let mut raw = Raw::connect(&hub.addr());
    raw.send(&format!(
        r#"["register","reset",{{"role":"http","version":"0.0.1","host":"127.0.0.1","port":{reset_port}}}]"#
    ));
    let route = Route::start(&hub.addr(), &["--default", "http"]);
    wait_routed(&route, "any", "0.0.0");
    // Until the router has heard of it, requests go to the live one only.
    wait_until("the router tries the resetting backend", || {
        assert_eq!(route.connect().get("any", "/").status, 200);
        hits.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    for _ in 0..40 {
        let answer = route.connect().get("any", "/");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["version"], "0.0.0");
    }
    assert!(
        hits.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the resetting backend was never tried"
    );
}

/// The first request the holding backend got, while it holds it.
static HOLDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set when the holding backend may close its first request unanswered.
static RELEASED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
fn a_get_retried_after_a_failure_goes_to_a_backend_registered_meanwhile() {
    use std::sync::atomic::Ordering::SeqCst;
    let hub = HubProc::start(&[]);
    // Holds its first request until released, then closes it unanswered;
    // closes every later one at once.
    let holding = raw_backend(|_, _| {
        if !HOLDING.swap(true, SeqCst) {
            while !RELEASED.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        false
    });
    let _a = register_raw(&hub, "http", holding);
    let route = Route::start(&hub.addr(), &["--default", "http", "--workers", "1"]);
    // The request starts while the holding backend is the only one.
    let port = route.port;
    let first = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let answer = Http::connect(port).get("any", "/");
            if answer.status != 503 || std::time::Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    wait_until("the holding backend has the request", || {
        HOLDING.load(SeqCst)
    });
    // Then another registers, and the router learns of it.
    let other = raw_backend(|_, conn| {
        let body = "other";
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).is_ok()
    });
    let mut b = Raw::connect(&hub.addr());
    b.send(&format!(
        r#"["register","other",{{"role":"http","version":"1.0.0","host":"127.0.0.1","port":{other}}}]"#
    ));
    wait_until("the router routes to the other backend", || {
        route.connect().get("any", "/").status == 200
    });
    // The held request fails, and is sent again, to the other backend.
    RELEASED.store(true, SeqCst);
    let answer = first.join().expect("the first request");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "other");
}

/// Registers, through a raw hub connection kept in the result, a backend on
/// `port` that is not run by a launcher.
fn register_raw(hub: &HubProc, role: &str, port: u16) -> Raw {
    let mut raw = Raw::connect(&hub.addr());
    raw.send(&format!(
        r#"["register","{role}-raw",{{"role":"{role}","version":"1.0.0","host":"127.0.0.1","port":{port}}}]"#
    ));
    raw
}

/// A backend that reads each request and never answers (connections kept).
fn silent_backend() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = read_head(&mut conn);
            held.push(conn);
        }
    });
    port
}

/// Whether the router closes `stream` within `within` (EOF or reset).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected byte from the router"),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn a_backend_that_never_answers_gets_504_and_the_connection_goes_on() {
    let hub = HubProc::start(&[]);
    let _raw = register_raw(&hub, "mute", silent_backend());
    let _v0 = backend(&hub.addr(), "0.0.0");
    let route = Route::start(
        &hub.addr(),
        &[
            "--rule",
            "mute=mute",
            "--default",
            "http",
            "--response-timeout",
            "500ms",
        ],
    );
    wait_routed(&route, "any", "0.0.0");
    let mut http = route.connect();
    wait_until("the silent backend is routed", || {
        http.get("mute", "/").status != 503
    });
    let began = std::time::Instant::now();
    let answer = http.get("mute", "/");
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(answer.body, "the backend did not answer in time\n");
    assert!(began.elapsed() >= Duration::from_millis(400));
    // The same client connection is served on.
    let answer = http.get("any", "/");
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[test]
fn silent_connections_and_stalled_bodies_are_closed_at_the_idle_timeout() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    // hyper's header timeout also closes a kept-alive connection waiting for
    // its next request: made long here, so that the idle timeout is seen.
    let route = Route::start(
        &hub.addr(),
        &[
            "--default",
            "http",
            "--idle-timeout",
            "600ms",
            "--header-timeout",
            "60s",
        ],
    );
    wait_routed(&route, "any", "0.0.0");
    // Kept alive after a request, then silent.
    let mut http = route.connect();
    let began = std::time::Instant::now();
    assert_eq!(http.get("any", "/").status, 200);
    assert!(closed_within(&mut http.writer, Duration::from_secs(10)));
    let closed_after = began.elapsed();
    assert!(
        closed_after >= Duration::from_millis(600) && closed_after < Duration::from_secs(8),
        "{closed_after:?}"
    );
    // A body that stops coming.
    let mut stalled = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
    stalled
        .write_all(b"POST /upload HTTP/1.1\r\nHost: any\r\nContent-Length: 1000\r\n\r\n0123456789")
        .expect("send");
    assert!(closed_within(&mut stalled, Duration::from_secs(10)));
    // Others are served throughout.
    assert_eq!(route.connect().get("any", "/").status, 200);
}

#[test]
fn a_tunnel_holds_its_place_under_the_cap_until_it_falls_silent() {
    let hub = HubProc::start(&[]);
    let command = ["python3".to_string(), fixture("upgrade_echo.py")];
    let _echo = Launcher::start_command(&hub.addr(), "ws@1.0.0", &[], &command, &[]);
    let route = Route::start(
        &hub.addr(),
        &[
            "--rule",
            "ws=ws",
            "--max-connections",
            "1",
            "--idle-timeout",
            "1s",
        ],
    );
    wait_until("the echo backend is routed", || {
        route.connect().get("ws", "/").status == 400
    });
    let mut tunnel = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tunnel
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .expect("send");
    assert!(read_head(&mut tunnel).starts_with("HTTP/1.1 101"));
    // While the tunnel talks, it keeps the one place: another client waits.
    let waiting = std::thread::spawn({
        let port = route.port;
        move || {
            let began = std::time::Instant::now();
            let status = Http::connect(port).get("ws", "/").status;
            (status, began.elapsed())
        }
    });
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        tunnel.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        tunnel.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"ping");
    }
    assert!(
        !waiting.is_finished(),
        "served while the tunnel held the place"
    );
    // Silent for the idle timeout: closed, and the place is given back.
    assert!(closed_within(&mut tunnel, Duration::from_secs(10)));
    let (status, waited) = waiting.join().expect("the waiting client");
    assert_eq!(status, 400);
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
}

#[test]
fn a_websocket_echoes_through_the_router() {
    let hub = HubProc::start(&[]);
    let command = ["python3".to_string(), fixture("websocket_echo.py")];
    let _echo = Launcher::start_command(&hub.addr(), "chat@1.0.0", &[], &command, &[]);
    let route = Route::start(&hub.addr(), &["--rule", "chat.example.com=chat"]);
    wait_until("the WebSocket backend is routed", || {
        route.connect().get("chat.example.com", "/").status == 400
    });
    let stream = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let url = format!("ws://chat.example.com:{}/socket", route.port);
    let (mut socket, response) = tungstenite::client(url.as_str(), stream).expect("handshake");
    assert_eq!(response.status(), 101);
    let big = vec![7u8; 200_000];
    let messages = [
        tungstenite::Message::text("hello"),
        tungstenite::Message::binary(big),
        tungstenite::Message::text("through the router"),
    ];
    for message in messages {
        socket.send(message.clone()).expect("send");
        assert_eq!(socket.read().expect("echo"), message);
    }
    socket.close(None).expect("close");
    loop {
        match socket.read() {
            Ok(tungstenite::Message::Close(_)) => {}
            Ok(other) => panic!("after close: {other:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
}

/// The next request head on `stream`; `None` once it ends.
fn next_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A backend of raw handlers: `answer(head, connection)` for each request
/// head, until it returns false.
fn raw_backend(answer: fn(&str, &mut TcpStream) -> bool) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                while let Some(head) = next_head(&mut conn) {
                    if !answer(&head, &mut conn) {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn an_early_answer_to_an_upload_does_not_hold_up_the_next_request() {
    let hub = HubProc::start(&[]);
    // Answers every request at once, before (and without) reading a body.
    let port = raw_backend(|_, conn| {
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .is_ok()
    });
    let _raw = register_raw(&hub, "early", port);
    let route = Route::start(&hub.addr(), &["--rule", "early=early"]);
    wait_until("the backend is routed", || {
        route.connect().get("early", "/").status == 200
    });
    // An upload answered while most of its body has not been sent, which
    // then pauses: its backend connection is not free for another request.
    let mut upload = route.connect();
    upload
        .writer
        .write_all(b"POST /up HTTP/1.1\r\nHost: early\r\nContent-Length: 100000\r\n\r\n0123456789")
        .expect("send");
    assert_eq!(upload.read().status, 200);
    let began = std::time::Instant::now();
    assert_eq!(route.connect().get("early", "/").status, 200);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the next request waited {:?} for the upload's connection",
        began.elapsed()
    );
    drop(upload);
}

#[test]
fn a_slow_upload_is_the_clients_time_not_the_backends() {
    let hub = HubProc::start(&[]);
    let _v0 = backend(&hub.addr(), "0.0.0");
    let route = Route::start(
        &hub.addr(),
        &["--default", "http", "--response-timeout", "500ms"],
    );
    wait_routed(&route, "any", "0.0.0");
    let mut http = route.connect();
    http.writer
        .write_all(b"POST /up HTTP/1.1\r\nHost: any\r\nContent-Length: 15\r\n\r\n")
        .expect("send");
    // A byte every 100 ms: 1.5 s of upload, three response timeouts.
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(100));
        http.writer.write_all(b"z").expect("a byte of the body");
    }
    let answer = http.read();
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[test]
fn a_client_gone_before_its_upgrade_is_answered_gives_its_place_back() {
    let hub = HubProc::start(&[]);
    // Switches protocols 400 ms after an upgrade request; 400 otherwise.
    let port = raw_backend(|head, conn| {
        if !head.to_ascii_lowercase().contains("upgrade: echo") {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            return true;
        }
        std::thread::sleep(Duration::from_millis(400));
        let _ = conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        );
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        false
    });
    let _raw = register_raw(&hub, "ws", port);
    let route = Route::start(
        &hub.addr(),
        &[
            "--rule",
            "ws=ws",
            "--max-connections",
            "1",
            "--idle-timeout",
            "60s",
        ],
    );
    wait_until("the backend is routed", || {
        route.connect().get("ws", "/").status == 400
    });
    // An upgrade request (with bytes after it), then a reset before the 101.
    let gone = TcpStream::connect(("127.0.0.1", route.port)).expect("connect");
    (&gone)
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nEXTRA",
        )
        .expect("send");
    socket2::SockRef::from(&gone)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(gone);
    // The one place comes back once the 101 finds no client, not at the
    // idle timeout.
    let began = std::time::Instant::now();
    assert_eq!(route.connect().get("ws", "/").status, 400);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
}
