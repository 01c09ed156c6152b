//! Hubs over etcd in the hard cases: services restarted on their ports,
//! records moving between connections and hubs, a watch broken while it
//! catches up, churn and large records while etcd is away, connections that
//! leave while their lease is granted, hubs cut off from etcd past their
//! leases' TTL, the default heartbeat's idle connection, and rows in the
//! store that no hub wrote. Each test states what must hold: no live
//! record lost or briefly freed, no dead one kept, no port held twice, no
//! write stuck.
//!
//! etcd is reached directly or through a TCP proxy (`cluster::Proxy`) that
//! can cut the hub off from it.

use crate::cluster::{Mode, Proxy};
use crate::harness::{HubProc, Raw, Rows, free_port, refused, wait_until};
use crate::store::{
    HEARTBEAT_MS, PREFIX, claim, connection, etcd_single, held, hub_over, hub_with_admin,
    ids_in_etcd, ids_of, lease_count, next_reject, port_of, raw_client, register_row, set,
    value_in_etcd,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// `seaport listen PORT --host 127.0.0.1 --store STORE` with 200 ms beats.
fn hub_on(port: u16, store: &str) -> HubProc {
    HubProc::start_on(port, &["--heartbeat", HEARTBEAT_MS, "--store", store])
}

/// A hub whose etcd is reached through `proxy`.
fn hub_behind(proxy: &Proxy) -> HubProc {
    hub_on(0, &format!("etcd://{}", proxy.addr()))
}

/// A hub behind `proxy` with a 5 s timeout: leases that outlive a short
/// cut, and a write that waits for its port long enough for a test to act
/// meanwhile.
fn patient_hub_behind(proxy: &Proxy) -> HubProc {
    let store = format!("etcd://{}", proxy.addr());
    HubProc::start_on(
        0,
        &[
            "--heartbeat",
            HEARTBEAT_MS,
            "--timeout",
            "5000",
            "--store",
            &store,
        ],
    )
}

/// Runs `check` every 100 ms for 2.5 s (longer than two of a hub's tries
/// of a write): what must stay true, not only become true.
fn holds_a_while(check: impl Fn()) {
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        check();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every `free` row `rows` gets within `window`.
fn frees_within(rows: &Rows, window: Duration) -> BTreeSet<String> {
    let end = Instant::now() + window;
    let mut freed = BTreeSet::new();
    while Instant::now() < end {
        if let Some(row) = rows.next_within(Duration::from_millis(100))
            && row[0] == "free"
        {
            freed.insert(row[1].as_str().unwrap_or_default().to_string());
        }
    }
    freed
}

#[test]
fn a_service_restarted_on_its_port_while_etcd_is_away_is_kept() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let old = raw_client(&a.addr(), "svc", "OLD", 40101);
    wait_until("etcd holds OLD", || ids_in_etcd(&etcd).contains("OLD"));
    etcd.kill(0).expect("kill etcd");
    // The service restarts: its old connection closes, and a new one
    // registers a new id on the same port.
    drop(old);
    wait_until("OLD is gone from the hub", || {
        ids_of(&a.addr(), "svc").is_empty()
    });
    let _new = raw_client(&a.addr(), "svc", "NEW", 40101);
    wait_until("NEW is on the hub", || {
        ids_of(&a.addr(), "svc") == set(&["NEW"])
    });
    etcd.restart(0).expect("restart etcd");
    wait_until("NEW, and only NEW, is in etcd", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("NEW") && !ids.contains("OLD")
    });
    assert_eq!(claim(&etcd, 40101), "NEW");
    assert_eq!(ids_of(&a.addr(), "svc"), set(&["NEW"]));
}

#[test]
fn a_client_restarted_on_another_hub_gets_its_port_once_the_dead_hubs_lease_is_gone() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let old = raw_client(&a.addr(), "svc", "OLD", 40111);
    wait_until("etcd holds OLD", || ids_in_etcd(&etcd).contains("OLD"));
    a.proc.signal(Signal::SIGKILL);
    drop(old);
    // A new record on the dead record's port waits for the dead hub's lease
    // to expire, and is not refused.
    let _new = raw_client(&b.addr(), "svc", "NEW", 40111);
    wait_until("NEW is in etcd and holds the port", || {
        ids_in_etcd(&etcd).contains("NEW") && claim(&etcd, 40111) == "NEW"
    });
    assert_eq!(ids_of(&b.addr(), "svc"), set(&["NEW"]));
    assert!(!ids_in_etcd(&etcd).contains("OLD"));
}

#[test]
fn a_hub_restarted_on_its_port_is_announced_again() {
    let etcd = etcd_single();
    let b = hub_over(&etcd);
    let port = free_port();
    let a = hub_on(port, &etcd.url());
    let a_id = |hub: &str| {
        held(hub)
            .into_iter()
            .find(|m| m["role"] == "seaport" && m["port"] == port)
            .and_then(|m| m["id"].as_str().map(String::from))
    };
    let mut first = None;
    wait_until("B knows A", || {
        first = a_id(&b.addr());
        first.is_some()
    });
    a.proc.signal(Signal::SIGKILL);
    drop(a);
    let _again = hub_on(port, &etcd.url());
    // The new hub's record is there, the dead one's is gone.
    wait_until(
        "B knows the restarted hub, and only it, on the port",
        || {
            let on_port: Vec<Value> = held(&b.addr())
                .into_iter()
                .filter(|m| m["role"] == "seaport" && m["port"] == port)
                .collect();
            on_port.len() == 1 && on_port[0]["id"].as_str() != first.as_deref()
        },
    );
}

