//! Ports that are truly the service's: a record is registered only when the
//! service's own processes listen on its port, a port another process holds is
//! never handed out or registered, instances never share a port, and with
//! `--socket` / `socket = true` the supervisor binds the port, passes it as
//! systemd does (descriptor 3, `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`)
//! and holds it across restarts, so that no connection is refused.

use crate::harness::{HubProc, Rows, free_ports, wait_until};
use crate::launcher::{Launcher, pid_of};
use crate::supervisor::{Root, Sup, row};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long a "nothing happens" check watches before believing it.
const QUIET: Duration = Duration::from_millis(700);

/// Connects to `port` again and again until stopped, counting connections
/// that failed (refused, reset, unanswered) and those that were served
/// (accepted, then closed).
pub(crate) struct Hammer {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    served: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    pub(crate) fn start(port: u16) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let (s, r, d) = (stop.clone(), refused.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(mut conn) => {
                        // The fixture closes each connection it accepts: an
                        // end of stream is a served connection, anything
                        // else (a reset, a timeout) a failed one.
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut buf = [0u8; 1];
                        match conn.read(&mut buf) {
                            Ok(0) => d.fetch_add(1, Ordering::Relaxed),
                            _ => r.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Err(_) => {
                        r.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
        Hammer {
            stop,
            refused,
            served,
            thread: Some(thread),
        }
    }

    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops and returns (refused, served).
    pub(crate) fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        (
            self.refused.load(Ordering::Relaxed),
            self.served.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_fixed_port_held_by_another_process_fails_naming_the_holder() {
    let hub = HubProc::start(&[]);
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    let mut launcher = Launcher::start(&hub.addr(), "web@1.0.0", &["--port", &port], &[]);
    let status = launcher.proc.wait();
    let stderr = launcher.stderr();
    assert!(!status.success(), "{stderr}");
    let expected = format!("port {port} is held by pid {} (", std::process::id());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("not starting"), "{stderr}");
    assert!(launcher.starts().is_empty(), "the command never ran");
    assert_eq!(crate::harness::show(&hub.addr()), serde_json::json!([]));
    // With --socket the same: the bind fails, naming the holder.
    let mut launcher = Launcher::start(
        &hub.addr(),
        "web@1.0.0",
        &["--port", &port, "--socket"],
        &[],
    );
    assert!(!launcher.proc.wait().success());
    let stderr = launcher.stderr();
    assert!(
        stderr.contains(&format!(
            "cannot bind port {port}: it is held by pid {} (",
            std::process::id()
        )),
        "{stderr}"
    );
}

#[test]
fn a_listener_that_is_not_the_service_never_makes_it_ready_and_the_port_moves() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let (launcher, base, port) = waiting_in_two_ports(&hub);
    // Someone else listens on the service's port before it does: something
    // answers there, but it is not the service.
    let intruder = TcpListener::bind(("127.0.0.1", port)).expect("bind the service's port");
    assert_eq!(
        rows.next_within(QUIET),
        None,
        "registered on a port another process listens on"
    );
    // The service then fails to bind, and is started again on the other port
    // of its range, where it is registered.
    let (other, stderr) = go_and_see_it_move(&launcher, &rows, base, port);
    assert!(
        stderr.contains(&format!(
            "port {port} is held by pid {} (",
            std::process::id()
        )) && stderr.contains(&format!("moving to port {other}")),
        "{stderr}"
    );
    drop(intruder);
}

#[test]
fn a_connection_holding_the_services_port_moves_it_before_the_next_start() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let (launcher, base, port) = waiting_in_two_ports(&hub);
    // Before the service binds, a connection takes its port as its own
    // local port, as any outgoing connection on the machine may: nothing
    // listens there, but nobody else can bind it while the connection lives.
    let connection = connection_from([127, 0, 0, 1], port);
    // The service fails to bind it, and is started again on the other port
    // of its range (not on the same one, again and again), where it is
    // registered.
    let (other, stderr) = go_and_see_it_move(&launcher, &rows, base, port);
    assert!(
        stderr.contains(&format!(
            "port {port} is in use by a socket that is not listening (a connection's own port); \
             moving to port {other}"
        )),
        "{stderr}"
    );
    drop(connection);
}

#[test]
fn a_fixed_port_a_connection_holds_on_another_address_is_left_to_the_service() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let port = free_ports(1);
    // A connection whose own port it is, on 127.0.0.2: the launcher could
    // not bind the port on every address, but the service, which binds
    // 127.0.0.1, can.
    let connection = connection_from([127, 0, 0, 2], port);
    let _launcher = Launcher::start(
        &hub.addr(),
        "web@1.0.0",
        &["--port", &port.to_string()],
        &[],
    );
    let row = rows.next();
    assert_eq!(row[0], "register", "{row}");
    assert_eq!(row[2]["port"], port, "{row}");
    drop(connection);
}

#[test]
fn five_instances_in_a_three_port_range_three_run_on_distinct_ports_two_fail() {
    let root = Root::new();
    let base = free_ports(3);
    root.service(
        "web",
        "web@1.0.0",
        &[],
        &format!("instances = 5\nrange = [{base}, {}]", base + 2),
    );
    let sup = Sup::start(&root, &[]);
    let rows = sup.wait_ps("three ready and two failed", |rows| {
        rows.iter().filter(|r| r["state"] == "ready").count() == 3
            && rows.iter().filter(|r| r["state"] == "failed").count() == 2
    });
    let mut ports: Vec<u64> = rows
        .iter()
        .filter(|r| r["state"] == "ready")
        .filter_map(|r| r["port"].as_u64())
        .collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        [u64::from(base), u64::from(base) + 1, u64::from(base) + 2],
        "{rows:#?}"
    );
    for failed in rows.iter().filter(|r| r["state"] == "failed") {
        let message = failed["message"].as_str().unwrap_or_default();
        assert!(message.contains("no free port in range"), "{failed}");
    }
    let (_, dump) = Rows::connect(&sup.hub);
    assert_eq!(dump.len(), 3, "three records: {dump:#?}");
}

