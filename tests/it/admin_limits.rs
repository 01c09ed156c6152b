//! The admin endpoint's limits that keep operators' windows open: the Host
//! guard on loopback, the cap on event streams, the stall timeout for
//! clients that stop reading, and metrics that odd records cannot break.

use crate::admin::bounded::serve;
use crate::harness::{DEADLINE, Raw};
use seaport::admin::AdminConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Sends `GET path` with `host`, returns the status and the head's first
/// bytes of body (the connection is kept open in the stream).
fn request(addr: SocketAddr, path: &str, host: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no answer to {path}: {other:?}"),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad head {head:?}"));
    (status, stream)
}

#[test]
fn on_loopback_only_requests_naming_an_address_or_localhost_are_answered() {
    let served = serve(AdminConfig::default());
    let addr = served.admin.local_addr();
    let port = addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(request(addr, "/healthz", &host).0, 200, "Host: {host}");
    }
    // A page of evil.example that resolves its name to 127.0.0.1.
    for host in [format!("evil.example:{port}"), "evil.example".to_string()] {
        assert_eq!(request(addr, "/v1/records", &host).0, 403, "Host: {host}");
    }
}

#[test]
fn event_streams_past_their_cap_get_503_and_the_rest_still_answers() {
    let served = serve(AdminConfig {
        max_event_streams: 2,
        ..AdminConfig::default()
    });
    let addr = served.admin.local_addr();
    let host = addr.to_string();
    let open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let (status, stream) = request(addr, "/v1/events", &host);
            assert_eq!(status, 200);
            stream
        })
        .collect();
    assert_eq!(request(addr, "/v1/events", &host).0, 503);
    assert_eq!(request(addr, "/healthz", &host).0, 200);
    assert_eq!(request(addr, "/metrics", &host).0, 200);
    // A place given back is taken again.
    drop(open);
    let began = Instant::now();
    loop {
        if request(addr, "/v1/events", &host).0 == 200 {
            break;
        }
        assert!(began.elapsed() < DEADLINE, "no place came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_stops_reading_is_closed_at_the_stall_timeout_and_a_reader_is_not() {
    let stall = Duration::from_secs(1);
    let served = serve(AdminConfig {
        stall_timeout: stall,
        keep_alive: Duration::from_millis(200),
        event_budget: 256 * 1024,
        // The stalled stream and the reader's: a third is refused until
        // one of them is closed, which tells, without reading the stalled
        // one, when the endpoint closed it.
        max_event_streams: 2,
        ..AdminConfig::default()
    });
    let addr = served.admin.local_addr();
    let host = addr.to_string();
    // One stream nobody reads (with a small receive buffer), one that is read.
    let mut stalled = crate::admin::small_window(
        addr,
        &format!("GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    );
    let (status, mut reader) = request(addr, "/v1/events", &host);
    assert_eq!(status, 200);
    let (status, _) = request(addr, "/v1/events", &host);
    assert_eq!(status, 503, "a third stream while two are open");
    reader
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut total = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match reader.read(&mut buf) {
                    Ok(0) => return (total, false),
                    Ok(n) => total += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return (total, false),
                }
            }
            (total, true)
        })
    };
    // Far more changes than the buffers on the way hold: 4 MiB.
    let (mut client, _, _) = Raw::connect_synced(&served.hub.local_addr().to_string());
    let filler = "x".repeat(2048);
    let mut rows = String::new();
    for n in 0..2000 {
        rows.push_str(&format!(
            r#"["register","r{n}",{{"role":"bulk","port":{},"filler":"{filler}"}}]"#,
            1000 + n
        ));
        rows.push('\n');
    }
    client.send_bytes(rows.as_bytes()).expect("send the rows");
    // The stalled one is closed once its buffers are full and nothing
    // moves: a new stream is then taken.
    let began = Instant::now();
    loop {
        let (status, _) = request(addr, "/v1/events", &host);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            began.elapsed() < DEADLINE,
            "a client that read nothing was never closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It was the stalled one: what it holds ends where the endpoint closed it.
    assert!(
        crate::admin::bounded::closed_within(&mut stalled, DEADLINE),
        "the stalled client's connection is still open"
    );
    // The reader goes on past three stall timeouts.
    std::thread::sleep(3 * stall);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (read, open) = drain.join().expect("the reader");
    assert!(open, "the reader was closed after {read} bytes");
    assert!(read > 4 * 1024 * 1024, "the reader got {read} bytes");
}

#[test]
fn records_with_an_empty_role_and_without_one_are_one_series() {
    let served = serve(AdminConfig::default());
    let addr = served.admin.local_addr();
    let (mut client, _, _) = Raw::connect_synced(&served.hub.local_addr().to_string());
    client.send(r#"["register","empty",{"role":"","port":1001}]"#);
    client.send(r#"["register","none",{"port":1002}]"#);
    let text = crate::admin::wait_for_sample(addr, r#"seaport_records{role=""}"#, 2.0);
    let series = text
        .lines()
        .filter(|line| line.starts_with(r#"seaport_records{role="""#))
        .count();
    assert_eq!(series, 1, "{text}");
}

#[test]
fn a_bad_signature_of_the_challenge_is_counted_as_a_bad_signature() {
    use seaport::protocol::wire::Row;
    let dir = tempfile::tempdir().expect("tempdir");
    let list = crate::auth::authorized_file(dir.path(), &["alice.json"]);
    let hub = crate::harness::HubProc::start(&[
        "--authorized",
        list.to_str().expect("utf8"),
        "--admin",
        "0",
    ]);
    let admin = crate::admin::admin_addr(&hub.proc);
    let alice = crate::auth::pair("alice.json");
    let mut raw = Raw::connect(&hub.addr());
    assert_eq!(raw.row()[0], "helo");
    assert_eq!(raw.row()[0], "challenge");
    // Alice's key, signing another challenge than the one given.
    let signature =
        seaport::protocol::auth::sign_challenge(&alice, "not-the-challenge").expect("sign");
    let auth = Row::Auth {
        public: alice.public_pem(),
        signature,
    };
    raw.send_bytes(&auth.encode()).expect("send auth");
    let text = crate::admin::wait_for_sample(
        admin,
        r#"seaport_rejected_writes_total{reason="bad_signature"}"#,
        1.0,
    );
    assert_eq!(
        crate::admin::sample(
            &text,
            r#"seaport_rejected_writes_total{reason="unauthorized"}"#
        ),
        Some(0.0)
    );
}

#[test]
fn only_the_roles_with_most_records_get_a_series_of_their_own() {
    let served = serve(AdminConfig::default());
    let addr = served.admin.local_addr();
    let (mut client, _, _) = Raw::connect_synced(&served.hub.local_addr().to_string());
    // Two records of `web`, then 520 roles of one record each: 521 roles,
    // 500 shown, the records of 21 counted together.
    let mut rows = String::from(
        "[\"register\",\"w1\",{\"role\":\"web\",\"port\":1}]\n[\"register\",\"w2\",{\"role\":\"web\",\"port\":2}]\n",
    );
    for n in 0..520 {
        rows.push_str(&format!(
            "[\"register\",\"r{n}\",{{\"role\":\"role{n:03}\",\"port\":{}}}]\n",
            1000 + n
        ));
    }
    client.send_bytes(rows.as_bytes()).expect("send the rows");
    let text = crate::admin::wait_for_sample(addr, "seaport_records_in_other_roles", 21.0);
    let series = text
        .lines()
        .filter(|line| line.starts_with("seaport_records{"))
        .count();
    assert_eq!(series, 500, "{text}");
    assert!(text.contains("seaport_records{role=\"web\"} 2"), "{text}");
}