#[test]
fn a_record_moving_back_never_frees_another_records_port() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    // R on A, port 40201.
    let mut first = raw_client(&a.addr(), "svc", "R", 40201);
    wait_until("claim 40201 is R", || claim(&etcd, 40201) == "R");
    // The same record on B (the client moved), then on 40202.
    let mut second = raw_client(&b.addr(), "svc", "R", 40201);
    let b_id = held(&b.addr())
        .into_iter()
        .find(|m| m["role"] == "seaport" && m["port"] == b.port)
        .and_then(|m| m["id"].as_str().map(String::from))
        .expect("B's id");
    wait_until("R is B's in etcd", || {
        etcd.etcdctl(&["get", &format!("{PREFIX}records/R"), "--print-value-only"])
            .unwrap_or_default()
            .contains(&b_id)
    });
    second.0.send(&register_row("R", "svc", 40202));
    wait_until("claim 40202 is R, 40201 free", || {
        claim(&etcd, 40202) == "R" && claim(&etcd, 40201).is_empty()
    });
    // Q takes 40201 on B; R's first client, still on A, moves R to 40203:
    // A must not release 40201, which is Q's now.
    let _q = raw_client(&b.addr(), "svc", "Q", 40201);
    wait_until("claim 40201 is Q", || claim(&etcd, 40201) == "Q");
    first.0.send(&register_row("R", "svc", 40203));
    wait_until("claim 40203 is R", || claim(&etcd, 40203) == "R");
    assert_eq!(claim(&etcd, 40201), "Q", "R's move released Q's claim");
    // Z takes 40201 on A: refused, once Q has had the time to go.
    let mut z = raw_client(&a.addr(), "svc", "Z", 40201);
    let reject = next_reject(&mut z);
    assert!(
        reject[3].as_str().is_some_and(|r| r.contains("taken")),
        "{reject}"
    );
    wait_until("A holds Q and not Z", || {
        let on_a = ids_of(&a.addr(), "svc");
        on_a.contains("Q") && !on_a.contains("Z")
    });
    assert_eq!(claim(&etcd, 40201), "Q");
}

#[test]
fn a_connection_that_leaves_while_its_lease_is_granted_leaves_no_lease() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let _settled = raw_client(&a.addr(), "svc", "SETTLED", 40300);
    wait_until("etcd holds SETTLED", || {
        ids_in_etcd(&etcd).contains("SETTLED")
    });
    let before = lease_count(&etcd);
    let pid = Pid::from_raw(i32::try_from(etcd.pid(0).expect("pid")).expect("a pid"));
    for n in 0..3u16 {
        // etcd paused: the grant for the connection's first record hangs
        // while the connection comes and goes.
        kill(pid, Signal::SIGSTOP).expect("stop etcd");
        let id = format!("X{n}");
        let gone = raw_client(&a.addr(), "svc", &id, 40301 + n);
        wait_until("the record is on the hub", || {
            ids_of(&a.addr(), "svc").contains(&id)
        });
        drop(gone);
        wait_until("it is gone from the hub", || {
            !ids_of(&a.addr(), "svc").contains(&id)
        });
        kill(pid, Signal::SIGCONT).expect("continue etcd");
        wait_until("etcd is back to the leases it had", || {
            lease_count(&etcd) == before
        });
    }
    assert!(
        !ids_in_etcd(&etcd).iter().any(|id| id.starts_with('X')),
        "a gone client's record is in etcd"
    );
}

#[test]
fn a_watch_broken_while_it_catches_up_misses_no_delete() {
    use etcd_client::{Client as EtcdClient, Txn, TxnOp};
    const N: usize = 3000;
    let etcd = etcd_single();
    let target = etcd.endpoints()[0].clone();
    let proxy = Proxy::start(&target);
    let a = hub_behind(&proxy);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt
        .block_on(EtcdClient::connect([format!("http://{target}")], None))
        .expect("connect etcd");
    // N records of another hub, written straight into etcd.
    let v = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    rt.block_on(async {
        let mut client = client.clone();
        let all: Vec<usize> = (0..N).collect();
        for chunk in all.chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|i| {
                    let row = format!(
                        r#"["register","F{i}",{{"role":"fake","version":"1.0.0","host":"10.9.0.1","port":{p},"id":"F{i}"}},{{"o":"FAKEHUB","v":{v}}}]"#,
                        p = i + 1
                    );
                    TxnOp::put(format!("{PREFIX}records/F{i}"), row, None)
                })
                .collect();
            client.txn(Txn::new().and_then(ops)).await.expect("txn");
        }
    });
    wait_until("A holds every record", || {
        ids_of(&a.addr(), "fake").len() == N
    });
    proxy.set(Mode::Refuse);
    wait_until("A's watch broke", || {
        a.proc.stderr().contains("cannot watch the store")
    });
    // Every record deleted, one revision each, while A cannot see.
    rt.block_on(async {
        let mut deleting = tokio::task::JoinSet::new();
        for w in 0..30 {
            let mut client = client.clone();
            deleting.spawn(async move {
                for i in (w..N).step_by(30) {
                    client
                        .delete(format!("{PREFIX}records/F{i}"), None)
                        .await
                        .expect("delete");
                }
            });
        }
        while deleting.join_next().await.is_some() {}
    });
    // A watches again, and is cut off again while etcd sends it the
    // backlog (1000 revisions every 100 ms), then comes back for good.
    let seen = a.proc.stderr().matches("watching the store again").count();
    proxy.set(Mode::Pass);
    wait_until("A watches again", || {
        a.proc.stderr().matches("watching the store again").count() > seen
    });
    // Into the backlog's delivery, which takes about 300 ms here: a fault
    // injected at a moment, not a wait for a condition.
    std::thread::sleep(Duration::from_millis(40));
    proxy.set(Mode::Refuse);
    proxy.set(Mode::Pass);
    wait_until("A holds none of the deleted records", || {
        ids_of(&a.addr(), "fake").is_empty()
    });
}