#[test]
fn a_passed_socket_is_descriptor_3_with_the_variables_and_restarts_refuse_nothing() {
    let hub = HubProc::start(&[]);
    let (rows, _) = Rows::connect(&hub.addr());
    let launcher = Launcher::start(
        &hub.addr(),
        "web@1.0.0",
        &["--socket"],
        &["--slow-start", "300"],
    );
    let row = rows.next();
    assert_eq!(row[0], "register", "{row}");
    let port = u16::try_from(row[2]["port"].as_u64().expect("port")).expect("a port");
    let first = launcher.wait_starts(1)[0].clone();
    assert_eq!(first["listen_fds"], "1", "{first}");
    assert_eq!(first["listen_fdnames"], "web", "{first}");
    assert_eq!(first["listen_pid_is_mine"], true, "{first}");
    assert_eq!(first["env_port"], port.to_string().as_str(), "{first}");

    // Kill the service under load: while it is gone and while the new one
    // sleeps before accepting, connections wait in the held socket's backlog.
    let hammer = Hammer::start(port);
    wait_until("connections are served", || hammer.served() > 10);
    let old = pid_of(&first, "pid");
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).expect("kill the service");
    let freed = rows.next();
    assert_eq!(freed[0], "free", "{freed}");
    let again = rows.next();
    assert_eq!(again[0], "register", "{again}");
    assert_eq!(again[2]["port"], port, "same port");
    let before = hammer.served();
    wait_until("connections are served again", || {
        hammer.served() > before + 10
    });
    let (refused, served) = hammer.finish();
    assert_eq!(
        refused, 0,
        "refused connections during the restart ({served} served)"
    );
    let second = launcher.wait_starts(2)[1].clone();
    assert_eq!(second["listen_pid_is_mine"], true, "{second}");
}

