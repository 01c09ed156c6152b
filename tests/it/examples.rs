//! The example `services.d` as a new user runs it (`seaport supervise
//! services.d`, from the checkout): every service ready, the api healthy on a
//! socket the supervisor holds, and a restart of the api under load refuses no
//! connection.

use crate::harness::{Proc, seaport, wait_until};
use crate::supervisor::{Sup, row};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// GET / on `port`; the whole answer, or why not.
fn get(port: u16) -> std::io::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: example\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn the_example_services_run_healthy_and_the_api_restarts_without_refusing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let services = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("services.d");
    let ctl = dir.path().join("ctl.sock").to_string_lossy().into_owned();
    let services = services.to_string_lossy().into_owned();
    let cmd = seaport(&[
        "supervise",
        &services,
        "--listen",
        "0",
        "--listen-host",
        "127.0.0.1",
        "--control",
        &ctl,
    ]);
    let proc = Proc::spawn_logging_to(
        "seaport supervise services.d",
        cmd,
        &dir.path().join("stderr"),
    );
    let first = proc.line();
    let port = first
        .strip_prefix("seaport listening on :")
        .expect("the hub's port first");
    let sup = Sup {
        proc,
        hub: format!("127.0.0.1:{port}"),
        ctl,
    };
    let ready = sup.wait_ps("every example service ready and the api healthy", |rows| {
        ["api.1", "api.2", "web"].iter().all(|n| {
            rows.iter()
                .any(|r| r["name"] == *n && r["state"] == "ready")
        }) && ["api.1", "api.2"]
            .iter()
            .all(|n| row(rows, n)["health"] == "healthy")
    });
    let api = u16::try_from(row(&ready, "api.1")["port"].as_u64().expect("port")).expect("port");
    let web = u16::try_from(row(&ready, "web")["port"].as_u64().expect("port")).expect("port");
    let answer = get(api).expect("the api answers");
    assert!(answer.contains("\"service\":\"api\""), "{answer}");
    assert!(get(web).expect("web answers").starts_with("HTTP/1.0 200"));

    // Restart the api while a client asks it again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let (refused, served) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, refused, served) = (stop.clone(), refused.clone(), served.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(api) {
                    Ok(answer) if answer.contains("\"service\":\"api\"") => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        })
    };
    wait_until("the api serves the client", || {
        served.load(Ordering::Relaxed) > 20
    });
    let (ok, _, err) = sup.act("restart", "api");
    assert!(ok, "{err}");
    sup.wait_ps("both api instances replaced", |rows| {
        ["api.1", "api.2"].iter().all(|n| {
            let r = row(rows, n);
            r["state"] == "ready" && r["pid"] != row(&ready, n)["pid"]
        })
    });
    let before = served.load(Ordering::Relaxed);
    wait_until("served after the restart", || {
        served.load(Ordering::Relaxed) > before + 20
    });
    stop.store(true, Ordering::Relaxed);
    client.join().expect("the client");
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "failed requests during the restart ({} served)",
        served.load(Ordering::Relaxed)
    );
}