#[test]
fn churn_while_etcd_is_away_leaves_nothing_to_write() {
    use crate::admin::{get, sample};
    let mut etcd = etcd_single();
    let (hub, admin) = hub_with_admin(&etcd);
    wait_until("etcd holds the hub's record", || {
        ids_in_etcd(&etcd).len() == 1
    });
    etcd.kill(0).expect("kill etcd");
    for n in 0..300u16 {
        let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
        raw.send(&register_row(&format!("C{n}"), "churn", 41000 + n));
        // The reply to a ping comes after the register is applied.
        raw.send(r#"["ping","x"]"#);
        let _ = raw.row();
        raw.shutdown();
    }
    wait_until("every churned record is gone from the hub", || {
        ids_of(&hub.addr(), "churn").is_empty()
    });
    // At most one write, caught under way by etcd's going, is left.
    wait_until("next to nothing waits", || {
        let scrape = get(admin, "/metrics").body;
        sample(&scrape, "seaport_store_writes_waiting").is_some_and(|w| w <= 1.0)
    });
    etcd.restart(0).expect("restart etcd");
    wait_until("nothing waits", || {
        let scrape = get(admin, "/metrics").body;
        sample(&scrape, "seaport_store_writes_waiting") == Some(0.0)
    });
    assert_eq!(ids_in_etcd(&etcd).len(), 1, "a churned record is in etcd");
}

#[test]
fn an_old_hubs_late_delete_never_frees_a_record_that_moved() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    let a = hub_behind(&proxy);
    let b = hub_over(&etcd);
    let c = hub_over(&etcd);
    let (watcher, _) = Rows::connect(&c.addr());
    wait_until("every hub is in etcd", || ids_in_etcd(&etcd).len() == 3);
    proxy.set(Mode::Refuse);
    wait_until("A is cut off", || {
        a.proc.stderr().contains("cannot watch the store")
    });
    // The client registers on A, which cannot write it, goes, and
    // registers on B.
    let on_a = raw_client(&a.addr(), "svc", "R", 40401);
    wait_until("R is on A", || ids_of(&a.addr(), "svc").contains("R"));
    drop(on_a);
    wait_until("R is gone from A", || ids_of(&a.addr(), "svc").is_empty());
    let _on_b = raw_client(&b.addr(), "svc", "R", 40401);
    loop {
        let row = watcher.next();
        if row[0] == "register" && row[1] == "R" {
            break;
        }
    }
    proxy.set(Mode::Pass);
    wait_until("A watches again", || {
        a.proc.stderr().contains("watching the store again")
    });
    let freed = frees_within(&watcher, Duration::from_secs(2));
    assert!(!freed.contains("R"), "the live record R was freed on hub C");
    assert!(ids_in_etcd(&etcd).contains("R"));
}

#[test]
fn a_burst_of_large_records_while_etcd_is_away_is_written_after() {
    let mut etcd = etcd_single();
    let hub = hub_over(&etcd);
    wait_until("etcd holds the hub's record", || {
        ids_in_etcd(&etcd).len() == 1
    });
    etcd.kill(0).expect("kill etcd");
    // 60 records of 20 KB: more than one transaction can carry.
    let blob = "x".repeat(20_300);
    let rows: Vec<String> = (0..60u16)
        .map(|n| {
            format!(
                r#"["register","L{n}",{{"role":"large","host":"127.0.0.1","port":{p},"id":"L{n}","blob":"{blob}"}}]"#,
                p = 42000 + n
            )
        })
        .collect();
    let _client = connection(&hub.addr(), &rows);
    wait_until("the hub holds them", || {
        ids_of(&hub.addr(), "large").len() == 60
    });
    etcd.restart(0).expect("restart etcd");
    wait_until("etcd holds every one", || {
        ids_in_etcd(&etcd)
            .iter()
            .filter(|id| id.starts_with('L'))
            .count()
            == 60
    });
}

#[test]
fn a_record_too_large_for_etcd_is_refused_when_the_hub_starts() {
    let stderr = refused(&[
        "listen",
        "0",
        "--store",
        "etcd://127.0.0.1:2379",
        "--max-line",
        "4000000",
        "--max-record",
        "3000000",
    ]);
    assert!(
        stderr.contains("--max-record 3000000 is too large for --store"),
        "{stderr}"
    );
}