#[test]
fn a_supervised_socket_service_restarts_without_refusing_a_connection() {
    let root = Root::new();
    root.service(
        "web",
        "web@1.0.0",
        &["--slow-start", "300"],
        "socket = true",
    );
    let sup = Sup::start(&root, &[]);
    let ready = sup.wait_ready(&["web"]);
    let port = u16::try_from(row(&ready, "web")["port"].as_u64().expect("port")).expect("port");
    let hammer = Hammer::start(port);
    wait_until("connections are served", || hammer.served() > 10);
    let mut last = row(&ready, "web")["pid"].clone();
    for _ in 0..2 {
        let (ok, _, err) = sup.act("restart", "web");
        assert!(ok, "{err}");
        let rows = sup.wait_ps("a new process is ready", |rows| {
            let r = row(rows, "web");
            r["state"] == "ready" && r["pid"] != last
        });
        last = row(&rows, "web")["pid"].clone();
        let before = hammer.served();
        wait_until("served after the restart", || hammer.served() > before + 10);
    }
    let (refused, served) = hammer.finish();
    assert_eq!(
        refused, 0,
        "refused connections during restarts ({served} served)"
    );
    let starts = root.starts("web");
    assert_eq!(starts.len(), 3, "{starts:#?}");
    assert!(starts.iter().all(|s| s["listen_pid_is_mine"] == true));
}

/// A service whose fixed port is held when the supervisor starts fails,
/// naming the holder; once the port is free, `seaport start` runs it.
#[test]
fn a_service_that_could_not_claim_its_port_starts_when_asked_again() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], &format!("port = {port}"));
    let sup = Sup::start(&root, &[]);
    let failed = sup.wait_ps("web failed for its port", |rows| {
        row(rows, "web")["state"] == "failed"
    });
    let message = row(&failed, "web")["message"].to_string();
    assert!(message.contains(&format!("port {port}")), "{message}");
    assert!(root.starts("web").is_empty(), "the command never ran");
    // Still held: asked to start, it fails again, and says so.
    let (ok, _, err) = sup.act("start", "web");
    assert!(ok, "{err}");
    sup.wait_ps("web failed twice", |rows| {
        row(rows, "web")["state"] == "failed" && row(rows, "web")["port_failures"] == 2
    });
    drop(holder);
    let (ok, _, err) = sup.act("start", "web");
    assert!(ok, "{err}");
    let ready = sup.wait_ready(&["web"]);
    assert_eq!(row(&ready, "web")["port"], port);
    assert_eq!(root.starts("web").len(), 1);
}

/// A launcher whose service, given a range of two ports, waits for a `go`
/// file before it binds; with the range's first port and the one it got.
fn waiting_in_two_ports(hub: &HubProc) -> (Launcher, u16, u16) {
    let base = free_ports(2);
    let range = format!("{base}-{}", base + 1);
    let launcher = Launcher::start(
        &hub.addr(),
        "web@1.0.0",
        &["--range", &range],
        &["--wait-for", "{dir}/go"],
    );
    let first = launcher.wait_starts(1)[0].clone();
    let port: u16 = first["env_port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    (launcher, base, port)
}

/// A connection whose own port is `port` on `ip`, to a listener of its
/// own: it holds the port without listening on it.
fn connection_from(ip: [u8; 4], port: u16) -> (socket2::Socket, TcpListener) {
    let server = TcpListener::bind(std::net::SocketAddr::from((ip, 0))).expect("a listener");
    let connection =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    connection
        .bind(&std::net::SocketAddr::from((ip, port)).into())
        .expect("bind the port as a connection's own");
    connection
        .connect(&server.local_addr().expect("its address").into())
        .expect("connect");
    (connection, server)
}

/// Lets the service of [`waiting_in_two_ports`] bind: it cannot bind
/// `port`, and is registered on the range's other port. Returns that port
/// and the launcher's log.
fn go_and_see_it_move(launcher: &Launcher, rows: &Rows, base: u16, port: u16) -> (u16, String) {
    std::fs::write(launcher.path("go"), "").expect("go");
    let row = rows.next();
    assert_eq!(row[0], "register", "{row}");
    let other = if port == base { base + 1 } else { base };
    assert_eq!(row[2]["port"], other, "{row}");
    (other, launcher.stderr())
}