#[test]
fn records_moved_to_a_new_connection_outlive_the_old_ones_revocation() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let rows: Vec<String> = (0..150u16)
        .map(|n| register_row(&format!("M{n}"), "moved", 43000 + n))
        .collect();
    let old = connection(&a.addr(), &rows);
    wait_until("etcd holds the 150", || {
        ids_in_etcd(&etcd)
            .iter()
            .filter(|id| id.starts_with('M'))
            .count()
            == 150
    });
    let (watcher, _) = Rows::connect(&b.addr());
    etcd.kill(0).expect("kill etcd");
    // The client's new connection registers the same records, then its old
    // connection ends.
    let mut new = connection(&a.addr(), &rows);
    new.0.send(r#"["ping","moved"]"#);
    while new.0.row()[0] != "pong" {}
    drop(old);
    etcd.restart(0).expect("restart etcd");
    // The old connection's lease goes, and no live record with it: left are
    // each hub's own lease and the new connection's.
    wait_until("the old connection's lease is revoked", || {
        lease_count(&etcd) == 3
    });
    let freed = frees_within(&watcher, Duration::from_secs(1));
    assert!(
        freed.is_empty(),
        "{} live records were freed on B: {freed:?}",
        freed.len()
    );
    assert_eq!(ids_of(&b.addr(), "moved").len(), 150);
}

#[test]
fn a_hub_cut_off_from_etcd_past_its_ttl_writes_its_records_again() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    let a = hub_behind(&proxy);
    let b = hub_over(&etcd);
    let _one = raw_client(&a.addr(), "svc", "ONE", 40601);
    wait_until("B holds ONE", || ids_of(&b.addr(), "svc").contains("ONE"));
    proxy.set(Mode::Refuse);
    wait_until("ONE expired in etcd", || {
        !ids_in_etcd(&etcd).contains("ONE")
    });
    wait_until("B let ONE go", || ids_of(&b.addr(), "svc").is_empty());
    proxy.set(Mode::Pass);
    wait_until("ONE is back in etcd and on B", || {
        ids_in_etcd(&etcd).contains("ONE") && ids_of(&b.addr(), "svc").contains("ONE")
    });
}

#[test]
fn a_hub_with_the_default_heartbeat_keeps_its_connection_to_etcd() {
    let etcd = etcd_single();
    // Leases of 45 s, renewed every 15 s: the connection to etcd is idle
    // in between, and etcd closes one that pings more often than every 5 s.
    let hub = HubProc::start(&["--store", &etcd.url()]);
    let _one = raw_client(&hub.addr(), "svc", "ONE", 40701);
    wait_until("etcd holds ONE", || ids_in_etcd(&etcd).contains("ONE"));
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        let log = hub.proc.stderr();
        assert!(
            !log.contains("cannot watch the store") && !log.contains("cannot write to the store"),
            "the connection to etcd broke: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The claim on `127.0.0.1:PORT` set by hand, as a record of a dying
/// client would hold it.
fn hold_port(etcd: &crate::etcd::Etcd, port: u16, holder: &str) {
    etcd.etcdctl(&["put", &format!("{PREFIX}ports/127.0.0.1:{port}"), holder])
        .expect("put a claim");
}

#[test]
fn a_record_freed_while_its_put_finds_its_port_taken_is_never_written() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    hold_port(&etcd, 40901, "Y");
    // A connection with a lease already.
    let mut client = raw_client(&a.addr(), "svc", "S", 40900);
    wait_until("etcd holds S", || ids_in_etcd(&etcd).contains("S"));
    // etcd paused: R's put hangs, under way, while its client frees R.
    let pid = Pid::from_raw(i32::try_from(etcd.pid(0).expect("pid")).expect("a pid"));
    kill(pid, Signal::SIGSTOP).expect("stop etcd");
    client.0.send(&register_row("R", "svc", 40901));
    wait_until("the hub holds R", || ids_of(&a.addr(), "svc").contains("R"));
    client.0.send(r#"["free","R"]"#);
    wait_until("R is freed on the hub", || {
        !ids_of(&a.addr(), "svc").contains("R")
    });
    kill(pid, Signal::SIGCONT).expect("continue etcd");
    // The put comes back refused for its port; then Y goes. R must not be
    // written once the port is free: watch for longer than two retries.
    etcd.etcdctl(&["del", &format!("{PREFIX}ports/127.0.0.1:40901")])
        .expect("delete the claim");
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        assert!(!ids_in_etcd(&etcd).contains("R"), "R, freed, is in etcd");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_port_change_whose_write_timed_out_releases_the_old_port() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    // Leases of 6 s, which outlive the cut below.
    let a = HubProc::start(&[
        "--heartbeat",
        "2000",
        "--store",
        &format!("etcd://{}", proxy.addr()),
    ]);
    let mut client = raw_client(&a.addr(), "svc", "R", 41001);
    wait_until("claim 41001 is R", || claim(&etcd, 41001) == "R");
    // The move's write is lost in a silent partition and times out (2 s):
    // whether it landed is unknown.
    proxy.set(Mode::Blackhole);
    client.0.send(&register_row("R", "svc", 41002));
    wait_until("the write timed out", || {
        a.proc.stderr().contains("cannot write to the store")
    });
    proxy.set(Mode::Pass);
    wait_until("R holds 41002, and not 41001", || {
        claim(&etcd, 41002) == "R" && claim(&etcd, 41001).is_empty()
    });
}

/// CPU time (user and system, in clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn a_writer_with_nothing_left_to_try_again_rests() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let mut client = raw_client(&a.addr(), "svc", "S", 41100);
    wait_until("etcd holds S", || ids_in_etcd(&etcd).contains("S"));
    etcd.kill(0).expect("kill etcd");
    // R's write fails, and R is freed while the writer waits to try again.
    client.0.send(&register_row("R", "svc", 41101));
    wait_until("the write failed", || {
        a.proc.stderr().contains("cannot write to the store")
    });
    client.0.send(r#"["free","R"]"#);
    wait_until("R is freed on the hub", || {
        !ids_of(&a.addr(), "svc").contains("R")
    });
    // Past the longest wait before a retry (2 s): nothing to do, no CPU.
    std::thread::sleep(Duration::from_millis(2500));
    let before = cpu_ticks(a.proc.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(a.proc.pid()) - before;
    assert!(used < 40, "the idle hub used {used} ticks of CPU in 2 s");
}

#[test]
fn a_move_waiting_for_its_port_outlives_the_old_connections_revocation() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    hold_port(&etcd, 41202, "Y");
    let old = raw_client(&a.addr(), "svc", "R", 41201);
    wait_until("B holds R", || ids_of(&b.addr(), "svc").contains("R"));
    let (watcher, _) = Rows::connect(&b.addr());
    // The service's new connection registers R on its new port, still
    // held; then its old connection ends.
    let _new = raw_client(&a.addr(), "svc", "R", 41202);
    wait_until("A waits for the port", || {
        a.proc.stderr().contains("trying again")
    });
    drop(old);
    // Within the wait (3 s), R is not freed anywhere.
    let freed = frees_within(&watcher, Duration::from_millis(1500));
    assert!(!freed.contains("R"), "live R was freed on B");
}

/// Puts `value` under record key `key` by hand, as another program or an
/// operator could.
fn put_record_key(etcd: &crate::etcd::Etcd, key: &str, value: &str) {
    etcd.etcdctl(&["put", &format!("{PREFIX}records/{key}"), value])
        .expect("put a key");
}

/// Rows under the records' prefix that no hub wrote: one that is not
/// JSON, one without a version, and one whose row is of another record
/// than its key names (its delete would free the key's record, and the
/// row's would stay on every hub). Each is skipped with a warning that
/// names it, whether the hub lists it at its start or sees it on its
/// watch, and the hub goes on serving and writing the others.
#[test]
fn rows_in_the_store_that_are_not_records_are_skipped_with_a_warning() {
    let etcd = etcd_single();
    let bad_rows = |n: u32| {
        let meta = |id: &str| {
            format!(
                r#"{{"role":"bad","version":"1.0.0","host":"127.0.0.1","port":{},"id":"{id}"}}"#,
                41000 + n
            )
        };
        put_record_key(&etcd, &format!("G{n}"), "not a row");
        put_record_key(
            &etcd,
            &format!("N{n}"),
            &format!(r#"["register","N{n}",{}]"#, meta(&format!("N{n}"))),
        );
        put_record_key(
            &etcd,
            &format!("A{n}"),
            &format!(
                r#"["register","B{n}",{},{{"o":"elsewhere","v":{}}}]"#,
                meta(&format!("B{n}")),
                n + 1
            ),
        );
    };
    // Listed at the start.
    bad_rows(1);
    let hub = hub_over(&etcd);
    let _good = raw_client(&hub.addr(), "svc", "S1", 41010);
    wait_until("the hub holds S1", || {
        ids_of(&hub.addr(), "svc").contains("S1")
    });
    // Seen on the watch.
    bad_rows(2);
    let _later = raw_client(&hub.addr(), "svc", "S2", 41011);
    wait_until("etcd holds S1 and S2", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("S1") && ids.contains("S2")
    });
    wait_until("the hub warned of all six rows", || {
        let log = hub.proc.stderr();
        [1, 2].iter().all(|n| {
            log.lines()
                .any(|l| l.contains(&format!("G{n}")) && l.contains("not a register row"))
                && log
                    .lines()
                    .any(|l| l.contains(&format!("N{n}")) && l.contains("without a version"))
                && log.lines().any(|l| {
                    l.contains(&format!("A{n}"))
                        && l.contains(&format!("B{n}"))
                        && l.contains("another record")
                })
        })
    });
    assert_eq!(
        ids_of(&hub.addr(), "svc"),
        set(&["S1", "S2"]),
        "the hub's own records"
    );
    assert_eq!(
        ids_of(&hub.addr(), "bad"),
        BTreeSet::new(),
        "no row that is not a record is applied"
    );
}

/// etcd started afresh at the same address (its data lost, or restored
/// from an older backup) counts its revisions from the start again. A hub
/// whose watch went on from the last revision it had seen would miss every
/// change until the new revisions caught up with it; it lists the store
/// again instead, and its records are written again.
#[test]
fn a_hub_lists_a_store_started_afresh_again() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let _x = raw_client(&a.addr(), "svc", "X", 41300);
    wait_until("b holds X", || ids_of(&b.addr(), "svc").contains("X"));
    // Revisions well past the few the fresh store reaches below.
    for i in 0..60 {
        etcd.etcdctl(&["put", "/elsewhere/k", &i.to_string()])
            .expect("put a key outside the prefix");
    }
    // Written after them: once b has it, b has read past them.
    let _w = raw_client(&a.addr(), "svc", "W", 41301);
    wait_until("b holds W", || ids_of(&b.addr(), "svc").contains("W"));
    etcd.stop(0).expect("stop etcd");
    std::fs::remove_dir_all(etcd.dir().join("m0").join("data")).expect("remove etcd's data");
    etcd.restart(0).expect("start etcd afresh");
    let _y = raw_client(&a.addr(), "svc", "Y", 41302);
    wait_until(
        "b holds Y, registered on a after the store started afresh",
        || ids_of(&b.addr(), "svc").contains("Y"),
    );
    wait_until("the fresh store has every live record", || {
        let ids = ids_in_etcd(&etcd);
        ["X", "W", "Y"].iter().all(|id| ids.contains(*id))
    });
    assert_eq!(ids_of(&b.addr(), "svc"), set(&["X", "W", "Y"]));
    assert!(
        b.proc.stderr().contains("listing again"),
        "b says why it lists the store again"
    );
}

/// The port of record `id` in etcd, if etcd has it.
fn port_in_etcd(etcd: &crate::etcd::Etcd, id: &str) -> Option<u64> {
    let row: Value =
        serde_json::from_str(&value_in_etcd(etcd, &format!("{PREFIX}records/{id}"))).ok()?;
    row[2]["port"].as_u64()
}

/// A hub cut off from etcd holds a change of record X that it could not
/// write. Meanwhile X's client registers it again through another hub, which
/// writes it. When the first hub reaches etcd again, its old change must not
/// overwrite the newer record, whether its writer or its watch comes back
/// first. Otherwise the record would sit on the first hub's lease, and a
/// free through the second hub, which deletes only what is on its own lease,
/// would leave it on every hub.
#[test]
fn a_hub_back_from_a_cut_never_overwrites_a_record_written_meanwhile() {
    let etcd = etcd_single();
    let (to_a, to_b) = (
        Proxy::start(&etcd.endpoints()[0]),
        Proxy::start(&etcd.endpoints()[0]),
    );
    // Leases that outlive the cuts.
    let long = |store: &str| {
        HubProc::start(&[
            "--heartbeat",
            HEARTBEAT_MS,
            "--timeout",
            "30000",
            "--store",
            store,
        ])
    };
    let a = long(&format!("etcd://{}", to_a.addr()));
    let b = long(&format!("etcd://{}", to_b.addr()));
    let watcher = hub_over(&etcd);
    let mut on_a = raw_client(&a.addr(), "svc", "X", 41400);
    wait_until("the watching hub holds X", || {
        port_of(&watcher.addr(), "X") == Some(41400)
    });
    // A cut off: X's change to 41401 waits on A.
    to_a.set(Mode::Refuse);
    on_a.0.send(&register_row("X", "svc", 41401));
    wait_until("A holds X's change", || {
        port_of(&a.addr(), "X") == Some(41401)
    });
    std::thread::sleep(Duration::from_millis(20));
    // X again through B, at a later version.
    let mut on_b = raw_client(&b.addr(), "svc", "X", 41402);
    wait_until("etcd has X from B", || {
        port_in_etcd(&etcd, "X") == Some(41402)
    });
    wait_until("the watching hub has X from B", || {
        port_of(&watcher.addr(), "X") == Some(41402)
    });
    // B cut off, then A back: A's old change meets B's record.
    to_b.set(Mode::Refuse);
    to_a.set(Mode::Pass);
    wait_until("A has X from B", || port_of(&a.addr(), "X") == Some(41402));
    // Both of A's retries (at most 2 s apart) have had their turn.
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        assert_eq!(
            port_in_etcd(&etcd, "X"),
            Some(41402),
            "A's old change overwrote X in etcd"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // X freed through B: gone everywhere.
    on_b.0.send(r#"["free","X"]"#);
    to_b.set(Mode::Pass);
    wait_until("X is gone from etcd and every hub", || {
        port_in_etcd(&etcd, "X").is_none()
            && [&a, &b, &watcher]
                .iter()
                .all(|hub| port_of(&hub.addr(), "X").is_none())
    });
}

/// A hub cut off from etcd past its leases' TTL finds its record gone from
/// the store when it comes back; its client, still connected, has done
/// nothing since. Meanwhile the record was registered again through another
/// hub, as by a client that moved there. The other hub's record, the newer,
/// stays: the first hub reads what the store has under a dropped record
/// before writing it again, instead of stamping its old version anew.
#[test]
fn a_record_registered_elsewhere_while_its_lease_was_lost_stays_there() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    let a = hub_behind(&proxy);
    let b = hub_over(&etcd);
    let _on_a = raw_client(&a.addr(), "svc", "X", 41500);
    wait_until("B holds X from A", || {
        port_of(&b.addr(), "X") == Some(41500)
    });
    proxy.set(Mode::Refuse);
    wait_until("X expired in etcd", || port_in_etcd(&etcd, "X").is_none());
    wait_until("B let X go", || port_of(&b.addr(), "X").is_none());
    let _on_b = raw_client(&b.addr(), "svc", "X", 41501);
    wait_until("etcd has X from B", || {
        port_in_etcd(&etcd, "X") == Some(41501)
    });
    proxy.set(Mode::Pass);
    wait_until("A has X from B", || port_of(&a.addr(), "X") == Some(41501));
    // Long enough for A's lease keeper and watch both to have come back.
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        assert_eq!(
            port_in_etcd(&etcd, "X"),
            Some(41501),
            "A took X back in etcd"
        );
        assert_eq!(port_of(&b.addr(), "X"), Some(41501), "B lost X");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A hub writes a record again after its lease was lost, but the record's
/// port is held in the store, so the write waits. Meanwhile the record's
/// client registers it through another hub, whose write, delayed by its
/// own cut, lands only then: a version newer than the one the first hub
/// had, but older than the one it gave the record to write it again. The
/// first hub's write must then yield to that version, not go over it.
#[test]
fn a_record_written_again_yields_to_a_newer_version_written_meanwhile() {
    let etcd = etcd_single();
    let (proxy_a, proxy_b) = (
        Proxy::start(&etcd.endpoints()[0]),
        Proxy::start(&etcd.endpoints()[0]),
    );
    // A timeout long enough that A's write waits for the port (up to the
    // timeout and a second) until B is back and has written.
    let a = patient_hub_behind(&proxy_a);
    let b = patient_hub_behind(&proxy_b);
    let _on_a = raw_client(&a.addr(), "svc", "X", 41600);
    wait_until("etcd has X from A", || {
        port_in_etcd(&etcd, "X") == Some(41600)
    });
    proxy_a.set(Mode::Refuse);
    wait_until("X expired in etcd", || port_in_etcd(&etcd, "X").is_none());
    wait_until("B let X go", || port_of(&b.addr(), "X").is_none());
    // Another record holds X's port on A.
    hold_port(&etcd, 41600, "Y");
    // X's client registers it through B while B cannot reach etcd.
    proxy_b.set(Mode::Refuse);
    let _on_b = raw_client(&b.addr(), "svc", "X", 41601);
    wait_until("B holds X from its client", || {
        port_of(&b.addr(), "X") == Some(41601)
    });
    // A comes back: its write of X again waits for the port.
    proxy_a.set(Mode::Pass);
    wait_until("A's write of X waits for its port", || {
        a.proc
            .stderr()
            .contains("is held in the store; trying again")
    });
    // B's write lands; then the port is free for A.
    proxy_b.set(Mode::Pass);
    wait_until("etcd has X from B", || {
        port_in_etcd(&etcd, "X") == Some(41601)
    });
    etcd.etcdctl(&["del", &format!("{PREFIX}ports/127.0.0.1:41600")])
        .expect("delete the claim");
    wait_until("A has X from B", || port_of(&a.addr(), "X") == Some(41601));
    holds_a_while(|| {
        assert_eq!(
            port_in_etcd(&etcd, "X"),
            Some(41601),
            "A wrote its version over B's"
        );
        assert_eq!(port_of(&a.addr(), "X"), Some(41601), "A holds its version");
        assert_eq!(port_of(&b.addr(), "X"), Some(41601), "B lost X");
    });
    assert_eq!(claim(&etcd, 41600), "", "A claimed the port it left");
}

/// The same race the other way round: the hub that lost its lease writes the
/// record again first, and the other hub, cut off when the record's client
/// registered it there, comes back after. Its client's version is newer than
/// the one the first hub had, so it stays, on both hubs.
#[test]
fn a_record_written_again_first_yields_to_a_newer_version_written_after() {
    let etcd = etcd_single();
    let (proxy_a, proxy_b) = (
        Proxy::start(&etcd.endpoints()[0]),
        Proxy::start(&etcd.endpoints()[0]),
    );
    let a = hub_behind(&proxy_a);
    let b = hub_behind(&proxy_b);
    let _on_a = raw_client(&a.addr(), "svc", "X", 41610);
    wait_until("etcd has X from A", || {
        port_in_etcd(&etcd, "X") == Some(41610)
    });
    proxy_a.set(Mode::Refuse);
    wait_until("X expired in etcd", || port_in_etcd(&etcd, "X").is_none());
    wait_until("B let X go", || port_of(&b.addr(), "X").is_none());
    // X's client registers it through B while B cannot reach etcd.
    proxy_b.set(Mode::Refuse);
    let _on_b = raw_client(&b.addr(), "svc", "X", 41611);
    wait_until("B holds X from its client", || {
        port_of(&b.addr(), "X") == Some(41611)
    });
    // A comes back and writes its version again; then B comes back.
    proxy_a.set(Mode::Pass);
    wait_until("etcd has X from A again", || {
        port_in_etcd(&etcd, "X") == Some(41610)
    });
    proxy_b.set(Mode::Pass);
    wait_until("etcd has X from B", || {
        port_in_etcd(&etcd, "X") == Some(41611)
    });
    wait_until("A has X from B", || port_of(&a.addr(), "X") == Some(41611));
    holds_a_while(|| {
        assert_eq!(port_in_etcd(&etcd, "X"), Some(41611), "etcd lost B's X");
        assert_eq!(port_of(&a.addr(), "X"), Some(41611), "A holds its version");
        assert_eq!(port_of(&b.addr(), "X"), Some(41611), "B took A's old X");
    });
}

/// Three hubs: X's client moves from A to B, then to C, while each is cut
/// off from etcd in turn. A comes back first and writes its version again,
/// then C, then B. The client's last registration, through C, is the
/// record on every hub, although B, coming back last, restamps its older
/// one.
#[test]
fn a_client_that_moved_twice_keeps_its_last_registration() {
    let etcd = etcd_single();
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&etcd.endpoints()[0])).collect();
    let hubs: Vec<HubProc> = proxies.iter().map(hub_behind).collect();
    let (a, b, c) = (&hubs[0], &hubs[1], &hubs[2]);
    let _on_a = raw_client(&a.addr(), "svc", "X", 41620);
    wait_until("etcd has X from A", || {
        port_in_etcd(&etcd, "X") == Some(41620)
    });
    proxies[0].set(Mode::Refuse);
    wait_until("X expired in etcd", || port_in_etcd(&etcd, "X").is_none());
    wait_until("B and C let X go", || {
        port_of(&b.addr(), "X").is_none() && port_of(&c.addr(), "X").is_none()
    });
    // The client registers X through B, then through C, each cut off.
    proxies[1].set(Mode::Refuse);
    let _on_b = raw_client(&b.addr(), "svc", "X", 41621);
    wait_until("B holds X", || port_of(&b.addr(), "X") == Some(41621));
    proxies[2].set(Mode::Refuse);
    let _on_c = raw_client(&c.addr(), "svc", "X", 41622);
    wait_until("C holds X", || port_of(&c.addr(), "X") == Some(41622));
    // A, then C, then B come back.
    proxies[0].set(Mode::Pass);
    wait_until("etcd has X from A again", || {
        port_in_etcd(&etcd, "X") == Some(41620)
    });
    proxies[2].set(Mode::Pass);
    wait_until("etcd has X from C", || {
        port_in_etcd(&etcd, "X") == Some(41622)
    });
    proxies[1].set(Mode::Pass);
    wait_until("every hub has X from C", || {
        port_in_etcd(&etcd, "X") == Some(41622)
            && hubs
                .iter()
                .all(|hub| port_of(&hub.addr(), "X") == Some(41622))
    });
    holds_a_while(|| {
        assert_eq!(port_in_etcd(&etcd, "X"), Some(41622), "etcd lost C's X");
        for hub in &hubs {
            assert_eq!(port_of(&hub.addr(), "X"), Some(41622), "a hub lost C's X");
        }
    });
}

/// A third hub's copy of a record, written again after the store dropped
/// it: a fresh stamp, but the version its client registered is older than
/// the one this hub's client registered. This hub's own write of the record
/// again finds that copy in the store and must write over it, not yield to
/// it: the client's latest registration is this hub's.
#[test]
fn a_record_written_again_writes_over_an_older_registration_written_again_elsewhere() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    let a = patient_hub_behind(&proxy);
    let _client = raw_client(&a.addr(), "svc", "X", 41630);
    wait_until("etcd has X from A", || {
        port_in_etcd(&etcd, "X") == Some(41630)
    });
    let row: Value = serde_json::from_str(&value_in_etcd(&etcd, &format!("{PREFIX}records/X")))
        .expect("X's row in etcd");
    let registered = row[3]["v"].as_u64().expect("X's version in etcd");
    proxy.set(Mode::Refuse);
    wait_until("X expired in etcd", || port_in_etcd(&etcd, "X").is_none());
    // A's write of X again waits for its port.
    hold_port(&etcd, 41630, "Y");
    proxy.set(Mode::Pass);
    wait_until("A's write of X waits for its port", || {
        a.proc
            .stderr()
            .contains("is held in the store; trying again")
    });
    // Hub C writes its copy of X again: stamped after A's client registered
    // X, but of a registration before it.
    let theirs = format!(
        r#"["register","X",{{"role":"svc","version":"1.0.0","host":"127.0.0.1","port":41631,"id":"X"}},{{"o":"C","v":{},"wo":"C","wv":{}}}]"#,
        registered + 1,
        registered - 1000
    );
    put_record_key(&etcd, "X", &theirs);
    etcd.etcdctl(&["del", &format!("{PREFIX}ports/127.0.0.1:41630")])
        .expect("delete the claim");
    wait_until("etcd has X from A again", || {
        port_in_etcd(&etcd, "X") == Some(41630)
    });
    holds_a_while(|| {
        assert_eq!(port_in_etcd(&etcd, "X"), Some(41630), "etcd has C's old X");
        assert_eq!(port_of(&a.addr(), "X"), Some(41630), "A took C's old X");
    });
}

/// A free that waits while the hub is cut off from etcd, of a record whose
/// key someone else deleted meanwhile (an operator, or a free through
/// another hub): the record's port claim, still on the hub's lease, goes
/// with the free. Otherwise it would hold the port for as long as the
/// client stays connected, and every other record on that port would be
/// refused.
#[test]
fn a_free_releases_the_port_claim_of_a_record_whose_key_is_gone() {
    let etcd = etcd_single();
    let proxy = Proxy::start(&etcd.endpoints()[0]);
    let a = patient_hub_behind(&proxy);
    let mut client = raw_client(&a.addr(), "svc", "X", 41640);
    wait_until("etcd has X and its claim", || {
        port_in_etcd(&etcd, "X") == Some(41640) && claim(&etcd, 41640) == "X"
    });
    proxy.set(Mode::Refuse);
    client.0.send(r#"["free","X"]"#);
    wait_until("A freed X", || port_of(&a.addr(), "X").is_none());
    etcd.etcdctl(&["del", &format!("{PREFIX}records/X")])
        .expect("delete X's key");
    proxy.set(Mode::Pass);
    wait_until("X's claim is released", || claim(&etcd, 41640).is_empty());
    // The port is free for another record, through the same hub.
    let _other = raw_client(&a.addr(), "svc", "Y", 41640);
    wait_until("etcd has Y on the port", || {
        port_in_etcd(&etcd, "Y") == Some(41640) && claim(&etcd, 41640) == "Y"
    });
    drop(client);
}
